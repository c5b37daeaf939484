"""Particles from per-plane detections: one particle per cluster of detections across z.

A droplet stays in focus over about D²/λ (1–5 mm for 20–40 µm at 355 nm), so the model fires on many
consecutive planes at nearly the same x, y. Per hologram, detections are clustered by single linkage in
the scaled space (x, y, z · ``particles.z_scale``) in metres: two detections closer than
``particles.distance`` belong to one particle (connected components of a k-d tree's pairs within that
distance, O(n log n) for thousands of detections). Clusters with fewer than ``particles.min_planes``
detections are dropped.

Each cluster's in-focus detection is, with ``particles.focus: amplitude`` (the default), the plane where
the reconstructed amplitude is darkest (``amplitude_min``): a droplet's depth of focus D²/λ reaches
millimetres and the model marks its shadow over much of it with a saturated probability, while the
amplitude minimum is sharp at the focus. With ``logit`` it is the detection with the largest mean logit,
with ``probability`` the one with the largest probability mass ``prob_mean · area``. Either way the peak across planes, not the first plane that fired; ties are broken by
``prob_max``, then by the smaller z. Clusters whose darkest contrast ``1 - amplitude_min`` stays below
``particles.min_contrast`` are dropped: they are out-of-focus ghosts of fringes, never a droplet's
shadow. The particle takes z, x, y (probability-weighted centroid) and d (from the area) of the in-focus
detection, and ``prob`` = the cluster's largest ``prob_max``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.sparse.csgraph
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from holopipe.baseline import PLANE_BATCH_PIXELS
from holopipe.examples import z_bin_centres
from holopipe.focus import gradient_magnitude, smoothed_amplitude, tamura_coefficient
from holopipe.io import write_atomically
from holopipe.optics import Propagator, hologram_field
from holopipe.standardize import open_standardized

__all__ = ["MIN_WINDOW_PIXELS", "PARTICLE_COLUMNS", "cluster_detections", "cluster_labels", "focus_windows",
           "merge_detections", "particles_file", "read_detections", "refine_depths", "window_focus"]

PARTICLE_COLUMNS = ("hid", "x", "y", "z", "d", "prob")
"""Columns of a particles CSV: hid (1-based), x, y, z, d (µm), prob (the cluster's peak probability)."""

MIN_WINDOW_PIXELS = 9
"""Smallest side (pixels) of a refinement window: a tiny droplet's edge still has a gradient ring in it."""

_NEEDED = ("hid", "plane", "x", "y", "z", "d", "area", "prob_max", "prob_mean", "logit_mean", "amplitude_min")


def cluster_labels(points_m: np.ndarray, distance_m: float) -> np.ndarray:
    """Single-linkage cluster label (0..) of each point (n, k): linked when closer than ``distance_m``."""
    n = len(points_m)
    if n == 0:
        return np.zeros(0, np.int64)
    pairs = cKDTree(points_m).query_pairs(distance_m, output_type="ndarray")  # (m, 2)
    graph = scipy.sparse.coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[1].astype(np.int64)


def cluster_detections(detections: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Particles as :func:`merge_detections` finds them, plus each cluster's depth extent.

    Columns :data:`PARTICLE_COLUMNS` and ``z_first``, ``z_last``: the nearest and farthest plane with a
    detection of the cluster (all µm), the range that :func:`refine_depths` searches (widened).
    """
    settings = config["particles"]
    missing = [column for column in _NEEDED if column not in detections.columns]
    if missing:
        raise ValueError(f"merge_detections: detections lack columns {missing}")
    particles = []
    for hid, group in detections.groupby("hid", sort=True):
        group = group.reset_index(drop=True)
        points = 1e-6 * np.column_stack([group["x"], group["y"], group["z"] * settings["z_scale"]])
        labels = cluster_labels(points, float(settings["distance"]))
        size = np.bincount(labels)
        if settings["focus"] == "logit":
            sharpness = group["logit_mean"].to_numpy()
        elif settings["focus"] == "amplitude":
            sharpness = -group["amplitude_min"].to_numpy()
        else:
            sharpness = group["prob_mean"].to_numpy() * group["area"].to_numpy()
        # In-focus detection per cluster: sharpest, then largest prob_max, then nearest the sensor
        # (exact ties only; deterministic whatever the row order). lexsort sorts by its last key first.
        order = np.lexsort((-group["z"].to_numpy(), group["prob_max"].to_numpy(), sharpness, labels))
        last = np.flatnonzero(np.r_[labels[order][1:] != labels[order][:-1], True])  # each cluster's end
        focus = group.iloc[order[last]]
        by_cluster = group.groupby(labels)
        peak = by_cluster["prob_max"].max().to_numpy()
        darkest = by_cluster["amplitude_min"].min().to_numpy()
        keep = (size >= int(settings["min_planes"])) & (1.0 - darkest >= float(settings["min_contrast"]))
        particles.append(pd.DataFrame({
            "hid": int(hid), "x": focus["x"].to_numpy()[keep], "y": focus["y"].to_numpy()[keep],
            "z": focus["z"].to_numpy()[keep], "d": focus["d"].to_numpy()[keep], "prob": peak[keep],
            "z_first": by_cluster["z"].min().to_numpy()[keep], "z_last": by_cluster["z"].max().to_numpy()[keep]}))
    columns = [*PARTICLE_COLUMNS, "z_first", "z_last"]
    if not particles:
        return pd.DataFrame({column: pd.Series(dtype=np.int64 if column == "hid" else float) for column in columns})
    table = pd.concat(particles, ignore_index=True)[columns]
    return table.sort_values(["hid", "z"], kind="stable", ignore_index=True)


def merge_detections(detections: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Particles (:data:`PARTICLE_COLUMNS`, µm, sorted by hid then z) from detections of any planes.

    ``detections`` has the columns of :data:`holopipe.infer.DETECTION_COLUMNS` (µm); ``config`` is a
    validated config whose ``particles`` section applies. The depth is the in-focus detection's, not
    refined (:func:`refine_depths` does that on the reconstruction).
    """
    return cluster_detections(detections, config)[list(PARTICLE_COLUMNS)]


def focus_windows(x_m, y_m, d_m, shape: tuple[int, int], *, dx: float, dy: float, diameters: float):
    """Pixel windows ``(row0, row1, col0, col1)`` (int arrays, half-open) around particles at x, y (m).

    Each is ``diameters`` particle diameters wide (at least :data:`MIN_WINDOW_PIXELS`), centred on the
    particle's pixel and cut at the frame's edge; it stays the same on every plane, so that a focus
    metric over it compares planes, not windows.
    """
    ny, nx = shape
    bounds = []
    for centre_m, pitch, n in ((y_m, dy, ny), (x_m, dx, nx)):
        centre = np.clip(np.round(np.asarray(centre_m, np.float64) / pitch + n / 2 - 0.5), 0, n - 1).astype(np.int64)
        half = np.maximum(np.ceil(0.5 * diameters * np.asarray(d_m, np.float64) / pitch), MIN_WINDOW_PIXELS // 2)
        half = half.astype(np.int64)
        bounds += [np.maximum(centre - half, 0), np.minimum(centre + half + 1, n)]
    return tuple(bounds)


def window_focus(amplitude: np.ndarray, metric: str) -> np.ndarray:
    """Focus score (larger is sharper) of each window of a stack (planes, rows, cols) of amplitudes.

    ``tamura``: the Tamura coefficient of the gradient magnitude over the window; ``min_amplitude``:
    minus the darkest box-averaged amplitude (:mod:`holopipe.focus`, as the baseline measures).
    """
    amplitude = np.asarray(amplitude, dtype=np.float64)
    if metric == "min_amplitude":
        return -smoothed_amplitude(amplitude).min(axis=(-2, -1))
    if metric == "tamura":
        gradient = gradient_magnitude(amplitude)
        count = gradient.shape[-2] * gradient.shape[-1]
        return tamura_coefficient(gradient.sum(axis=(-2, -1)), np.square(gradient).sum(axis=(-2, -1)), count)
    raise ValueError(f"window_focus: unknown metric {metric!r} (tamura or min_amplitude)")


def refine_depths(propagator: Propagator, planes_m: np.ndarray, particles: pd.DataFrame, settings: dict, *,
                  dx: float, dy: float, batch_planes: int | None = None) -> np.ndarray:
    """Refined depth (m) of each particle of one hologram: the plane where its focus metric peaks.

    ``particles`` has ``x, y, d, z_first, z_last`` in metres (:func:`cluster_detections`' extent);
    ``settings`` the ``particles`` section (``refine`` metric, ``refine_margin``, ``refine_window``,
    ``refine_interpolate``). Each particle's planes between ``z_first - refine_margin`` and ``z_last +
    refine_margin`` are scored over its fixed window (:func:`focus_windows`); only the union of those
    planes is reconstructed, ``batch_planes`` at a time (default: :data:`PLANE_BATCH_PIXELS` complex
    pixels), and only the windows are kept, so memory is one batch whatever the frame. With
    ``refine_interpolate`` an interior peak moves by the vertex of the parabola through it and its two
    neighbours (at most half a plane).
    """
    metric = settings["refine"]
    n = len(particles)
    planes_m = np.asarray(planes_m, np.float64)
    if n == 0:
        return np.zeros(0)
    margin = float(settings["refine_margin"])
    first = np.clip(np.searchsorted(planes_m, particles["z_first"].to_numpy() - margin - 1e-9, "left"),
                    0, planes_m.size - 1)
    last = np.clip(np.searchsorted(planes_m, particles["z_last"].to_numpy() + margin + 1e-9, "right") - 1,
                   first, planes_m.size - 1)
    row0, row1, col0, col1 = focus_windows(particles["x"].to_numpy(), particles["y"].to_numpy(),
                                           particles["d"].to_numpy(), propagator.shape, dx=dx, dy=dy,
                                           diameters=float(settings["refine_window"]))
    needed = np.zeros(planes_m.size, bool)
    for a, b in zip(first, last):
        needed[a:b + 1] = True
    indices = np.flatnonzero(needed)
    if batch_planes is None:
        pad_y, pad_x = propagator.pad
        ny, nx = propagator.shape
        batch_planes = max(1, PLANE_BATCH_PIXELS // ((ny + 2 * pad_y) * (nx + 2 * pad_x)))
    scores = np.full((n, planes_m.size), -np.inf)
    for start in range(0, indices.size, batch_planes):
        batch = indices[start:start + batch_planes]
        amplitude = propagator.reconstruct(planes_m[batch]).amplitude  # (planes, ny, nx), any array library
        for k in range(n):
            # The batch's planes in this particle's range are one run: batch is sorted, the range an interval.
            a, b = np.searchsorted(batch, first[k], "left"), np.searchsorted(batch, last[k], "right")
            if a < b:
                window = amplitude[int(a):int(b), int(row0[k]):int(row1[k]), int(col0[k]):int(col1[k])]
                scores[k, batch[a:b]] = window_focus(np.asarray(window), metric)
    best = np.array([a + int(np.argmax(scores[k, a:b + 1])) for k, (a, b) in enumerate(zip(first, last))])
    z = planes_m[best]
    if settings["refine_interpolate"] and planes_m.size > 1:
        rows = np.arange(n)
        interior = (best > first) & (best < last)
        left, centre = scores[rows, np.maximum(best - 1, 0)], scores[rows, best]
        right = scores[rows, np.minimum(best + 1, planes_m.size - 1)]
        curvature = left - 2 * centre + right
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(interior & (curvature < 0), 0.5 * (left - right) / curvature, 0.0)
        z = z + np.clip(shift, -0.5, 0.5) * (planes_m[1] - planes_m[0])
    return z


def read_detections(paths) -> pd.DataFrame:
    """The detections of several inference CSVs (the chunks of a split, any order) as one table."""
    tables = []
    for path in paths:
        table = pd.read_csv(path)
        missing = [column for column in _NEEDED if column not in table.columns]
        if missing:
            raise ValueError(f"{path}: not an inference detections CSV (missing columns {missing})")
        tables.append(table)
    if not tables:
        raise ValueError("read_detections: no detection files given")
    table = pd.concat(tables, ignore_index=True)
    return table.sort_values(["hid", "plane"], kind="stable", ignore_index=True)


def particles_file(chunk_csvs: list, out_csv, config: dict, *, store_path=None, progress=True) -> Path:
    """Gather a split's chunk CSVs, merge them into particles and write ``out_csv`` atomically.

    With ``particles.refine`` other than none, each particle's depth is refined on the holograms of the
    standardized split store ``store_path`` (reconstructed as in inference, ``reconstruction`` section).
    """
    clusters = cluster_detections(read_detections(chunk_csvs), config)
    if config["particles"]["refine"] != "none" and len(clusters):
        if store_path is None:
            raise ValueError(f"particles.refine is {config['particles']['refine']!r}: it needs the standardized "
                             "split store (--store) to reconstruct the holograms")
        clusters["z"] = _refined_depths(clusters, config, store_path, progress=progress)
    table = clusters[list(PARTICLE_COLUMNS)].sort_values(["hid", "z"], kind="stable", ignore_index=True)
    return write_atomically(out_csv, lambda tmp: table.to_csv(tmp, index=False))


def _refined_depths(clusters: pd.DataFrame, config: dict, store_path, *, progress: bool) -> np.ndarray:
    """:func:`refine_depths` of every hologram with particles (µm in and out), in ``clusters``' order."""
    name = os.fspath(store_path)
    reconstruction = config["reconstruction"]
    z = clusters["z"].to_numpy(np.float64).copy()
    ds = open_standardized(name, config)
    try:
        attrs = ds.attrs
        dx, dy = float(attrs["dx"]), float(attrs["dy"])
        planes = z_bin_centres(float(attrs["zMin"]), float(attrs["zMax"]), int(reconstruction["z_bins"]))
        n_holograms = ds.sizes["hologram_number"]
        for hid, group in tqdm(clusters.groupby("hid", sort=True), desc=f"refine {Path(name).name}",
                               unit="hologram", disable=not progress):
            if not 1 <= hid <= n_holograms:
                raise ValueError(f"{name}: detections name hologram {hid}, the store has {n_holograms}")
            image = ds["image"].isel(hologram_number=int(hid) - 1).compute(scheduler="synchronous").values
            field = hologram_field(np.ascontiguousarray(image.T, dtype=np.float32), background=1.0)
            propagator = Propagator(field, wavelength=float(attrs["lambda"]), dx=dx, dy=dy,
                                    pad=int(reconstruction["pad"]), band_limit=bool(reconstruction["band_limit"]))
            metres = group[["x", "y", "d", "z_first", "z_last"]] * 1e-6
            z[group.index.to_numpy()] = 1e6 * refine_depths(propagator, planes, metres, config["particles"],
                                                            dx=dx, dy=dy)
    finally:
        ds.close()
    return z
