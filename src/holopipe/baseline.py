"""The physics-only particle finder, in the spirit of HOLODEC's standard processing (HoloSuite).

Each hologram of a standardized split is reconstructed on the same planes as inference (the centres
of ``reconstruction.z_bins`` bins between zMin and zMax; one FFT per hologram, planes in batches), and
then, without any learning:

1. **Threshold.** A voxel is dark where its amplitude is below ``baseline.threshold``; when that is
   null the threshold is set per hologram from its amplitude histogram: ``mode - threshold_sigmas *
   sigma`` over up to :data:`THRESHOLD_PLANES` evenly spaced planes (every pixel subsampled to about
   :data:`THRESHOLD_SAMPLES` values). The mode is the peak of a histogram around the median; sigma is
   the MAD (times 1.4826), robust to the few dark particle voxels, and never below
   :data:`MIN_SIGMA`, so a particle-free, perfectly flat hologram finds nothing.
2. **Group.** Dark pixels are labelled per plane (8-connected) into 2-D *regions*; a region is joined
   to every region of the previous plane that shares a pixel with it. The 3-D particles are the
   connected components of that graph (``scipy.sparse.csgraph``), so only the previous plane's labels
   are held: memory is one batch of planes, whatever the number of planes, and the result does not
   depend on the batch size. Groups with fewer than ``baseline.min_voxels`` voxels are dropped.
3. **Focus.** A focused opaque particle goes nearly black, the dips of fringes and twin images do
   not, so only regions whose darkest pixel has a contrast ``1 - amplitude`` of at least
   ``baseline.min_contrast`` are candidates (a group without one is dropped). The particle is the
   group's best-focused candidate region by ``baseline.focus_metric``:

   - ``min_amplitude``: the darkest region, after a :data:`holopipe.focus.SMOOTHING_PIXELS`-pixel box
     average (a single interference speckle next to a focused particle must not decide the plane);
   - ``edge_sharpness``: the largest mean gradient magnitude of the amplitude over the region (a
     focused opaque disk has the sharpest edge);
   - ``tamura``: the largest Tamura coefficient sqrt(std / mean) of the gradient magnitude in a
     window around the region (its box widened by half its size on each side).

   One region, not the union of the group's regions on that plane: where the long out-of-focus
   columns (depth of focus ~ D²/λ) of two particles touch, the group still reports one particle's
   size and position; the other one is lost (a known limit of connected-component grouping).
4. **Measure.** From that region: z is its plane; x, y its centroid (rows are y, columns x; pixel
   ``i`` has its centre at ``(i + 0.5 - n/2) * pitch``); d the equivalent diameter
   ``2 sqrt(area dx dy / π)`` of its pixels darker than half-way between the background and its
   minimum (or than the threshold, if that is lower): the half-contrast edge of a focused disk, which
   does not grow with the detection threshold. The score is the darkness contrast ``1 - minimum
   amplitude`` of the region.

Reconstruction uses :class:`holopipe.optics.Propagator` and so would run on any array library;
labelling is scipy's, on numpy arrays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import scipy.sparse
import scipy.sparse.csgraph
from tqdm.auto import tqdm

from holopipe.focus import gradient_magnitude, smoothed_amplitude, tamura_coefficient
from holopipe.io import equivalent_diameter, pixel_position, write_atomically
from holopipe.optics import Propagator
from holopipe.reconstruction import hologram_propagator, open_standardized, z_bin_centres

__all__ = ["CSV_COLUMNS", "auto_threshold", "baseline_file", "find_particles"]

CSV_COLUMNS = ("hid", "x", "y", "z", "d", "score")

THRESHOLD_PLANES = 8
"""Evenly spaced planes whose amplitudes set the automatic threshold."""

THRESHOLD_SAMPLES = 2**20
"""About this many amplitudes (a regular pixel subsample of those planes) go into the histogram."""

MIN_SIGMA = 0.01
"""Floor of the robust amplitude spread (background ~1), so that a flat hologram is all background."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def auto_threshold(amplitude: np.ndarray, sigmas: float) -> tuple[float, float, float]:
    """(threshold, background mode, robust sigma) of an amplitude sample (any shape).

    The mode is the centre of the fullest bin of a 101-bin histogram over median ± 4 sigma, so a
    skewed background (bright fringes on one side) still sits at its peak.
    """
    values = np.asarray(amplitude, dtype=np.float64).ravel()
    median = float(np.median(values))
    sigma = max(1.4826 * float(np.median(np.abs(values - median))), MIN_SIGMA)
    counts, edges = np.histogram(values, bins=101, range=(median - 4 * sigma, median + 4 * sigma))
    peak = int(np.argmax(counts))
    mode = float(0.5 * (edges[peak] + edges[peak + 1]))
    return mode - sigmas * sigma, mode, sigma


