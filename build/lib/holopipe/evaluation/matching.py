"""Matching predicted particles to true ones (one home: evaluation, labels, post-processing and the
benchmarks all match with :func:`match`).

Matching is one-to-one per hologram (Hungarian algorithm): the cost of a pair is the normalised
distance ``sqrt((dx/tol_xy)² + (dy/tol_xy)² + (dz/tol_z)²)``; a pair farther than the tolerance in
any of x, y or z is forbidden. Forbidden pairs get a cost larger than any full set of allowed pairs
and are dropped after the assignment, so the assignment first maximises the number of matches and
then minimises their total cost (unlike greedy nearest-first matching, which can block a match).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from holopipe.core.io import PARTICLE_VARS, open_holodec, particle_table, skipped_holograms, window_dust_table

__all__ = ["COORDINATES", "MATCH_COLUMNS", "SplitTruth", "check_holograms", "match", "on_window_dust", "read_truth"]

COORDINATES = PARTICLE_VARS[1:]
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


def on_window_dust(predicted: pd.DataFrame, dust: pd.DataFrame, tolerance_xy_m: float) -> int:
    """How many ``predicted`` particles (µm) sit on the window dust (µm): within a speck's radius plus the
    matching's lateral tolerance of its x, y, at any depth (the dust shadows every plane's same pixels)."""
    if not len(dust) or not len(predicted):
        return 0
    distance = np.hypot(predicted["x"].to_numpy()[:, None] - dust["x"].to_numpy()[None],
                        predicted["y"].to_numpy()[:, None] - dust["y"].to_numpy()[None])
    return int((distance <= dust["d"].to_numpy()[None] / 2 + tolerance_xy_m * 1e6).any(axis=1).sum())


class SplitTruth(NamedTuple):
    """A split's truth as every evaluation reads it (:func:`read_truth`)."""

    particles: pd.DataFrame
    """The true particles (µm) of the holograms evaluated."""
    holograms: np.ndarray
    """The holograms evaluated (1-based hids): all but those standardization skipped (no data)."""
    n_holograms: int
    skipped: dict[int, str]
    """The skipped holograms' hids and why each was skipped."""
    n_skipped_particles: int
    """True particles left out with the skipped holograms."""
    dust: pd.DataFrame
    """The window dust the file records (µm; empty for none): not particles of the volume."""


def check_holograms(table: pd.DataFrame, n_holograms: int, source) -> None:
    """Particles only of holograms 1..n_holograms: any other would be silently left out of every count."""
    outside = np.unique(table["hid"][(table["hid"] < 1) | (table["hid"] > n_holograms)])
    if outside.size:
        raise ValueError(f"{source}: particles of hologram(s) {outside[:10].tolist()}, but the split has "
                         f"{n_holograms} holograms (hid 1..{n_holograms})")


def read_truth(store) -> SplitTruth:
    """The truth of a split's store (a HOLODEC file or standardized store); the one reader of the evaluation,
    the post-processing search and the accuracy benchmark, so they all leave out the same holograms."""
    ds = open_holodec(store)
    try:
        particles, n_holograms = particle_table(ds), int(ds.sizes["hologram_number"])
        skipped, dust = skipped_holograms(ds), window_dust_table(ds)
    finally:
        ds.close()
    check_holograms(particles, n_holograms, store)
    left_out = particles["hid"].isin(list(skipped)).to_numpy()
    holograms = np.setdiff1d(np.arange(1, n_holograms + 1), list(skipped))
    return SplitTruth(particles[~left_out].reset_index(drop=True), holograms, n_holograms, skipped,
                      int(left_out.sum()), dust)
