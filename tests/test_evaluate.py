"""Matching (Hungarian, per hologram, tolerances), detection metrics and the evaluation files."""

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from holopipe.config import load_config
from holopipe.evaluate import PLOT_NAMES, detection_metrics, evaluate_files, match
from holopipe.io import write_zarr

TOL_XY, TOL_Z = 50e-6, 360e-6  # metres, the defaults
BINS = [0.0, 20e-6, 40e-6, 100e-6]


def table(*rows):
    """Particles (hid, x, y, z, d in µm)."""
    return pd.DataFrame(rows, columns=["hid", "x", "y", "z", "d"]).astype({"hid": np.int64})


def test_exact_hit_matches_with_zero_error():
    truth = table((1, 10.0, -20.0, 5000.0, 30.0))
    pairs = match(truth, truth.copy(), TOL_XY, TOL_Z)
    assert len(pairs) == 1 and pairs.loc[0, "cost"] == 0.0
    assert pairs[["error_x", "error_y", "error_z", "error_d"]].to_numpy().tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_out_of_tolerance_in_z_alone_is_no_match_and_the_edge_is_a_match():
    truth = table((1, 0.0, 0.0, 5000.0, 30.0))
    assert match(truth, table((1, 0.0, 0.0, 5000.0 + 361.0, 30.0)), TOL_XY, TOL_Z).empty
    assert match(truth, table((1, 0.0, 50.5, 5000.0, 30.0)), TOL_XY, TOL_Z).empty
    edge = match(truth, table((1, 0.0, 0.0, 5000.0 - 360.0, 30.0)), TOL_XY, TOL_Z)
    assert len(edge) == 1 and edge.loc[0, "cost"] == pytest.approx(1.0)


def test_two_predictions_of_one_particle_give_one_true_and_one_false_positive():
    truth = table((1, 0.0, 0.0, 5000.0, 30.0))
    predicted = table((1, 5.0, 0.0, 5000.0, 30.0), (1, 0.0, 0.0, 5010.0, 30.0))
    pairs = match(truth, predicted, TOL_XY, TOL_Z)
    assert pairs["pred_index"].tolist() == [1], "the nearer one in normalised distance (10/360 < 5/50)"
    metrics = detection_metrics(truth, predicted, pairs, BINS)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (1, 1, 0)


def test_empty_hologram_all_false_positives_or_all_false_negatives():
    nothing = table()
    predicted = table((1, 0.0, 0.0, 5000.0, 30.0), (1, 80.0, 0.0, 5000.0, 30.0))
    pairs = match(nothing, predicted, TOL_XY, TOL_Z)
    metrics = detection_metrics(nothing, predicted, pairs, BINS)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (0, 2, 0)
    assert (metrics["precision"], metrics["recall"], metrics["f1"]) == (0.0, 1.0, 0.0)
    assert metrics["rms_x_um"] is None and metrics["bias_z_um"] is None
    pairs = match(predicted, nothing, TOL_XY, TOL_Z)
    metrics = detection_metrics(predicted, nothing, pairs, BINS)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (0, 0, 2)
    assert (metrics["precision"], metrics["recall"], metrics["f1"]) == (1.0, 0.0, 0.0)


def greedy_match_count(truth, predicted):
    """Nearest-first greedy matching within tolerance (the method the Hungarian algorithm replaces)."""
    candidates = sorted(
        (np.sqrt(((p.x - t.x) / 50) ** 2 + ((p.y - t.y) / 50) ** 2 + ((p.z - t.z) / 360) ** 2), i, j)
        for i, t in truth.iterrows() for j, p in predicted.iterrows()
        if abs(p.x - t.x) <= 50 and abs(p.y - t.y) <= 50 and abs(p.z - t.z) <= 360)
    used_t, used_p = set(), set()
    for _, i, j in candidates:
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
    return len(used_t)


def test_hungarian_finds_the_global_optimum_where_greedy_blocks_a_match():
    # P is nearest to A (20 µm) but also within reach of B; Q reaches only A. Greedy takes A-P and leaves
    # B-Q (73 µm) out of tolerance; the optimum is A-Q + B-P, two matches.
    truth = table((1, 0.0, 0.0, 5000.0, 30.0), (1, 45.0, 0.0, 5000.0, 30.0))
    predicted = table((1, 20.0, 0.0, 5000.0, 30.0), (1, -28.0, 0.0, 5000.0, 30.0))
    assert greedy_match_count(truth, predicted) == 1
    pairs = match(truth, predicted, TOL_XY, TOL_Z)
    assert sorted(zip(pairs["true_index"], pairs["pred_index"])) == [(0, 1), (1, 0)]