def _threshold_sample(propagator: Propagator, planes: np.ndarray) -> np.ndarray:
    """Amplitudes of up to THRESHOLD_PLANES evenly spaced planes, pixels subsampled."""
    chosen = planes[np.unique(np.linspace(0, planes.size - 1, min(THRESHOLD_PLANES, planes.size)).round().astype(int))]
    ny, nx = propagator.shape
    step = max(1, int(np.ceil(np.sqrt(chosen.size * ny * nx / THRESHOLD_SAMPLES))))
    return np.asarray(propagator.reconstruct(chosen).amplitude)[:, ::step, ::step]


def _window_sums(table: np.ndarray, top, bottom, left, right) -> np.ndarray:
    """Sums over [top, bottom) x [left, right) from a summed-area table padded with a zero row/column."""
    return table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]


def _summed_area(values: np.ndarray) -> np.ndarray:
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = np.cumsum(np.cumsum(values, axis=0, dtype=np.float64), axis=1)
    return table


def _region_stats(amplitude: np.ndarray, labels: np.ndarray, n: int, threshold: float, background: float,
                  metric: str) -> dict:
    """Per-region statistics of one plane (regions 1..n of ``labels``), additive where possible.

    Sums run over the dark pixels only, so a full-size plane with few dark pixels costs little more
    than its labelling.
    """
    rows, cols = np.nonzero(labels)
    region = labels[rows, cols] - 1
    values = amplitude[rows, cols].astype(np.float64)

    def total(weights=None):
        return np.bincount(region, weights, minlength=n).astype(np.float64)

    minimum = np.full(n, np.inf)
    np.minimum.at(minimum, region, values)
    stats = {"area": total(), "minimum": minimum, "sum_row": total(rows), "sum_col": total(cols)}
    level = np.minimum(threshold, 0.5 * (background + minimum))
    stats["sizing_area"] = total(values < level[region])
    if metric == "min_amplitude":
        smooth = smoothed_amplitude(amplitude)
        focus = np.full(n, np.inf)
        np.minimum.at(focus, region, smooth[rows, cols].astype(np.float64))
        stats["focus"] = focus
        return stats
    gradient = gradient_magnitude(amplitude)
    if metric == "edge_sharpness":
        stats["gradient_sum"] = total(gradient[rows, cols])
        return stats
    boxes = ndi.find_objects(labels, n)
    top, bottom, left, right = (np.array([getattr(box[axis], end) for box in boxes])
                                for axis, end in ((0, "start"), (0, "stop"), (1, "start"), (1, "stop")))
    margin_rows, margin_cols = (bottom - top + 1) // 2, (right - left + 1) // 2
    ny, nx = labels.shape
    window = (np.maximum(top - margin_rows, 0), np.minimum(bottom + margin_rows, ny),
              np.maximum(left - margin_cols, 0), np.minimum(right + margin_cols, nx))
    stats["window_n"] = ((window[1] - window[0]) * (window[3] - window[2])).astype(np.float64)
    stats["window_sum"] = _window_sums(_summed_area(gradient), *window)
    stats["window_sum2"] = _window_sums(_summed_area(np.square(gradient, dtype=np.float64)), *window)
    return stats


def _focus_score(regions: pd.DataFrame, metric: str) -> pd.Series:
    """Per-region focus score: larger is more in focus."""
    if metric == "min_amplitude":
        return -regions["focus"]
    if metric == "edge_sharpness":
        return regions["gradient_sum"] / regions["area"]
    return pd.Series(tamura_coefficient(regions["window_sum"], regions["window_sum2"], regions["window_n"]),
                     index=regions.index)


