"""Hand labels on real holograms: the candidates to label, the label files, and the labelling order.

Real holograms have no truth. So, as NCAR did for the talk's head-to-head table, people label every
*candidate*, the union of both methods' particles of a split, as a particle in focus or not. A U-Net
particle and a baseline particle that match within the evaluation tolerances (one-to-one,
:func:`holopipe.evaluation.matching.match`) are one candidate, with the U-Net's coordinates. Each candidate comes
with crops of the reconstructed amplitude and phase around its x, y on its nearest reconstruction plane
and :data:`PLANES_EACH_SIDE` planes either side, so that the labelling page only reads files.

Which method found a candidate is kept in ``candidates.csv`` for the evaluation (``unet``, ``baseline``)
and must never reach the labeller: the page shows candidates blind, in :func:`label_order`.

Label files ``labels/<split>/<labeller>.csv`` hold one row per label given, in the order given; the
latest row of a candidate counts. Every change rewrites the whole file atomically (temporary file in the
same folder, flushed and fsynced, then renamed), so a killed server loses nothing given. A file made for
other candidates (stale after a rerun) or naming an unknown candidate is refused, never skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from holopipe import __version__
from holopipe.core.device import host_array
from holopipe.core.files import write_atomically
from holopipe.core.io import PARTICLE_VARS, hologram_image_yx, read_particle_csv, um_to_pixel
from holopipe.evaluation.matching import match
from holopipe.optics.reconstruction import SampleVolume, hologram_propagator, open_standardized

__all__ = ["CANDIDATE_COLUMNS", "CONFIDENCES", "CROP_PIXELS", "LABELS", "LABEL_COLUMNS", "ORDER_SEED",
           "PLANES_EACH_SIDE", "Candidates", "LabelFile", "check_labeller", "crop_indices", "label_order",
           "open_candidates", "read_label_files", "read_labels", "union_candidates", "write_candidates"]

CROP_PIXELS = 96
"""Side (pixels) of a candidate's square crop: 284 µm at HOLODEC's 2.96 µm, several diameters of a large droplet."""
PLANES_EACH_SIDE = 3
"""Reconstruction planes either side of a candidate's own plane in its crops (the page's z slider)."""
ORDER_SEED = 13
"""Fixed part of the labelling order's seed; the candidates_id is the other part."""
LABELS = ("particle", "not_particle", "unsure")
CONFIDENCES = (1, 2, 3, 4, 5)
CANDIDATE_COLUMNS = ("candidate", *PARTICLE_VARS, "unet", "baseline")
"""Columns of candidates.csv: id, hologram (1-based), x, y, z, d (µm), found by the U-Net, by the baseline (0/1)."""
LABEL_COLUMNS = ("candidates_id", "candidate", "label", "confidence", "labeller", "time")
LABELLER_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def union_candidates(unet: pd.DataFrame, baseline: pd.DataFrame, tolerance_xy_m: float,
                     tolerance_z_m: float) -> pd.DataFrame:
    """The candidates (:data:`CANDIDATE_COLUMNS`) of two particle tables (hid, x, y, z, d in µm).

    A pair matched one-to-one within the tolerances (metres) is one candidate with the U-Net's values and
    both flags; every other particle is a candidate of its own method. Rows are sorted by hid, z, x, y and
    numbered ``c0000``...: the same inputs give the same ids.
    """
    unet = unet.reset_index(drop=True)
    baseline = baseline.reset_index(drop=True)
    pairs = match(unet, baseline, tolerance_xy_m, tolerance_z_m)
    paired_baseline = np.zeros(len(baseline), bool)
    paired_baseline[pairs["pred_index"].to_numpy(np.int64)] = True
    in_pair = np.zeros(len(unet), bool)
    in_pair[pairs["true_index"].to_numpy(np.int64)] = True
    coordinates = list(PARTICLE_VARS)
    table = pd.concat([unet[coordinates].assign(unet=1, baseline=in_pair.astype(np.int64)),
                       baseline.loc[~paired_baseline, coordinates].assign(unet=0, baseline=1)], ignore_index=True)
    table = table.astype({"hid": np.int64, **{c: np.float64 for c in "xyzd"}})
    table = table.sort_values(["hid", "z", "x", "y"], kind="stable", ignore_index=True)
    width = max(4, len(str(max(len(table) - 1, 0))))
    table.insert(0, "candidate", [f"c{i:0{width}d}" for i in range(len(table))])
    return table[list(CANDIDATE_COLUMNS)]


