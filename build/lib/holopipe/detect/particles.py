"""Particles from per-plane detections: one particle per cluster of detections across z.

A droplet stays in focus over about D²/λ (1–5 mm for 20–40 µm at 355 nm), so the model fires on many
consecutive planes at nearly the same x, y. Per hologram, detections link through z where their disks
overlap (:func:`linked_pairs`: at most ``particles.link_depth`` apart in z, centres closer than half their
summed diameters or ``particles.distance``), so a column follows its droplet plane to plane and a droplet
beside it joins only where the two touch. A linked column can still hold two droplets on one line of
sight: its darkness then peaks twice, and it is cut between the peaks (:func:`line_of_sight_splits`,
``particles.split_prominence``). Clusters with fewer than ``particles.min_planes`` detections are dropped.

Each cluster's in-focus detection is, with ``particles.focus: amplitude`` (the default), the plane where
the reconstructed amplitude is darkest (``amplitude_min``): a droplet's depth of focus D²/λ reaches
millimetres and the model marks its shadow over much of it with a saturated probability, while the
amplitude minimum is sharper (still blunt for large droplets: hence the refinement below). With
``logit`` it is the detection with the largest mean logit, with ``probability`` the one with the largest
probability mass ``prob_mean · area``. Either way the peak across planes, not the first plane that
fired; ties are broken by ``prob_max``, then by the smaller z. Clusters whose darkest contrast ``1 -
amplitude_min`` stays below ``particles.min_contrast`` are dropped: they are out-of-focus ghosts of
fringes, never a droplet's shadow (with ``particles.contrast_diameter`` the threshold, and
``min_disk_contrast`` after refinement, is scaled where a small far droplet is imaged faint:
:func:`contrast_floor`). The particle takes z, x, y (probability-weighted centroid) and d (from
the area) of the in-focus detection, and ``prob`` = the cluster's largest ``prob_max``.

**Depth refinement** (``particles.refine``, default ``tamura``): the model says whether and where in x, y
a droplet is, the physics says its depth. The saturated model marks a large droplet over millimetres,
and the darkest detection of so blunt a minimum can land far from the focus. So each hologram of the
standardized split store is reconstructed (as in inference: ``reconstruction.z_bins`` planes, ``pad``,
``band_limit``, and ``particles.beyond_planes`` more at their spacing beyond each end of the sample volume:
a particle whose focus lies out there is outside the volume, and is dropped) on the planes each cluster
spans, widened by ``particles.refine_margin`` on both sides,
and a focus metric of :mod:`holopipe.optics.focus` is evaluated over a fixed window ``particles.refine_window``
diameters wide around the particle's x, y (:func:`focus_windows`; the same window on every plane, so the
values compare planes): ``tamura``, the Tamura coefficient of the amplitude gradient (the baseline's
``focus_metric``), or ``min_amplitude``, the darkest box-averaged amplitude. z is the plane where it
peaks, between planes at the vertex of a parabola with ``particles.refine_interpolate``; the part of a cut
column searches between its cuts only, and one whose focus peaks on a cut is its neighbour's droplet
again (:func:`without_cut_ghosts`). The window is ``refine_window`` diameters of the cluster's LARGEST
detection (the darkest one of a large droplet may be a fragment of it). On that plane x, y and d are
measured as the baseline does (centroid and equivalent diameter of the half-contrast dark region), from
the darkest point within the detection's own disk (:func:`measure_dark_disk`): a larger neighbour's
shadow in the window is not taken for it. Only where the frame edge cuts the window (the fringes are cut,
and a cluster may sit beside its droplet) is the window widened by ``particles.distance`` and searched
whole. Clusters of one droplet then refine to the same place and are merged where their disks overlap
within ``particles.link_depth`` (:func:`merge_duplicates`), keeping the largest disk. Clusters of one large
droplet can also refine to different planes of its long depth of focus D²/λ; :func:`without_ghosts`
keeps the sharpest focus of those lying inside its shadow (``particles.ghost_diameters``) and within
``particles.ghost_depths_of_focus`` depths of focus in z (the ghost removal the baseline applies to its
own groups, :func:`suppress_ghosts`), so that a small droplet beside a large one survives. Last, over the
whole split, what sits at one place in at least ``particles.stationary_fraction`` of its holograms is dust
on a window, not a droplet (:func:`without_stationary`); every refined cluster counts there, those dropped
as too faint or outside the volume included. Planes are reconstructed on ``particles.device`` in batches
sized for its memory (:func:`holopipe.optics.propagation.device_planes_per_batch`: dozens of full-size planes on a
GPU) and every particle of a batch is scored at once there (its windows' indices uploaded in one packed copy and
gathered in one indexing op per size group, :func:`holopipe.optics.focus.window_scores`); only the scores and the best
planes' measuring windows (one copy, :func:`holopipe.optics.focus.host_windows`) reach the host, so memory is one batch
of planes even for full 4872 x 3248 frames. Each hologram's result is kept
as it finishes, so a killed job resumes (:func:`particles_file`). ``none`` keeps the in-focus
detection's plane, x, y and d, and needs no store.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import scipy.signal
import scipy.sparse
import scipy.sparse.csgraph
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from holopipe.core.device import array_mover, host_array
from holopipe.core.files import HologramParts, input_identity, write_atomically
from holopipe.core.io import (
    PARTICLE_VARS,
    equivalent_diameter,
    hologram_image_yx,
    open_holodec,
    pixel_position,
    usable_holograms,
)
from holopipe.core.provenance import code_identity
from holopipe.detect.sweep import DETECTION_COLUMNS
from holopipe.optics.focus import host_windows, reconstructed_amplitude, smoothed_amplitude, window_scores
from holopipe.optics.propagation import Propagator, device_planes_per_batch, in_focus_contrast_at
from holopipe.optics.reconstruction import SampleVolume, hologram_propagator, open_standardized

__all__ = ["MIN_WINDOW_PIXELS", "PARTICLE_COLUMNS", "cluster_detections", "components", "contrast_floor",
           "focus_windows", "label_detections", "line_of_sight_splits", "linked_pairs", "measure_dark_disk",
           "merge_detections", "merge_duplicates", "particles_file", "read_detections", "refine_depths",
           "suppress_ghosts", "without_cut_ghosts", "without_ghosts", "without_stationary"]

PARTICLE_COLUMNS = (*PARTICLE_VARS, "prob")
"""Columns of a particles CSV: hid (1-based), x, y, z, d (µm), prob (the cluster's peak probability)."""

MIN_WINDOW_PIXELS = 9
"""Smallest side (pixels) of a refinement window: a tiny droplet's edge still has a gradient ring in it."""

def linked_pairs(x_m, y_m, z_m, d_m, distance_m: float, depth_m: float) -> np.ndarray:
    """Pairs (m, 2) of detections that belong to one particle: at most ``depth_m`` apart in z, and laterally
    closer than the larger of ``distance_m`` and half their summed diameters (their disks overlap).

    A droplet's column of detections links plane to plane however long its depth of focus, while a
    droplet beside it links only where their disks touch: the chains that single linkage at a fixed
    distance in a scaled (x, y, z) space made along a line of sight need the disks themselves to meet.
    """
    x, y, z, d = (np.asarray(v, np.float64) for v in (x_m, y_m, z_m, d_m))
    if x.size < 2:
        return np.zeros((0, 2), np.int64)
    reach = max(float(distance_m), float(d.max()))
    # A box query (Chebyshev) whose z side is scaled to the lateral reach finds every candidate once.
    points = np.column_stack([x, y, z * (reach / depth_m)]) if depth_m > 0 else np.column_stack([x, y])
    pairs = cKDTree(points).query_pairs(reach, p=np.inf, output_type="ndarray")
    if depth_m <= 0 and len(pairs):
        pairs = pairs[z[pairs[:, 0]] == z[pairs[:, 1]]]
    i, j = pairs[:, 0], pairs[:, 1]
    lateral = np.hypot(x[i] - x[j], y[i] - y[j])
    return pairs[(lateral <= np.maximum(float(distance_m), 0.5 * (d[i] + d[j])))
                 & (np.abs(z[i] - z[j]) <= depth_m)]


def components(pairs: np.ndarray, n: int) -> np.ndarray:
    """Connected-component label (0..) of each of ``n`` nodes linked by ``pairs`` (m, 2)."""
    if n == 0:
        return np.zeros(0, np.int64)
    graph = scipy.sparse.coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[1].astype(np.int64)


def line_of_sight_splits(z: np.ndarray, amplitude_min: np.ndarray, prominence: float) -> np.ndarray:
    """Depths (``z``'s unit, ascending) at which one cluster's detections are two droplets on one line of sight.

    A droplet's darkness ``1 - amplitude_min`` (darkest over the cluster, per plane) peaks at its focus; two
    droplets on one line of sight make two peaks. Each peak of at least ``prominence`` (its height above
    the deeper of the dips that part it from a higher peak or the column's ends) is a droplet, and the
    column is cut at the least dark plane between neighbouring peaks. ``prominence`` 1 never splits.
    """
    planes, inverse = np.unique(np.asarray(z, np.float64), return_inverse=True)
    if planes.size < 3 or prominence >= 1:
        return np.zeros(0)
    darkness = np.zeros(planes.size)
    np.maximum.at(darkness, inverse, 1.0 - np.asarray(amplitude_min, np.float64))
    padded = np.r_[0.0, darkness, 0.0]  # the background beyond both ends: a peak at an end counts
    peaks = scipy.signal.find_peaks(padded, prominence=prominence)[0] - 1
    return np.array([planes[a + int(np.argmin(darkness[a:b + 1]))] for a, b in zip(peaks[:-1], peaks[1:])])


def _best_per_label(labels: np.ndarray, *keys) -> np.ndarray:
    """Row of each label's best row, in label order: the largest by the last of ``keys``, ties broken by
    the keys before it (``np.lexsort``'s order: last key first). ``labels`` must not be empty."""
    order = np.lexsort((*keys, labels))
    return order[np.flatnonzero(np.r_[labels[order][1:] != labels[order][:-1], True])]


def label_detections(detections: pd.DataFrame, config: dict) -> pd.DataFrame:
    """``detections`` (hid then plane order) with a ``cluster`` column, one label (0..) per particle over all
    holograms, ``line``, the first label of the column it was cut from, and ``z_low``, ``z_high`` (µm): the
    depths between which its focus may be sought.

    Per hologram, detections link through z where their disks overlap (:func:`linked_pairs`,
    ``particles.distance`` and ``link_depth``); a linked column whose darkness peaks twice is cut between
    the peaks (:func:`line_of_sight_splits`, ``particles.split_prominence``), and each part's focus is then
    sought between its cuts only (elsewhere ``z_low``, ``z_high`` are infinite).
    """
    settings = config["particles"]
    missing = [column for column in DETECTION_COLUMNS if column not in detections.columns]
    if missing:
        raise ValueError(f"merge_detections: detections lack columns {missing}")
    detections = detections.sort_values(["hid", "plane"], kind="stable", ignore_index=True)
    labels, lines = np.zeros(len(detections), np.int64), np.zeros(len(detections), np.int64)
    low, high = np.full(len(detections), -np.inf), np.full(len(detections), np.inf)
    distance, depth = float(settings["distance"]), float(settings["link_depth"])
    prominence, offset = float(settings["split_prominence"]), 0
    for _, rows in detections.groupby("hid", sort=True).indices.items():
        table = detections.iloc[rows]
        z = table["z"].to_numpy(np.float64)
        pairs = linked_pairs(1e-6 * table["x"].to_numpy(), 1e-6 * table["y"].to_numpy(), 1e-6 * z,
                             1e-6 * table["d"].to_numpy(), distance, depth)
        local = components(pairs, len(rows))
        amplitude = table["amplitude_min"].to_numpy(np.float64)
        for members in pd.Series(np.arange(len(rows))).groupby(local).indices.values():
            cuts = line_of_sight_splits(z[members], amplitude[members], prominence)
            part = np.searchsorted(cuts, z[members], side="left")  # a cut plane goes with the part before it
            bounds = np.r_[-np.inf, cuts, np.inf]
            labels[rows[members]], lines[rows[members]] = offset + part, offset
            low[rows[members]], high[rows[members]] = bounds[part], bounds[part + 1]
            offset += cuts.size + 1
    return detections.assign(cluster=labels, line=lines, z_low=low, z_high=high)


def contrast_floor(particles: pd.DataFrame, threshold: float, config: dict) -> np.ndarray:
    """The darkness contrast each particle (x, y, z in µm) must reach: ``threshold``, scaled where
    ``particles.contrast_diameter`` is set by the contrast a droplet of that diameter reaches in focus at the
    particle's place in the frame (:func:`~holopipe.optics.propagation.in_focus_contrast_at`, the ``optics``
    frame): the aperture images a small far droplet faint however sharp its focus."""
    diameter = config["particles"]["contrast_diameter"]
    if diameter is None or not len(particles):
        return np.full(len(particles), float(threshold))
    optics = config["optics"]
    scale = in_focus_contrast_at(*(particles[axis].to_numpy(np.float64) * 1e-6 for axis in "xyz"), float(diameter),
                                 nx=int(optics["nx"]), ny=int(optics["ny"]), dx=float(optics["dx"]),
                                 dy=float(optics["dy"]), wavelength=float(optics["wavelength"]))
    return float(threshold) * scale


def cluster_detections(detections: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Particles as :func:`merge_detections` finds them, with what refinement needs of their clusters.

    Columns :data:`PARTICLE_COLUMNS`, ``cluster`` and ``line`` (:func:`label_detections`' labels),
    ``z_first``, ``z_last``: the nearest and farthest plane with a detection of the cluster (the range that
    :func:`refine_depths` searches, widened up to ``z_low``, ``z_high``) and ``d_max``, its largest
    detection (all µm); ``detections`` and ``darkest_contrast``, what ``min_planes`` and ``min_contrast``
    judge. ``detections`` may already carry :func:`label_detections`' columns.
    """
    settings = config["particles"]
    columns = [*PARTICLE_COLUMNS, "cluster", "line", "z_first", "z_last", "z_low", "z_high", "d_max", "detections",
               "darkest_contrast"]
    if "cluster" not in detections.columns:
        detections = label_detections(detections, config)
    if detections.empty:
        integers = ("hid", "cluster", "line", "detections")
        return pd.DataFrame({column: pd.Series(dtype=np.int64 if column in integers else float) for column in columns})
    labels = detections["cluster"].to_numpy()
    if settings["focus"] == "logit":
        sharpness = detections["logit_mean"].to_numpy()
    elif settings["focus"] == "amplitude":
        sharpness = -detections["amplitude_min"].to_numpy()
    else:
        sharpness = detections["prob_mean"].to_numpy() * detections["area"].to_numpy()
    # In-focus detection per cluster: sharpest, then largest prob_max, then nearest the sensor
    # (exact ties only; deterministic whatever the row order).
    best = _best_per_label(labels, -detections["z"].to_numpy(), detections["prob_max"].to_numpy(), sharpness)
    focus = detections.iloc[best].set_index("cluster")
    by_cluster = detections.groupby("cluster")
    table = pd.DataFrame({
        "hid": focus["hid"].astype(np.int64), "x": focus["x"], "y": focus["y"], "z": focus["z"], "d": focus["d"],
        "prob": by_cluster["prob_max"].max(), "cluster": focus.index.to_numpy(), "line": focus["line"],
        "z_first": by_cluster["z"].min(), "z_last": by_cluster["z"].max(), "z_low": focus["z_low"],
        "z_high": focus["z_high"], "d_max": by_cluster["d"].max(), "detections": by_cluster.size(),
        "darkest_contrast": 1.0 - by_cluster["amplitude_min"].min()})
    keep = ((table["detections"] >= int(settings["min_planes"]))
            & (table["darkest_contrast"] >= contrast_floor(table, float(settings["min_contrast"]), config)))
    table = table[keep].reindex(columns=columns).astype({"hid": np.int64, "cluster": np.int64, "line": np.int64,
                                                         "detections": np.int64})
    return table.sort_values(["hid", "z"], kind="stable", ignore_index=True)


def merge_detections(detections: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Particles (:data:`PARTICLE_COLUMNS`, µm, sorted by hid then z) from detections of any planes.

    ``detections`` has the columns of :data:`holopipe.detect.sweep.DETECTION_COLUMNS` (µm); ``config`` is a
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


def refine_depths(propagator: Propagator, planes_m: np.ndarray, particles: pd.DataFrame, settings: dict, *,
                  dx: float, dy: float, batch_planes: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Each particle of one hologram refined on the reconstruction: a table (``particles``' index) of
    ``z`` (m), where its focus metric peaks, that peak's value ``focus``, and ``x, y, d`` (m) measured on
    the peak's plane (:func:`measure_dark_disk`).

    ``particles`` has ``x, y, d, z_first, z_last`` in metres (``d`` sizes the window;
    :func:`cluster_detections`' extent); ``settings`` the ``particles`` section (``refine`` metric,
    ``refine_margin``, ``refine_window``, ``refine_interpolate``, ``distance``). Each particle's planes
    between ``z_first - refine_margin`` and ``z_last + refine_margin`` are scored over its fixed window
    (:func:`focus_windows`); only the union of those planes is reconstructed, ``batch_planes`` at a time
    (default: :func:`~holopipe.optics.propagation.device_planes_per_batch`, sized for the device). Per batch, every
    (particle, plane) pair in range is scored at once on the propagator's device
    (:func:`holopipe.optics.focus.window_scores`) and only the scores come back, with the measuring windows of the
    particles whose best plane so far is in the batch: memory is one batch whatever the frame, and no copy is made per
    particle and plane. With ``refine_interpolate`` an interior peak moves by the vertex of the parabola through it and
    its two neighbours (at most half a plane). ``progress`` shows a bar over the plane batches.
    """
    metric = settings["refine"]
    n = len(particles)
    planes_m = np.asarray(planes_m, np.float64)
    if n == 0:
        return pd.DataFrame({column: np.zeros(0) for column in ("z", "focus", "x", "y", "d")}, index=particles.index)
    margin = float(settings["refine_margin"])
    z_low = particles["z_low"].to_numpy(np.float64) if "z_low" in particles else np.full(n, -np.inf)
    z_high = particles["z_high"].to_numpy(np.float64) if "z_high" in particles else np.full(n, np.inf)
    lowest = np.maximum(particles["z_first"].to_numpy() - margin, z_low)
    highest = np.minimum(particles["z_last"].to_numpy() + margin, z_high)
    first = np.clip(np.searchsorted(planes_m, lowest - 1e-9, "left"), 0, planes_m.size - 1)
    last = np.clip(np.searchsorted(planes_m, highest + 1e-9, "right") - 1, first, planes_m.size - 1)
    row0, row1, col0, col1 = focus_windows(particles["x"].to_numpy(), particles["y"].to_numpy(),
                                           particles["d"].to_numpy(), propagator.shape, dx=dx, dy=dy,
                                           diameters=float(settings["refine_window"]))
    needed = np.zeros(planes_m.size, bool)
    for a, b in zip(first, last):
        needed[a:b + 1] = True
    indices = np.flatnonzero(needed)
    if batch_planes is None:
        batch_planes = device_planes_per_batch(propagator)
    # x, y, d are measured on the peak's plane inside the particle's own window (a larger neighbour's shadow
    # there is not taken for it: the dark region is sought from the detection's centre). Only a window that
    # the frame edge cuts is widened by the linking distance, and searched whole: there the fringes are cut
    # and the detection may sit beside its droplet. The window of the best plane so far is kept during the
    # sweep: no plane is reconstructed twice.
    reach_y, reach_x = (int(np.ceil(float(settings["distance"]) / pitch)) for pitch in (dy, dx))
    ny, nx = propagator.shape
    cut = (row0 == 0) | (row1 == ny) | (col0 == 0) | (col1 == nx)
    wide = (np.where(cut, np.maximum(row0 - reach_y, 0), row0), np.where(cut, np.minimum(row1 + reach_y, ny), row1),
            np.where(cut, np.maximum(col0 - reach_x, 0), col0), np.where(cut, np.minimum(col1 + reach_x, nx), col1))
    centre_row, centre_col = ((np.asarray(particles[axis].to_numpy(), np.float64) / pitch + size / 2 - 0.5)
                              for axis, pitch, size in (("y", dy, ny), ("x", dx, nx)))
    radius = np.maximum(0.5 * particles["d"].to_numpy(np.float64) / min(dx, dy), 1.5)
    scores = np.full((n, planes_m.size), -np.inf)
    best_score, best_windows = np.full(n, -np.inf), [None] * n
    for start in tqdm(range(0, indices.size, batch_planes), desc="refine planes", unit="batch", leave=False,
                      disable=not progress):
        batch = indices[start:start + batch_planes]
        amplitude = reconstructed_amplitude(propagator, planes_m[batch])  # (planes, ny, nx), on the device
        # Every (particle, slot) pair whose plane is in the particle's range, particle-major.
        particle, slot = np.nonzero((batch[None, :] >= first[:, None]) & (batch[None, :] <= last[:, None]))
        if particle.size == 0:
            continue
        run = host_array(window_scores(amplitude, slot, row0[particle], row1[particle], col0[particle],
                                       col1[particle], metric))
        scores[particle, batch[slot]] = run
        # Each particle's best pair in the batch (the earliest of equal maxima, as np.argmax below picks),
        # kept only when strictly better than its best so far.
        top = _best_per_label(particle, -slot, run)
        top = top[run[top] > best_score[particle[top]]]
        best_score[particle[top]] = run[top]
        kept = particle[top]
        for k, window in zip(kept, host_windows(amplitude, slot[top], *(bound[kept] for bound in wide))):
            best_windows[k] = window
    best = np.array([a + int(np.argmax(scores[k, a:b + 1])) for k, (a, b) in enumerate(zip(first, last))])
    z, peak = planes_m[best], scores[np.arange(n), best]
    if settings["refine_interpolate"] and planes_m.size > 1:
        rows = np.arange(n)
        interior = (best > first) & (best < last)
        left, centre = scores[rows, np.maximum(best - 1, 0)], scores[rows, best]
        right = scores[rows, np.minimum(best + 1, planes_m.size - 1)]
        curvature = left - 2 * centre + right
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(interior & (curvature < 0), 0.5 * (left - right) / curvature, 0.0)
        z = z + np.clip(shift, -0.5, 0.5) * (planes_m[1] - planes_m[0])
    measured = np.array([measure_dark_disk(best_windows[k], wide[0][k], wide[2][k], (ny, nx), dx=dx, dy=dy,
                                           seed=None if cut[k] else (centre_row[k], centre_col[k], radius[k]))
                         for k in range(n)]).reshape(n, 4)
    at_cut = ((best == first) & (lowest > -np.inf) & (lowest == z_low)) | ((best == last) & (highest == z_high)
                                                                        & (highest < np.inf))
    return pd.DataFrame({"z": z, "focus": peak, "x": measured[:, 0], "y": measured[:, 1], "d": measured[:, 2],
                         "contrast": measured[:, 3], "at_cut": at_cut}, index=particles.index)


def measure_dark_disk(window: np.ndarray, row0: int, col0: int, shape: tuple[int, int], *, dx: float,
                      dy: float, seed: tuple[float, float, float] | None = None) -> tuple[float, float, float]:
    """x, y, d (m) of the dark disk in an amplitude ``window`` whose first pixel is ``(row0, col0)`` of a
    frame of ``shape``.

    The disk is the 8-connected region of pixels darker than half-way between the background (1) and
    its darkest box-averaged amplitude that holds that darkest point: x, y its centroid, d its equivalent
    diameter ``2 sqrt(area dx dy / π)`` (the half-contrast edge, as the baseline sizes). With ``seed``
    ``(row, col, radius)`` (frame pixels) the darkest point is sought within ``radius`` of ``(row, col)``
    only, and the region is cut at twice that from it: a small droplet beside a larger, darker shadow is
    measured, not moved onto its neighbour. Without, anywhere in the window.
    """
    ny, nx = shape
    smooth = smoothed_amplitude(window)
    rows, cols = np.indices(window.shape)
    if seed is None:
        near = np.ones(window.shape, bool)
    else:
        near = np.hypot(rows + row0 - seed[0], cols + col0 - seed[1]) <= seed[2]
    darkest = np.unravel_index(int(np.argmin(np.where(near, smooth, np.inf))), smooth.shape)
    dark = window < 0.5 * (1.0 + smooth[darkest])
    if seed is not None:
        dark &= np.hypot(rows - darkest[0], cols - darkest[1]) <= 2 * seed[2]
    labels, _ = ndi.label(dark, structure=np.ones((3, 3), bool))
    label = labels[darkest]
    rows, cols = np.nonzero(labels == label) if label else (np.array([darkest[0]]), np.array([darkest[1]]))
    return (float(pixel_position(cols.mean() + col0, nx, dx)), float(pixel_position(rows.mean() + row0, ny, dy)),
            float(equivalent_diameter(rows.size, dx, dy)), float(1.0 - window[rows, cols].mean()))


def read_detections(paths) -> pd.DataFrame:
    """The detections of several inference CSVs (the chunks of a split, any order) as one table."""
    tables = []
    for path in paths:
        table = pd.read_csv(path)
        missing = [column for column in DETECTION_COLUMNS if column not in table.columns]
        if missing:
            raise ValueError(f"{path}: not an inference detections CSV (missing columns {missing})")
        tables.append(table)
    if not tables:
        raise ValueError("read_detections: no detection files given")
    table = pd.concat(tables, ignore_index=True)
    return table.sort_values(["hid", "plane"], kind="stable", ignore_index=True)


def particles_file(chunk_csvs: list, out_csv, config: dict, *, store_path=None, progress=True) -> Path:
    """Gather a split's chunk CSVs, merge them into particles and write ``out_csv`` atomically.

    With ``particles.refine`` other than none, each particle is refined on the holograms of the
    standardized split store ``store_path`` (reconstructed as in inference, ``reconstruction`` section):
    see the module docstring. Each hologram's refinement is kept beside ``out_csv`` as it finishes
    (:class:`holopipe.core.files.HologramParts`, fingerprinted by the code, the ``particles``, ``reconstruction``
    and ``optics`` sections and the inputs' identity), so a killed job's rerun refines only the rest.
    """
    chunk_csvs = list(chunk_csvs)
    detections = read_detections(chunk_csvs)
    clusters = cluster_detections(detections, config)
    settings = config["particles"]
    if settings["refine"] == "none" or not len(clusters):
        table = without_stationary(clusters, _split_holograms(store_path, detections), settings["stationary_fraction"])
        return write_atomically(out_csv, lambda tmp: _particle_table(table).to_csv(tmp, index=False))
    if store_path is None:
        raise ValueError(f"particles.refine is {settings['refine']!r}: it needs the standardized "
                         "split store (--store) to reconstruct the holograms")
    parts = HologramParts(out_csv, {
        "stage": "particles", "code": code_identity(),
        "particles": {k: v for k, v in settings.items() if k != "device"},
        "reconstruction": config["reconstruction"], "optics": config["optics"],
        "inputs": input_identity(*chunk_csvs, store_path)})
    refined = _refined(clusters, config, store_path, parts, progress=progress)
    candidates = without_cut_ghosts(clusters.assign(**{c: refined[c] for c in ("x", "y", "z", "d", "focus",
                                                                                "contrast", "at_cut")}))
    # A disk too faint to be a droplet in focus, or a focus beyond the sample volume: not a particle of it.
    refined_clusters = candidates[(candidates["contrast"] >= contrast_floor(candidates, settings["min_disk_contrast"],
                                                                            config))
                                  & refined["inside"].reindex(candidates.index).to_numpy(bool)]
    table = without_ghosts(merge_duplicates(refined_clusters, settings), settings,
                           float(config["optics"]["wavelength"]))
    table = _particle_table(without_stationary(table, _split_holograms(store_path, detections),
                                               settings["stationary_fraction"], evidence=candidates))
    return parts.finish(lambda tmp: table.to_csv(tmp, index=False))


def _split_holograms(store_path, detections: pd.DataFrame) -> int:
    """How many holograms the split has: the store's usable ones, or without a store (refine none) those with
    a detection."""
    if store_path is None:
        return int(detections["hid"].nunique())
    ds = open_holodec(store_path)
    try:
        return len(usable_holograms(ds))
    finally:
        ds.close()


def _particle_table(particles: pd.DataFrame) -> pd.DataFrame:
    return particles[list(PARTICLE_COLUMNS)].sort_values(["hid", "z"], kind="stable", ignore_index=True)


STATIONARY_MIN_HOLOGRAMS = 3
"""A place holds something stationary only when found in at least this many holograms of a split."""


def without_stationary(particles: pd.DataFrame, n_holograms: int, fraction: float | None, *,
                       evidence: pd.DataFrame | None = None) -> pd.DataFrame:
    """A split's ``particles`` (hid, x, y, d in µm) without those at a place where something sits in at least
    ``fraction`` of its ``n_holograms`` (and in :data:`STATIONARY_MIN_HOLOGRAMS`). Droplets drift with the air
    between holograms; dust on a window, a scratch or a dead pixel stays, in every hologram of a flight.

    A place is counted from ``evidence`` (default ``particles``): every candidate the stage found, those it
    later dropped included. Dust on a window at the volume's edge refines to just outside the volume in most
    holograms, so the particles kept alone see it in a few. A particle and a candidate of another hologram
    are at one place when their centres are closer than the larger radius, at any depth: a speck shadows
    its column on every plane, and the detector's false particles there lie at any depth (a droplet that
    happens to lie behind a speck goes too). ``fraction`` None keeps everything."""
    evidence = particles if evidence is None else evidence
    if fraction is None or not len(particles) or not len(evidence):
        return particles
    needed = max(STATIONARY_MIN_HOLOGRAMS, int(np.ceil(fraction * n_holograms)))
    x, y, d = (particles[c].to_numpy(np.float64) for c in "xyd")
    ex, ey, ed = (evidence[c].to_numpy(np.float64) for c in "xyd")
    reach = 0.5 * max(d.max(), ed.max())
    pairs = cKDTree(np.column_stack([x, y])).sparse_distance_matrix(
        cKDTree(np.column_stack([ex, ey])), reach, output_type="ndarray")
    i, j = pairs["i"], pairs["j"]
    close = pairs["v"] <= 0.5 * np.maximum(d[i], ed[j])
    # Holograms at each particle's place: its own, and those of the candidates there (each counted once).
    hid, evidence_hid = particles["hid"].to_numpy(), evidence["hid"].to_numpy()
    seen = pd.DataFrame({"particle": np.r_[np.arange(len(hid)), i[close]],
                         "hid": np.r_[hid, evidence_hid[j[close]]]}).drop_duplicates()
    holograms = seen.groupby("particle").size().reindex(np.arange(len(hid)), fill_value=0).to_numpy()
    return particles[holograms < needed]


def suppress_ghosts(particles: pd.DataFrame, rank: str, wavelength_m: float, depths_of_focus: float,
                    diameters: float) -> pd.DataFrame:
    """``particles`` (one hologram, x, y, z, d in metres) without the ghosts of others.

    A droplet's depth of focus is D²/λ (10 mm at 60 µm), and whatever marks it along that column can
    report it more than once: dim spots of its defocused rings (the baseline's 3-D groups), or clusters
    that refine to different planes (the U-Net path). Best first by the column ``rank`` (the baseline's
    darkness contrast, the refinement's focus peak), a particle of diameter D removes every remaining
    one near it in x, y and within ``depths_of_focus`` · D²/λ in z (the standard
    processing's ghost removal), scaled to both: a particle of diameter d is a ghost of it only when it
    lies inside the better one's shadow widened by ``diameters``, ``distance + d/2 <= diameters · D/2``.
    So a small droplet beside a large one (their disks at most touching) survives while ``diameters`` is
    below ``1 + 2 d/D``, and spots on the large one's column go. ``depths_of_focus`` 0 keeps every particle.
    """
    if depths_of_focus == 0 or len(particles) < 2:
        return particles
    order = np.argsort(-particles[rank].to_numpy(), kind="stable")
    x, y, z, d = (particles[c].to_numpy(np.float64)[order] for c in "xyzd")
    kept = np.ones(len(order), dtype=bool)
    for i in range(len(order)):
        if not kept[i]:
            continue
        later = np.arange(i + 1, len(order))
        ghost = ((np.hypot(x[later] - x[i], y[later] - y[i]) + 0.5 * d[later] <= 0.5 * diameters * d[i])
                 & (np.abs(z[later] - z[i]) <= depths_of_focus * d[i] ** 2 / wavelength_m))
        kept[later[ghost]] = False
    return particles.iloc[np.sort(order[kept])]


def merge_duplicates(particles: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """One particle per group of refined particles (µm) whose disks overlap (or whose centres are closer than
    ``distance``) within ``link_depth`` in z: :func:`linked_pairs` on the refined x, y, z, d.

    A droplet whose detections fell into several clusters (a ghost beside it, a gap across z, a large
    droplet that the model marked in fragments) refines to one place several times: the whole disk and its
    parts. The one kept is the largest (the droplet, not a fragment of it), then the one of largest ``prob``.
    """
    kept = []
    for _, group in particles.groupby("hid", sort=True):
        x, y, z, d = (1e-6 * group[c].to_numpy(np.float64) for c in "xyzd")
        pairs = linked_pairs(x, y, z, d, float(settings["distance"]), float(settings["link_depth"]))
        labels = components(pairs, len(group))
        kept.append(group.iloc[_best_per_label(labels, group["prob"].to_numpy(), group["d"].to_numpy())])
    return pd.concat(kept) if kept else particles


def without_cut_ghosts(particles: pd.DataFrame) -> pd.DataFrame:
    """Refined parts of cut columns (``line``) without those whose focus peaked on a cut (``at_cut``).

    A part's focus is sought between its cuts only; one that peaks on a cut was climbing towards the
    neighbouring part's droplet, so it is that droplet again, unless no part of the column peaked inside
    (then the sharpest one stays).
    """
    inside = ~particles["at_cut"].to_numpy(bool)
    lines = particles["line"].to_numpy()
    has_inside = pd.Series(inside).groupby(lines).transform("any").to_numpy()
    sharpest = np.zeros(len(particles), bool)
    sharpest[_best_per_label(lines, particles["focus"].to_numpy())] = True
    return particles[inside | (~has_inside & sharpest)]


def without_ghosts(particles: pd.DataFrame, settings: dict, wavelength_m: float) -> pd.DataFrame:
    """Refined particles (µm) of every hologram without the ghosts of others (:func:`suppress_ghosts`,
    sharpest ``focus`` first, ``particles.ghost_depths_of_focus`` and ``ghost_diameters``)."""
    kept = []
    for _, group in particles.groupby("hid", sort=True):
        metres = group.assign(**{c: group[c] * 1e-6 for c in "xyzd"})
        kept.append(group.loc[suppress_ghosts(metres, "focus", wavelength_m, settings["ghost_depths_of_focus"],
                                              settings["ghost_diameters"]).index])
    return pd.concat(kept) if kept else particles


def _refined(clusters: pd.DataFrame, config: dict, store_path, parts: HologramParts, *,
             progress: bool) -> pd.DataFrame:
    """:func:`refine_depths` (x, y, z, d in µm, focus) of every hologram's particles, ``clusters``' index;
    holograms already in ``parts`` are read from there, the others saved to it as they finish.

    The window scales with the cluster's largest detection: the in-focus detection of a large droplet
    may be a small fragment of it.
    """
    name = os.fspath(store_path)
    reconstruction = config["reconstruction"]
    on_device = array_mover(config["particles"]["device"], "particles.device")
    groups = clusters.groupby("hid", sort=True)
    done = parts.done()
    ds = open_standardized(name, config)
    try:
        attrs = ds.attrs
        dx, dy = float(attrs["dx"]), float(attrs["dy"])
        volume = SampleVolume.of(attrs)
        planes = volume.planes(int(reconstruction["z_bins"]), int(config["particles"]["beyond_planes"]))
        n_holograms = ds.sizes["hologram_number"]
        for hid, group in tqdm(groups, desc=f"refine {Path(name).name}", unit="hologram", disable=not progress):
            if not 1 <= hid <= n_holograms:
                raise ValueError(f"{name}: detections name hologram {hid}, the store has {n_holograms}")
            if hid in done:
                continue
            image_yx = hologram_image_yx(ds, int(hid) - 1)
            propagator = hologram_propagator(image_yx, attrs, reconstruction, to_device=on_device)
            metres = group[["x", "y", "d_max", "z_first", "z_last", "z_low", "z_high"]].rename(
                columns={"d_max": "d"}) * 1e-6
            found = refine_depths(propagator, planes, metres, config["particles"], dx=dx, dy=dy, progress=progress)
            found = found.assign(inside=volume.contains(found["z"]))
            parts.save(hid, found.assign(**{c: found[c] * 1e6 for c in "xyzd"}, cluster=group["cluster"].to_numpy()))
    finally:
        ds.close()
    table = pd.concat(parts.load(list(groups.groups)), ignore_index=True).set_index("cluster")
    return table.loc[clusters["cluster"].to_numpy()].set_index(clusters.index)
