"""Training examples: tiles of reconstructed planes (amplitude and phase, or real and imaginary parts of the
field: ``examples.channels``) with in-focus particle masks.

Each hologram of a standardized split is reconstructed once per chosen plane (one FFT per hologram,
planes batched) and cut into square tiles:

- positives: at the centre of the z bin of a particle, placed so that the particle lies in the tile
  at a random offset (the whole disk where the frame allows);
- near negatives (a fraction of the negatives): at a particle's own (x, y), on a plane out of its focus by
  one to two *effective* depths of focus (the hard case: a particle just out of focus, which the label calls
  empty exactly where the physics does; nearer planes, where the particle still looks in focus but is not
  in its bin, are never cut);
- the other negatives: at random planes whose z bin holds no particle, at random positions.

The mask of a tile has two channels: ``in_focus`` marks the disks of *all* the hologram's particles whose z falls in the
tile's bin; ``band`` marks the disks of particles in another bin whose plane lies within their effective depth of focus
(:func:`effective_depth_of_focus`), where a particle looks in focus although its bin is elsewhere. Training leaves the
band out of the loss (:data:`holopipe.ml.dataset.IGNORE`): the label neither asks for the particle there nor forbids it,
as the optics cannot tell. The planes are the centres of ``reconstruction.z_bins`` equal bins between the store's
``zMin`` and ``zMax``; inference reconstructs the same planes (:func:`~holopipe.optics.reconstruction.z_bin_centres`,
:func:`z_bin_of`), so a model sees at inference exactly the defocus it was trained on.

Everything random is drawn from ``numpy.random.default_rng([examples.seed, split_stream(split), h])`` for
hologram index ``h``, before any reconstruction: a store is reproducible, whatever the order in which
holograms finish, and splits of different names draw different tiles. The stream derives from what a split
is (its name), not where it stands in the config, so adding a split never re-cuts the examples of another.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from tqdm.auto import tqdm

from holopipe import __version__
from holopipe.core.config import ConfigError
from holopipe.core.device import cpu_threads
from holopipe.core.files import write_atomically
from holopipe.core.io import hologram_image_yx, particle_table, skipped_holograms, um_to_pixel
from holopipe.optics.propagation import effective_depth_of_focus, frame_edges
from holopipe.optics.reconstruction import (
    SampleVolume,
    field_channels,
    hologram_propagator,
    open_standardized,
    z_bin_of,
)

__all__ = [
    "build_examples",
    "in_band",
    "particles_in_pixels",
    "plan_hologram",
    "rasterize_disks",
    "split_stream",
]

MASK_CHANNELS = ("in_focus", "band")
PLAN_COLUMNS = ("z_bin", "row0", "col0", "positive", "near")

_PLACEMENT_TRIES = 100
"""Redraws of a tile position before accepting a duplicate (same plane and origin) tile."""


def split_stream(split: str) -> int:
    """The random stream of a split's examples: the first 8 bytes of the SHA-256 of its name, as an integer.
    A digest of the name, not the split's position in the config (which a user's added split shifts) nor
    Python's ``hash`` (salted per process), so the examples training reads are cut the same in every run."""
    return int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:8], "big")


