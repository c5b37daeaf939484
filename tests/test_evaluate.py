"""Matching (Hungarian, per hologram, tolerances), detection metrics, bootstrap intervals over holograms,
recall and size error by diameter and depth, and the per-split evaluation files."""

import json
import re
import time

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from holopipe.core.config import load_config
from holopipe.core.io import DUST_ATTRS, open_holodec, write_zarr
from holopipe.evaluation.evaluate import (
    bootstrap_intervals,
    bootstrap_scores,
    detection_metrics,
    evaluate_files,
    hologram_counts,
    recall_grid,
    resample_counts,
    runs_and_holograms_intervals,
    runs_and_holograms_scores,
    summary,
    wilson_interval,
)
from holopipe.evaluation.matching import match, on_window_dust
from holopipe.evaluation.plots import PLOT_NAMES
from holopipe.run.cli import main

TOL_XY, TOL_Z = 50e-6, 360e-6  # metres, the defaults
BINS = [0.0, 20e-6, 40e-6, 100e-6]
DEPTHS = [2e-3, 4e-3, 6e-3, 8e-3, 10e-3]  # metres: 4 equal bins of z 2-10 mm


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
    metrics = detection_metrics(truth, predicted, pairs, BINS, DEPTHS)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (1, 1, 0)


def test_empty_hologram_all_false_positives_or_all_false_negatives():
    nothing = table()
    predicted = table((1, 0.0, 0.0, 5000.0, 30.0), (1, 80.0, 0.0, 5000.0, 30.0))
    pairs = match(nothing, predicted, TOL_XY, TOL_Z)
    metrics = detection_metrics(nothing, predicted, pairs, BINS, DEPTHS)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (0, 2, 0)
    assert (metrics["precision"], metrics["recall"], metrics["f1"]) == (0.0, 1.0, 0.0)
    assert metrics["rms_x_um"] is None and metrics["bias_z_um"] is None
    pairs = match(predicted, nothing, TOL_XY, TOL_Z)
    metrics = detection_metrics(predicted, nothing, pairs, BINS, DEPTHS)
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
    metrics = detection_metrics(truth, predicted, pairs, BINS, DEPTHS)
    assert (metrics["n_true"], metrics["n_predicted"], metrics["tp"], metrics["fp"], metrics["fn"]) == (4, 5, 3, 2, 1)
    precision, recall = 3 / 5, 3 / 4
    assert metrics["precision"] == pytest.approx(precision) and metrics["recall"] == pytest.approx(recall)
    assert metrics["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    errors = {"x": [3, 0, 0], "y": [1, -1, 2], "z": [100, -100, 0], "d": [2, -2, 4]}
    for c, e in errors.items():
        assert metrics[f"rms_{c}_um"] == pytest.approx(np.sqrt(np.mean(np.square(e))))
        assert metrics[f"bias_{c}_um"] == pytest.approx(np.mean(e))
    assert metrics["recall_by_diameter"] == [
        {"low_um": 0.0, "high_um": 20.0, "n_true": 1, "tp": 1, "recall": 1.0,
         "recall_ci95": list(wilson_interval(1, 1)), "rms_d_um": 2.0, "bias_d_um": 2.0},
        {"low_um": 20.0, "high_um": 40.0, "n_true": 2, "tp": 2, "recall": 1.0,
         "recall_ci95": list(wilson_interval(2, 2)),
         "rms_d_um": pytest.approx(np.sqrt(10.0)), "bias_d_um": 1.0},  # errors -2 and +4 µm
        {"low_um": 40.0, "high_um": 100.0, "n_true": 1, "tp": 0, "recall": 0.0,
         "recall_ci95": list(wilson_interval(0, 1)), "rms_d_um": None, "bias_d_um": None},
    ]
    # Diameter rows 0-20, 20-40, 40-100 µm by depth columns 2-4 ... 8-10 mm: the 50 µm droplet at 6 mm is missed.
    assert metrics["recall_by_diameter_and_depth"] == {
        "diameter_edges_um": pytest.approx([0.0, 20.0, 40.0, 100.0]),
        "depth_edges_um": pytest.approx([2000.0, 4000.0, 6000.0, 8000.0, 10000.0]),
        "n_true": [[1, 0, 0, 0], [2, 0, 0, 0], [0, 0, 1, 0]], "tp": [[1, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]]}
    assert json.dumps(metrics)  # plain JSON types only


def test_recall_by_depth_bins_the_true_z_with_the_last_edge_closed():
    # Bins (mm) [2, 4), [4, 6), [6, 8), [8, 10]; z 1.5 and 11 mm fall in none. d errors of the found: +1, -3, +2, +4.
    truth = table((1, 0.0, 0.0, 2000.0, 30.0), (1, 300.0, 0.0, 3999.0, 30.0), (1, 600.0, 0.0, 4000.0, 30.0),
                  (2, 0.0, 0.0, 9000.0, 30.0), (2, 300.0, 0.0, 10000.0, 30.0), (2, 600.0, 0.0, 11000.0, 30.0),
                  (3, 0.0, 0.0, 1500.0, 30.0))
    predicted = table((1, 0.0, 0.0, 2000.0, 31.0), (1, 600.0, 0.0, 4000.0, 27.0), (2, 0.0, 0.0, 9000.0, 32.0),
                      (2, 300.0, 0.0, 10000.0, 34.0), (2, 600.0, 0.0, 11000.0, 30.0))
    metrics = detection_metrics(truth, predicted, match(truth, predicted, TOL_XY, TOL_Z), BINS, DEPTHS)
    rows = metrics["recall_by_depth"]
    assert [(r["low_um"], r["high_um"]) for r in rows] == [(2000, 4000), (4000, 6000), (6000, 8000), (8000, 10000)]
    assert [(r["n_true"], r["tp"]) for r in rows] == [(2, 1), (1, 1), (0, 0), (2, 2)]
    assert [r["recall"] for r in rows] == [0.5, 1.0, None, 1.0]
    assert rows[0]["recall_ci95"] == list(wilson_interval(1, 2)) and rows[2]["recall_ci95"] is None
    low, high = rows[0]["recall_ci95"]
    assert 0.0 < low < 0.5 < high < 1.0
    assert (rows[0]["bias_d_um"], rows[0]["rms_d_um"]) == (1.0, 1.0)
    assert (rows[1]["bias_d_um"], rows[1]["rms_d_um"]) == (-3.0, 3.0)
    assert rows[2]["bias_d_um"] is None and rows[2]["rms_d_um"] is None
    assert rows[3]["bias_d_um"] == 3.0 and rows[3]["rms_d_um"] == pytest.approx(np.sqrt((4 + 16) / 2))
    assert metrics["tp"] == 5, "particles outside every depth bin still count in the totals"


def synthetic_counts(n_holograms, seed, recall=0.8, false_per_hologram=1.0):
    """tp, fp, fn of holograms with Poisson(10) droplets, each found with probability ``recall``."""
    rng = np.random.default_rng(seed)
    n_true = rng.poisson(10.0, n_holograms)
    tp = rng.binomial(n_true, recall)
    return np.stack([tp, rng.poisson(false_per_hologram, n_holograms), n_true - tp], axis=1)


def brute_force_f1(counts, n_resamples, seed):
    """F1 of every resample, one resample at a time from the same draws as resample_counts describes."""
    draws = np.random.default_rng(seed).integers(0, len(counts), size=(n_resamples, len(counts)))
    f1 = []
    for row in draws:
        tp, fp, fn = counts[row].sum(axis=0)
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / (tp + fn) if tp + fn else 1.0
        f1.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return np.array(f1)


def point_f1(counts):
    tp, fp, fn = counts.sum(axis=0)
    return 2 * tp / (2 * tp + fp + fn)


def test_resample_counts_draw_every_hologram_with_replacement_reproducibly():
    weights = resample_counts(7, 500, seed=4)
    assert weights.shape == (500, 7) and (weights.sum(axis=1) == 7).all()
    assert np.array_equal(weights, resample_counts(7, 500, seed=4))
    assert not np.array_equal(weights, resample_counts(7, 500, seed=5))
    draws = np.random.default_rng(4).integers(0, 7, size=(500, 7))
    assert np.array_equal(weights[123], np.bincount(draws[123], minlength=7))
    assert 0.3 < (weights == 0).mean() < 0.4, "with replacement: about (6/7)^7 = 34 % of holograms left out"


def test_bootstrap_matches_the_brute_force_resampling_and_holds_the_point_estimate():
    counts = synthetic_counts(40, seed=1)
    scores = bootstrap_scores({"unet": counts}, 300, seed=9)["unet"]
    np.testing.assert_allclose(scores["f1"], brute_force_f1(counts, 300, seed=9), rtol=0, atol=1e-12)
    intervals, difference = bootstrap_intervals({"unet": counts}, 2000, seed=0)
    low, high = intervals["unet"]["f1_ci95"]
    assert low < point_f1(counts) < high and difference is None, "no baseline: no difference"
    for name in ("precision", "recall"):
        low, high = intervals["unet"][f"{name}_ci95"]
        assert 0.0 < low < high <= 1.0


def test_bootstrap_interval_narrows_as_the_holograms_grow():
    widths = {}
    for n in (20, 500):
        counts = synthetic_counts(n, seed=n)
        low, high = bootstrap_intervals({"unet": counts}, 2000, seed=0)[0]["unet"]["f1_ci95"]
        assert low < point_f1(counts) < high
        widths[n] = high - low
    assert widths[500] < 0.4 * widths[20], widths  # about sqrt(20/500) = 0.2 expected


def test_identical_methods_differ_by_exactly_zero_and_a_better_one_by_more_than_zero():
    counts = synthetic_counts(50, seed=2)
    _, same = bootstrap_intervals({"unet": counts, "baseline": counts.copy()}, 2000, seed=0)
    assert same == {"f1": 0.0, "f1_ci95": [0.0, 0.0]}
    # Better on every hologram: every droplet found, no false detection.
    perfect = np.stack([counts[:, 0] + counts[:, 2], np.zeros(50, np.int64), np.zeros(50, np.int64)], axis=1)
    intervals, better = bootstrap_intervals({"unet": perfect, "baseline": counts}, 2000, seed=0)
    assert better["f1"] == pytest.approx(1.0 - point_f1(counts))
    assert 0.0 < better["f1_ci95"][0] < better["f1"] < better["f1_ci95"][1]
    assert intervals["unet"]["f1_ci95"] == [1.0, 1.0]
    again = bootstrap_intervals({"unet": perfect, "baseline": counts}, 2000, seed=0)
    assert again == (intervals, better), "reproducible with the seed"
    assert bootstrap_intervals({"unet": perfect, "baseline": counts}, 2000, seed=1)[1] != better


def test_holograms_without_particles_are_drawn_too_and_one_hologram_has_no_interval():
    counts = np.array([[3, 1, 1], [2, 0, 2], [0, 0, 0], [0, 0, 0]])
    scores = bootstrap_scores({"unet": counts}, 1000, seed=0)["unet"]["f1"]
    np.testing.assert_allclose(scores, brute_force_f1(counts, 1000, seed=0), rtol=0, atol=1e-12)
    # Drawing only the empty holograms: nothing to find, nothing found, F1 = 1 (the 0/0 conventions).
    assert np.isclose(scores, 1.0).any()
    only_empty = (resample_counts(4, 1000, seed=0)[:, :2] == 0).all(axis=1)
    assert np.array_equal(np.isclose(scores, 1.0), only_empty)
    single, difference = bootstrap_intervals({"unet": counts[:1], "baseline": counts[1:2]}, 2000, seed=0)
    assert single["unet"] == {"precision_ci95": None, "recall_ci95": None, "f1_ci95": None}
    assert difference == {"f1": pytest.approx(point_f1(counts[:1]) - point_f1(counts[1:2])), "f1_ci95": None}


def test_runs_and_holograms_resampling_matches_the_brute_force_draws():
    runs = np.stack([synthetic_counts(12, seed=s, recall=r) for s, r in ((1, 0.7), (2, 0.8), (3, 0.9))])
    scores = runs_and_holograms_scores({"unet": runs}, 200, seed=5)["unet"]["f1"]
    holograms, picked = resample_counts(12, 200, seed=5), resample_counts(3, 200, seed=6)
    expected = []
    for h, r in zip(holograms, picked):
        tp, fp, fn = sum(r[s] * h[i] * runs[s, i] for s in range(3) for i in range(12))
        expected.append(2 * tp / (2 * tp + fp + fn))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)


