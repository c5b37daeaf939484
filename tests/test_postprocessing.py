"""make tune-postprocessing: both methods' settings searched on one split with the same budget, today's settings
tried first, and the choice written into the config file in place of its blocks, the rest of the file kept."""

import numpy as np
import pytest
import yaml
from helpers import WIDE, WIDE_PARTICLES, contrast_hologram, scene_dict, split_store, truth_table

from holopipe.core.config import load_config, with_overrides
from holopipe.detect.baseline import detections_file
from holopipe.evaluation.postprocessing import BEGIN, END, SEARCH_SPACES, tune_postprocessing, write_settings
from holopipe.run.cli import main


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A split of two holograms on a non-square frame (dx != dy), and detections of it to merge."""
    folder = tmp_path_factory.mktemp("postprocessing")
    hologram = contrast_hologram(WIDE_PARTICLES, WIDE)
    truth = truth_table(WIDE_PARTICLES, 1)
    store = split_store(folder / "valid.zarr", [hologram, np.ones_like(hologram)], WIDE, truth)
    config = load_config(scene_dict(WIDE))
    detections = detections_file(config, store, folder / "detections.csv", progress=False)
    return config, store, detections


def test_both_methods_get_the_same_trials_and_start_from_todays_settings(scene):
    config, store, detections = scene
    result = tune_postprocessing(config, [[detections]], store, trials=3, seed=1)
    assert result["split"] == "valid" and result["n_true"] == 2 and result["trials"] == 3
    for section in ("particles", "baseline"):
        found = result[section]
        assert set(found["settings"]) == set(SEARCH_SPACES[section])
        assert 0 <= found["f1_before"] <= found["f1"] <= 1, "the best of trials that include today's settings"
    assert result["particles"]["f1_before"] == 1.0 and result["baseline"]["f1_before"] == 1.0


def test_the_particles_stage_is_scored_on_counts_pooled_over_the_trained_models(scene, tmp_path):
    """Two models' detections of the split, one finding both droplets and one finding nothing: F1 of the pooled
    counts (2 found of 4, no false one: 2/3), not the mean of the two F1s (1/2)."""
    config, store, detections = scene
    nothing = tmp_path / "nothing.csv"
    nothing.write_text(detections.read_text().splitlines()[0] + "\n")
    result = tune_postprocessing(config, [[detections], [nothing]], store, trials=1)
    assert result["runs"] == 2 and result["particles"]["f1_before"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("diameter_m", [None, 2.0e-5])
def test_a_setting_that_null_switches_off_is_tried_as_it_stands_and_chosen_as_a_value_or_null(scene, diameter_m):
    """contrast_diameter: null (fixed thresholds) or a diameter; the first trial is today's either way, and one
    trial's choice is exactly it (the Optuna on/off parameter beside it never reaches the settings)."""
    config, store, detections = scene
    config = with_overrides(config, {"particles.contrast_diameter": diameter_m,
                                     "baseline.contrast_diameter": diameter_m})
    result = tune_postprocessing(config, [[detections]], store, trials=1)
    for section in ("particles", "baseline"):
        assert result[section]["settings"]["contrast_diameter"] == diameter_m
        assert set(result[section]["settings"]) == set(SEARCH_SPACES[section])


def test_a_split_without_truth_is_refused_by_name(tmp_path, scene):
    config, _, detections = scene
    empty = split_store(tmp_path / "mine.zarr", [np.ones((WIDE.ny, WIDE.nx), np.float32)], WIDE)
    with pytest.raises(ValueError, match="mine.zarr: no true particles"):
        tune_postprocessing(config, [[detections]], empty, trials=1)


CONFIG_TEXT = """# A user's config.
splits:
  train: {source: simulate, n_holograms: 2, seed: 1}  # kept as written

particles:
  refine_margin: 1.2e-2  # not searched: kept
  distance: 5.0e-5

optics: {wavelength: 3.55e-7, dx: 2.96e-6, dy: 3.6e-6, nx: 176, ny: 112, z_min: 2.0e-3, z_max: 1.0e-2}
"""


def chosen(distance):
    return {"split": "valid", "n_holograms": 2, "n_true": 9, "trials": 5,
            "particles": {"settings": {"distance": distance, "min_planes": 2}, "f1": 0.9, "f1_before": 0.8},
            "baseline": {"settings": {"focus_metric": "min_amplitude", "min_voxels": 3}, "f1": 0.7, "f1_before": 0.6}}


def test_the_choice_replaces_the_blocks_and_keeps_the_rest_of_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_TEXT)
    write_settings(path, chosen(3.0e-5))
    text = path.read_text()
    assert text.startswith("# A user's config.\n") and "# kept as written" in text and text.count(BEGIN) == 1
    config = load_config(path)
    assert config["particles"]["distance"] == 3.0e-5 and config["particles"]["refine_margin"] == 1.2e-2
    assert config["particles"]["min_planes"] == 2 and config["baseline"]["focus_metric"] == "min_amplitude"
    assert config["optics"]["dy"] == 3.6e-6
    assert "F1 there: particles 0.800 -> 0.900, baseline 0.600 -> 0.700" in text
    write_settings(path, chosen(2.0e-5))  # again: one block, replaced
    again = path.read_text()
    assert again.count(BEGIN) == 1 and again.count(END) == 1 and again.count("particles:") == 1
    assert load_config(path)["particles"]["distance"] == 2.0e-5


def test_a_setting_switched_off_is_written_as_null(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_TEXT)
    result = chosen(3.0e-5)
    result["baseline"]["settings"]["contrast_diameter"] = 2.0e-5
    result["particles"]["settings"]["contrast_diameter"] = None
    write_settings(path, result)
    config = load_config(path)
    assert config["baseline"]["contrast_diameter"] == 2.0e-5 and config["particles"]["contrast_diameter"] is None
    assert "contrast_diameter: null" in path.read_text()


def test_a_value_the_schema_refuses_never_reaches_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_TEXT)
    with pytest.raises(ValueError, match="min_planes"):
        write_settings(path, chosen(3.0e-5) | {"particles": {"settings": {"min_planes": 0}, "f1": 1, "f1_before": 1}})
    assert path.read_text() == CONFIG_TEXT


def test_the_command_searches_and_writes(tmp_path, scene, capsys):
    config, store, detections = scene
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(scene_dict(WIDE)))
    main(["tune-postprocessing", "--config", str(path), "--detections", str(detections), "--detections",
          str(detections), "--store", str(store), "--trials", "2", "--write", str(path)])
    out = capsys.readouterr().out
    assert "particles: F1 on valid 1.000 -> 1.000" in out and f"written into {path}" in out
    text = path.read_text()
    assert BEGIN in text and "detections of 2 trained models" in text and load_config(path)["optics"]["dy"] == WIDE.dy