def rasterize_disks(rows, cols, radius_rows, radius_cols, frame_shape, window=None) -> np.ndarray:
    """Boolean mask of disks in a frame, cut to ``window = (row0, col0, height, width)``.

    Positions are continuous pixel indices of the frame (pixel ``i`` has its centre at ``i``), radii in
    pixels along each axis (an ellipse in pixels where dx != dy). A pixel is inside when its centre is;
    every disk also marks the frame pixel nearest its centre, so a particle smaller than a pixel is
    never lost.
    """
    window = (0, 0, *frame_shape) if window is None else window
    row0, col0, height, width = window
    mask = np.zeros((height, width), dtype=bool)
    disks = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=np.float64))
                                  for v in (rows, cols, radius_rows, radius_cols)))
    for row, col, r_row, r_col in zip(*disks):
        top, bottom = max(int(np.ceil(row - r_row)), row0), min(int(np.floor(row + r_row)), row0 + height - 1)
        left, right = max(int(np.ceil(col - r_col)), col0), min(int(np.floor(col + r_col)), col0 + width - 1)
        if top <= bottom and left <= right:
            rr = np.arange(top, bottom + 1)[:, None]
            cc = np.arange(left, right + 1)[None, :]
            inside = ((rr - row) / r_row) ** 2 + ((cc - col) / r_col) ** 2 <= 1.0
            mask[top - row0:bottom - row0 + 1, left - col0:right - col0 + 1] |= inside
        near_row = min(max(int(np.floor(row + 0.5)), 0), frame_shape[0] - 1) - row0
        near_col = min(max(int(np.floor(col + 0.5)), 0), frame_shape[1] - 1) - col0
        if 0 <= near_row < height and 0 <= near_col < width:
            mask[near_row, near_col] = True
    return mask


def particles_in_pixels(table: pd.DataFrame, attrs, n_bins: int) -> pd.DataFrame:
    """The particle table (µm) with frame pixel positions, radii in pixels, z bins and each particle's
    effective depth of focus (``depth_of_focus``, m) added."""
    nx, ny, dx, dy = int(attrs["Nx"]), int(attrs["Ny"]), float(attrs["dx"]), float(attrs["dy"])
    row, col = um_to_pixel(table["y"], ny, dy), um_to_pixel(table["x"], nx, dx)
    edges_x, edges_y = frame_edges(np.asarray(table["x"], float) * 1e-6, np.asarray(table["y"], float) * 1e-6,
                                   nx=nx, ny=ny, dx=dx, dy=dy)
    depth = effective_depth_of_focus(np.asarray(table["z"], float) * 1e-6, np.asarray(table["d"], float) * 1e-6,
                                     edges_x, edges_y, wavelength=float(attrs["lambda"]))
    return table.assign(
        row=row,
        col=col,
        radius_row=table["d"] * 1e-6 / 2 / dy,
        radius_col=table["d"] * 1e-6 / 2 / dx,
        z_bin=z_bin_of(table["z"] * 1e-6, float(attrs["zMin"]), float(attrs["zMax"]), n_bins),
        depth_of_focus=depth,
    )


def _draw_cycling(rng: np.random.Generator, items, count: int) -> list:
    """``count`` items drawn without replacement, then again from a fresh permutation when they run out."""
    items = list(items)
    if not items:
        return []
    drawn = []
    while len(drawn) < count:
        drawn.extend(items[i] for i in rng.permutation(len(items)))
    return drawn[:count]


def _origin_range(position: float, radius: float, n: int, tile: int) -> tuple[int, int]:
    """Tile origins (inclusive range) along one axis that hold the disk, or at least its nearest pixel."""
    low, high = max(int(np.ceil(position + radius)) - tile + 1, 0), min(int(np.floor(position - radius)), n - tile)
    if low > high:
        nearest = min(max(int(np.floor(position + 0.5)), 0), n - 1)
        low, high = max(nearest - tile + 1, 0), min(nearest, n - tile)
    return low, high


NEAR_NEGATIVE_FOCUS_DEPTHS = (1.0, 2.0)
"""A near negative's plane lies this many effective depths of focus from its particle's z: just out of
focus. Planes within the first are the particle's band (left out of the loss)."""


def near_negative_bins(particle_z_m: float, depth_of_focus_m: float, planes_m: np.ndarray) -> np.ndarray:
    """Bins whose plane is out of the particle's focus by one to two (effective) depths of focus; where the
    depth range holds none (a large droplet near the ends of a short slice), every bin farther than one."""
    offset = np.abs(planes_m - particle_z_m)
    low, high = (factor * depth_of_focus_m for factor in NEAR_NEGATIVE_FOCUS_DEPTHS)
    chosen = np.flatnonzero((offset > low) & (offset <= high))
    return chosen if chosen.size else np.flatnonzero(offset > low)