def test_training_runs_that_disagree_widen_the_interval_and_identical_ones_do_not():
    holograms = synthetic_counts(30, seed=7)
    same = np.stack([holograms] * 3)
    alone = bootstrap_scores({"unet": holograms}, 2000, seed=0)["unet"]["f1"]
    np.testing.assert_allclose(runs_and_holograms_scores({"unet": same}, 2000, seed=0)["unet"]["f1"], alone)
    # Three models that find 60, 75 and 90 % of the same droplets: their spread belongs in the interval.
    n_true = holograms[:, 0] + holograms[:, 2]
    runs = np.stack([np.stack([t, holograms[:, 1], n_true - t], axis=1)
                     for t in (np.round(n_true * r).astype(np.int64) for r in (0.6, 0.75, 0.9))])
    results, _ = runs_and_holograms_intervals({"unet": runs, "baseline": holograms[None]}, 2000, seed=0,
                                              differences=())
    pooled, _ = bootstrap_intervals({"unet": runs.sum(axis=0)}, 2000, seed=0)
    width = np.diff(results["unet"]["f1_ci95"])[0]
    assert width > 2 * np.diff(pooled["unet"]["f1_ci95"])[0], "one training's interval leaves the runs out"
    assert results["unet"]["f1"] == pytest.approx(point_f1(runs.reshape(-1, 3)))
    assert results["baseline"]["f1_ci95"] == bootstrap_intervals({"b": holograms}, 2000, seed=0)[0]["b"]["f1_ci95"]


