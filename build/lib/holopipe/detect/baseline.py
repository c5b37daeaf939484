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
2. **Group.** Only the dark pixels leave the device (their coordinates and amplitudes); on the host
   they are labelled per plane (8-connected, a sparse pixel graph:
   :func:`holopipe.detect.sweep.pixel_components`) into 2-D *regions*; a region is joined to every region of
   the previous plane that shares a pixel with it. The 3-D particles are the connected components of
   that graph (``scipy.sparse.csgraph``), so only the previous plane's dark pixels are held: memory is
   one batch of planes, whatever the number of planes, and the result does not depend on the batch
   size. Groups with fewer than ``baseline.min_voxels`` voxels are dropped.
3. **Focus.** A focused opaque particle goes nearly black, the dips of fringes and twin images do
   not, so only regions whose darkest pixel has a contrast ``1 - amplitude`` of at least
   ``baseline.min_contrast`` are candidates (a group without one is dropped; with ``baseline.contrast_diameter``
   the threshold is scaled by the contrast a droplet of that diameter reaches in focus where the region is:
   :func:`~holopipe.optics.propagation.in_focus_contrast`, a small far droplet is imaged faint). The particle is the
   group's best-focused candidate region by ``baseline.focus_metric``:

   - ``min_amplitude``: the darkest region, after a :data:`holopipe.optics.focus.SMOOTHING_PIXELS`-pixel box
     average (a single interference speckle next to a focused particle must not decide the plane);
   - ``edge_sharpness``: the largest mean gradient magnitude of the amplitude over the region (a
     focused opaque disk has the sharpest edge);
   - ``tamura``: the largest Tamura coefficient sqrt(std / mean) of the gradient magnitude in a
     window around the region (its box widened by half its size on each side).

   The metric is computed on the device for the candidate regions only (their pixels or windows,
   gathered in one indexing op per batch: :mod:`holopipe.optics.focus`), never over whole planes.

   One region, not the union of the group's regions on that plane: where the long out-of-focus
   columns (depth of focus ~ D²/λ) of two particles touch, the group still reports one particle's
   size and position. Unless the two are in focus at one depth, the group's darkness (its candidates'
   darkest amplitude, per plane) then peaks twice, and with ``baseline.split_prominence`` below 1 it is
   cut between the peaks as the particles stage cuts its columns
   (:func:`holopipe.detect.particles.line_of_sight_splits`): each part reports its own best-focused region.
