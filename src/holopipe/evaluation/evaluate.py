"""Evaluation: predicted particles matched to the truth, detection metrics with their uncertainty, and the
report's figures.

Matching: :func:`holopipe.evaluation.matching.match`; plots: :mod:`holopipe.evaluation.plots`.

Conventions of the metrics (``detection_metrics``): ``precision = tp / n_predicted`` and is 1 when
nothing was predicted (no false detections); ``recall = tp / n_true`` and is 1 when there is nothing
to find; ``f1`` is their harmonic mean, 0 when both are 0. Errors are predicted minus true, in µm;
their rms and bias are null (None) without matches. Recall by diameter and by depth bin the *true*
diameter and z, each bin ``[low, high)`` (the last one closed); a bin carries its counts, the recall
with its 95 % Wilson interval, and the rms and bias of the diameter error of its matched particles
(null for an empty bin or one without matches). ``recall_by_diameter_and_depth`` crosses the two binnings
(:func:`recall_grid`): true droplets and those found per (diameter, depth) cell, since what a far droplet costs
depends on its size (the aperture's resolution) and the two one-way tables cannot say which small droplets
are lost where.

**Splits are evaluated apart** (:func:`evaluate_files`): each has its own metrics, never pooled, since
the splits differ on purpose (simulation physics, real data). The primary split (:func:`primary_split`)
is written to ``metrics.json``, every other beside it (:func:`split_metrics_paths`). A split without
truth particles gets what can be said without them: counts per hologram and the d and z distributions.

**Bootstrap intervals over holograms** (:func:`bootstrap_intervals`): particles of one hologram share
its noise, focus and crowding, so holograms, not particles, are the independent units. Each resample
draws the split's holograms with replacement (every hologram, also one with neither truth nor
prediction, which then adds zero), sums tp, fp and fn over the draws and computes precision, recall
and F1 with the conventions above; ``*_ci95`` are the 2.5 and 97.5 percentiles over the resamples.
Every method sees the same draws, so ``unet_minus_baseline`` (the F1 difference per resample) is a
paired interval: holograms that are hard for both methods move both scores and cancel. Degenerate
cases: a split without truth particles has no F1, hence no intervals and no difference; with a single
hologram every resample is that hologram, the intervals would be zero-wide and say nothing, so they are
null; a resample that draws only holograms with neither truth nor prediction scores 1 by the
conventions above (rare unless most holograms are empty). The draws depend only on the seed and the
split's number of holograms: a split's intervals do not change when other splits are added.

**Hand labels** (real data, no truth; :mod:`holopipe.evaluation.labels`): where a split has label files, each
method's entry of the primary split gets ``labels: {split: ...}`` (:func:`label_metrics`): precision on
real data, the share of the method's labelled candidates that are labelled ``particle`` (``unsure``
ones left out and counted as ``n_unsure``), and recall relative to the union, the share of all
candidates labelled ``particle`` that the method found; each at every confidence ``>= k`` (k = 1..5)
and per diameter bin (the candidate's d), with the labellers' pairwise Cohen's kappa. Intervals are
95 % Wilson score intervals: closed-form, not random, and well behaved for the few dozen labels and
shares near 0 or 1 a labelling session gives (the Wald interval collapses to zero width at 0 and 1; a
bootstrap over holograms needs many holograms with labels). They treat candidates as independent,
which droplets of one hologram nearly are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from holopipe.core.config import primary_split
from holopipe.core.files import write_atomically
from holopipe.core.io import read_particle_csv
from holopipe.evaluation.labels import CONFIDENCES, LABELS, open_candidates, read_labels
from holopipe.evaluation.matching import COORDINATES, check_holograms, match, on_window_dust, read_truth
from holopipe.evaluation.plots import plot_evaluation, plot_labels

__all__ = ["bootstrap_intervals", "bootstrap_scores", "cohen_kappa",
           "combined_labels", "detection_metrics", "evaluate_files", "hologram_counts", "label_metrics",
           "primary_split", "recall_grid", "resample_counts",
           "runs_and_holograms_intervals", "runs_and_holograms_scores", "split_metrics_paths", "summary",
           "wilson_interval"]

DIFFERENCE = ("unet", "baseline")
"""The paired F1 difference ``unet_minus_baseline`` is reported where both methods are evaluated."""
WILSON_Z = 1.959963984540054
"""Normal quantile of a two-sided 95 % interval."""


def _scores(tp, fp, fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of counts (scalars or arrays of one shape) with the module's 0/0 conventions."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 1.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1


def _error_stats(errors_um: np.ndarray, name: str) -> dict:
    """``rms_<name>_um`` and ``bias_<name>_um`` of errors (µm); null without any."""
    if errors_um.size == 0:
        return {f"rms_{name}_um": None, f"bias_{name}_um": None}
    return {f"rms_{name}_um": float(np.sqrt(np.mean(errors_um**2))), f"bias_{name}_um": float(np.mean(errors_um))}


def _binned(values_um: np.ndarray, edges_um: np.ndarray, found: np.ndarray, error_d_um: np.ndarray) -> list[dict]:
    """Per bin ``[low, high)`` of ``edges_um`` (the last one closed) of the true ``values_um``: n_true, tp,
    recall and its Wilson interval, and the diameter error of the found particles (``error_d_um``, NaN
    where not found)."""
    rows = []
    for i, (low, high) in enumerate(zip(edges_um[:-1], edges_um[1:])):
        last = i == edges_um.size - 2
        inside = (values_um >= low) & ((values_um <= high) if last else (values_um < high))
        n, tp = int(inside.sum()), int((inside & found).sum())
        rows.append({"low_um": float(low), "high_um": float(high), "n_true": n, "tp": tp,
                     "recall": float(tp / n) if n else None,
                     "recall_ci95": list(wilson_interval(tp, n)) if n else None,
                     **_error_stats(error_d_um[inside & found], "d")})
    return rows


def detection_metrics(truth: pd.DataFrame, predicted: pd.DataFrame, matches: pd.DataFrame, diameter_bins,
                      depth_bins) -> dict:
    """Counts, precision, recall, F1, rms and bias of the x, y, z, d errors (µm), recall by diameter, by depth
    and by both (``recall_by_diameter_and_depth``: bin edges in µm, ``n_true`` and ``tp`` per (diameter, depth)).

    ``matches`` is :func:`match`'s result for these tables (``truth`` must have a unique index);
    ``diameter_bins`` and ``depth_bins`` are bin edges in metres of the true d and z. See the module
    docstring for the 0/0 conventions and the bins.
    """
    n_true, n_predicted, tp = len(truth), len(predicted), len(matches)
    precision, recall, f1 = (float(v) for v in _scores(tp, n_predicted - tp, n_true - tp))
    metrics = {"n_true": n_true, "n_predicted": n_predicted, "tp": tp, "fp": n_predicted - tp,
               "fn": n_true - tp, "precision": precision, "recall": recall, "f1": f1}
    for c in COORDINATES:
        metrics.update(_error_stats(matches[f"error_{c}"].to_numpy(np.float64), c))
    found = np.zeros(n_true, dtype=bool)
    error_d = np.full(n_true, np.nan)
    matched = truth.index.get_indexer(matches["true_index"])
    found[matched] = True
    error_d[matched] = matches["error_d"].to_numpy(np.float64)
    for name, column, edges in (("recall_by_diameter", "d", diameter_bins), ("recall_by_depth", "z", depth_bins)):
        metrics[name] = _binned(truth[column].to_numpy(np.float64), np.asarray(edges, dtype=np.float64) * 1e6,
                                found, error_d)
    n_cell, tp_cell = recall_grid(truth, matches, diameter_bins, depth_bins)
    metrics["recall_by_diameter_and_depth"] = {
        "diameter_edges_um": (np.asarray(diameter_bins, np.float64) * 1e6).tolist(),
        "depth_edges_um": (np.asarray(depth_bins, np.float64) * 1e6).tolist(),
        "n_true": n_cell.tolist(), "tp": tp_cell.tolist()}
    return metrics


def hologram_counts(truth: pd.DataFrame, predicted: pd.DataFrame, matches: pd.DataFrame,
                    n_holograms: int) -> np.ndarray:
    """tp, fp and fn of each hologram 1..n_holograms, shape (n_holograms, 3), int64; a hologram without
    particles is a row of zeros (it is still drawn by the bootstrap). hid must lie in 1..n_holograms."""
    def per_hologram(hid: pd.Series) -> np.ndarray:
        return np.bincount(hid.to_numpy(np.int64), minlength=n_holograms + 1)[1:]

    tp = per_hologram(matches["hid"])
    return np.stack([tp, per_hologram(predicted["hid"]) - tp, per_hologram(truth["hid"]) - tp], axis=1)


def resample_counts(n_holograms: int, n_resamples: int, seed: int) -> np.ndarray:
    """How often each hologram is drawn in each bootstrap resample, shape (n_resamples, n_holograms).

    Resample r draws ``n_holograms`` holograms with replacement: ``rng.integers(0, n_holograms,
    (n_resamples, n_holograms))`` with ``rng = np.random.default_rng(seed)``, counted per row (each row
    sums to n_holograms), so a sum over the drawn holograms is a matrix product.
    """
    draws = np.random.default_rng(seed).integers(0, n_holograms, size=(n_resamples, n_holograms))
    flat = (draws + n_holograms * np.arange(n_resamples)[:, None]).ravel()  # one bin per (resample, hologram)
    return np.bincount(flat, minlength=n_resamples * n_holograms).reshape(n_resamples, n_holograms)


def bootstrap_scores(counts: dict[str, np.ndarray], n_resamples: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Precision, recall and F1 of every method in every resample: method -> name -> (n_resamples,).

    ``counts`` maps method -> :func:`hologram_counts` (n_holograms, 3), holograms in the same order for
    every method: each method is scored on the same draws (:func:`resample_counts`), so differences
    between methods are paired.
    """
    shapes = {method: c.shape for method, c in counts.items()}
    if len(set(shapes.values())) != 1 or next(iter(shapes.values()))[1:] != (3,):
        raise ValueError(f"counts must be (n_holograms, 3) tp, fp, fn of the same holograms, got shapes {shapes}")
    n_holograms = next(iter(shapes.values()))[0]
    weights = resample_counts(n_holograms, n_resamples, seed).astype(np.float64)  # (R, H)
    scores = {}
    for method, c in counts.items():
        tp, fp, fn = (weights @ c.astype(np.float64)).T  # (R, H) @ (H, 3) -> three (R,): exact integer sums
        scores[method] = dict(zip(("precision", "recall", "f1"), _scores(tp, fp, fn)))
    return scores