def test_the_paired_difference_over_runs_is_zero_for_a_copy_and_excludes_zero_for_a_clear_gain():
    baseline = synthetic_counts(30, seed=8, recall=0.6)
    copies = np.stack([baseline] * 3)
    _, same = runs_and_holograms_intervals({"unet": copies, "baseline": baseline[None]}, 1000, seed=0)
    assert same == {"unet_minus_baseline": {"f1": 0.0, "f1_ci95": [0.0, 0.0]}}
    better = np.stack([synthetic_counts(30, seed=8 + s, recall=0.95, false_per_hologram=0.2) for s in range(3)])
    _, gain = runs_and_holograms_intervals({"unet": better, "baseline": baseline[None]}, 1000, seed=0)
    assert 0 < gain["unet_minus_baseline"]["f1_ci95"][0] < gain["unet_minus_baseline"]["f1"]
    with pytest.raises(ValueError, match="same holograms and runs"):
        runs_and_holograms_scores({"unet": better, "other": better[:2]}, 10, seed=0)


def test_recall_grid_bins_true_diameter_by_depth_with_the_last_bin_closed():
    truth = pd.DataFrame({"hid": 1, "d": [10.0, 15.0, 20.0, 20.0, 35.0], "z": [1000.0, 3000.0, 1000.0, 4000.0, 1000.0]},
                         index=[10, 11, 12, 13, 14])
    matches = pd.DataFrame({"true_index": [11, 13]})
    n_true, tp = recall_grid(truth, matches, [10e-6, 15e-6, 20e-6], [1e-3, 2.5e-3, 4e-3])
    assert n_true.tolist() == [[1, 0], [1, 2]] and tp.tolist() == [[0, 0], [0, 2]]  # d 35 µm: outside