4. **Ghosts.** A large droplet's out-of-focus column (its depth of focus is ~ D²/λ: 10 mm at 60 µm) is
   dark over many planes but not uniformly, so it can split into several groups at one x, y, each
   reporting a "particle" (mostly small dim spots of its defocused rings, tens of µm off its axis and
   one or two depths of focus away). :func:`holopipe.detect.particles.suppress_ghosts` keeps, darkest first
   (``score``), a particle and drops
   the others within ``baseline.ghost_diameters`` of its diameters in x, y and
   ``baseline.ghost_depths_of_focus`` of its depths of focus in z: the standard processing's ghost
   removal. (2 and 1.5, chosen on the default config's validation split: F1 0.77 without, 0.91 with.)
5. **Measure.** From that region's pixels darker than half-way between the background and its
   minimum (or than the threshold, if that is lower), the half-contrast disk of a focused droplet: z is
   its plane; x, y their centroid (rows are y, columns x; pixel ``i`` has its centre at
   ``(i + 0.5 - n/2) * pitch``), so a region grown into a neighbour's dimmer out-of-focus shadow still
   gives the droplet's centre; d their equivalent diameter ``2 sqrt(area dx dy / π)``, an edge that does
   not grow with the detection threshold. The score is the darkness contrast ``1 - minimum
   amplitude`` of the region.
6. **Outside.** ``baseline.beyond_planes`` more planes at the same spacing are searched beyond each end
   of the sample volume: a particle in focus out there is outside it, and is not reported on the volume's
   first or last plane (as the particles stage does).
7. **Stationary.** Over the split, what is found at one place in at least ``baseline.stationary_fraction``
   of its holograms is dust on a window, not a droplet
   (:func:`holopipe.detect.particles.without_stationary`, as the particles stage does); particles found outside
   the volume count there too.

Reconstruction, thresholding and the focus metric run on ``baseline.device`` (torch on a GPU; numpy on
the CPU, where scipy's FFT is twice torch's speed), planes in batches sized for the device's memory
(:func:`~holopipe.optics.propagation.device_planes_per_batch`); labelling and grouping run on the host with cost
proportional to the dark pixels, in a worker thread while the device reconstructs the next batch.
:func:`baseline_file` keeps each finished hologram beside its output (:class:`holopipe.core.files.HologramParts`): a
killed job's rerun skips them.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import array_api_compat
import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import scipy.sparse
import scipy.sparse.csgraph
from tqdm.auto import tqdm

from holopipe.core.device import array_mover, host_array
from holopipe.core.files import HologramParts, input_identity, write_atomically
from holopipe.core.io import PARTICLE_VARS, equivalent_diameter, hologram_image_yx, pixel_position, usable_holograms
from holopipe.core.provenance import code_identity
from holopipe.detect.particles import line_of_sight_splits, suppress_ghosts, without_stationary
from holopipe.detect.sweep import BATCHES_IN_FLIGHT, DETECTION_COLUMNS, pixel_components
from holopipe.optics.focus import pixel_values, reconstructed_amplitude, window_scores
from holopipe.optics.propagation import Propagator, device_planes_per_batch, in_focus_contrast_at
from holopipe.optics.reconstruction import SampleVolume, hologram_propagator, open_standardized

__all__ = ["CSV_COLUMNS", "auto_threshold", "baseline_file", "detections_file", "find_particles", "plane_detections"]

CSV_COLUMNS = (*PARTICLE_VARS, "score")

THRESHOLD_PLANES = 8
"""Evenly spaced planes whose amplitudes set the automatic threshold."""

THRESHOLD_SAMPLES = 2**20
"""About this many amplitudes (a regular pixel subsample of those planes) go into the histogram."""

LOGIT_FLOOR = 1e-6
"""The physics detections' contrast, as a probability, is kept this far from 0 and 1 so its logit is finite."""

MIN_SIGMA = 0.01
"""Floor of the robust amplitude spread (background ~1), so that a flat hologram is all background."""


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


def _threshold_sample(propagator: Propagator, planes: np.ndarray, batch_planes: int) -> np.ndarray:
    """Amplitudes of up to THRESHOLD_PLANES evenly spaced planes, pixels subsampled on the device."""
    chosen = planes[np.unique(np.linspace(0, planes.size - 1, min(THRESHOLD_PLANES, planes.size)).round().astype(int))]
    ny, nx = propagator.shape
    step = max(1, int(np.ceil(np.sqrt(chosen.size * ny * nx / THRESHOLD_SAMPLES))))
    return np.concatenate([host_array(reconstructed_amplitude(propagator,
                                                              chosen[i:i + batch_planes])[:, ::step, ::step])
                           for i in range(0, chosen.size, batch_planes)])


def _dark_pixels(amplitude, threshold: float):
    """(slot, row, column) int64 and amplitude float64 of the pixels of a batch (planes, ny, nx) darker
    than ``threshold``, in raster order, on the host: the only part of the planes that leaves the device."""
    xp = array_api_compat.array_namespace(amplitude)
    flat = xp.reshape(amplitude, (-1,))
    (dark,) = xp.nonzero(flat < threshold)  # 1-D: cheaper than the 3-D indices, unravelled on the host
    slots, rows, cols = np.unravel_index(host_array(dark, np.int64), tuple(amplitude.shape))
    return slots, rows, cols, host_array(xp.take(flat, dark))


def _region_stats(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, labels: np.ndarray, n: int,
                  threshold: float, background: float) -> dict:
    """Per-region sums and extremes of one plane's dark pixels (regions 0..n-1 of ``labels``)."""
    index = np.arange(n)

    def total(weights=None):
        return np.bincount(labels, weights, minlength=n).astype(np.float64)

    minimum = np.asarray(ndi.minimum(values, labels, index), np.float64)
    level = np.minimum(threshold, 0.5 * (background + minimum))
    sizing = values < level[labels]
    return {"area": total(), "minimum": minimum, "sum_row": total(rows), "sum_col": total(cols),
            "sizing_area": total(sizing), "sizing_row": total(rows * sizing), "sizing_col": total(cols * sizing),
            "top": np.asarray(ndi.minimum(rows, labels, index), np.int64),
            "bottom": np.asarray(ndi.maximum(rows, labels, index), np.int64) + 1,
            "left": np.asarray(ndi.minimum(cols, labels, index), np.int64),
            "right": np.asarray(ndi.maximum(cols, labels, index), np.int64) + 1}


def _sharpness(amplitude, regions: pd.DataFrame, pixels: tuple, metric: str) -> np.ndarray:
    """Focus score (larger is more in focus) of a batch's candidate regions, computed on the device over
    their windows (``tamura``) or pixels (``pixels``: slot, row, column, region row; the others) only."""
    if metric == "tamura":
        ny, nx = amplitude.shape[-2:]
        top, bottom, left, right = (regions[k].to_numpy() for k in ("top", "bottom", "left", "right"))
        margin_rows, margin_cols = (bottom - top + 1) // 2, (right - left + 1) // 2
        return host_array(window_scores(amplitude, regions["slot"].to_numpy(), np.maximum(top - margin_rows, 0),
                                        np.minimum(bottom + margin_rows, ny), np.maximum(left - margin_cols, 0),
                                        np.minimum(right + margin_cols, nx), "tamura"))
    slots, rows, cols, region = (np.concatenate(part) for part in zip(*pixels))
    if metric == "min_amplitude":
        darkest = np.full(len(regions), np.inf)
        np.minimum.at(darkest, region, host_array(pixel_values(amplitude, slots, rows, cols, "smoothed")))
        return -darkest
    gradient = host_array(pixel_values(amplitude, slots, rows, cols, "gradient"))
    return np.bincount(region, gradient, minlength=len(regions)) / regions["area"].to_numpy()


class _PlaneGrouper:
    """Steps 2 and 3 of the method for one hologram, fed plane batches in order: labels each plane's dark
    pixels into regions, links them to the previous plane's and scores the candidate regions on the device.

    It runs in a worker thread while the device reconstructs the next batch; batches must come in plane
    order (one worker), since each plane links to the one before it.
    """

    def __init__(self, propagator: Propagator, planes: np.ndarray, threshold: float, background: float,
                 baseline: dict, *, smoothed_minimum: bool = False):
        self.shape, self.planes, self.threshold, self.background = propagator.shape, planes, threshold, background
        self.optics = propagator.transfer
        self.smoothed_minimum = smoothed_minimum
        self.min_contrast, self.metric = float(baseline["min_contrast"]), baseline["focus_metric"]
        self.contrast_diameter = baseline["contrast_diameter"]
        self.areas, self.candidates, self.edges = [], [], []
        self.previous_pixels, self.previous_labels, self.offset = np.zeros(0, np.int64), np.zeros(0, np.int64), 0

    def _contrast_floor(self, stats: dict, plane: int):
        """``baseline.min_contrast``, scaled where ``contrast_diameter`` is set by the contrast a droplet of that
        diameter reaches in focus at each region's centroid on this plane (as the particles stage scales its own)."""
        if self.contrast_diameter is None:
            return self.min_contrast
        (ny, nx), optics = self.shape, self.optics
        x = pixel_position(stats["sum_col"] / stats["area"], nx, optics.dx)
        y = pixel_position(stats["sum_row"] / stats["area"], ny, optics.dy)
        return self.min_contrast * in_focus_contrast_at(x, y, float(self.planes[plane]), float(self.contrast_diameter),
                                                        nx=nx, ny=ny, dx=optics.dx, dy=optics.dy,
                                                        wavelength=optics.wavelength)

    def add(self, start: int, amplitude, slots, rows, cols, values) -> None:
        """The batch of planes ``start``, ... (``amplitude`` (B, ny, nx) on the device, its dark pixels
        from :func:`_dark_pixels` on the host)."""
        ny, nx = self.shape
        batch, pixels, n_batch = [], [], 0
        for slot in range(amplitude.shape[0]):
            lo, hi = np.searchsorted(slots, [slot, slot + 1])
            r, c, v = rows[lo:hi], cols[lo:hi], values[lo:hi]
            n, labels = pixel_components(r, c, (ny, nx))  # labels 0..n-1 in raster order, as ndi.label's
            linear = r * nx + c
            offset = self.offset
            if n and self.previous_pixels.size:
                # One int64 key per (previous, current) global label pair of the pixels both planes share.
                _, before, now = np.intersect1d(self.previous_pixels, linear, assume_unique=True,
                                                return_indices=True)
                keys = np.unique(self.previous_labels[before] * (offset + n) + labels[now] + offset)
                self.edges.append(np.stack(np.divmod(keys, offset + n), axis=1))
            self.previous_pixels, self.previous_labels = linear, labels + offset
            if n:
                stats = _region_stats(r, c, v, labels, n, self.threshold, self.background)
                self.areas.append(stats["area"])
                # Candidates for the focus are the regions that are themselves dark enough (a focused
                # particle is): only they get a focus metric.
                chosen = np.flatnonzero(1 - stats["minimum"] >= self._contrast_floor(stats, start + slot))
                if chosen.size:
                    batch.append(pd.DataFrame({"region": offset + chosen, "plane": start + slot, "slot": slot,
                                               **{key: value[chosen] for key, value in stats.items()}}))
                    row_of = np.full(n, -1)
                    row_of[chosen] = n_batch + np.arange(chosen.size)
                    on = row_of[labels] >= 0
                    pixels.append((np.full(int(on.sum()), slot), r[on], c[on], row_of[labels[on]]))
                    n_batch += chosen.size
            self.offset += n
        if batch:
            regions = pd.concat(batch, ignore_index=True)
            regions = regions.assign(sharpness=_sharpness(amplitude, regions, pixels, self.metric))
            if self.smoothed_minimum:  # as inference measures its detections' amplitude_min
                slots, rows, cols, region = (np.concatenate(part) for part in zip(*pixels))
                darkest = np.full(len(regions), np.inf)
                np.minimum.at(darkest, region, host_array(pixel_values(amplitude, slots, rows, cols, "smoothed")))
                regions = regions.assign(smoothed_minimum=darkest)
            self.candidates.append(regions)


def _grouped_planes(propagator: Propagator, planes: np.ndarray, baseline: dict, batch_planes: int | None,
                    progress: bool, smoothed_minimum: bool = False) -> _PlaneGrouper:
    """Steps 1-3's per-plane work on every plane: the grouper holding the candidate regions and their links.

    ``batch_planes`` planes are reconstructed at once (default:
    :func:`~holopipe.optics.propagation.device_planes_per_batch`, sized for the device) on the propagator's array
    library and device. The host's labelling of a batch runs in a worker thread while the device reconstructs the next
    (at most :data:`holopipe.detect.sweep.BATCHES_IN_FLIGHT` batches wait for it: memory stays a few batches, and a
    worker's error surfaces here); ``progress`` shows a bar over the plane batches.
    """
    if batch_planes is None:
        batch_planes = device_planes_per_batch(propagator)
    if baseline["threshold"] is None:
        threshold, background, _ = auto_threshold(_threshold_sample(propagator, planes, batch_planes),
                                                  float(baseline["threshold_sigmas"]))
    else:
        threshold, background = float(baseline["threshold"]), 1.0
    grouper = _PlaneGrouper(propagator, planes, threshold, background, baseline, smoothed_minimum=smoothed_minimum)
    in_flight = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="holopipe-baseline") as pool:
        for start in tqdm(range(0, planes.size, batch_planes), desc="baseline planes", unit="batch", leave=False,
                          disable=not progress):
            amplitude = reconstructed_amplitude(propagator, planes[start:start + batch_planes])  # (B, ny, nx)
            dark = _dark_pixels(amplitude, threshold)
            if len(in_flight) >= BATCHES_IN_FLIGHT:
                in_flight.popleft().result()
            in_flight.append(pool.submit(grouper.add, start, amplitude, *dark))
            del amplitude
        while in_flight:
            in_flight.popleft().result()
    return grouper


