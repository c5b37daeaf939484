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

**Hand labels** (real data, no truth; :mod:`holopipe.labels`): where a split has label files, each
method's entry gets ``labels: {split: ...}`` (:func:`label_metrics`): precision on real data, the share
of the method's labelled candidates that are labelled ``particle`` (``unsure`` ones left out and counted
as ``n_unsure``), and recall relative to the union, the share of all candidates labelled ``particle``
that the method found; each at every confidence ``>= k`` (k = 1..5) and per diameter bin (the
candidate's d), with the labellers' pairwise Cohen's kappa. Intervals are 95 % Wilson score intervals:
closed-form, not random, and well behaved for the few dozen labels and shares near 0 or 1 a labelling
session gives (the Wald interval collapses to zero width at 0 and 1; a bootstrap over holograms needs
many holograms with labels). They treat candidates as independent, which droplets of one hologram
nearly are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from holopipe.io import open_holodec, particle_table, write_atomically

__all__ = ["LABEL_PLOT_NAMES", "PLOT_NAMES", "cohen_kappa", "combined_labels", "detection_metrics", "evaluate_files",
           "label_metrics", "match", "read_predictions", "wilson_interval"]

PLOT_NAMES = ("scatter3d.png", "diameters.png", "errors.png", "recall_by_diameter.png", "f1_bars.png")
LABEL_PLOT_NAMES = ("labels_table.png", "labels_gallery.png")
"""Written on every run: with labels the head-to-head table and the gallery, without them a note saying so."""
WILSON_Z = 1.959963984540054
"""Normal quantile of a two-sided 95 % interval."""
GALLERY_SIZE = 24
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
    from holopipe.labels import LABELS

    first, second = np.asarray(first, dtype=object), np.asarray(second, dtype=object)
    if first.size == 0:
        return None
    observed = float(np.mean(first == second))
    chance = float(sum(np.mean(first == c) * np.mean(second == c) for c in LABELS))
    return None if chance == 1.0 else (observed - chance) / (1.0 - chance)


def combined_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """One label per candidate from every labeller's current labels (:func:`holopipe.labels.read_labels`).

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
    labels (:func:`holopipe.labels.read_labels`); see the module docstring. Per method: ``precision`` and
    ``recall`` (value, 95 % Wilson ``low``/``high``, ``hits``, ``n``) over every label, ``n_candidates``,
    ``n_labelled``, ``n_unsure`` (its labelled ``unsure`` candidates), ``by_confidence`` (k = 1..5:
    labels of confidence >= k), ``by_diameter`` (``diameter_bins`` in metres, the candidate's d), and,
    the same for every method, ``labellers``, ``n_labelled_candidates`` and ``agreement``: Cohen's kappa
    per pair of labellers on the candidates both labelled, with ``n``.
    """
    from holopipe.labels import CONFIDENCES

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


SPLIT_KEY = 10**9
"""(split, hid) -> hid + SPLIT_KEY x the split's position: one integer key per hologram across splits."""


def _keyed(tables: dict[str, pd.DataFrame], order: list[str]) -> pd.DataFrame:
    """One table for several splits: (split, hid) becomes one integer key so matching stays per hologram."""
    return pd.concat([table.assign(split=split, hid=table["hid"] + order.index(split) * SPLIT_KEY)
                      for split, table in tables.items()], ignore_index=True)


def evaluate_files(config: dict, truth_store_paths: dict, predictions: dict, out_json, plots_dir,
                   labels: dict | None = None) -> Path:
    """Evaluate every method on every split; write ``metrics.json`` and the plots; returns out_json.

    ``truth_store_paths`` maps split -> store (netCDF or zarr, the truth particles in µm);
    ``predictions`` maps method -> split -> particle CSV. ``metrics.json`` is ``{method: {metric:
    value}}``: the detection metrics pooled over the splits that have truth particles (matching per
    hologram), with ``truth: true`` and ``splits_evaluated``; where no split has any (real data of
    one's own, without a particle table), counts per hologram and d, z distributions with a d
    histogram, ``truth: false`` and a note (also under ``splits_without_truth`` beside the metrics of
    the splits with truth). With more than one split, each split's own metrics are nested under
    ``splits``. Plots go to ``plots_dir`` under :data:`PLOT_NAMES` (``diameters.png`` one panel per
    split; without truth, ``f1_bars.png`` shows particles per hologram); every file is written atomically.

    ``labels`` maps split -> (candidates directory, label CSVs): where a split's label files hold any
    label, each method's entry gets ``labels: {split: label_metrics}`` (:func:`label_metrics`); without
    any, metrics.json is as without ``labels``. :data:`LABEL_PLOT_NAMES` are always written: the
    head-to-head table and the gallery of candidates where the methods disagree, or a note that there
    are no labels yet.
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
    labelled = _labelled_splits(labels or {}, list(truths), list(predicted), bins)
    for split, (_, _, by_method) in labelled.items():
        for method, metrics in by_method.items():
            results[method].setdefault("labels", {})[split] = metrics
    out_json = Path(out_json)
    text = json.dumps(results, indent=2, sort_keys=True)
    write_atomically(out_json, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    _plot_all(Path(plots_dir), truths, n_holograms, with_truth, predicted, results, all_matches)
    _plot_labels(Path(plots_dir), labelled, list(labels or truths))
    return out_json


def _labelled_splits(labels: dict, splits: list[str], methods: list[str], diameter_bins) -> dict:
    """split -> (Candidates, combined labels, label_metrics) of the splits whose label files hold labels.

    A method without a column in candidates.csv has no candidates there: a ValueError naming the file.
    """
    from holopipe.labels import open_candidates, read_labels

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


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    # The bounding box of what is drawn: titles above equal-aspect images stay inside the picture.
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))


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


def _interval_text(share: dict) -> str:
    if share["value"] is None:
        return "-"
    return f"{share['value']:.0%} [{share['low']:.0%}, {share['high']:.0%}]"


def _no_labels(path: Path, splits: list[str]) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 1.6))
    ax = figure.add_subplot()
    commands = "\n".join(f"holopipe label --split {s}" for s in splits) or "holopipe label --split SPLIT"
    ax.text(0.5, 0.5, f"no labels yet:\n{commands}", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    _save(figure, path)


def _plot_labels(plots_dir: Path, labelled: dict, splits: list[str]) -> None:
    """The talk's head-to-head table and the gallery of disagreements, or a note where nothing is labelled."""
    from matplotlib.figure import Figure

    if not labelled:
        for name in LABEL_PLOT_NAMES:
            _no_labels(plots_dir / name, splits)
        return
    header = ["split", "method", "precision [95 % CI]", "recall [95 % CI]", "n labelled", "unsure"]
    rows = [[split, method, _interval_text(m["precision"]), _interval_text(m["recall"]),
             f"{m['precision']['n']} of {m['n_candidates']}", str(m["n_unsure"])]
            for split, (_, _, by_method) in labelled.items() for method, m in by_method.items()]
    figure = Figure(figsize=(9, 1.0 + 0.4 * len(rows)))
    ax = figure.add_subplot()
    ax.set_axis_off()
    cells = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    cells.auto_set_font_size(False)
    cells.set_fontsize(10)
    cells.scale(1.0, 1.5)
    notes = [f"{split}: {len(combined)} of {len(candidates.table)} candidates labelled by "
             f"{', '.join(next(iter(by_method.values()))['labellers'])}"
             for split, (candidates, combined, by_method) in labelled.items()]
    ax.set_title("Hand labels: precision = share of a method's candidates labelled particle; recall = share of "
                 "all labelled particles it found\n" + "; ".join(notes), fontsize=9)
    _save(figure, plots_dir / "labels_table.png")

    shown = []  # candidates that one method found and the other did not, with their label
    for split, (candidates, combined, by_method) in labelled.items():
        methods = list(by_method)
        table = candidates.table.merge(combined, on="candidate")
        disagree = table[table[methods].sum(axis=1) == 1] if len(methods) == 2 else table.iloc[:0]
        for row in disagree.itertuples():
            if len(shown) < GALLERY_SIZE:
                found_by = next(m for m in methods if getattr(row, m) == 1)
                shown.append((candidates, row, found_by, split))
    if not shown:
        figure = Figure(figsize=(6, 1.6))
        ax = figure.add_subplot()
        ax.text(0.5, 0.5, "no labelled candidate that only one method found", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        _save(figure, plots_dir / "labels_gallery.png")
        return
    columns = min(6, len(shown))
    n_rows = -(-len(shown) // columns)
    figure = Figure(figsize=(2.2 * columns, 2.5 * n_rows))
    for i, (candidates, row, found_by, split) in enumerate(shown):
        ax = figure.add_subplot(n_rows, columns, i + 1)
        amplitude = candidates.crops(row.candidate)[0][candidates.manifest["focus_plane"]]
        ny, nx = amplitude.shape
        extent = (0, nx * candidates.manifest["dx_um"], 0, ny * candidates.manifest["dy_um"])
        ax.imshow(amplitude, cmap="gray", vmin=0.0, vmax=1.5, extent=extent, origin="lower")
        ax.set_title(f"{split} {row.candidate}: {found_by} only\n{row.label} ({row.confidence}), d {row.d:.0f} µm",
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(figure, plots_dir / "labels_gallery.png")