def test_bootstrap_of_2000_resamples_of_100_holograms_takes_well_under_a_second():
    counts = {"unet": synthetic_counts(100, seed=3), "baseline": synthetic_counts(100, seed=4, recall=0.6)}
    bootstrap_intervals(counts, 2000, seed=0)  # warm-up: imports, allocator
    start = time.perf_counter()
    bootstrap_intervals(counts, 2000, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.25, f"{elapsed:.3f} s"


def test_hologram_counts_give_every_hologram_a_row():
    truth = table((1, 0.0, 0.0, 3000.0, 30.0), (3, 0.0, 0.0, 3000.0, 30.0), (3, 300.0, 0.0, 3000.0, 30.0))
    predicted = table((1, 0.0, 0.0, 3000.0, 30.0), (3, 900.0, 0.0, 3000.0, 30.0), (4, 0.0, 0.0, 3000.0, 30.0))
    counts = hologram_counts(truth, predicted, match(truth, predicted, TOL_XY, TOL_Z), n_holograms=5)
    assert counts.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 2], [0, 1, 0], [0, 0, 0]]


def store(path, particles: pd.DataFrame, n_holograms=2, nx=16, ny=16, dx=10e-6, dy=10e-6):
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), np.ones((n_holograms, nx, ny), np.float32)),
         **{name: ("particle", particles[name].to_numpy(np.float32)) for name in ("hid", "x", "y", "z", "d")}},
        attrs={"Nx": nx, "Ny": ny, "dx": dx, "dy": dy, "lambda": 3.55e-7, "zMin": 2e-3, "zMax": 10e-3},
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
    assert out == tmp_path / "evaluation" / "metrics.json"
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"unet", "baseline", "unet_minus_baseline"}
    unet_m, base_m = metrics["unet"], metrics["baseline"]
    assert unet_m["truth"] and unet_m["split"] == "test" and unet_m["n_holograms"] == 2
    assert (unet_m["tp"], unet_m["fp"], unet_m["fn"], unet_m["recall"]) == (3, 0, 0, 1.0)
    assert (base_m["tp"], base_m["fp"], base_m["fn"]) == (1, 1, 2)
    real_metrics = json.loads((tmp_path / "evaluation" / "real" / "metrics.json").read_text())
    assert set(real_metrics) == {"unet", "baseline"}, "no truth: no F1, no difference"
    assert real_metrics["baseline"]["n_predicted"] == 1
    assert real_metrics["baseline"]["predicted_by_hologram"] == [1, 0]
    real_only = real_metrics["unet"]
    assert real_only["truth"] is False and "precision" not in real_only and "note" in real_only
    assert real_only["split"] == "real" and "f1_ci95" not in real_only
    assert (real_only["n_predicted"], real_only["predicted_per_hologram"]) == (3, 1.5)
    assert real_only["d_um"]["median"] == pytest.approx(40.0)
    for name in PLOT_NAMES:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob(".*tmp*"))

    real_predictions = {method: {"real": paths["real"]} for method, paths in predictions.items()}
    only_real = evaluate_files(config, {"real": stores["real"]}, real_predictions, tmp_path / "real.json",
                               tmp_path / "plots_real")
    real_metrics = json.loads(only_real.read_text())
    assert real_metrics["unet"]["truth"] is False and "recall" not in real_metrics["unet"]
    assert not (tmp_path / "real").exists(), "one split: the primary one, no other file"
    assert all((tmp_path / "plots_real" / name).exists() for name in PLOT_NAMES)


