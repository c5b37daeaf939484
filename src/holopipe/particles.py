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
amplitude minimum is sharper (still blunt for large droplets: hence the refinement below). With
``logit`` it is the detection with the largest mean logit, with ``probability`` the one with the largest
probability mass ``prob_mean · area``. Either way the peak across planes, not the first plane that
fired; ties are broken by ``prob_max``, then by the smaller z. Clusters whose darkest contrast ``1 -
amplitude_min`` stays below ``particles.min_contrast`` are dropped: they are out-of-focus ghosts of
fringes, never a droplet's shadow. The particle takes z, x, y (probability-weighted centroid) and d (from
the area) of the in-focus detection, and ``prob`` = the cluster's largest ``prob_max``.

**Depth refinement** (``particles.refine``, default ``tamura``): the model says whether and where in x, y
a droplet is, the physics says its depth. The saturated model marks a large droplet over millimetres,
and the darkest detection of so blunt a minimum can land far from the focus. So each hologram of the
standardized split store is reconstructed (as in inference: ``reconstruction.z_bins`` planes, ``pad``,
``band_limit``) on the planes each cluster spans, widened by ``particles.refine_margin`` on both sides,
and a focus metric of :mod:`holopipe.focus` is evaluated over a fixed window ``particles.refine_window``
diameters wide around the particle's x, y (:func:`focus_windows`; the same window on every plane, so the
values compare planes): ``tamura``, the Tamura coefficient of the amplitude gradient (the baseline's
``focus_metric``), or ``min_amplitude``, the darkest box-averaged amplitude. z is the plane where it
peaks, between planes at the vertex of a parabola with ``particles.refine_interpolate``. The window is
``refine_window`` diameters of the cluster's LARGEST detection (the darkest one of a large droplet may be
a fragment of it). On that plane x, y and d are measured as the baseline does (centroid and equivalent
diameter of the half-contrast dark region holding the darkest point, in the window widened by
``particles.distance``): a cluster beside its droplet, e.g. where the frame edge cuts the fringes, still
takes the droplet's centre. Clusters of one droplet (such a ghost, or a column split across z) then
refine to the same place and are merged (:func:`merge_duplicates`, within ``particles.distance`` as in
clustering), keeping the largest prob. Clusters of one large droplet can also refine to different planes
of its long depth of focus D²/λ; :func:`without_ghosts` keeps the sharpest focus of those within
``particles.ghost_diameters`` diameters in x, y and ``particles.ghost_depths_of_focus`` depths of focus
in z (the ghost removal the baseline applies to its own groups, :func:`suppress_ghosts`). Planes are
reconstructed on ``particles.device`` in batches sized for its memory
(:func:`holopipe.optics.device_planes_per_batch`: dozens of full-size planes on a GPU) and every particle of
a batch is scored at once there (its windows' indices uploaded in one packed copy and gathered in one
indexing op per size group, :func:`holopipe.focus.window_scores`); only the scores and the best planes'
measuring windows (one copy, :func:`holopipe.focus.host_windows`) reach the host, so memory is one batch of
planes even for full 4872 x 3248 frames. Each hologram's result is kept
as it finishes, so a killed job resumes (:func:`particles_file`). ``none`` keeps the in-focus
detection's plane, x, y and d, and needs no store.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import scipy.sparse
import scipy.sparse.csgraph
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from holopipe.device import array_mover
from holopipe.focus import host_array, host_windows, reconstructed_amplitude, smoothed_amplitude, window_scores
from holopipe.io import HologramParts, equivalent_diameter, input_identity, pixel_position, write_atomically
from holopipe.optics import Propagator, device_planes_per_batch
from holopipe.provenance import code_identity
from holopipe.reconstruction import hologram_propagator, open_standardized, z_bin_centres

__all__ = ["MIN_WINDOW_PIXELS", "PARTICLE_COLUMNS", "cluster_detections", "cluster_labels",
           "focus_windows", "label_detections", "measure_dark_disk", "merge_detections",
           "merge_duplicates", "particles_file", "read_detections", "refine_depths", "suppress_ghosts",
           "without_ghosts"]

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


def _linking_points(table: pd.DataFrame, settings: dict) -> np.ndarray:
    """(x, y, z · ``z_scale``) in metres of a table in µm: the space detections and particles link in."""
    return 1e-6 * np.column_stack([table["x"], table["y"], table["z"] * settings["z_scale"]])


def _best_per_label(labels: np.ndarray, *keys) -> np.ndarray:
    """Row of each label's best row, in label order: the largest by the last of ``keys``, ties broken by
    the keys before it (``np.lexsort``'s order: last key first). ``labels`` must not be empty."""
    order = np.lexsort((*keys, labels))
    return order[np.flatnonzero(np.r_[labels[order][1:] != labels[order][:-1], True])]