def find_particles(propagator: Propagator, planes: np.ndarray, baseline: dict, *, dx: float, dy: float,
                   batch_planes: int | None = None) -> pd.DataFrame:
    """Particles of one hologram, ``x, y, z, d`` in metres and ``score``, from its propagator.

    ``planes`` are the reconstruction depths (metres); ``batch_planes`` planes are reconstructed at
    once (default: :meth:`~holopipe.optics.Propagator.planes_per_batch`). See the module docstring for
    the method.
    """
    metric = baseline["focus_metric"]
    if baseline["threshold"] is None:
        threshold, background, _ = auto_threshold(_threshold_sample(propagator, planes),
                                                  float(baseline["threshold_sigmas"]))
    else:
        threshold, background = float(baseline["threshold"]), 1.0
    ny, nx = propagator.shape
    if batch_planes is None:
        batch_planes = propagator.planes_per_batch()
    regions, edges, previous, offset = [], [], None, 0
    for start in range(0, planes.size, batch_planes):
        amplitude = np.asarray(propagator.reconstruct(planes[start:start + batch_planes]).amplitude)
        for slot, plane_amplitude in enumerate(amplitude):
            labels, n = ndi.label(plane_amplitude < threshold, structure=_EIGHT_CONNECTED)
            if n:
                stats = _region_stats(plane_amplitude, labels, n, threshold, background, metric)
                regions.append(pd.DataFrame({"plane": start + slot, **stats}))
            global_labels = np.where(labels > 0, labels.astype(np.int64) + offset, 0)
            if previous is not None:
                both = (previous > 0) & (global_labels > 0)
                # One int64 key per (previous, current) label pair: 1-D unique is much faster than rows.
                keys = np.unique(previous[both] * (offset + n + 1) + global_labels[both])
                edges.append(np.stack(np.divmod(keys, offset + n + 1), axis=1))
            previous, offset = global_labels, offset + n
    columns = ["x", "y", "z", "d", "score"]
    if offset == 0:
        return pd.DataFrame({name: np.empty(0) for name in columns})
    table = pd.concat(regions, ignore_index=True)  # region k (0-based) has global label k + 1
    pairs = np.concatenate([np.empty((0, 2), dtype=np.int64), *edges]) - 1
    graph = scipy.sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(offset, offset))
    table["group"] = scipy.sparse.csgraph.connected_components(graph, directed=False)[1]
    voxels = table.groupby("group")["area"].transform("sum")
    # Candidates for the focus are the regions that are themselves dark enough (a focused particle is):
    # the particle is the best-focused one of its group, so a group whose out-of-focus column touches a
    # neighbour's still reports one region's size and position, not the union of both.
    table = table[(voxels >= int(baseline["min_voxels"])) & (1 - table["minimum"] >= float(baseline["min_contrast"]))]
    table = table.assign(sharpness=_focus_score(table, metric))
    focus = table.loc[table.groupby("group")["sharpness"].idxmax()]
    row, col = focus["sum_row"] / focus["area"], focus["sum_col"] / focus["area"]
    sizing_area = np.maximum(focus["sizing_area"], 1.0)  # a region darker than its own level has >= 1 pixel
    return pd.DataFrame({
        "x": pixel_position(col, nx, dx),
        "y": pixel_position(row, ny, dy),
        "z": planes[focus["plane"].to_numpy()],
        "d": equivalent_diameter(sizing_area, dx, dy),
        "score": (1 - focus["minimum"]).to_numpy(),
    })


def baseline_file(config: dict, store_path, out_csv, *, progress=True) -> Path:
    """Run the baseline on every hologram of a standardized split store; write its particle CSV.

    The CSV (written atomically, header even when empty) has ``hid, x, y, z, d, score``: hologram
    number (1-based), position and diameter in µm, and the darkness contrast at focus. zMin and zMax
    come from the store, or from ``optics`` where the store lacks them (real data).
    """
    name, out_csv = os.fspath(store_path), Path(out_csv)
    reconstruction = config["reconstruction"]
    ds = open_standardized(name, config)
    try:
        attrs = ds.attrs
        dx, dy = float(attrs["dx"]), float(attrs["dy"])
        planes = z_bin_centres(float(attrs["zMin"]), float(attrs["zMax"]), int(reconstruction["z_bins"]))
        found = []
        for h in tqdm(range(ds.sizes["hologram_number"]), desc=f"baseline {Path(name).name}", unit="hologram",
                      disable=not progress):
            image = ds["image"].isel(hologram_number=h).compute(scheduler="synchronous").values
            particles = find_particles(hologram_propagator(image, attrs, reconstruction), planes, config["baseline"], dx=dx, dy=dy)
            found.append(particles.assign(hid=h + 1))
    finally:
        ds.close()
    table = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=list(CSV_COLUMNS))
    for column in ("x", "y", "z", "d"):
        table[column] = table[column].astype(np.float64) * 1e6
    table = table.astype({"hid": np.int64})[list(CSV_COLUMNS)]
    write_atomically(out_csv, lambda tmp: table.to_csv(tmp, index=False))
    return out_csv