@pytest.mark.slow
def test_each_split_gets_its_own_file_with_intervals_and_the_log_table(tmp_path, capsys):
    # Non-square frames with dx != dy; the primary split is test although fraunhofer comes first.
    config = load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 3, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 10e-6, "dy": 12e-6, "nx": 24, "ny": 16, "z_min": 2e-3,
                   "z_max": 10e-3},
        "evaluate": {"depth_bins": 4, "bootstrap": 500, "seed": 3},
    })
    frame = {"nx": 24, "ny": 16, "dx": 10e-6, "dy": 12e-6}
    fraunhofer_truth = table((1, 0.0, 0.0, 4000.0, 30.0), (2, 50.0, -50.0, 7000.0, 60.0),
                             (2, -100.0, 0.0, 2500.0, 12.0))
    test_truth = table((1, 0.0, 0.0, 3000.0, 25.0), (1, 100.0, 100.0, 6000.0, 45.0), (2, -40.0, 10.0, 8000.0, 15.0))
    stores = {"fraunhofer": store(tmp_path / "fraunhofer.zarr", fraunhofer_truth, n_holograms=2, **frame),
              "test": store(tmp_path / "test.zarr", test_truth, n_holograms=3, **frame)}  # hologram 3 holds nothing
    found = {
        ("unet", "fraunhofer"): table((1, 0.0, 0.0, 4000.0, 31.0), (2, 50.0, -50.0, 7000.0, 58.0)),
        ("baseline", "fraunhofer"): table((2, -100.0, 0.0, 2500.0, 14.0)),
        ("unet", "test"): table((1, 1.0, 0.0, 3050.0, 26.0), (1, 100.0, 102.0, 6000.0, 44.0),
                                (2, -40.0, 10.0, 8100.0, 16.0), (2, 300.0, 300.0, 5000.0, 30.0)),
        ("baseline", "test"): table((1, 2.0, 0.0, 3200.0, 28.0), (2, 70.0, 70.0, 5000.0, 20.0)),
    }
    predictions = {}
    for (method, split), particles in found.items():
        predictions.setdefault(method, {})[split] = write_csv(tmp_path / f"{split}_{method}.csv", particles, "prob")
    # tp, fp, fn per hologram, by hand.
    by_hand = {("unet", "fraunhofer"): [[1, 0, 0], [1, 0, 1]], ("baseline", "fraunhofer"): [[0, 0, 1], [1, 0, 1]],
               ("unet", "test"): [[2, 0, 0], [1, 1, 0], [0, 0, 0]],
               ("baseline", "test"): [[1, 0, 1], [0, 1, 1], [0, 0, 0]]}
    f1_by_hand = {("unet", "fraunhofer"): 0.8, ("baseline", "fraunhofer"): 0.5, ("unet", "test"): 6 / 7,
                  ("baseline", "test"): 0.4}

    out = tmp_path / "evaluation" / "metrics.json"
    assert main(["evaluate", "--truth", *(f"{s}={p}" for s, p in stores.items()),
                 "--prediction", *(f"{m}:{s}={p}" for m, by_split in predictions.items() for s, p in by_split.items()),
                 "--out", str(out), "--plots", str(tmp_path / "evaluation"), "--config-json", json.dumps(config)]) == 0

    files = {"test": out, "fraunhofer": tmp_path / "evaluation" / "fraunhofer" / "metrics.json"}
    for split, path in files.items():
        metrics = json.loads(path.read_text())
        assert set(metrics) == {"unet", "baseline", "unet_minus_baseline"}
        for method in ("unet", "baseline"):
            m, counts = metrics[method], np.array(by_hand[method, split])
            assert m["split"] == split and m["n_holograms"] == len(counts)
            assert [m["tp"], m["fp"], m["fn"]] == counts.sum(axis=0).tolist(), (split, method)
            assert m["f1"] == pytest.approx(f1_by_hand[method, split])
            expected = np.percentile(brute_force_f1(counts, 500, seed=3), [2.5, 97.5])
            assert m["f1_ci95"] == pytest.approx(expected.tolist()), (split, method)
            assert m["f1_ci95"][0] <= m["f1"] <= m["f1_ci95"][1]
            assert all(len(m[f"{n}_ci95"]) == 2 for n in ("precision", "recall"))
            assert len(m["recall_by_depth"]) == 4 and len(m["recall_by_diameter"]) == 6
        difference = metrics["unet_minus_baseline"]
        assert difference["f1"] == pytest.approx(f1_by_hand["unet", split] - f1_by_hand["baseline", split])
        paired = (brute_force_f1(np.array(by_hand["unet", split]), 500, seed=3)
                  - brute_force_f1(np.array(by_hand["baseline", split]), 500, seed=3))
        assert difference["f1_ci95"] == pytest.approx(np.percentile(paired, [2.5, 97.5]).tolist())
    assert not (tmp_path / "evaluation" / "test").exists(), "the primary split is only in metrics.json"

    test = json.loads(out.read_text())
    # Depth bins 2-4-6-8-10 mm: truth z 3, 6, 8 mm; the baseline finds only the first (d error +3 µm).
    unet_depth, base_depth = test["unet"]["recall_by_depth"], test["baseline"]["recall_by_depth"]
    assert [(r["n_true"], r["tp"]) for r in unet_depth] == [(1, 1), (0, 0), (1, 1), (1, 1)]
    assert [r["bias_d_um"] for r in unet_depth] == [1.0, None, -1.0, 1.0]
    assert [(r["n_true"], r["tp"]) for r in base_depth] == [(1, 1), (0, 0), (1, 0), (1, 0)]
    assert base_depth[0]["rms_d_um"] == 3.0 and base_depth[2]["rms_d_um"] is None
    for method, depth in (("unet", unet_depth), ("baseline", base_depth)):  # the grid's columns add up to depth's
        grid = test[method]["recall_by_diameter_and_depth"]
        assert np.sum(grid["n_true"], axis=0).tolist() == [r["n_true"] for r in depth]
        assert np.sum(grid["tp"], axis=0).tolist() == [r["tp"] for r in depth]
    for name in PLOT_NAMES:
        assert (tmp_path / "evaluation" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    log = capsys.readouterr().out
    assert "fraunhofer (" in log and f"test (primary, {out})" in log
    unet_rows = [line.split()[:5] for line in log.splitlines()
                 if line.startswith("unet ") and line.split()[1].isdigit()]
    assert unet_rows == [["unet", "3", "2", "0", "1"], ["unet", "3", "3", "1", "0"]], log  # n truth, tp, fp, fn
    assert f"unet - baseline: F1 {6 / 7 - 0.4:+.3f} [" in log and log.count("(paired)") == 2


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
    elsewhere = write_csv(tmp_path / "elsewhere.csv", table((1, 0.0, 0.0, 3000.0, 25.0), (2, 0.0, 0.0, 3000.0, 25.0)),
                          "prob")
    with pytest.raises(ValueError, match=r"elsewhere.csv: particles of hologram\(s\) \[2\].*1 holograms"):
        evaluate_files(config, {"test": truth_store}, {"unet": {"test": elsewhere}}, tmp_path / "m.json",
                       tmp_path / "p")
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


@pytest.mark.slow
def test_skipped_holograms_are_listed_and_left_out_of_every_count_with_their_truth(tmp_path, capsys):
    # Non-square frames with dx != dy; hologram 2 of 4 had no data (standardization skipped it).
    config = load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 4, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 10e-6, "dy": 12e-6, "nx": 24, "ny": 16, "z_min": 2e-3,
                   "z_max": 10e-3},
        "evaluate": {"bootstrap": 200, "seed": 3},
    })
    frame = {"nx": 24, "ny": 16, "dx": 10e-6, "dy": 12e-6}
    truth = table((1, 0.0, 0.0, 3000.0, 25.0), (2, 40.0, 10.0, 8000.0, 15.0), (2, -40.0, 10.0, 5000.0, 35.0),
                  (3, 10.0, -20.0, 6000.0, 30.0), (4, 0.0, 30.0, 4000.0, 20.0))
    path = store(tmp_path / "test.zarr", truth, n_holograms=4, **frame)
    reference = store(tmp_path / "reference.zarr", truth[truth["hid"] != 2], n_holograms=4, **frame)
    import zarr
    zarr.open_group(path, mode="r+").attrs.update(skipped_holograms=[2],
                                                  skipped_reasons=["dark: 100.0% of its pixels at 0"])
    found = table((1, 1.0, 0.0, 3050.0, 26.0), (3, 10.0, -20.0, 6100.0, 31.0), (4, 200.0, 30.0, 4000.0, 20.0))
    predictions = {"unet": {"test": write_csv(tmp_path / "unet.csv", found, "prob")},
                   "baseline": {"test": write_csv(tmp_path / "baseline.csv", found.iloc[:1], "score")}}

    metrics = json.loads(evaluate_files(config, {"test": path}, predictions, tmp_path / "metrics.json",
                                        tmp_path / "plots").read_text())
    main(["evaluate", "--truth", f"test={path}", "--prediction", f"unet:test={predictions['unet']['test']}",
          f"baseline:test={predictions['baseline']['test']}", "--out", str(tmp_path / "cli.json"),
          "--plots", str(tmp_path / "cli_plots"), "--config-json", json.dumps(config)])
    # Without the skipped hologram's truth, the counts are those of a store that never had it, but for the
    # number of holograms drawn: 3, not 4.
    expected = json.loads(evaluate_files(config, {"test": reference}, predictions, tmp_path / "ref.json",
                                         tmp_path / "ref_plots").read_text())

    unet = metrics["unet"]
    assert unet["skipped_holograms"] == [{"hid": 2, "reason": "dark: 100.0% of its pixels at 0"}]
    assert unet["n_true_skipped"] == 2 and "with their 2 true particle(s)" in unet["skipped_note"]
    assert (unet["n_true"], unet["tp"], unet["fp"], unet["fn"], unet["n_holograms"]) == (3, 2, 1, 1, 3)
    assert "bootstrap over the 3 holograms" in unet["interval"]
    for name in ("n_true", "tp", "fp", "fn", "precision", "recall", "f1"):
        assert unet[name] == expected["unet"][name] and metrics["baseline"][name] == expected["baseline"][name]
    assert expected["unet"]["skipped_holograms"] == [] and expected["unet"]["skipped_note"] is None
    assert "skipped, no data: hologram 2 (dark: 100.0% of its pixels at 0); their 2 true particle(s) are not " \
           "counted" in capsys.readouterr().out

    stale = write_csv(tmp_path / "stale.csv", table((2, 40.0, 10.0, 8000.0, 15.0)), "prob")
    with pytest.raises(ValueError, match=r"stale\.csv: particles of hologram\(s\) \[2\], which .*test\.zarr lists "
                                         r"as skipped \(no data\)"):
        evaluate_files(config, {"test": path}, {"unet": {"test": stale}}, tmp_path / "m.json", tmp_path / "p")