def in_band(particles: pd.DataFrame, plane_m: float, z_bin: int) -> np.ndarray:
    """Which particles look in focus at ``plane_m`` (within their effective depth of focus) while their
    bin is another than ``z_bin``: the band a label can neither ask for nor forbid."""
    offset = np.abs(particles["z"].to_numpy(float) * 1e-6 - plane_m)
    return (offset <= NEAR_NEGATIVE_FOCUS_DEPTHS[0] * particles["depth_of_focus"].to_numpy(float)) & (
        particles["z_bin"].to_numpy() != z_bin)


def plan_hologram(rng: np.random.Generator, particles: pd.DataFrame, frame_shape: tuple[int, int],
                  planes_m: np.ndarray, examples: dict) -> pd.DataFrame:
    """The tiles of one hologram: a table with columns z_bin, row0, col0, positive, near.

    ``particles`` are one hologram's particles with pixel positions (columns row, col, radius_row,
    radius_col, z_bin, depth_of_focus in m, and z and d in µm); ``planes_m`` the bin centres. Positives go
    to randomly chosen particles; with ``every_particle`` each particle has one first (in random order),
    then ``positives_per_hologram`` is topped up; particles are reused at new tile positions when there are
    fewer than the count, and a hologram without particles has no positives. Near negatives go to randomly chosen
    particles too, at their (x, y), on a plane of :func:`near_negative_bins`; a particle with no such
    plane, or a hologram without particles, gives its slots to random empty bins. A hologram whose every
    bin holds a particle has no other negatives. Tiles of one hologram do not repeat (plane, origin)
    unless the frame leaves no choice.
    """
    ny, nx = frame_shape
    tile = int(examples["tile_size"])
    occupied = set(particles["z_bin"].tolist())
    empty = [b for b in range(len(planes_m)) if b not in occupied]
    n_negatives = int(examples["negatives_per_hologram"])
    n_near = int(round(examples["near_negative_fraction"] * n_negatives))

    rows, seen = [], set()

    def place(z_bin, row_range, col_range, positive, is_near):
        for _ in range(_PLACEMENT_TRIES):
            key = (z_bin, int(rng.integers(row_range[0], row_range[1] + 1)),
                   int(rng.integers(col_range[0], col_range[1] + 1)))
            if key not in seen:
                break
        seen.add(key)
        rows.append((*key, positive, is_near))

    def around(p):
        return (_origin_range(p["row"], p["radius_row"], ny, tile),
                _origin_range(p["col"], p["radius_col"], nx, tile))

    n_positives = int(examples["positives_per_hologram"])
    if examples.get("every_particle", False):
        n_positives = max(n_positives, len(particles))
    for index in _draw_cycling(rng, range(len(particles)), n_positives):
        p = particles.iloc[index]
        place(int(p["z_bin"]), *around(p), True, False)
    placed_near = 0
    for index in _draw_cycling(rng, range(len(particles)), n_near):
        p = particles.iloc[index]
        bins = near_negative_bins(p["z"] * 1e-6, p["depth_of_focus"], planes_m)
        if bins.size:
            place(int(rng.choice(bins)), *around(p), False, True)
            placed_near += 1
    frame_range = ((0, ny - tile), (0, nx - tile))
    for z_bin in rng.choice(empty, n_negatives - placed_near) if empty else []:
        place(int(z_bin), *frame_range, False, False)
    plan = pd.DataFrame(rows, columns=list(PLAN_COLUMNS))
    return plan.astype({"z_bin": np.int64, "row0": np.int64, "col0": np.int64, "positive": bool,
                        "near": bool})


