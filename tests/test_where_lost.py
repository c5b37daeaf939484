"""benchmarks/where_lost.py: each missed droplet is put at the stage that lost it."""

import numpy as np
import pandas as pd
import yaml
from helpers import REPO

from holopipe.core.config import load_config, merged_config
from holopipe.detect.sweep import DETECTION_COLUMNS


def _detections(x, y, z_first, planes, contrast):
    """``planes`` detections of one droplet's column (µm), 100 µm apart in z, darkest at ``contrast``."""
    z = z_first + 100.0 * np.arange(planes)
    return pd.DataFrame({"hid": 1, "plane": np.arange(planes) + int(z_first // 100), "x": x, "y": y, "z": z,
                         "d": 20.0, "area": 30.0, "prob_max": 0.9, "prob_mean": 0.8, "logit_mean": 2.0,
                         "amplitude_min": 1.0 - contrast})[list(DETECTION_COLUMNS)]


def test_each_missed_droplet_gets_the_stage_that_lost_it(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from where_lost import where_lost

    config = load_config(merged_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), {
        "particles": {"min_planes": 2, "min_contrast": 0.2, "link_depth": 5.0e-4, "distance": 1.0e-5},
        "evaluate": {"tolerance_xy": 5.0e-5, "tolerance_z": 3.6e-4}}))
    truth = pd.DataFrame([
        (1, 0.0, 0.0, 20000.0, 30.0),       # found
        (1, 500.0, 500.0, 20000.0, 20.0),   # its particle 1 mm deep: depth
        (1, -500.0, 500.0, 20000.0, 20.0),  # behind the next one, whose particle it is: line of sight
        (1, -500.0, 500.0, 25000.0, 40.0),  # found
        (1, 500.0, -500.0, 20000.0, 10.0),  # a faint column: dropped by clustering (min_contrast)
        (1, 900.0, -500.0, 20000.0, 10.0),  # a single detection: dropped by clustering (min_planes)
        (1, -500.0, -500.0, 20000.0, 10.0),  # nothing there: no detection
        (1, 0.0, 800.0, 20000.0, 20.0),     # a column kept by clustering, no particle: after refinement
        (1, 0.0, -800.0, 20000.0, 20.0),    # its detections joined a column focused 60 µm away
    ], columns=["hid", "x", "y", "z", "d"])
    particles = pd.DataFrame([(1, 0.0, 0.0, 20000.0, 30.0, 0.9), (1, 500.0, 500.0, 21000.0, 20.0, 0.9),
                              (1, -500.0, 500.0, 25000.0, 40.0, 0.9)],
                             columns=["hid", "x", "y", "z", "d", "prob"])
    detections = pd.concat([_detections(500.0, -500.0, 19900.0, 3, 0.05), _detections(900.0, -500.0, 20000.0, 1, 0.5),
                            _detections(0.0, 800.0, 19900.0, 3, 0.5)]
                           # a column drifting from the droplet to 60 µm beside it, darkest there
                           + [_detections(0.0, -800.0 - 15.0 * k, 19900.0 + 100.0 * k, 1, 0.3 + 0.075 * k)
                              for k in range(5)], ignore_index=True)

    lost = where_lost(truth, particles, detections, config).set_index(["x", "y"])

    assert len(lost) == 7
    assert lost.loc[(500.0, 500.0), ["stage", "detail"]].tolist() == ["depth", "dz +1000"]
    assert lost.loc[(-500.0, 500.0), ["stage", "detail"]].tolist() == ["line of sight", "dz +5000"]
    assert lost.loc[(500.0, -500.0), ["stage", "detail"]].tolist() == ["clustering", "min_contrast (0.05)"]
    assert lost.loc[(900.0, -500.0), ["stage", "detail"]].tolist() == ["clustering", "min_planes (1)"]
    assert lost.loc[(-500.0, -500.0), "stage"] == "no detection"
    assert lost.loc[(0.0, 800.0), "stage"] == "after refinement"
    assert lost.loc[(0.0, -800.0), ["stage", "detail"]].tolist() == ["clustering", "joined a cluster focused elsewhere"]