def crop_indices(centre: int, size: int, n: int) -> np.ndarray:
    """Pixel indices (``size`` of them) of a crop centred on pixel ``centre`` along an axis of ``n`` pixels.

    The centre is at index ``size // 2`` of the crop; indices beyond the frame repeat its edge pixel.
    """
    return np.clip(np.arange(size) - size // 2 + int(centre), 0, n - 1)


def _crop_settings() -> dict:
    return {"crop_pixels": CROP_PIXELS, "planes_each_side": PLANES_EACH_SIDE}


def _candidates_id(csv_bytes: bytes) -> str:
    digest = hashlib.sha256(csv_bytes)
    digest.update(json.dumps(_crop_settings(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _plane_indices(z_um: np.ndarray, planes_m: np.ndarray) -> np.ndarray:
    """(candidates, 2k + 1) indices into the plane grid: the plane nearest each z and k either side,
    clipped at the grid's ends (the end plane repeated)."""
    nearest = np.argmin(np.abs(planes_m[None, :] - np.asarray(z_um, np.float64)[:, None] * 1e-6), axis=1)
    offsets = np.arange(-PLANES_EACH_SIDE, PLANES_EACH_SIDE + 1)
    return np.clip(nearest[:, None] + offsets[None, :], 0, planes_m.size - 1)


def _hologram_crops(propagator, planes_m, plane_index, rows, cols):
    """Amplitude and phase crops (candidates, planes, size, size) float16 of one hologram's candidates.

    Only the planes they need are reconstructed,
    :meth:`~holopipe.optics.propagation.Propagator.planes_per_batch` at a time.
    """
    n, n_planes = plane_index.shape
    amplitude = np.zeros((n, n_planes, CROP_PIXELS, CROP_PIXELS), np.float16)
    phase = np.zeros_like(amplitude)
    needed = np.unique(plane_index)
    batch = propagator.planes_per_batch()
    for start in range(0, needed.size, batch):
        planes = needed[start:start + batch]
        field = propagator.reconstruct(planes_m[planes])
        amplitude_b, phase_b = (host_array(part, np.float32) for part in field)  # (planes, ny, nx)
        for slot, plane in enumerate(planes):
            for i, j in zip(*np.nonzero(plane_index == plane)):
                window = np.ix_(rows[i], cols[i])
                amplitude[i, j] = amplitude_b[slot][window]
                phase[i, j] = phase_b[slot][window]
    return amplitude, phase


def write_candidates(config: dict, split: str, store_path, unet_csv, baseline_csv, out_dir, *,
                     to_device=None) -> Path:
    """Write a split's candidates directory (candidates.csv, crops.zarr, manifest.json) atomically.

    ``store_path`` is the split's standardized store (the crops are reconstructed from it as inference
    does: ``reconstruction.z_bins`` planes between zMin and zMax, ``pad``, ``band_limit``); ``unet_csv`` and
    ``baseline_csv`` are the methods' particle CSVs of the split. One propagator per hologram, on numpy
    unless ``to_device`` (e.g. :func:`holopipe.core.device.array_mover`'s) moves the hologram elsewhere.
    """
    import zarr

    tolerance_xy, tolerance_z = float(config["evaluate"]["tolerance_xy"]), float(config["evaluate"]["tolerance_z"])
    table = union_candidates(read_particle_csv(unet_csv), read_particle_csv(baseline_csv), tolerance_xy, tolerance_z)
    csv_bytes = table.to_csv(index=False).encode()
    reconstruction = config["reconstruction"]
    ds = open_standardized(store_path, config)
    try:
        attrs = ds.attrs
        dx, dy = float(attrs["dx"]), float(attrs["dy"])
        nx, ny = int(ds.sizes["xsize"]), int(ds.sizes["ysize"])
        planes_m = SampleVolume.of(attrs).planes(int(reconstruction["z_bins"]))
        n_holograms = int(ds.sizes["hologram_number"])
        outside = table.loc[~table["hid"].between(1, n_holograms), "hid"]
        if len(outside):
            raise ValueError(f"{store_path}: particles name hologram {int(outside.iloc[0])}, "
                             f"the store has {n_holograms}")
        plane_index = _plane_indices(table["z"].to_numpy(), planes_m)
        rows = np.stack([crop_indices(c, CROP_PIXELS, ny) for c in
                         np.round(um_to_pixel(table["y"].to_numpy(), ny, dy)).astype(np.int64)]) \
            if len(table) else np.zeros((0, CROP_PIXELS), np.int64)
        cols = np.stack([crop_indices(c, CROP_PIXELS, nx) for c in
                         np.round(um_to_pixel(table["x"].to_numpy(), nx, dx)).astype(np.int64)]) \
            if len(table) else np.zeros((0, CROP_PIXELS), np.int64)
        manifest = {"candidates_id": _candidates_id(csv_bytes), "split": split, "n_candidates": len(table),
                    "dx_um": dx * 1e6, "dy_um": dy * 1e6, **_crop_settings(), "focus_plane": PLANES_EACH_SIDE,
                    "tolerance_xy_um": tolerance_xy * 1e6, "tolerance_z_um": tolerance_z * 1e6,
                    "holopipe_version": __version__}

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            (tmp / "candidates.csv").write_bytes(csv_bytes)
            group = zarr.open_group(tmp / "crops.zarr", mode="w", zarr_format=3)
            shape = (len(table), 2 * PLANES_EACH_SIDE + 1, CROP_PIXELS, CROP_PIXELS)
            # One chunk per candidate (the page reads one at a time), 64 of them a shard (file): few files.
            shards = (max(1, min(64, len(table))), *shape[1:])
            arrays = {name: group.create_array(name, shape=shape, chunks=(1, *shape[1:]), shards=shards,
                                               dtype="float16", fill_value=0) for name in ("amplitude", "phase")}
            group.create_array("z", data=planes_m[plane_index] * 1e6 if len(table)
                               else np.zeros((0, shape[1])), chunks=(max(1, len(table)), shape[1]))
            # Candidates are sorted by hid: each hologram's rows are one contiguous slice.
            for hid, index in table.groupby("hid", sort=True).indices.items():
                image_yx = hologram_image_yx(ds, int(hid) - 1)
                propagator = hologram_propagator(image_yx, attrs, reconstruction, to_device=to_device)
                crops = _hologram_crops(propagator, planes_m, plane_index[index], rows[index], cols[index])
                for array, values in zip(arrays.values(), crops):
                    array[index[0]:index[-1] + 1] = values
            text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
            (tmp / "manifest.json").write_text(text, encoding="utf-8")

        return write_atomically(Path(out_dir), write)
    finally:
        ds.close()


@dataclasses.dataclass
class Candidates:
    """An opened candidates directory: ``table`` (candidates.csv), ``manifest`` (manifest.json), ``path``."""

    path: Path
    table: pd.DataFrame
    manifest: dict
    _arrays: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def candidates_id(self) -> str:
        return self.manifest["candidates_id"]

    def row(self, candidate: str) -> int:
        """Position of candidate id ``candidate`` in the table; a ValueError naming it if unknown."""
        rows = np.flatnonzero(self.table["candidate"].to_numpy() == candidate)
        if not rows.size:
            raise ValueError(f"{self.path}: unknown candidate {candidate}")
        return int(rows[0])

    def crops(self, index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Amplitude and phase (plane, y, x) float32 and the planes' depths z (µm) of one candidate, by row
        position (int) or candidate id (str). The candidate's own plane is ``manifest["focus_plane"]``."""
        import zarr

        row = self.row(index) if isinstance(index, str) else int(index)
        if not 0 <= row < len(self.table):
            raise IndexError(f"{self.path}: candidate row {row} out of range 0..{len(self.table) - 1}")
        if not self._arrays:  # opened once: each lookup reads and parses the array's metadata
            group = zarr.open_group(self.path / "crops.zarr", mode="r")
            self._arrays.update(amplitude=group["amplitude"], phase=group["phase"],
                                z=np.asarray(group["z"][:], np.float64))
        arrays = self._arrays
        return (np.asarray(arrays["amplitude"][row], np.float32), np.asarray(arrays["phase"][row], np.float32),
                arrays["z"][row].copy())


def open_candidates(path) -> Candidates:
    """Open a candidates directory written by :func:`write_candidates`, checking that its parts agree."""
    path = Path(path)
    try:
        csv_bytes = (path / "candidates.csv").read_bytes()
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: not a candidates directory (no {Path(error.filename).name}); "
                                "run `holopipe label-candidates` (the workflow's label_candidates rule)") from error
    table = pd.read_csv(io.BytesIO(csv_bytes), dtype={"candidate": str})
    missing = [c for c in CANDIDATE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path / 'candidates.csv'}: missing column(s) {missing}")
    if manifest.get("candidates_id") != _candidates_id(csv_bytes) or manifest.get("n_candidates") != len(table):
        raise ValueError(f"{path}: manifest.json does not describe candidates.csv (candidates_id "
                         f"{manifest.get('candidates_id')}, {manifest.get('n_candidates')} candidates, the table "
                         f"has {len(table)}): rewrite the directory with `holopipe label-candidates`")
    return Candidates(path=path, table=table, manifest=manifest)


def check_labeller(name: str, where) -> str:
    """``name`` if it is a labeller name (:data:`LABELLER_NAME`), else a ValueError naming ``where`` (a path)."""
    if not LABELLER_NAME.fullmatch(name or ""):
        raise ValueError(f"{where}: labeller name {name!r}: use letters, digits, '-', '_' and '.' only")
    return name


def _replace_text(path: Path, text: str) -> None:
    """:func:`holopipe.core.files.write_atomically` of ``text``, flushed and fsynced before the rename, and the folder
    fsynced after it: a label given survives a crash of the machine, not only of the server."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    write_atomically(path, write)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


class LabelFile:
    """One labeller's label file of one split's candidates, ``labels/<split>/<labeller>.csv``.

    The labeller is the file's name without ``.csv``. An existing file is read and checked (see
    :func:`read_label_files`); :meth:`add` and :meth:`undo` rewrite it whole, atomically.
    """

    def __init__(self, path, candidates: Candidates):
        self.path = Path(path)
        self.candidates = candidates
        self.labeller = check_labeller(self.path.stem, self.path)
        self._known = set(candidates.table["candidate"])
        self.rows: list[dict] = self._read() if self.path.exists() else []

    def _read(self) -> list[dict]:
        table = pd.read_csv(self.path, dtype=str, keep_default_na=False)
        missing = [c for c in LABEL_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{self.path}: not a label file (missing column(s) {missing})")
        ids = sorted(set(table["candidates_id"]) - {self.candidates.candidates_id})
        if ids:
            raise ValueError(f"{self.path} was given for candidates {ids[0]} but {self.candidates.path} holds "
                             f"{self.candidates.candidates_id}: the candidates changed (rerun?); move the file "
                             "away or relabel")
        rows = []
        for number, row in enumerate(table[list(LABEL_COLUMNS)].to_dict("records"), start=1):
            confidence = int(row["confidence"]) if row["confidence"].strip().isdigit() else row["confidence"]
            self._check(row["candidate"], row["label"], confidence, f" (row {number})")
            rows.append({**row, "confidence": confidence})
        return rows

    def _check(self, candidate: str, label: str, confidence, where: str = "") -> None:
        if candidate not in self._known:
            raise ValueError(f"{self.path}: unknown candidate {candidate}{where}, not in {self.candidates.path}")
        if label not in LABELS:
            raise ValueError(f"{self.path}: label {label!r}{where} is not one of {', '.join(LABELS)}")
        if isinstance(confidence, bool) or confidence not in CONFIDENCES:
            raise ValueError(f"{self.path}: confidence {confidence!r}{where} is not an integer 1..5")

    def labels(self) -> pd.DataFrame:
        """The current labels (:data:`LABEL_COLUMNS`): each candidate's latest row, in the order given."""
        table = pd.DataFrame(self.rows, columns=list(LABEL_COLUMNS)).astype({"confidence": np.int64})
        return table.drop_duplicates("candidate", keep="last").reset_index(drop=True)

    def add(self, candidate: str, label: str, confidence: int) -> None:
        """Append one label (now, UTC) and rewrite the file."""
        self._check(candidate, label, confidence)
        self._write(self.rows + [{"candidates_id": self.candidates.candidates_id, "candidate": candidate,
                                  "label": label, "confidence": int(confidence), "labeller": self.labeller,
                                  "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}])

    def undo(self) -> str | None:
        """Remove the last row given and rewrite the file; its candidate, or None when there was none."""
        if not self.rows:
            return None
        candidate = self.rows[-1]["candidate"]
        self._write(self.rows[:-1])
        return candidate

    def _write(self, rows: list[dict]) -> None:
        """Make ``rows`` the file's content, and only then this object's: a failed write (a full disk) leaves
        both as they were, so the page never counts a label that is not on disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _replace_text(self.path, pd.DataFrame(rows, columns=list(LABEL_COLUMNS)).to_csv(index=False))
        self.rows = rows


def read_label_files(folder, candidates: Candidates) -> pd.DataFrame:
    """Every labeller's current labels of ``candidates`` from the ``*.csv`` files in ``folder`` (none: empty).

    One row per (labeller, candidate) with :data:`LABEL_COLUMNS`; ``labeller`` is the file's name. A stale
    file, an unknown candidate or a bad value is a ValueError naming the file (:class:`LabelFile`).
    """
    paths = sorted(Path(folder).glob("*.csv")) if Path(folder).is_dir() else []
    return read_labels(paths, candidates)


def read_labels(paths, candidates: Candidates) -> pd.DataFrame:
    """:func:`read_label_files` of the label files ``paths``."""
    tables = [LabelFile(path, candidates).labels().assign(labeller=Path(path).stem) for path in paths]
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "confidence" else object) for c in LABEL_COLUMNS})
    return pd.concat(tables, ignore_index=True)


def label_order(candidates: Candidates, seed: int = ORDER_SEED) -> list[str]:
    """Candidate ids in the page's order: a random permutation seeded by ``seed`` and the candidates_id.

    Every labeller of the same candidates sees the same order; it ignores which method found a candidate
    (and the table's hid, z order), so neither method's candidates come in a block.
    """
    rng = np.random.default_rng([int(seed), int(candidates.candidates_id, 16)])
    ids = candidates.table["candidate"].to_numpy()
    return [str(ids[i]) for i in rng.permutation(len(ids))]