def _cut_tiles(image_yx: np.ndarray, particles: pd.DataFrame, plan: pd.DataFrame, planes: np.ndarray,
               attrs, channels, tile: int, reconstruction: dict, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (n, channel, tile, tile) and masks (n, 1, tile, tile) of one hologram's planned tiles.

    ``image_yx`` is the row-major (ny, nx) contrast hologram; the hologram's FFT is computed once and its
    planes are reconstructed in batches that bound memory.
    """
    propagator = hologram_propagator(image_yx, attrs, reconstruction)
    ny, nx = propagator.shape
    batch = propagator.planes_per_batch()
    inputs = np.empty((len(plan), len(channels), tile, tile), dtype=dtype)
    masks = np.empty((len(plan), len(MASK_CHANNELS), tile, tile), dtype=np.uint8)
    bins = np.unique(plan["z_bin"].to_numpy())
    for start in range(0, bins.size, batch):
        chunk = bins[start:start + batch]
        planes_here = propagator.reconstruct(planes[chunk])
        for slot, z_bin in enumerate(chunk):
            in_bin = particles[particles["z_bin"] == z_bin]
            band = particles[in_band(particles, planes[z_bin], z_bin)]
            values = field_channels(planes_here.amplitude[slot], planes_here.phase[slot], channels)
            for i in np.flatnonzero(plan["z_bin"].to_numpy() == z_bin):
                row0, col0 = int(plan["row0"].iloc[i]), int(plan["col0"].iloc[i])
                window = (slice(row0, row0 + tile), slice(col0, col0 + tile))
                for c, value in enumerate(values):
                    inputs[i, c] = value[window]
                masks[i, 0] = rasterize_disks(in_bin["row"], in_bin["col"], in_bin["radius_row"],
                                              in_bin["radius_col"], (ny, nx), (row0, col0, tile, tile))
                masks[i, 1] = rasterize_disks(band["row"], band["col"], band["radius_row"],
                                              band["radius_col"], (ny, nx), (row0, col0, tile, tile))
    return inputs, masks


def _check_input(ds: xr.Dataset, name: str, tile: int) -> None:
    if ds.sizes["hologram_number"] == 0:
        raise ValueError(f"{name}: no holograms (empty split); nothing to cut examples from")
    ny, nx = ds.sizes["ysize"], ds.sizes["xsize"]
    if tile > min(ny, nx):
        raise ConfigError(f"examples.tile_size ({tile}) is larger than the frame of {name} "
                          f"(ny={ny}, nx={nx} pixels)")


def _skeleton(plan: pd.DataFrame, planes: np.ndarray, channels, tile: int, dtype, attrs: dict) -> xr.Dataset:
    """The output dataset with its metadata filled in and lazy (never computed) tile arrays."""
    n = len(plan)
    return xr.Dataset(
        {
            "inputs": (("example", "channel", "row", "col"),
                       da.zeros((n, len(channels), tile, tile), dtype=dtype, chunks=(1, len(channels), tile, tile))),
            "masks": (("example", "mask_channel", "row", "col"),
                      da.zeros((n, len(MASK_CHANNELS), tile, tile), dtype=np.uint8,
                               chunks=(1, len(MASK_CHANNELS), tile, tile))),
            "hid": ("example", plan["hid"].to_numpy(np.int32), {"long_name": "hologram number (1-based)"}),
            "z": ("example", planes[plan["z_bin"].to_numpy()], {"units": "m", "long_name": "plane (bin centre)"}),
            "z_bin": ("example", plan["z_bin"].to_numpy(np.int32), {"long_name": "z bin (0-based)"}),
            "row0": ("example", plan["row0"].to_numpy(np.int32), {"long_name": "tile origin row in (ny, nx)"}),
            "col0": ("example", plan["col0"].to_numpy(np.int32), {"long_name": "tile origin column in (ny, nx)"}),
            "positive": ("example", plan["positive"].to_numpy(bool), {"long_name": "tile at a particle's plane"}),
            "near": ("example", plan["near"].to_numpy(bool),
                     {"long_name": "negative at a particle's (x, y), 1-2 effective depths of focus from it"}),
        },
        coords={"channel": np.array(channels, dtype=object),
                "mask_channel": np.array(MASK_CHANNELS, dtype=object)},
        attrs=attrs,
    )


def build_examples(in_path, out_path, config: dict, *, split: str, progress=True) -> Path:
    """Cut the examples of a standardized split store into a zarr store at ``out_path``; returns its path.

    ``config`` is a validated config (:func:`holopipe.core.config.load_config`); its ``examples`` and
    ``reconstruction`` sections apply, the optics come from the store. ``split``, the split's name, picks
    its random stream (:func:`split_stream`). Holograms run in a small thread pool (the FFTs release the
    GIL), a few at a time, and their tiles are written as they finish, so memory stays at a few holograms.
    The store is written under a temporary name and renamed when complete.
    """
    examples, reconstruction = config["examples"], config["reconstruction"]
    in_name, out_path = os.fspath(in_path), Path(out_path)
    tile, n_bins, channels = int(examples["tile_size"]), int(reconstruction["z_bins"]), list(examples["channels"])
    dtype = np.dtype(examples["dtype"])
    ds = open_standardized(in_name, config)
    try:
        _check_input(ds, in_name, tile)
        attrs = ds.attrs
        frame = (ds.sizes["ysize"], ds.sizes["xsize"])
        planes = SampleVolume.of(attrs).planes(n_bins)
        particles = particles_in_pixels(particle_table(ds), attrs, n_bins)
        by_hologram = {hid: group for hid, group in particles.groupby("hid")}
        n_holograms = ds.sizes["hologram_number"]
        plans, skipped = [], skipped_holograms(ds)
        for h in range(n_holograms):
            rng = np.random.default_rng([int(examples["seed"]), split_stream(split), h])
            hologram_particles = by_hologram.get(h + 1, particles.iloc[:0])
            plan = plan_hologram(rng, hologram_particles, frame, planes, examples)
            # A skipped hologram (no data) has no tiles: its particles' masks would mark an empty image.
            plans.append((plan.iloc[:0] if h + 1 in skipped else plan).assign(hid=h + 1))
        plan = pd.concat(plans, ignore_index=True)
        if plan.empty:
            raise ValueError(f"{in_name}: no examples to cut (no particles for positives and "
                             "examples.negatives_per_hologram is 0, or every z bin is occupied)")
        store_attrs = {
            "source": in_name, "channel_names": channels, "tile_size": tile, "z_bins": n_bins,
            "Nx": int(attrs["Nx"]), "Ny": int(attrs["Ny"]),
            **{key: float(attrs[key]) for key in ("dx", "dy", "lambda", "zMin", "zMax")},
            "split": split, "examples_config": json.dumps(examples, sort_keys=True),
            "reconstruction_config": json.dumps(reconstruction, sort_keys=True),
            "holopipe_version": __version__,
        }
        skeleton = _skeleton(plan, planes, channels, tile, dtype, store_attrs)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in plans])])

        def work(h):
            # Synchronous: the pool already runs holograms in parallel; one image read per task.
            return h, _cut_tiles(hologram_image_yx(ds, h), by_hologram.get(h + 1, particles.iloc[:0]), plans[h], planes,
                                 attrs, channels, tile, reconstruction, dtype)

        def write(tmp: Path) -> None:
            skeleton.to_zarr(tmp, mode="w", compute=False, zarr_format=3, consolidated=False)
            _run_holograms(work, [h for h in range(n_holograms) if len(plans[h])], tmp, offsets,
                           progress=progress, desc=f"examples {out_path.name}")

        write_atomically(out_path, write)
    finally:
        ds.close()
    return out_path


def _run_holograms(work, holograms, store: Path, offsets, *, progress: bool, desc: str) -> None:
    """Run ``work(h)`` in a thread pool, at most a few holograms in flight, writing each result's region."""
    workers = min(4, cpu_threads())
    pending, queue = set(), iter(holograms)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(holograms), desc=desc, unit="hologram",
                                                   disable=not progress) as bar:
        while True:
            while len(pending) < workers + 1:
                h = next(queue, None)
                if h is None:
                    break
                pending.add(pool.submit(work, h))
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                h, (inputs, masks) = future.result()
                region = xr.Dataset({"inputs": (("example", "channel", "row", "col"), inputs),
                                     "masks": (("example", "mask_channel", "row", "col"), masks)})
                region.to_zarr(store, region={"example": slice(int(offsets[h]), int(offsets[h + 1]))},
                               zarr_format=3, consolidated=False)
                bar.update()