def test_a_prediction_never_matches_a_particle_of_another_hologram():
    truth = table((1, 0.0, 0.0, 5000.0, 30.0), (2, 100.0, 0.0, 5000.0, 30.0))
    predicted = table((2, 0.0, 0.0, 5000.0, 30.0), (1, 100.0, 0.0, 5000.0, 30.0))
    assert match(truth, predicted, TOL_XY, TOL_Z).empty
    predicted.loc[0, "hid"] = 1
    pairs = match(truth, predicted, TOL_XY, TOL_Z)
    assert pairs[["hid", "true_index", "pred_index"]].to_numpy().tolist() == [[1, 0, 0]]


def test_metrics_from_known_counts_errors_and_diameter_bins():
    # 4 true particles (d 10, 30, 30, 50 µm); 3 matched with known errors; 2 false predictions.
    truth = table((1, 0.0, 0.0, 3000.0, 10.0), (1, 200.0, 0.0, 3000.0, 30.0), (2, 0.0, 0.0, 3000.0, 30.0),
                  (2, 200.0, 0.0, 6000.0, 50.0))
    predicted = table((1, 3.0, 1.0, 3100.0, 12.0), (1, 200.0, -1.0, 2900.0, 28.0), (2, 0.0, 2.0, 3000.0, 34.0),
                      (2, 500.0, 0.0, 3000.0, 30.0), (1, -400.0, 0.0, 3000.0, 30.0))
    pairs = match(truth, predicted, TOL_XY, TOL_Z)
    metrics = detection_metrics(truth, predicted, pairs, BINS)
    assert (metrics["n_true"], metrics["n_predicted"], metrics["tp"], metrics["fp"], metrics["fn"]) == (4, 5, 3, 2, 1)
    precision, recall = 3 / 5, 3 / 4
    assert metrics["precision"] == pytest.approx(precision) and metrics["recall"] == pytest.approx(recall)
    assert metrics["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    errors = {"x": [3, 0, 0], "y": [1, -1, 2], "z": [100, -100, 0], "d": [2, -2, 4]}
    for c, e in errors.items():
        assert metrics[f"rms_{c}_um"] == pytest.approx(np.sqrt(np.mean(np.square(e))))
        assert metrics[f"bias_{c}_um"] == pytest.approx(np.mean(e))
    assert metrics["recall_by_diameter"] == [
        {"low_um": 0.0, "high_um": 20.0, "n_true": 1, "tp": 1, "recall": 1.0},
        {"low_um": 20.0, "high_um": 40.0, "n_true": 2, "tp": 2, "recall": 1.0},
        {"low_um": 40.0, "high_um": 100.0, "n_true": 1, "tp": 0, "recall": 0.0},
    ]
    assert json.dumps(metrics)  # plain JSON types only


def store(path, particles: pd.DataFrame, n_holograms=2):
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), np.ones((n_holograms, 16, 16), np.float32)),
         **{name: ("particle", particles[name].to_numpy(np.float32)) for name in ("hid", "x", "y", "z", "d")}},
        attrs={"Nx": 16, "Ny": 16, "dx": 10e-6, "dy": 10e-6, "lambda": 3.55e-7, "zMin": 2e-3, "zMax": 10e-3},
    )
    return write_zarr(ds, path)


def write_csv(path, particles: pd.DataFrame, extra: str):
    particles.assign(**{extra: 0.9}).to_csv(path, index=False)
    return path