def _line_of_sight_parts(candidates: pd.DataFrame, planes: np.ndarray, prominence: float) -> np.ndarray:
    """A group label (0..) per candidate region, each group cut where its darkness peaks twice across z
    (:func:`holopipe.detect.particles.line_of_sight_splits`, as the particles stage cuts its columns): two droplets
    whose columns touch, or that share a line of sight, report two particles."""
    z, minimum = planes[candidates["plane"].to_numpy()], candidates["minimum"].to_numpy(np.float64)
    part = np.zeros(len(candidates), np.int64)
    for rows in candidates.groupby("group").indices.values():
        cuts = line_of_sight_splits(z[rows], minimum[rows], prominence)
        part[rows] = np.searchsorted(cuts, z[rows], side="left")
    return pd.factorize(pd.MultiIndex.from_arrays([candidates["group"].to_numpy(), part]))[0]


def find_particles(propagator: Propagator, planes: np.ndarray, baseline: dict, *, dx: float, dy: float,
                   batch_planes: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Particles of one hologram, ``x, y, z, d`` in metres and ``score``, from its propagator.

    ``planes`` are the reconstruction depths (metres), reconstructed ``batch_planes`` at once on the
    propagator's array library and device (:func:`_grouped_planes`). See the module docstring for the method.
    """
    grouper = _grouped_planes(propagator, planes, baseline, batch_planes, progress)
    ny, nx = propagator.shape
    columns = ["x", "y", "z", "d", "score"]
    if not grouper.candidates:
        return pd.DataFrame({name: np.empty(0) for name in columns})
    table = pd.concat(grouper.candidates, ignore_index=True)
    offset = grouper.offset
    pairs = np.concatenate([np.empty((0, 2), dtype=np.int64), *grouper.edges])
    graph = scipy.sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(offset, offset))
    group = scipy.sparse.csgraph.connected_components(graph, directed=False)[1]
    voxels = np.bincount(group, weights=np.concatenate(grouper.areas))
    # The particle is the best-focused candidate of its group, so a group whose out-of-focus column
    # touches a neighbour's still reports one region's size and position, not the union of both.
    table = table.assign(group=group[table["region"].to_numpy()])
    table = table[voxels[table["group"].to_numpy()] >= int(baseline["min_voxels"])]
    if float(baseline["split_prominence"]) < 1 and len(table):
        table = table.assign(group=_line_of_sight_parts(table, planes, float(baseline["split_prominence"])))
    focus = table.loc[table.groupby("group")["sharpness"].idxmax()]
    # x, y and d from the region's pixels darker than half its contrast: the focused disk, not the dimmer
    # out-of-focus shadow of a neighbour that the region may have grown into.
    sized = focus["sizing_area"] > 0
    row = np.where(sized, focus["sizing_row"], focus["sum_row"]) / np.where(sized, focus["sizing_area"], focus["area"])
    col = np.where(sized, focus["sizing_col"], focus["sum_col"]) / np.where(sized, focus["sizing_area"], focus["area"])
    sizing_area = np.maximum(focus["sizing_area"], 1.0)  # a region darker than its own level has >= 1 pixel
    return pd.DataFrame({
        "x": pixel_position(col, nx, dx),
        "y": pixel_position(row, ny, dy),
        "z": planes[focus["plane"].to_numpy()],
        "d": equivalent_diameter(sizing_area, dx, dy),
        "score": (1 - focus["minimum"]).to_numpy(),
    })


def plane_detections(propagator: Propagator, planes: np.ndarray, baseline: dict, *, dx: float, dy: float,
                     hid: int, batch_planes: int | None = None, progress: bool = False) -> pd.DataFrame:
    """The physics detector alone, as inference reports the U-Net's: every dark candidate region of every
    plane (steps 1-3 before grouping: below the threshold, contrast at least ``baseline.min_contrast``) as a
    row of :data:`holopipe.detect.sweep.DETECTION_COLUMNS` (µm), for the particles stage to merge across z.

    The ablation that tells the detector from what follows it. x, y: the region's centroid; d: its
    equivalent diameter; amplitude_min: box-averaged as inference's; the probabilities are the darkness
    contrast ``1 - amplitude_min`` (the physics' confidence), logit_mean its logit.
    """
    grouper = _grouped_planes(propagator, planes, baseline, batch_planes, progress, smoothed_minimum=True)
    columns = list(DETECTION_COLUMNS)
    if not grouper.candidates:
        return pd.DataFrame({name: np.empty(0, np.int64 if name in ("hid", "plane") else np.float64)
                             for name in columns})
    regions = pd.concat(grouper.candidates, ignore_index=True)
    ny, nx = propagator.shape
    darkest = regions["smoothed_minimum"].to_numpy(np.float64)
    contrast = np.clip(1 - darkest, LOGIT_FLOOR, 1 - LOGIT_FLOOR)
    plane = regions["plane"].to_numpy(np.int64)
    table = pd.DataFrame({
        "hid": np.full(plane.size, hid, np.int64), "plane": plane,
        "x": pixel_position(regions["sum_col"] / regions["area"], nx, dx) * 1e6,
        "y": pixel_position(regions["sum_row"] / regions["area"], ny, dy) * 1e6,
        "z": planes[plane] * 1e6,
        "d": equivalent_diameter(regions["area"].to_numpy(np.float64), dx, dy) * 1e6,
        "area": regions["area"].to_numpy(np.float64), "prob_max": contrast, "prob_mean": contrast,
        "logit_mean": np.log(contrast / (1 - contrast)), "amplitude_min": darkest})
    return table[columns]


def detections_file(config: dict, store_path, out_csv, *, progress=True) -> Path:
    """:func:`plane_detections` of every hologram of a standardized split store, written atomically as one
    inference-style detections CSV (``holopipe particles --in`` reads it)."""
    name, reconstruction, settings = os.fspath(store_path), config["reconstruction"], config["baseline"]
    on_device = array_mover(settings["device"], "baseline.device")
    ds = open_standardized(name, config)
    try:
        attrs = ds.attrs
        dx, dy = float(attrs["dx"]), float(attrs["dy"])
        planes = SampleVolume.of(attrs).planes(int(reconstruction["z_bins"]))
        tables = []
        for hid in tqdm(usable_holograms(ds), desc=f"physics detections {Path(name).name}", unit="hologram",
                        disable=not progress):
            image_yx = hologram_image_yx(ds, hid - 1)
            propagator = hologram_propagator(image_yx, attrs, reconstruction, to_device=on_device)
            tables.append(plane_detections(propagator, planes, settings, dx=dx, dy=dy, hid=hid, progress=progress))
    finally:
        ds.close()
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(DETECTION_COLUMNS))
    return write_atomically(out_csv, lambda tmp: table.to_csv(tmp, index=False))


def _micrometre_table(particles: pd.DataFrame, hid: int) -> pd.DataFrame:
    """One hologram's particles as the CSV holds them: hid, then x, y, z, d in µm, score."""
    table = particles.assign(hid=hid, **{c: particles[c].astype(np.float64) * 1e6 for c in "xyzd"})
    return table[list(CSV_COLUMNS)]


def baseline_file(config: dict, store_path, out_csv, *, progress=True) -> Path:
    """Run the baseline on every hologram of a standardized split store; write its particle CSV.

    The CSV (written atomically, header even when empty) has ``hid, x, y, z, d, score``: hologram
    number (1-based), position and diameter in µm, and the darkness contrast at focus. zMin and zMax
    come from the store, or from ``optics`` where the store lacks them (real data). Each hologram's
    particles are kept beside ``out_csv`` as it finishes (:class:`holopipe.core.files.HologramParts`,
    fingerprinted by the code, the ``baseline`` (but its device), ``reconstruction`` and ``optics`` sections
    and the store's identity): a rerun after a kill skips the finished holograms.
    """
    name, out_csv = os.fspath(store_path), Path(out_csv)
    reconstruction, settings = config["reconstruction"], config["baseline"]
    on_device = array_mover(settings["device"], "baseline.device")
    ds = open_standardized(name, config)
    try:
        parts = HologramParts(out_csv, {
            "stage": "baseline", "code": code_identity(),
            "baseline": {k: v for k, v in settings.items() if k != "device"},
            "reconstruction": reconstruction, "optics": config["optics"], "inputs": input_identity(store_path)})
        attrs = ds.attrs
        dx, dy = float(attrs["dx"]), float(attrs["dy"])
        volume = SampleVolume.of(attrs)
        planes = volume.planes(int(reconstruction["z_bins"]), int(settings["beyond_planes"]))
        hids = usable_holograms(ds)  # standardization's skipped holograms (no data) are not searched
        done = parts.done()
        for hid in tqdm(hids, desc=f"baseline {Path(name).name}", unit="hologram", disable=not progress):
            if hid in done:
                continue
            image_yx = hologram_image_yx(ds, hid - 1)
            propagator = hologram_propagator(image_yx, attrs, reconstruction, to_device=on_device)
            particles = find_particles(propagator, planes, settings, dx=dx, dy=dy, progress=progress)
            particles = suppress_ghosts(particles, "score", float(attrs["lambda"]),
                                        settings["ghost_depths_of_focus"], settings["ghost_diameters"])
            parts.save(hid, _micrometre_table(particles, hid))
    finally:
        ds.close()
    candidates = pd.concat(parts.load(hids), ignore_index=True)
    candidates = candidates.astype({"hid": np.int64, **{c: np.float64 for c in CSV_COLUMNS[1:]}})
    # In focus beyond the volume: outside it. Those still count where something sits still (window dust).
    table = candidates[volume.contains(candidates["z"].to_numpy() * 1e-6)]
    table = without_stationary(table, len(hids), settings["stationary_fraction"], evidence=candidates)
    return parts.finish(lambda tmp: table.to_csv(tmp, index=False))
