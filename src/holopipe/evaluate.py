"""Evaluation: predicted particles matched to the truth, detection metrics, and the report's plots.

Matching is one-to-one per hologram (Hungarian algorithm): the cost of a pair is the normalised
distance ``sqrt((dx/tol_xy)² + (dy/tol_xy)² + (dz/tol_z)²)``; a pair farther than the tolerance in
any of x, y or z is forbidden. Forbidden pairs get a cost larger than any full set of allowed pairs
and are dropped after the assignment, so the assignment first maximises the number of matches and
then minimises their total cost (unlike greedy nearest-first matching, which can block a match).

Conventions of the metrics (``detection_metrics``): ``precision = tp / n_predicted`` and is 1 when
nothing was predicted (no false detections); ``recall = tp / n_true`` and is 1 when there is nothing
to find; ``f1`` is their harmonic mean, 0 when both are 0. Errors are predicted minus true, in µm;
their rms and bias are null (None) without matches. Recall by diameter bins the *true* diameters,
each bin ``[low, high)`` (the last one closed), recall null for an empty bin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from holopipe.io import open_holodec, particle_table, write_atomically

__all__ = ["PLOT_NAMES", "detection_metrics", "evaluate_files", "match", "read_predictions"]

PLOT_NAMES = ("scatter3d.png", "diameters.png", "errors.png", "recall_by_diameter.png", "f1_bars.png")
COORDINATES = ("x", "y", "z", "d")
MATCH_COLUMNS = ("hid", "true_index", "pred_index",
                 *(f"{c}_{side}" for side in ("true", "pred") for c in COORDINATES),
                 *(f"error_{c}" for c in COORDINATES), "cost")


def match(truth: pd.DataFrame, predicted: pd.DataFrame, tolerance_xy_m: float, tolerance_z_m: float) -> pd.DataFrame:
    """Matched pairs of ``truth`` and ``predicted`` particles (tables with hid, x, y, z, d in µm).

    Returns one row per pair: hid, true_index and pred_index (the tables' index labels), the true and
    predicted coordinates (``x_true`` ... ``d_pred``, µm), errors ``error_x`` ... ``error_d``
    (predicted minus true, µm) and the normalised distance ``cost`` (<= sqrt(3)). A prediction only
    ever matches a particle of its own hologram.
    """
    if tolerance_xy_m <= 0 or tolerance_z_m <= 0:
        raise ValueError(f"tolerances must be positive metres, got xy {tolerance_xy_m}, z {tolerance_z_m}")
    tol_xy, tol_z = tolerance_xy_m * 1e6, tolerance_z_m * 1e6
    pairs = []
    predicted_by_hid = dict(tuple(predicted.groupby("hid")))
    for hid, true_h in truth.groupby("hid"):
        pred_h = predicted_by_hid.get(hid)
        if pred_h is None or pred_h.empty:
            continue
        offsets = {c: pred_h[c].to_numpy(np.float64)[None, :] - true_h[c].to_numpy(np.float64)[:, None]
                   for c in ("x", "y", "z")}
        cost = np.sqrt((offsets["x"] / tol_xy) ** 2 + (offsets["y"] / tol_xy) ** 2 + (offsets["z"] / tol_z) ** 2)
        allowed = (np.abs(offsets["x"]) <= tol_xy) & (np.abs(offsets["y"]) <= tol_xy) & (np.abs(offsets["z"]) <= tol_z)
        if not allowed.any():
            continue
        # Larger than any sum of allowed costs (each <= sqrt(3)): one more match always beats a cheaper set.
        forbidden = 2.0 * np.sqrt(3.0) * (min(cost.shape) + 1)
        rows, cols = linear_sum_assignment(np.where(allowed, cost, forbidden))
        keep = allowed[rows, cols]
        rows, cols = rows[keep], cols[keep]
        pair = {"hid": np.full(rows.size, hid, dtype=np.int64),
                "true_index": true_h.index.to_numpy()[rows], "pred_index": pred_h.index.to_numpy()[cols]}
        for side, table, index in (("true", true_h, rows), ("pred", pred_h, cols)):
            for c in COORDINATES:
                pair[f"{c}_{side}"] = table[c].to_numpy(np.float64)[index]
        for c in COORDINATES:
            pair[f"error_{c}"] = pair[f"{c}_pred"] - pair[f"{c}_true"]
        pair["cost"] = cost[rows, cols]
        pairs.append(pd.DataFrame(pair))
    if not pairs:
        return pd.DataFrame({name: pd.Series(dtype=np.int64 if name == "hid" else np.float64)
                             for name in MATCH_COLUMNS})
    return pd.concat(pairs, ignore_index=True)[list(MATCH_COLUMNS)]


def _ratio(numerator: int, denominator: int, empty: float) -> float:
    return float(numerator / denominator) if denominator else empty


def _diameter_bins(truth: pd.DataFrame, matches: pd.DataFrame, diameter_bins) -> list[dict]:
    edges_um = np.asarray(diameter_bins, dtype=np.float64) * 1e6
    d_true = truth["d"].to_numpy(np.float64)
    found = np.zeros(len(truth), dtype=bool)
    found[truth.index.get_indexer(matches["true_index"])] = True
    rows = []
    for i, (low, high) in enumerate(zip(edges_um[:-1], edges_um[1:])):
        last = i == edges_um.size - 2
        inside = (d_true >= low) & ((d_true <= high) if last else (d_true < high))
        n, tp = int(inside.sum()), int((inside & found).sum())
        rows.append({"low_um": float(low), "high_um": float(high), "n_true": n, "tp": tp,
                     "recall": float(tp / n) if n else None})
    return rows


def detection_metrics(truth: pd.DataFrame, predicted: pd.DataFrame, matches: pd.DataFrame, diameter_bins) -> dict:
    """Counts, precision, recall, F1, rms and bias of the x, y, z, d errors (µm) and recall by diameter.

    ``matches`` is :func:`match`'s result for these tables (``truth`` must have a unique index);
    ``diameter_bins`` are bin edges in metres. See the module docstring for the 0/0 conventions.
    """
    n_true, n_predicted, tp = len(truth), len(predicted), len(matches)
    precision = _ratio(tp, n_predicted, 1.0)
    recall = _ratio(tp, n_true, 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    metrics = {"n_true": n_true, "n_predicted": n_predicted, "tp": tp, "fp": n_predicted - tp,
               "fn": n_true - tp, "precision": precision, "recall": recall, "f1": f1}
    for c in COORDINATES:
        errors = matches[f"error_{c}"].to_numpy(np.float64)
        metrics[f"rms_{c}_um"] = float(np.sqrt(np.mean(errors**2))) if errors.size else None
        metrics[f"bias_{c}_um"] = float(np.mean(errors)) if errors.size else None
    metrics["recall_by_diameter"] = _diameter_bins(truth, matches, diameter_bins)
    return metrics


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
            "note": "no truth particles in the evaluated split(s): precision, recall and errors not computed",
            "n_holograms": n_holograms, "n_predicted": len(predicted),
            "predicted_per_hologram": float(len(predicted) / n_holograms) if n_holograms else None,
            "counts_per_hologram": _distribution(per_hologram), "predicted_by_hologram": per_hologram.tolist(),
            "d_um": _distribution(predicted["d"]), "z_um": _distribution(predicted["z"]),
            "d_histogram_um": _histogram(predicted["d"], np.asarray(diameter_bins, dtype=np.float64) * 1e6)}


def read_predictions(path) -> pd.DataFrame:
    """A particle CSV (hid, x, y, z, d in µm, + prob or score); a clear error names a bad file."""
    path = Path(path)
    table = pd.read_csv(path)
    missing = [c for c in ("hid", *COORDINATES) if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing particle column(s) {missing}; expected hid, x, y, z, d (µm)")
    return table.astype({"hid": np.int64, **{c: np.float64 for c in COORDINATES}})


SPLIT_KEY = 10**9
"""(split, hid) -> hid + SPLIT_KEY x the split's position: one integer key per hologram across splits."""


def _keyed(tables: dict[str, pd.DataFrame], order: list[str]) -> pd.DataFrame:
    """One table for several splits: (split, hid) becomes one integer key so matching stays per hologram."""
    return pd.concat([table.assign(split=split, hid=table["hid"] + order.index(split) * SPLIT_KEY)
                      for split, table in tables.items()], ignore_index=True)


def evaluate_files(config: dict, truth_store_paths: dict, predictions: dict, out_json, plots_dir) -> Path:
    """Evaluate every method on every split; write ``metrics.json`` and the five plots; returns out_json.

    ``truth_store_paths`` maps split -> store (netCDF or zarr, the truth particles in µm);
    ``predictions`` maps method -> split -> particle CSV. ``metrics.json`` is ``{method: {metric:
    value}}``: the detection metrics pooled over the splits that have truth particles (matching per
    hologram), with ``truth: true`` and ``splits_evaluated``; where no split has any (real data of
    one's own, without a particle table), counts per hologram and d, z distributions with a d
    histogram, ``truth: false`` and a note (also under ``splits_without_truth`` beside the metrics of
    the splits with truth). With more than one split, each split's own metrics are nested under
    ``splits``. Plots go to ``plots_dir`` under :data:`PLOT_NAMES` (``diameters.png`` one panel per
    split; without truth, ``f1_bars.png`` shows particles per hologram); every file is written atomically.
    """
    evaluate = config["evaluate"]
    tol_xy, tol_z, bins = float(evaluate["tolerance_xy"]), float(evaluate["tolerance_z"]), evaluate["diameter_bins"]
    truths, n_holograms = {}, {}
    for split, path in truth_store_paths.items():
        ds = open_holodec(path)
        try:
            truths[split], n_holograms[split] = particle_table(ds), int(ds.sizes["hologram_number"])
        finally:
            ds.close()
    for method, by_split in predictions.items():
        missing = sorted(set(truths) - set(by_split))
        if missing:
            raise ValueError(f"method {method!r} has no predictions for split(s) {missing}")
    predicted = {method: {split: read_predictions(by_split[split]) for split in truths}
                 for method, by_split in predictions.items()}
    with_truth = [split for split in truths if len(truths[split])]
    order = list(truths)

    def holograms(splits: list[str]) -> np.ndarray:
        return np.concatenate([np.arange(1, n_holograms[s] + 1) + order.index(s) * SPLIT_KEY for s in splits])

    def evaluate_splits(method: str, splits: list[str]) -> tuple[dict, pd.DataFrame]:
        preds = _keyed({s: predicted[method][s] for s in splits}, order)
        truth_splits = [s for s in splits if s in with_truth]
        if not truth_splits:
            return _counts_only(preds, holograms(splits), bins), pd.DataFrame()
        truth = _keyed({s: truths[s] for s in truth_splits}, order)
        preds_t = preds[preds["split"].isin(truth_splits)]
        matches = match(truth, preds_t, tol_xy, tol_z)
        metrics = {"truth": True, "splits_evaluated": truth_splits,
                   **detection_metrics(truth, preds_t, matches, bins),
                   "tolerance_xy_um": tol_xy * 1e6, "tolerance_z_um": tol_z * 1e6}
        without = [s for s in splits if s not in truth_splits]
        if without:
            metrics["splits_without_truth"] = {s: _counts_only(predicted[method][s], np.arange(1, n_holograms[s] + 1),
                                                               bins) for s in without}
        return metrics, matches

    results, all_matches = {}, {}
    for method in predicted:
        results[method], all_matches[method] = evaluate_splits(method, list(truths))
        if len(truths) > 1:
            results[method]["splits"] = {s: evaluate_splits(method, [s])[0] for s in truths}
    out_json = Path(out_json)
    text = json.dumps(results, indent=2, sort_keys=True)
    write_atomically(out_json, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    _plot_all(Path(plots_dir), truths, n_holograms, with_truth, predicted, results, all_matches)
    return out_json


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90))