@pytest.mark.parametrize("rows, message", [
    ("1,0,0,3000,25\n1,5,0,,25\n", r"column 'z' is not a finite number in 1 row\(s\): line 3 \(z = nan\)"),
    ("1,0,0,3000,-4\n2,0,0,3000,25\n1,0,0,3000,0\n",
     r"column 'd' is not positive \(µm\) in 2 row\(s\): line 2 \(d = -4\), line 4 \(d = 0\)"),
    (",0,0,3000,25\n", r"column 'hid' is not a finite number in 1 row\(s\): line 2 \(hid = nan\)"),
    ("1.5,0,0,3000,25\n", r"column 'hid' is not a hologram number \(a whole number >= 1\) in 1 row\(s\): line 2"),
])
def test_a_bad_prediction_csv_fails_naming_the_file_the_column_and_the_rows(tmp_path, rows, message):
    config = load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 2, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 10e-6, "dy": 12e-6, "nx": 24, "ny": 16, "z_min": 2e-3,
                   "z_max": 10e-3},
    })
    path = store(tmp_path / "test.zarr", table((1, 0.0, 0.0, 3000.0, 25.0)), nx=24, ny=16, dy=12e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text("hid,x,y,z,d\n" + rows)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ": " + message):
        evaluate_files(config, {"test": path}, {"unet": {"test": bad}}, tmp_path / "m.json", tmp_path / "p")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_particles_reported_on_window_dust_are_counted_per_method(tmp_path):
    """Two specks (40 and 20 µm) in every hologram: a prediction within a speck's radius plus the lateral
    tolerance (20 µm) of its x, y, at any depth, is on it; one farther away is not, and the split's
    metrics and summary say how many false particles each method reported there."""
    dust = pd.DataFrame({"x": [0.0, 60.0], "y": [0.0, -40.0], "z": [2000.0, 2000.0], "d": [40.0, 20.0]})
    predicted = table((1, 39.0, 0.0, 5000.0, 30.0), (2, 41.0, 0.0, 5000.0, 30.0), (2, 60.0, -69.0, 9000.0, 10.0),
                      (2, 60.0, -71.0, 9000.0, 10.0))
    assert on_window_dust(predicted, dust, 20e-6) == 2
    config = load_config({"splits": {"test": {"source": "simulate", "n_holograms": 2, "seed": 1}},
                          "optics": {"wavelength": 3.55e-7, "dx": 10e-6, "dy": 12e-6, "nx": 16, "ny": 12,
                                     "z_min": 2e-3, "z_max": 10e-3}, "evaluate": {"tolerance_xy": 2e-5}})
    # A true droplet behind the first speck (6 mm deep), found: a correct particle, not one on the dust.
    path = store(tmp_path / "test.zarr", table((1, -50.0, 30.0, 3000.0, 25.0), (1, 2.0, 0.0, 6000.0, 25.0)),
                 nx=16, ny=12, dy=12e-6)
    ds = open_holodec(path).load()
    ds.attrs.update({name: dust[axis].tolist() for axis, name in DUST_ATTRS.items()})
    dusty = write_zarr(ds, tmp_path / "dusty.zarr")
    with_droplet = pd.concat([predicted, table((1, 3.0, 1.0, 6010.0, 24.0))], ignore_index=True)
    assert on_window_dust(with_droplet, dust, 20e-6) == 3
    predictions = {"unet": {"test": write_csv(tmp_path / "unet.csv", with_droplet, "prob")},
                   "baseline": {"test": write_csv(tmp_path / "baseline.csv", predicted.iloc[2:], "score")}}
    out = evaluate_files(config, {"test": dusty}, predictions, tmp_path / "metrics.json", tmp_path / "plots")
    metrics = json.loads(out.read_text())
    assert (metrics["unet"]["on_window_dust"], metrics["baseline"]["on_window_dust"]) == (2, 1)
    assert metrics["unet"]["on_window_dust_per_10_holograms"] == 10.0 and metrics["unet"]["window_dust_specks"] == 2
    assert ("on the 2 specks of window dust (per 10 holograms): baseline 1 (5.0), unet 2 (10.0)"
            in summary(out, ["test"]))
    plain = evaluate_files(config, {"test": path}, predictions, tmp_path / "plain.json", tmp_path / "plots")
    assert "on_window_dust" not in json.loads(plain.read_text())["unet"], "no dust recorded, no count"