def test_evaluate_files_writes_both_methods_and_the_plots_and_counts_only_without_truth(tmp_path):
    config = load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 2, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 10e-6, "dy": 10e-6, "nx": 16, "ny": 16, "z_min": 2e-3,
                   "z_max": 10e-3},
    })
    truth = table((1, 0.0, 0.0, 3000.0, 25.0), (1, 50.0, 50.0, 6000.0, 45.0), (2, -40.0, 10.0, 8000.0, 15.0))
    stores = {"test": store(tmp_path / "test.zarr", truth), "real": store(tmp_path / "real.zarr", table())}
    unet = table((1, 1.0, 0.0, 3050.0, 26.0), (1, 50.0, 52.0, 6000.0, 44.0), (2, -40.0, 10.0, 8100.0, 16.0))
    baseline = table((1, 2.0, 0.0, 3200.0, 28.0), (2, 70.0, 70.0, 5000.0, 20.0))
    real = table((1, 0.0, 0.0, 4000.0, 30.0), (2, 0.0, 0.0, 5000.0, 50.0), (2, 10.0, 0.0, 7000.0, 40.0))
    predictions = {
        "unet": {"test": write_csv(tmp_path / "test_unet.csv", unet, "prob"),
                 "real": write_csv(tmp_path / "real_unet.csv", real, "prob")},
        "baseline": {"test": write_csv(tmp_path / "test_baseline.csv", baseline, "score"),
                     "real": write_csv(tmp_path / "real_baseline.csv", real.iloc[:1], "score")},
    }
    out = evaluate_files(config, stores, predictions, tmp_path / "evaluation" / "metrics.json", tmp_path / "plots")
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"unet", "baseline"}
    unet_m, base_m = metrics["unet"], metrics["baseline"]
    assert unet_m["truth"] and unet_m["splits_evaluated"] == ["test"]
    assert (unet_m["tp"], unet_m["fp"], unet_m["fn"], unet_m["recall"]) == (3, 0, 0, 1.0)
    assert (base_m["tp"], base_m["fp"], base_m["fn"]) == (1, 1, 2)
    assert base_m["splits_without_truth"]["real"]["n_predicted"] == 1
    assert base_m["splits_without_truth"]["real"]["predicted_by_hologram"] == [1, 0]
    real_only = unet_m["splits"]["real"]
    assert real_only["truth"] is False and "precision" not in real_only and "note" in real_only
    assert (real_only["n_predicted"], real_only["predicted_per_hologram"]) == (3, 1.5)
    assert real_only["d_um"]["median"] == pytest.approx(40.0)
    assert unet_m["splits"]["test"]["f1"] == unet_m["f1"]
    for name in PLOT_NAMES:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob(".*tmp*"))

    real_predictions = {method: {"real": paths["real"]} for method, paths in predictions.items()}
    only_real = evaluate_files(config, {"real": stores["real"]}, real_predictions, tmp_path / "real.json",
                               tmp_path / "plots_real")
    real_metrics = json.loads(only_real.read_text())
    assert real_metrics["unet"]["truth"] is False and "recall" not in real_metrics["unet"]
    assert "splits" not in real_metrics["unet"], "one split: no nested per-split copy"
    assert all((tmp_path / "plots_real" / name).exists() for name in PLOT_NAMES)


def test_missing_prediction_split_or_columns_are_clear_errors(tmp_path):
    config = load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 1, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 10e-6, "dy": 10e-6, "nx": 16, "ny": 16, "z_min": 2e-3,
                   "z_max": 10e-3},
    })
    truth_store = store(tmp_path / "test.zarr", table((1, 0.0, 0.0, 3000.0, 25.0)), n_holograms=1)
    with pytest.raises(ValueError, match="'unet' has no predictions for split.*test"):
        evaluate_files(config, {"test": truth_store}, {"unet": {}}, tmp_path / "m.json", tmp_path / "p")
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"hid": [1], "x": [0.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="bad.csv.*missing particle column"):
        evaluate_files(config, {"test": truth_store}, {"unet": {"test": bad}}, tmp_path / "m.json", tmp_path / "p")
    assert not (tmp_path / "m.json").exists()


def test_a_split_without_truth_gets_counts_per_hologram_and_a_size_histogram(tmp_path):
    config = load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 3, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 10e-6, "dy": 10e-6, "nx": 16, "ny": 16, "z_min": 2e-3,
                   "z_max": 10e-3},
        "evaluate": {"diameter_bins": [10e-6, 20e-6, 40e-6]},
    })
    # A user's file without a particle table: no particle variables at all.
    own = write_zarr(xr.Dataset({"image": (("hologram_number", "xsize", "ysize"), np.ones((3, 16, 16), np.float32))},
                                attrs={"Nx": 16, "Ny": 16, "dx": 10e-6, "dy": 10e-6, "lambda": 3.55e-7,
                                       "zMin": 2e-3, "zMax": 10e-3}), tmp_path / "own.zarr")
    found = table((1, 0.0, 0.0, 4000.0, 15.0), (1, 5.0, 0.0, 5000.0, 25.0), (3, 0.0, 0.0, 6000.0, 35.0),
                  (3, 1.0, 0.0, 7000.0, 5.0), (3, 2.0, 0.0, 7000.0, 50.0))
    predictions = {"unet": {"own": write_csv(tmp_path / "own_unet.csv", found, "prob")},
                   "baseline": {"own": write_csv(tmp_path / "own_baseline.csv", found.iloc[:1], "score")}}

    metrics = json.loads(evaluate_files(config, {"own": own}, predictions, tmp_path / "metrics.json",
                                        tmp_path / "plots").read_text())

    unet, baseline = metrics["unet"], metrics["baseline"]
    assert unet["truth"] is False and "f1" not in unet and "precision" not in unet
    assert unet["predicted_by_hologram"] == [2, 0, 3] and baseline["predicted_by_hologram"] == [1, 0, 0]
    assert unet["counts_per_hologram"]["median"] == 2.0 and unet["predicted_per_hologram"] == pytest.approx(5 / 3)
    assert unet["d_histogram_um"] == {"edges": [10.0, 20.0, 40.0], "counts": [1, 2], "below": 1, "above": 1}
    assert baseline["d_histogram_um"]["counts"] == [1, 0]
    for name in PLOT_NAMES:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