def _legend(ax) -> None:
    """A legend where something was drawn (an empty one only warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _no_truth(ax) -> None:
    ax.text(0.5, 0.5, "no truth particles:\nnot computed", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _plot_all(plots_dir: Path, truths: dict, n_holograms: dict, with_truth: list, predicted: dict, results: dict,
              matches: dict) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

    methods = list(predicted)
    colours = {m: f"C{i + 1}" for i, m in enumerate(methods)}
    splits = list(truths)

    # One hologram in 3-D: the one with the most true (else predicted) particles of the first split with truth.
    split = with_truth[0] if with_truth else splits[0]
    counts = pd.concat([truths[split]["hid"], *(predicted[m][split]["hid"] for m in methods)]).value_counts()
    hid = int(truths[split]["hid"].value_counts().idxmax() if len(truths[split]) else
              counts.idxmax() if len(counts) else 1)
    figure = Figure(figsize=(6, 5))
    ax = figure.add_subplot(projection="3d")
    truth_h = truths[split][truths[split]["hid"] == hid]
    ax.scatter(truth_h["x"], truth_h["y"], truth_h["z"] / 1e3, s=60, facecolors="none", edgecolors="C0",
               label="truth")
    for marker, m in zip("x+^sv", methods):
        pred_h = predicted[m][split][predicted[m][split]["hid"] == hid]
        ax.scatter(pred_h["x"], pred_h["y"], pred_h["z"] / 1e3, marker=marker, color=colours[m], label=m)
    ax.set(xlabel="x (µm)", ylabel="y (µm)", zlabel="z (mm)", title=f"{split}, hologram {hid}")
    _legend(ax)
    _save(figure, plots_dir / "scatter3d.png")

    # Diameters, one panel per split: truth and every method where the split has truth, methods alone where not.
    figure = Figure(figsize=(6, 3.2 * len(splits)))
    values = np.concatenate([np.empty(0), *(truths[s]["d"].to_numpy(np.float64) for s in with_truth),
                             *(predicted[m][s]["d"].to_numpy(np.float64) for m in methods for s in splits)])
    edges = np.histogram_bin_edges(values if values.size else [0.0, 1.0], bins=30)
    for i, s in enumerate(splits):
        ax = figure.add_subplot(len(splits), 1, i + 1)
        series = {"truth": truths[s]["d"]} if s in with_truth else {}
        series.update({m: predicted[m][s]["d"] for m in methods})
        for name, d in series.items():
            if len(d):
                ax.hist(d, bins=edges, histtype="step", linewidth=1.5, color=colours.get(name, "C0"), label=name)
        truth_note = "" if s in with_truth else ", no truth"
        ax.set(xlabel="diameter d (µm)", ylabel="particles",
               title=f"Diameters: {s} ({n_holograms[s]} holograms{truth_note})")
        _legend(ax)
    _save(figure, plots_dir / "diameters.png")

    figure = Figure(figsize=(8, 6))
    for i, c in enumerate(COORDINATES):
        ax = figure.add_subplot(2, 2, i + 1)
        if not with_truth:
            _no_truth(ax)
            continue
        errors = {m: matches[m][f"error_{c}"].to_numpy(np.float64) for m in methods if len(matches[m])}
        pooled = np.concatenate([np.empty(0), *errors.values()])
        edges = np.histogram_bin_edges(pooled if pooled.size else [-1.0, 1.0], bins=20)
        for m, values in errors.items():
            ax.hist(values, bins=edges, histtype="step", linewidth=1.5, color=colours[m], label=m)
        ax.set(xlabel=f"{c} error (µm), predicted - true", ylabel="matches")
        _legend(ax)
    _save(figure, plots_dir / "errors.png")

    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    if with_truth:
        for m in methods:
            rows = results[m]["recall_by_diameter"]
            centres = [0.5 * (r["low_um"] + r["high_um"]) for r in rows]
            recall = [np.nan if r["recall"] is None else r["recall"] for r in rows]
            ax.plot(centres, recall, marker="o", color=colours[m], label=m)
        ax.set(xlabel="true diameter (µm, bin centre)", ylabel="recall", ylim=(0, 1.05), title="Recall by diameter")
        _legend(ax)
    else:
        _no_truth(ax)
    _save(figure, plots_dir / "recall_by_diameter.png")

    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    width = 0.8 / max(len(methods), 1)
    if with_truth:
        names = ("precision", "recall", "f1")
        for j, m in enumerate(methods):
            ax.bar(np.arange(3) + j * width, [results[m][n] for n in names], width, color=colours[m], label=m)
        ax.set_xticks(np.arange(3) + width * (len(methods) - 1) / 2, names)
        ax.set(ylim=(0, 1.05), title="Detection")
    else:  # what can be said without truth: how many particles each method finds per hologram
        for j, m in enumerate(methods):
            counts = results[m]["predicted_by_hologram"]
            ax.bar(np.arange(len(counts)) + j * width, counts, width, color=colours[m], label=m)
        ax.set(xlabel="hologram (in split order)", ylabel="particles found",
               title="Particles per hologram, no truth")
    _legend(ax)
    _save(figure, plots_dir / "f1_bars.png")
