"""The evaluation's plots for the Snakemake report: particles in 3-D, diameters, errors, recall by diameter,
by depth and by both, size error, F1 with intervals, and the hand labels' table and gallery. Drawn with matplotlib's
object API (no pyplot: no global state, Agg), written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from holopipe.core.files import write_atomically
from holopipe.evaluation.matching import COORDINATES

__all__ = ["LABEL_PLOT_NAMES", "PLOT_NAMES", "plot_evaluation", "plot_labels"]

PLOT_NAMES = ("scatter3d.png", "diameters.png", "errors.png", "recall_by_diameter.png", "recall_by_depth.png",
              "recall_grid.png", "size_error.png", "f1_bars.png")
LABEL_PLOT_NAMES = ("labels_table.png", "labels_gallery.png")
"""Written on every run: with labels the head-to-head table and the gallery, without them a note saying so."""
GALLERY_SIZE = 24
"""Candidates shown in the labels gallery."""


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


def plot_evaluation(plots_dir: Path, truths: dict, n_holograms: dict, predicted: dict, results: dict, matches: dict,
              primary: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

    methods = list(predicted)
    colours = {m: f"C{i + 1}" for i, m in enumerate(methods)}
    splits = list(truths)
    with_truth = [s for s in splits if len(truths[s])]
    # The one-split plots show the primary split where it has truth, else the first split that has.
    split = primary if primary in with_truth or not with_truth else with_truth[0]

    # One hologram in 3-D: the one with the most true (else predicted) particles.
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
        errors = {m: matches[split][m][f"error_{c}"].to_numpy(np.float64) for m in methods}
        pooled = np.concatenate([np.empty(0), *errors.values()])
        edges = np.histogram_bin_edges(pooled if pooled.size else [-1.0, 1.0], bins=20)
        for m, values in errors.items():
            if values.size:
                ax.hist(values, bins=edges, histtype="step", linewidth=1.5, color=colours[m], label=m)
        ax.set(xlabel=f"{c} error (µm), predicted - true", ylabel="matches", title=split)
        _legend(ax)
    _save(figure, plots_dir / "errors.png")

    by_bin = {"recall_by_diameter": ("true diameter (µm, bin centre)", 1.0),
              "recall_by_depth": ("true z (mm, bin centre)", 1e-3)}
    for key, (xlabel, scale) in by_bin.items():
        figure = Figure(figsize=(6, 3.4 * max(len(with_truth), 1)))
        if not with_truth:
            _no_truth(figure.add_subplot())
        for i, s in enumerate(with_truth):
            ax = figure.add_subplot(len(with_truth), 1, i + 1)
            for m in methods:
                rows = results[s][m][key]
                centres = np.array([0.5 * (r["low_um"] + r["high_um"]) for r in rows]) * scale
                recall = np.array([np.nan if r["recall"] is None else r["recall"] for r in rows])
                band = np.array([[np.nan, np.nan] if r["recall_ci95"] is None else r["recall_ci95"] for r in rows])
                ax.fill_between(centres, band[:, 0], band[:, 1], color=colours[m], alpha=0.2, linewidth=0)
                ax.plot(centres, recall, marker="o", color=colours[m], label=m)
            ax.set(xlabel=xlabel, ylabel="recall", ylim=(0, 1.05),
                   title=f"{key.replace('_', ' ').capitalize()}: {s} (band: 95 % Wilson)")
            _legend(ax)
        _save(figure, plots_dir / f"{key}.png")

    _recall_grid(plots_dir / "recall_grid.png", results, with_truth, methods)

    # Size error, bias ± rms of d per bin: by diameter (left) and by depth (right), one row per split.
    figure = Figure(figsize=(10, 3.4 * max(len(with_truth), 1)))
    if not with_truth:
        _no_truth(figure.add_subplot())
    offsets = (np.arange(len(methods)) - (len(methods) - 1) / 2) * 0.08  # of a bin's width: methods side by side
    for i, s in enumerate(with_truth):
        for j, (key, (xlabel, scale)) in enumerate(by_bin.items()):
            ax = figure.add_subplot(len(with_truth), 2, 2 * i + j + 1)
            ax.axhline(0.0, color="0.6", linewidth=0.8)
            for m, offset in zip(methods, offsets):
                rows = [r for r in results[s][m][key] if r["bias_d_um"] is not None]
                x = np.array([0.5 * (r["low_um"] + r["high_um"]) + offset * (r["high_um"] - r["low_um"])
                              for r in rows]) * scale
                ax.errorbar(x, [r["bias_d_um"] for r in rows], yerr=[r["rms_d_um"] for r in rows], fmt="o",
                            capsize=3, color=colours[m], label=m)
            ax.set(xlabel=xlabel, ylabel="d error (µm): bias ± rms", title=f"Size error: {s}")
            _legend(ax)
    _save(figure, plots_dir / "size_error.png")

    figure = Figure(figsize=(max(6, 1.6 * len(with_truth) + 3), 4))
    ax = figure.add_subplot()
    width = 0.8 / max(len(methods), 1)
    if with_truth:
        for j, m in enumerate(methods):
            f1 = np.array([results[s][m]["f1"] for s in with_truth])
            interval = np.array([results[s][m]["f1_ci95"] or [f, f] for s, f in zip(with_truth, f1)])
            ax.bar(np.arange(len(with_truth)) + j * width, f1, width, color=colours[m], label=m,
                   yerr=np.stack([f1 - interval[:, 0], interval[:, 1] - f1]), capsize=4)
        ax.set_xticks(np.arange(len(with_truth)) + width * (len(methods) - 1) / 2,
                      [f"{s}\n({n_holograms[s]} holograms)" for s in with_truth])
        ax.set(ylim=(0, 1.05), ylabel="F1", title="F1 per split, 95 % bootstrap interval over holograms")
    else:  # what can be said without truth: how many particles each method finds per hologram
        for j, m in enumerate(methods):
            counts = np.concatenate([results[s][m]["predicted_by_hologram"] for s in splits])
            ax.bar(np.arange(len(counts)) + j * width, counts, width, color=colours[m], label=m)
        ax.set(xlabel="hologram (in split order)", ylabel="particles found",
               title="Particles per hologram, no truth")
    _legend(ax)
    _save(figure, plots_dir / "f1_bars.png")


def _recall_grid(path: Path, results: dict, with_truth: list[str], methods: list[str]) -> None:
    """Recall per (true diameter, true depth) cell, one row of panels per split and one panel per method:
    the colour is the recall, the text ``found/true``; an empty cell is blank."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.8 * max(len(methods), 1), 3.8 * max(len(with_truth), 1)))
    if not with_truth:
        _no_truth(figure.add_subplot())
    for i, s in enumerate(with_truth):
        for j, m in enumerate(methods):
            ax = figure.add_subplot(len(with_truth), len(methods), i * len(methods) + j + 1)
            grid = results[s][m]["recall_by_diameter_and_depth"]
            n_true, tp = np.asarray(grid["n_true"], np.float64), np.asarray(grid["tp"], np.float64)
            recall = np.divide(tp, n_true, out=np.full_like(tp, np.nan), where=n_true > 0)
            ax.imshow(recall, cmap="RdYlGn", vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
            for (row, col), n in np.ndenumerate(n_true):
                if n:
                    ax.text(col, row, f"{int(tp[row, col])}/{int(n)}", ha="center", va="center", fontsize=7)
            depth_mm = np.asarray(grid["depth_edges_um"]) * 1e-3
            diameter_um = np.asarray(grid["diameter_edges_um"])
            ax.set_xticks(np.arange(depth_mm.size - 1),
                          [f"{a:.0f}-{b:.0f}" for a, b in zip(depth_mm[:-1], depth_mm[1:])], fontsize=7)
            ax.set_yticks(np.arange(diameter_um.size - 1),
                          [f"{a:.0f}-{b:.0f}" for a, b in zip(diameter_um[:-1], diameter_um[1:])], fontsize=7)
            ax.set(xlabel="true z (mm)", ylabel="true diameter (µm)", title=f"Recall, {m}: {s} (found/true)")
    _save(figure, path)


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


def plot_labels(plots_dir: Path, labelled: dict, splits: list[str]) -> None:
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
