"""benchmarks/trainings.py: several trainings' particle files of one split pooled, with per-run F1."""

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import REPO

from holopipe.core.config import load_config
from holopipe.evaluation.matching import SplitTruth

TRUTH = pd.DataFrame([(hid, x, 0.0, 20000.0, 20.0) for hid in (1, 2, 3) for x in (-600.0, -200.0, 200.0, 600.0)],
                     columns=["hid", "x", "y", "z", "d"])


def _found(path, rows):
    """A particle CSV at ``path`` of (hid, x) pairs placed on the truth's droplets, or off them with x + 5000."""
    pd.DataFrame([(hid, x, 0.0, 20000.0, 20.0, 0.9) for hid, x in rows],
                 columns=["hid", "x", "y", "z", "d", "prob"]).to_csv(path, index=False)
    return path


def test_runs_pool_their_counts_and_each_keeps_its_own_f1(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from trainings import trainings_table

    config = load_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    truth = SplitTruth(TRUTH, np.array([1, 2, 3]), 3, {}, 0, pd.DataFrame(columns=["x", "y", "z", "d"]))
    every = [(hid, x) for hid in (1, 2, 3) for x in (-600.0, -200.0, 200.0, 600.0)]
    run_a = _found(tmp_path / "a.csv", every)                              # 12 found
    run_b = _found(tmp_path / "b.csv", every[:9] + [(1, 5000.0)])          # 9 found, 1 false, 3 missed
    baseline = _found(tmp_path / "baseline.csv", every[:6] + [(2, 5000.0), (3, 5000.0)])  # 6, 2 false, 6 missed

    table = trainings_table(truth, [run_a, run_b], baseline, config)

    assert [(run["tp"], run["fp"], run["fn"]) for run in table["runs"]] == [(12, 0, 0), (9, 1, 3)]
    assert [run["f1"] for run in table["runs"]] == pytest.approx([1.0, 18 / 22])
    assert table["run_sd"] == pytest.approx(np.std([1.0, 18 / 22], ddof=1))
    assert table["methods"]["unet"]["f1"] == pytest.approx(2 * 21 / (2 * 21 + 1 + 3))  # pooled counts
    assert table["methods"]["baseline"]["f1"] == pytest.approx(12 / 20)
    difference = table["unet_minus_baseline"]
    assert difference["f1"] == pytest.approx(42 / 46 - 12 / 20)
    low, high = difference["f1_ci95"]
    assert low < difference["f1"] < high  # resampled over runs and holograms, which all differ


def test_a_missing_particle_file_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from trainings import main

    with pytest.raises(SystemExit):
        main(["--store", str(tmp_path / "test.zarr"), "--unet", str(tmp_path / "seed0.csv"),
              "--baseline", str(tmp_path / "baseline.csv")])
    assert f"{tmp_path / 'test.zarr'} does not exist" in capsys.readouterr().err