def label_detections(detections: pd.DataFrame, config: dict) -> pd.DataFrame:
    """``detections`` (hid then plane order) with a ``cluster`` column: one label (0..) per particle, all holograms.

    Single linkage per hologram in (x, y, z · ``particles.z_scale``) at ``particles.distance``.
    """
    settings = config["particles"]
    missing = [column for column in _NEEDED if column not in detections.columns]
    if missing:
        raise ValueError(f"merge_detections: detections lack columns {missing}")
    detections = detections.sort_values(["hid", "plane"], kind="stable", ignore_index=True)
    labels, offset = np.zeros(len(detections), np.int64), 0
    for _, rows in detections.groupby("hid", sort=True).indices.items():
        local = cluster_labels(_linking_points(detections.iloc[rows], settings), float(settings["distance"]))
        labels[rows] = local + offset
        offset += int(local.max()) + 1
    return detections.assign(cluster=labels)


def cluster_detections(detections: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Particles as :func:`merge_detections` finds them, with what refinement needs of their clusters.

    Columns :data:`PARTICLE_COLUMNS`, ``cluster`` (:func:`label_detections`' label), ``z_first``,
    ``z_last``: the nearest and farthest plane with a detection of the cluster (the range that
    :func:`refine_depths` searches, widened) and ``d_max``, its largest detection (all µm).
    ``detections`` may already carry the ``cluster`` labels.
    """
    settings = config["particles"]
    columns = [*PARTICLE_COLUMNS, "cluster", "z_first", "z_last", "d_max"]
    if "cluster" not in detections.columns:
        detections = label_detections(detections, config)
    if detections.empty:
        return pd.DataFrame({column: pd.Series(dtype=np.int64 if column in ("hid", "cluster") else float)
                             for column in columns})
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
        "prob": by_cluster["prob_max"].max(), "cluster": focus.index.to_numpy(),
        "z_first": by_cluster["z"].min(), "z_last": by_cluster["z"].max(), "d_max": by_cluster["d"].max()})
    keep = ((by_cluster.size() >= int(settings["min_planes"]))
            & (1.0 - by_cluster["amplitude_min"].min() >= float(settings["min_contrast"])))
    table = table[keep.reindex(table.index, fill_value=False)]
    table = table.reindex(columns=columns).astype({"hid": np.int64, "cluster": np.int64})
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
    (default: :func:`~holopipe.optics.device_planes_per_batch`, sized for the device). Per batch, every (particle, plane)
    pair in range is scored at once on the propagator's device (:func:`holopipe.focus.window_scores`) and
    only the scores come back, with the measuring windows of the particles whose best plane so far is in
    the batch: memory is one batch whatever the frame, and no copy is made per particle and plane. With
    ``refine_interpolate`` an interior peak moves by the vertex of the parabola through it and its two
    neighbours (at most half a plane). ``progress`` shows a bar over the plane batches.
    """
    metric = settings["refine"]
    n = len(particles)
    planes_m = np.asarray(planes_m, np.float64)
    if n == 0:
        return pd.DataFrame({column: np.zeros(0) for column in ("z", "focus", "x", "y", "d")}, index=particles.index)
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
        batch_planes = device_planes_per_batch(propagator)
    # x, y, d are measured on the peak's plane over the window widened by the clustering distance, so that
    # a cluster that sat beside the droplet (fringes cut by the frame edge) still takes the droplet's centre.
    # That window of the best plane so far is kept during the sweep: no plane is reconstructed twice.
    reach_y, reach_x = (int(np.ceil(float(settings["distance"]) / pitch)) for pitch in (dy, dx))
    ny, nx = propagator.shape
    wide = (np.maximum(row0 - reach_y, 0), np.minimum(row1 + reach_y, ny),
            np.maximum(col0 - reach_x, 0), np.minimum(col1 + reach_x, nx))
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
    measured = np.array([measure_dark_disk(best_windows[k], wide[0][k], wide[2][k], (ny, nx), dx=dx, dy=dy)
                         for k in range(n)]).reshape(n, 3)
    return pd.DataFrame({"z": z, "focus": peak, "x": measured[:, 0], "y": measured[:, 1], "d": measured[:, 2]},
                        index=particles.index)


def measure_dark_disk(window: np.ndarray, row0: int, col0: int, shape: tuple[int, int], *, dx: float,
                      dy: float) -> tuple[float, float, float]:
    """x, y, d (m) of the dark disk in an amplitude ``window`` whose first pixel is ``(row0, col0)`` of a
    frame of ``shape``.

    The disk is the 8-connected region of pixels darker than half-way between the background (1) and
    the window's darkest box-averaged amplitude that holds that darkest point: x, y its centroid, d its
    equivalent diameter ``2 sqrt(area dx dy / π)`` (the half-contrast edge, as the baseline sizes).
    """
    ny, nx = shape
    smooth = smoothed_amplitude(window)
    darkest = np.unravel_index(int(np.argmin(smooth)), smooth.shape)
    labels, _ = ndi.label(window < 0.5 * (1.0 + smooth[darkest]), structure=np.ones((3, 3), bool))
    label = labels[darkest]
    rows, cols = np.nonzero(labels == label) if label else (np.array([darkest[0]]), np.array([darkest[1]]))
    return (float(pixel_position(cols.mean() + col0, nx, dx)), float(pixel_position(rows.mean() + row0, ny, dy)),
            float(equivalent_diameter(rows.size, dx, dy)))


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

    With ``particles.refine`` other than none, each particle is refined on the holograms of the
    standardized split store ``store_path`` (reconstructed as in inference, ``reconstruction`` section):
    see the module docstring. Each hologram's refinement is kept beside ``out_csv`` as it finishes
    (:class:`holopipe.io.HologramParts`, fingerprinted by the code, the ``particles``, ``reconstruction``
    and ``optics`` sections and the inputs' identity), so a killed job's rerun refines only the rest.
    """
    chunk_csvs = list(chunk_csvs)
    clusters = cluster_detections(read_detections(chunk_csvs), config)
    settings = config["particles"]
    if settings["refine"] == "none" or not len(clusters):
        return write_atomically(out_csv, lambda tmp: _particle_table(clusters).to_csv(tmp, index=False))
    if store_path is None:
        raise ValueError(f"particles.refine is {settings['refine']!r}: it needs the standardized "
                         "split store (--store) to reconstruct the holograms")
    parts = HologramParts(out_csv, {
        "stage": "particles", "code": code_identity(),
        "particles": {k: v for k, v in settings.items() if k != "device"},
        "reconstruction": config["reconstruction"], "optics": config["optics"],
        "inputs": input_identity(*chunk_csvs, store_path)})
    refined = _refined(clusters, config, store_path, parts, progress=progress)
    refined_clusters = clusters.assign(**{c: refined[c] for c in ("x", "y", "z", "d", "focus")})
    table = _particle_table(without_ghosts(merge_duplicates(refined_clusters, settings), settings,
                                           float(config["optics"]["wavelength"])))
    return parts.finish(lambda tmp: table.to_csv(tmp, index=False))


def _particle_table(particles: pd.DataFrame) -> pd.DataFrame:
    return particles[list(PARTICLE_COLUMNS)].sort_values(["hid", "z"], kind="stable", ignore_index=True)


def suppress_ghosts(particles: pd.DataFrame, rank: str, wavelength_m: float, depths_of_focus: float,
                    diameters: float) -> pd.DataFrame:
    """``particles`` (one hologram, x, y, z, d in metres) without the ghosts of others.

    A droplet's depth of focus is D²/λ (10 mm at 60 µm), and whatever marks it along that column can
    report it more than once: dim spots of its defocused rings (the baseline's 3-D groups), or clusters
    that refine to different planes (the U-Net path). Best first by the column ``rank`` (the baseline's
    darkness contrast, the refinement's focus peak), a particle of diameter D removes every remaining
    one within ``diameters`` · D of it in x, y and ``depths_of_focus`` · D²/λ in z (the standard
    processing's ghost removal). ``depths_of_focus`` 0 keeps every particle.
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
        ghost = ((np.hypot(x[later] - x[i], y[later] - y[i]) <= diameters * d[i])
                 & (np.abs(z[later] - z[i]) <= depths_of_focus * d[i] ** 2 / wavelength_m))
        kept[later[ghost]] = False
    return particles.iloc[np.sort(order[kept])]


def merge_duplicates(particles: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """One particle per group of refined particles (µm) linked within ``distance`` as in clustering.

    A droplet whose detections fell into several clusters (a ghost beside it, a gap across z) refines
    to one place several times; the one kept has the largest ``prob``, then the sharpest ``focus``.
    """
    kept = []
    for _, group in particles.groupby("hid", sort=True):
        labels = cluster_labels(_linking_points(group, settings), float(settings["distance"]))
        kept.append(group.iloc[_best_per_label(labels, group["focus"].to_numpy(), group["prob"].to_numpy())])
    return pd.concat(kept) if kept else particles


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
        planes = z_bin_centres(float(attrs["zMin"]), float(attrs["zMax"]), int(reconstruction["z_bins"]))
        n_holograms = ds.sizes["hologram_number"]
        for hid, group in tqdm(groups, desc=f"refine {Path(name).name}", unit="hologram", disable=not progress):
            if not 1 <= hid <= n_holograms:
                raise ValueError(f"{name}: detections name hologram {hid}, the store has {n_holograms}")
            if hid in done:
                continue
            image = ds["image"].isel(hologram_number=int(hid) - 1).compute(scheduler="synchronous").values
            propagator = hologram_propagator(image, attrs, reconstruction, to_device=on_device)
            metres = group[["x", "y", "d_max", "z_first", "z_last"]].rename(columns={"d_max": "d"}) * 1e-6
            found = refine_depths(propagator, planes, metres, config["particles"], dx=dx, dy=dy, progress=progress)
            parts.save(hid, found.assign(**{c: found[c] * 1e6 for c in "xyzd"}, cluster=group["cluster"].to_numpy()))
    finally:
        ds.close()
    table = pd.concat(parts.load(list(groups.groups)), ignore_index=True).set_index("cluster")
    return table.loc[clusters["cluster"].to_numpy()].set_index(clusters.index)
