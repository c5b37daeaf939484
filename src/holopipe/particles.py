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

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.sparse.csgraph
from scipy.spatial import cKDTree

from holopipe.io import write_atomically

__all__ = ["PARTICLE_COLUMNS", "cluster_labels", "merge_detections", "particles_file", "read_detections"]

PARTICLE_COLUMNS = ("hid", "x", "y", "z", "d", "prob")
"""Columns of a particles CSV: hid (1-based), x, y, z, d (µm), prob (the cluster's peak probability)."""

_NEEDED = ("hid", "plane", "x", "y", "z", "d", "area", "prob_max", "prob_mean", "logit_mean", "amplitude_min")


def cluster_labels(points_m: np.ndarray, distance_m: float) -> np.ndarray:
    """Single-linkage cluster label (0..) of each point (n, k): linked when closer than ``distance_m``."""
    n = len(points_m)
    if n == 0:
        return np.zeros(0, np.int64)
    pairs = cKDTree(points_m).query_pairs(distance_m, output_type="ndarray")  # (m, 2)
    graph = scipy.sparse.coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[1].astype(np.int64)


def merge_detections(detections: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Particles (:data:`PARTICLE_COLUMNS`, µm, sorted by hid then z) from detections of any planes.

    ``detections`` has the columns of :data:`holopipe.infer.DETECTION_COLUMNS` (µm); ``config`` is a
    validated config whose ``particles`` section applies.
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
        peak = group.groupby(labels)["prob_max"].max().to_numpy()
        darkest = group.groupby(labels)["amplitude_min"].min().to_numpy()
        keep = (size >= int(settings["min_planes"])) & (1.0 - darkest >= float(settings["min_contrast"]))
        particles.append(pd.DataFrame({
            "hid": int(hid), "x": focus["x"].to_numpy()[keep], "y": focus["y"].to_numpy()[keep],
            "z": focus["z"].to_numpy()[keep], "d": focus["d"].to_numpy()[keep], "prob": peak[keep]}))
    if not particles:
        return pd.DataFrame({column: pd.Series(dtype=np.int64 if column == "hid" else float)
                             for column in PARTICLE_COLUMNS})
    table = pd.concat(particles, ignore_index=True)[list(PARTICLE_COLUMNS)]
    return table.sort_values(["hid", "z"], kind="stable", ignore_index=True)


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


def particles_file(chunk_csvs: list, out_csv, config: dict) -> Path:
    """Gather a split's chunk CSVs, merge them into particles and write ``out_csv`` atomically."""
    table = merge_detections(read_detections(chunk_csvs), config)
    return write_atomically(out_csv, lambda tmp: table.to_csv(tmp, index=False))