def _interval95(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def bootstrap_intervals(counts: dict[str, np.ndarray], n_resamples: int, seed: int) -> tuple[dict, dict | None]:
    """95 % bootstrap intervals over holograms (see the module docstring) of each method's scores, and
    the paired F1 difference of :data:`DIFFERENCE`.

    ``counts`` as in :func:`bootstrap_scores`. Returns ``({method: {precision_ci95, recall_ci95,
    f1_ci95}}, difference)`` with intervals ``[low, high]`` (null with fewer than 2 holograms) and
    ``difference = {f1: F1(unet) - F1(baseline) on all holograms, f1_ci95}``, None unless both methods
    are in ``counts``.
    """
    names = ("precision", "recall", "f1")
    n_holograms = len(next(iter(counts.values())))
    compared = all(method in counts for method in DIFFERENCE)
    difference = None
    if compared:
        point = {m: float(_scores(*counts[m].sum(axis=0))[2]) for m in DIFFERENCE}
        difference = {"f1": point[DIFFERENCE[0]] - point[DIFFERENCE[1]], "f1_ci95": None}
    if n_holograms < 2:
        return {method: {f"{n}_ci95": None for n in names} for method in counts}, difference
    scores = bootstrap_scores(counts, n_resamples, seed)
    intervals = {method: {f"{n}_ci95": _interval95(s[n]) for n in names} for method, s in scores.items()}
    if compared:
        difference["f1_ci95"] = _interval95(scores[DIFFERENCE[0]]["f1"] - scores[DIFFERENCE[1]]["f1"])
    return intervals, difference


def runs_and_holograms_scores(counts: dict[str, np.ndarray], n_resamples: int,
                              seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Precision, recall and F1 of every method in every resample of training runs *and* holograms:
    method -> name -> (n_resamples,).

    ``counts`` maps method -> (n_runs, n_holograms, 3) tp, fp, fn (:func:`hologram_counts` of each run's
    model), the same holograms in the same order everywhere; a method that no training changes (the physics
    baseline) gives one run, (1, n_holograms, 3), and is resampled over holograms only. Each resample draws
    the runs with replacement (:func:`resample_counts`, ``seed + 1``) and, independently, the holograms
    (``seed``), and sums the counts of every drawn (run, hologram) pair: the two factors are crossed (every
    model sees every hologram), and resampling both is the conservative choice for a crossed design (it counts
    the interaction twice, so intervals come out slightly wide, never narrow). Every method sees the same
    draws, so differences are paired. With n runs, the run level's spread is underestimated by (n-1)/n.
    """
    shapes = {method: c.shape for method, c in counts.items()}
    runs = {shape[0] for shape in shapes.values()} - {1}
    if len(runs) > 1 or len({shape[1:] for shape in shapes.values()}) != 1 or next(iter(shapes.values()))[2:] != (3,):
        raise ValueError("counts must be (n_runs or 1, n_holograms, 3) tp, fp, fn of the same holograms and runs, "
                         f"got shapes {shapes}")
    n_runs, n_holograms = (runs.pop() if runs else 1), next(iter(shapes.values()))[1]
    hologram_weights = resample_counts(n_holograms, n_resamples, seed).astype(np.float64)  # (R, H)
    run_weights = resample_counts(n_runs, n_resamples, seed + 1).astype(np.float64)  # (R, S)
    scores = {}
    for method, c in counts.items():
        c = c.astype(np.float64)
        if c.shape[0] == 1:
            totals = hologram_weights @ c[0]  # (R, 3)
        else:
            totals = np.einsum("rs,rh,shk->rk", run_weights, hologram_weights, c)
        scores[method] = dict(zip(("precision", "recall", "f1"), _scores(*totals.T)))
    return scores


def runs_and_holograms_intervals(counts: dict[str, np.ndarray], n_resamples: int, seed: int,
                                 differences=(DIFFERENCE,)) -> tuple[dict, dict]:
    """Point scores (counts pooled over runs and holograms) and 95 % intervals of
    :func:`runs_and_holograms_scores`, and each paired F1 difference ``(a, b)`` of ``differences``.

    Returns ``({method: {precision, recall, f1, *_ci95}}, {"a_minus_b": {f1, f1_ci95}})``.
    """
    names = ("precision", "recall", "f1")
    scores = runs_and_holograms_scores(counts, n_resamples, seed)
    results = {}
    for method, c in counts.items():
        point = dict(zip(names, (float(v) for v in _scores(*c.reshape(-1, 3).sum(axis=0)))))
        results[method] = {**point, **{f"{n}_ci95": _interval95(scores[method][n]) for n in names}}
    compared = {f"{a}_minus_{b}": {"f1": results[a]["f1"] - results[b]["f1"],
                                   "f1_ci95": _interval95(scores[a]["f1"] - scores[b]["f1"])}
                for a, b in differences}
    return results, compared


def recall_grid(truth: pd.DataFrame, matches: pd.DataFrame, diameter_edges_m,
                depth_edges_m) -> tuple[np.ndarray, np.ndarray]:
    """(n_true, tp) per (diameter bin, depth bin) of the true d and z, each (n_diameters, n_depths), with
    :func:`detection_metrics`' bins (``[low, high)``, the last one closed); particles outside are left out."""
    found = np.zeros(len(truth), dtype=bool)
    found[truth.index.get_indexer(matches["true_index"])] = True

    def bin_of(values_um, edges_m):
        edges = np.asarray(edges_m, np.float64) * 1e6
        index = np.searchsorted(edges, values_um, side="right") - 1
        index[values_um == edges[-1]] = edges.size - 2
        return np.where((values_um >= edges[0]) & (values_um <= edges[-1]), index, -1)

    d_bin = bin_of(truth["d"].to_numpy(np.float64), diameter_edges_m)
    z_bin = bin_of(truth["z"].to_numpy(np.float64), depth_edges_m)
    shape = (len(diameter_edges_m) - 1, len(depth_edges_m) - 1)
    inside = (d_bin >= 0) & (z_bin >= 0)
    flat = np.ravel_multi_index((d_bin[inside], z_bin[inside]), shape)
    size = shape[0] * shape[1]
    n_true = np.bincount(flat, minlength=size).reshape(shape)
    tp = np.bincount(flat, weights=found[inside], minlength=size).astype(np.int64).reshape(shape)
    return n_true, tp


def _distribution(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"mean": None, "median": None, "p05": None, "p95": None}
    p05, median, p95 = np.percentile(values, [5, 50, 95])
    return {"mean": float(values.mean()), "median": float(median), "p05": float(p05), "p95": float(p95)}


def _histogram(values, edges) -> dict:
    """Counts of ``values`` in the bins ``[low, high)`` of ``edges`` (the last one closed), and outside them."""
    values, edges = np.asarray(values, dtype=np.float64), np.asarray(edges, dtype=np.float64)
    return {"edges": edges.tolist(), "counts": np.histogram(values, bins=edges)[0].tolist(),
            "below": int((values < edges[0]).sum()), "above": int((values > edges[-1]).sum())}


def _counts_only(predicted: pd.DataFrame, holograms, diameter_bins) -> dict:
    """What can be said without truth: particles per hologram, and how their d and z are distributed.

    ``holograms`` are the hid keys of every evaluated hologram (those with no prediction count 0);
    ``d_histogram`` bins d with ``diameter_bins`` (metres; its edges in µm).
    """
    holograms = np.asarray(holograms, dtype=np.int64)
    per_hologram = pd.Series(predicted["hid"]).value_counts().reindex(holograms, fill_value=0).to_numpy()
    n_holograms = int(holograms.size)
    return {"truth": False,
            "note": "no truth particles in this split: precision, recall and errors not computed",
            "n_holograms": n_holograms, "n_predicted": len(predicted),
            "predicted_per_hologram": float(len(predicted) / n_holograms) if n_holograms else None,
            "counts_per_hologram": _distribution(per_hologram), "predicted_by_hologram": per_hologram.tolist(),
            "d_um": _distribution(predicted["d"]), "z_um": _distribution(predicted["z"]),
            "d_histogram_um": _histogram(predicted["d"], np.asarray(diameter_bins, dtype=np.float64) * 1e6)}


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> tuple[float | None, float | None]:
    """The Wilson score interval of a share ``successes / n`` (95 % by default); (None, None) when n is 0."""
    if n == 0:
        return None, None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _share(hits: int, n: int) -> dict:
    low, high = wilson_interval(hits, n)
    return {"value": float(hits / n) if n else None, "low": low, "high": high, "hits": int(hits), "n": int(n)}


def cohen_kappa(first, second) -> float | None:
    """Cohen's kappa of two labellers' labels of the same candidates (particle / not_particle / unsure as
    three classes): ``(p_o - p_e) / (1 - p_e)``; None without candidates or when chance agreement is 1
    (both gave one and the same class throughout: kappa is undefined)."""
    first, second = np.asarray(first, dtype=object), np.asarray(second, dtype=object)
    if first.size == 0:
        return None
    observed = float(np.mean(first == second))
    chance = float(sum(np.mean(first == c) * np.mean(second == c) for c in LABELS))
    return None if chance == 1.0 else (observed - chance) / (1.0 - chance)


def combined_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """One label per candidate from every labeller's current labels (:func:`holopipe.evaluation.labels.read_labels`).

    With several labellers a candidate's label is the majority's; a tie (two labellers who disagree) is
    ``unsure``. Its confidence is the lowest given for the winning label (for a tie, the lowest given),
    so that "confidence >= k" means every labeller behind the label was at least that sure. Columns
    candidate, label, confidence, n_labellers.
    """
    rows = []
    for candidate, group in labels.groupby("candidate", sort=True):
        votes = group["label"].value_counts()
        tie = (votes == votes.max()).sum() > 1
        label = "unsure" if tie else str(votes.idxmax())
        voters = group if tie else group[group["label"] == label]
        rows.append({"candidate": candidate, "label": label, "confidence": int(voters["confidence"].min()),
                     "n_labellers": len(group)})
    return pd.DataFrame(rows, columns=["candidate", "label", "confidence", "n_labellers"])


def _label_shares(flags: np.ndarray, label: np.ndarray, keep: np.ndarray) -> dict:
    """Precision and recall of one method among the candidates ``keep`` (boolean masks over candidates)."""
    particle, rejected = keep & (label == "particle"), keep & (label == "not_particle")
    mine = flags & (particle | rejected)
    return {"precision": _share(int((flags & particle).sum()), int(mine.sum())),
            "recall": _share(int((flags & particle).sum()), int(particle.sum())),
            "n_unsure": int((keep & flags & (label == "unsure")).sum())}


def label_metrics(candidates: pd.DataFrame, labels: pd.DataFrame, methods, diameter_bins) -> dict:
    """Each method's metrics from hand labels of one split's candidates: ``{method: {...}}``.

    ``candidates`` is candidates.csv (a 0/1 column per method), ``labels`` every labeller's current
    labels (:func:`holopipe.evaluation.labels.read_labels`); see the module docstring. Per method: ``precision`` and
    ``recall`` (value, 95 % Wilson ``low``/``high``, ``hits``, ``n``) over every label, ``n_candidates``,
    ``n_labelled``, ``n_unsure`` (its labelled ``unsure`` candidates), ``by_confidence`` (k = 1..5:
    labels of confidence >= k), ``by_diameter`` (``diameter_bins`` in metres, the candidate's d), and,
    the same for every method, ``labellers``, ``n_labelled_candidates`` and ``agreement``: Cohen's kappa
    per pair of labellers on the candidates both labelled, with ``n``.
    """
    combined = combined_labels(labels).set_index("candidate")
    label = combined["label"].reindex(candidates["candidate"]).to_numpy(dtype=object)
    confidence = combined["confidence"].reindex(candidates["candidate"]).fillna(0).to_numpy(np.int64)
    labelled = confidence > 0
    d_um = candidates["d"].to_numpy(np.float64)
    edges = np.asarray(diameter_bins, dtype=np.float64) * 1e6
    labellers = sorted(labels["labeller"].unique())
    by_labeller = {name: group.set_index("candidate")["label"] for name, group in labels.groupby("labeller")}
    agreement = []
    for i, first in enumerate(labellers):
        for second in labellers[i + 1:]:
            both = by_labeller[first].index.intersection(by_labeller[second].index)
            agreement.append({"labellers": [first, second], "n": len(both),
                              "kappa": cohen_kappa(by_labeller[first][both], by_labeller[second][both])})
    results = {}
    for method in methods:
        flags = candidates[method].to_numpy(np.int64) == 1
        by_diameter = []
        for j, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
            inside = (d_um >= low) & ((d_um <= high) if j == edges.size - 2 else (d_um < high))
            by_diameter.append({"low_um": float(low), "high_um": float(high),
                                **_label_shares(flags, label, labelled & inside)})
        results[method] = {
            **_label_shares(flags, label, labelled), "n_candidates": int(flags.sum()),
            "n_labelled": int((flags & labelled).sum()),
            "by_confidence": [{"min_confidence": k, **_label_shares(flags, label, confidence >= k)}
                              for k in CONFIDENCES],
            "by_diameter": by_diameter, "labellers": labellers, "n_labelled_candidates": int(labelled.sum()),
            "agreement": agreement, "interval": "Wilson score, 95 %"}
    return results


def split_metrics_paths(out_json, splits) -> dict[str, Path]:
    """split -> its metrics file: the primary split's is ``out_json``, every other's ``<split>/metrics.json``
    in out_json's folder."""
    out_json, primary = Path(out_json), primary_split(splits)
    return {split: out_json if split == primary else out_json.parent / split / "metrics.json" for split in splits}


def _check_not_skipped(table: pd.DataFrame, skipped: dict, source, store) -> None:
    """No particles of a hologram that standardization skipped: the method cannot have seen it (a stale CSV)."""
    found = np.unique(table["hid"][table["hid"].isin(list(skipped))])
    if found.size:
        raise ValueError(f"{source}: particles of hologram(s) {found[:10].tolist()}, which {store} lists as "
                         "skipped (no data): the file predates the store; rerun the method")


def _note_skipped(results: dict, skipped: dict, n_true_skipped: int) -> None:
    """Say in every method's metrics which holograms were left out and how many true particles went with them."""
    listed = [{"hid": hid, "reason": reason} for hid, reason in sorted(skipped.items())]
    note = (f"{len(skipped)} hologram(s) without data left out (standardization skipped them), with their "
            f"{n_true_skipped} true particle(s), of every count above" if skipped else None)
    for name, metrics in results.items():
        if name != "_minus_".join(DIFFERENCE):
            metrics.update(skipped_holograms=listed, n_true_skipped=n_true_skipped, skipped_note=note)


def _evaluate_split(split: str, truth: pd.DataFrame, holograms: np.ndarray, predicted: dict, evaluate: dict,
                    depth_bins, dust: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """One split's ``{method: metrics}`` (+ ``unet_minus_baseline``) and ``{method: matches}`` (empty without
    truth) over ``holograms``, the hids evaluated (those standardization did not skip). Where the split's
    file records window ``dust``, each method also gets ``on_window_dust`` (:func:`on_window_dust` of its false
    particles, those matched to no droplet, in all its holograms) and ``on_window_dust_per_10_holograms``."""
    diameter_bins = evaluate["diameter_bins"]
    n_holograms = int(holograms.size)
    if not len(truth):
        return {method: {"split": split, **_counts_only(table, holograms, diameter_bins)}
                for method, table in predicted.items()}, {}
    tol_xy, tol_z = float(evaluate["tolerance_xy"]), float(evaluate["tolerance_z"])
    n_resamples, seed = int(evaluate["bootstrap"]), int(evaluate["seed"])
    matches = {method: match(truth, table, tol_xy, tol_z) for method, table in predicted.items()}
    # Rows of the evaluated holograms only: a skipped one is not drawn by the bootstrap.
    counts = {method: hologram_counts(truth, table, matches[method], int(holograms.max()))[holograms - 1]
              for method, table in predicted.items()}
    intervals, difference = bootstrap_intervals(counts, n_resamples, seed)
    interval = (f"bootstrap over the {n_holograms} holograms, {n_resamples} resamples (seed {seed}), "
                "2.5-97.5 percentiles, the same draws for every method; one trained model: another training "
                "run moves the U-Net by more (make accuracy's intervals cover both)")
    results = {method: {"truth": True, "split": split, "n_holograms": n_holograms,
                        **detection_metrics(truth, table, matches[method], diameter_bins, depth_bins),
                        **intervals[method], "interval": interval,
                        "tolerance_xy_um": tol_xy * 1e6, "tolerance_z_um": tol_z * 1e6}
               for method, table in predicted.items()}
    if difference is not None:
        results["_minus_".join(DIFFERENCE)] = {**difference, "interval": interval}
    if dust is not None and len(dust):
        for method, table in predicted.items():
            # False particles only: a true droplet that happens to lie behind a speck is found, not dust.
            false = table.drop(index=matches[method]["pred_index"])
            found = on_window_dust(false[false["hid"].isin(holograms)], dust, tol_xy)
            results[method].update(on_window_dust=found, on_window_dust_per_10_holograms=10 * found / n_holograms,
                                   window_dust_specks=len(dust))
    return results, matches


def evaluate_files(config: dict, truth_store_paths: dict, predictions: dict, out_json, plots_dir,
                   labels: dict | None = None) -> Path:
    """Evaluate every method on every split apart; write each split's metrics and the plots; returns out_json.

    ``truth_store_paths`` maps split -> store (netCDF or zarr, the truth particles in µm); ``predictions`` maps method
    -> split -> particle CSV. The primary split (:func:`primary_split`) goes to ``out_json``, every other split to
    ``<out_json's folder>/<split>/metrics.json`` (:func:`split_metrics_paths`), each ``{method: {metric: value}}``. A
    split with truth particles gives ``truth: true``, its ``split`` and ``n_holograms``, :func:`detection_metrics`
    (recall by diameter with ``evaluate.diameter_bins``, by depth with ``evaluate.depth_bins`` equal bins of
    ``optics.z_min`` to ``optics.z_max``), bootstrap intervals ``precision_ci95``, ``recall_ci95``, ``f1_ci95`` and,
    beside the methods, ``unet_minus_baseline: {f1, f1_ci95}`` (module docstring). A split without any (real data of
    one's own) gives counts per hologram and d, z distributions with a d histogram, ``truth: false`` and a note. Plots
    go to ``plots_dir`` under :data:`~holopipe.evaluation.plots.PLOT_NAMES` (per split where there is more than one;
    without truth anywhere, ``f1_bars.png`` shows particles per hologram); every file is written atomically.

    Holograms that standardization skipped (no data: :func:`holopipe.core.io.skipped_holograms`) are left out of
    every count and of the bootstrap, with their true particles; every method's entry lists them
    (``skipped_holograms``: hid and reason), with ``n_true_skipped`` and ``skipped_note``. A prediction in a
    skipped hologram is refused (its CSV predates the store).

    ``labels`` maps split -> (candidates directory, label CSVs): where a split's label files hold any label, each
    method's entry of the primary split gets ``labels: {split: label_metrics}`` (:func:`label_metrics`); without any,
    the files are as without ``labels``. :data:`~holopipe.evaluation.plots.LABEL_PLOT_NAMES` are always written: the
    head-to-head table and the gallery of candidates where the methods disagree, or a note that there are no labels yet.
    """
    evaluate, optics = config["evaluate"], config["optics"]
    depth_bins = np.linspace(float(optics["z_min"]), float(optics["z_max"]), int(evaluate["depth_bins"]) + 1)
    read = {split: read_truth(path) for split, path in truth_store_paths.items()}
    truths = {split: truth.particles for split, truth in read.items()}
    holograms = {split: truth.holograms for split, truth in read.items()}
    for method, by_split in predictions.items():
        missing = sorted(set(truths) - set(by_split))
        if missing:
            raise ValueError(f"method {method!r} has no predictions for split(s) {missing}")
    predicted = {method: {split: read_particle_csv(by_split[split]) for split in truths}
                 for method, by_split in predictions.items()}
    for method, by_split in predicted.items():
        for split, table in by_split.items():
            check_holograms(table, read[split].n_holograms, predictions[method][split])
            _check_not_skipped(table, read[split].skipped, predictions[method][split], truth_store_paths[split])
    results, matches = {}, {}
    for split in truths:
        results[split], matches[split] = _evaluate_split(
            split, truths[split], holograms[split], {m: predicted[m][split] for m in predicted}, evaluate,
            depth_bins, read[split].dust)
        _note_skipped(results[split], read[split].skipped, read[split].n_skipped_particles)
    primary = primary_split(truths)
    labelled = _labelled_splits(labels or {}, list(truths), list(predicted), evaluate["diameter_bins"])
    for split, (_, _, by_method) in labelled.items():
        for method, metrics in by_method.items():
            results[primary][method].setdefault("labels", {})[split] = metrics
    paths = split_metrics_paths(out_json, truths)
    for split, path in paths.items():
        text = json.dumps(results[split], indent=2, sort_keys=True)
        write_atomically(path, lambda tmp, text=text: tmp.write_text(text + "\n", encoding="utf-8"))
    plot_evaluation(Path(plots_dir), truths, {s: int(h.size) for s, h in holograms.items()}, predicted, results,
                    matches, primary)
    plot_labels(Path(plots_dir), labelled, list(labels or truths))
    return paths[primary]


def _interval_or_dash(interval, signed: bool = False) -> str:
    if interval is None:
        return "[-]"
    spec = "+.3f" if signed else ".3f"
    return f"[{interval[0]:{spec}}, {interval[1]:{spec}}]"


def summary(out_json, splits) -> str:
    """The log's table of each split's metrics file written by :func:`evaluate_files`: per method n truth,
    tp, fp, fn and F1 with its 95 % interval, and the paired difference; counts alone without truth."""
    paths, primary = split_metrics_paths(out_json, splits), primary_split(splits)
    blocks = []
    for split, path in paths.items():
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        methods = {name: m for name, m in results.items() if "truth" in m}
        first = next(iter(methods.values()))
        role = "primary, " if split == primary else ""
        if not first["truth"]:
            lines = [f"{split} ({role}{path}): {first['n_holograms']} holograms, no truth particles",
                     f"{'method':10} {'found':>7} {'per hologram':>12}"]
            lines += [f"{name:10} {m['n_predicted']:7d} {m['predicted_per_hologram'] or 0.0:12.2f}"
                      for name, m in methods.items()]
        else:
            lines = [f"{split} ({role}{path}): {first['n_holograms']} holograms; {first['interval']}",
                     f"{'method':10} {'n truth':>7} {'tp':>6} {'fp':>6} {'fn':>6}  F1 [95 %]"]
            lines += [f"{name:10} {m['n_true']:7d} {m['tp']:6d} {m['fp']:6d} {m['fn']:6d}  {m['f1']:.3f} "
                      f"{_interval_or_dash(m['f1_ci95'])}" for name, m in methods.items()]
            difference = results.get("_minus_".join(DIFFERENCE))
            if difference is not None:
                lines.append(f"{' - '.join(DIFFERENCE)}: F1 {difference['f1']:+.3f} "
                             f"{_interval_or_dash(difference['f1_ci95'], signed=True)} (paired)")
            if "on_window_dust" in first:
                lines.append(f"on the {first['window_dust_specks']} specks of window dust (per 10 holograms): "
                             + ", ".join(f"{name} {m['on_window_dust']} ({m['on_window_dust_per_10_holograms']:.1f})"
                                         for name, m in methods.items()))
        if first.get("skipped_holograms"):
            lines.append("skipped, no data: " + "; ".join(f"hologram {s['hid']} ({s['reason']})"
                                                          for s in first["skipped_holograms"])
                         + f"; their {first['n_true_skipped']} true particle(s) are not counted")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _labelled_splits(labels: dict, splits: list[str], methods: list[str], diameter_bins) -> dict:
    """split -> (Candidates, combined labels, label_metrics) of the splits whose label files hold labels.

    A method without a column in candidates.csv has no candidates there: a ValueError naming the file.
    """
    unknown = sorted(set(labels) - set(splits))
    if unknown:
        raise ValueError(f"labels given for split(s) {unknown}, which are not evaluated ({', '.join(splits)})")
    found = {}
    for split, (candidates_dir, label_files) in labels.items():
        candidates = open_candidates(candidates_dir)
        missing = [m for m in methods if m not in candidates.table.columns]
        if missing:
            raise ValueError(f"{candidates.path / 'candidates.csv'}: no column for method(s) {missing}")
        given = read_labels(list(label_files), candidates)
        if len(given):
            found[split] = (candidates, combined_labels(given),
                            label_metrics(candidates.table, given, methods, diameter_bins))
    return found
