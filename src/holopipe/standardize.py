"""Standardize holograms with statistics fitted on the training split only.

A standardized hologram is ``I / B``: ``B`` is the training set's mean intensity (a scalar) or its
per-pixel median image (which also divides out a fixed beam profile and sensor pattern). Either way
the background sits at ~1, so a standardized hologram is still the in-line field ``I / I0`` and
reconstructs physically (``hologram_field(h, background=1.0)``). With ``log_transform`` the stored
value is ``1 + log(max(I / B, LOG_EPS))``, which is ~``I / B`` near the background and compresses
bright fringes.

Only the training store is ever read to fit; valid and test are transformed with the training ``B``,
so nothing about them leaks into the model's inputs. The contrast mean and std (of the standardized
training holograms) are recorded for the model to scale its inputs.

Memory stays bounded: means and stds stream one hologram at a time; the median reads the training
store in strips of rows across all holograms (``MEDIAN_BLOCK_BYTES`` each), straight from the file.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from holopipe import __version__
from holopipe.io import (IMAGE_DIMS, ignoring_snakemake_marker, open_holodec, write_atomically,
                         write_zarr)

__all__ = ["apply_stats", "fit_stats", "read_stats", "standardize_image", "write_stats"]

log = logging.getLogger("holopipe")

LOG_EPS = 1e-3
"""Floor of I / B before the log: below one gray level in 128 (dead pixels, saturated shadows)."""

MEDIAN_BLOCK_BYTES = 128 * 2**20
"""Largest strip of the training images (all holograms x rows x ysize, stored dtype) held per task."""

DEAD_BACKGROUND_FRACTION = 0.01
"""Median-image pixels darker than this fraction of the mean intensity are dead: B = the mean there."""


def standardize_image(intensity, background, log_transform: bool):
    """Standardized float32 hologram(s): I / B, or 1 + log(max(I / B, LOG_EPS)); B broadcasts."""
    ratio = np.asarray(intensity, np.float32) / np.asarray(background, np.float32)
    if log_transform:
        ratio = 1 + np.log(np.maximum(ratio, np.float32(LOG_EPS)))
    return ratio.astype(np.float32, copy=False)


def _open_strips(path, rows: int) -> xr.DataArray:
    """The image of an already validated file, chunked (all holograms, rows, ysize) at the source.

    Reading each strip from the file keeps memory at one strip per task; rechunking the hologram
    chunks in dask would instead hold every hologram until the first strip is complete.
    """
    name = os.fspath(path)
    chunks = {"hologram_number": -1, "xsize": rows, "ysize": -1}
    with ignoring_snakemake_marker(), warnings.catch_warnings():
        # Strips cut across the stored one-hologram chunks on purpose (see above).
        warnings.filterwarnings("ignore", message=".*separate the stored chunks.*")
        if os.path.isdir(name):
            return xr.open_zarr(name, chunks=chunks, consolidated=False)["image"]
        return xr.open_dataset(name, engine="netcdf4", chunks=chunks)["image"]


def _median_image(path, n_holograms: int, ny: int, itemsize: int) -> np.ndarray:
    rows = max(1, MEDIAN_BLOCK_BYTES // (n_holograms * ny * itemsize))
    image = _open_strips(path, rows)
    try:
        # The median is (Nx, Ny) float64, small next to the data; compute it into memory.
        return da.median(image.data, axis=0).compute()
    finally:
        image.close()


def fit_stats(train_path, config: dict) -> dict:
    """Fit the standardization on the training store only (bounded memory, dask).

    Returns a JSON-serialisable dict (see the module docstring for the keys' meaning), plus, for the
    ``median`` background, ``background_image``: float32 (Nx, Ny), which :func:`write_stats` stores
    beside the JSON.
    """
    settings, optics = config["standardize"], config["optics"]
    ds = open_holodec(train_path, z_limits=(optics["z_min"], optics["z_max"]))
    try:
        image = ds["image"].data
        # Two scalars from one pass over the holograms (dask shares the reads between them).
        mean, std = (float(v) for v in dask.compute(image.mean(dtype=np.float64), image.std(dtype=np.float64)))
        if not mean > 0:
            raise ValueError(f"{train_path}: mean training intensity is {mean:g}; cannot standardize by it")
        stats = {
            "background": settings["background"],
            "log_transform": bool(settings["log_transform"]),
            "intensity_mean": mean,
            "intensity_std": std,
            "n_holograms": int(ds.sizes["hologram_number"]),
            "Nx": int(ds.sizes["xsize"]),
            "Ny": int(ds.sizes["ysize"]),
            "dx": float(ds.attrs["dx"]),
            "dy": float(ds.attrs["dy"]),
            "source": os.fspath(train_path),
            "standardize": dict(settings),
            "holopipe_version": __version__,
        }
        background = mean
        if settings["background"] == "median":
            median = _median_image(train_path, ds.sizes["hologram_number"], ds.sizes["ysize"],
                                   image.dtype.itemsize)
            dead = median < DEAD_BACKGROUND_FRACTION * mean
            if dead.any():
                log.info("%s: %d dead pixel(s) in the median background; using the mean intensity there",
                         train_path, int(dead.sum()))
            background = np.where(dead, mean, median).astype(np.float32)
            stats["dead_background_pixels"] = int(dead.sum())
        contrast = image.map_blocks(standardize_image, background, stats["log_transform"], dtype=np.float32)
        contrast_mean, contrast_std = dask.compute(contrast.mean(dtype=np.float64), contrast.std(dtype=np.float64))
    finally:
        ds.close()
    stats.update(contrast_mean=float(contrast_mean), contrast_std=float(contrast_std))
    if settings["background"] == "median":
        stats["background_image"] = background
    return stats


def _save_npy(path: Path, image: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would append .npy to the temporary name
        np.save(handle, image)


def write_stats(stats: dict, path) -> Path:
    """Write ``stats`` as JSON at ``path`` atomically; a median image goes to ``<stem>_background.npy``
    beside it (written first, so a complete JSON always names a complete image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = dict(stats)
    background = stats.pop("background_image", None)
    if background is not None:
        stats["background_file"] = f"{path.stem}_background.npy"
        image = np.asarray(background, np.float32)
        write_atomically(path.parent / stats["background_file"], lambda tmp: _save_npy(tmp, image))
    text = json.dumps(stats, indent=2, sort_keys=True) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_stats(path) -> tuple[dict, np.ndarray | None]:
    """(stats dict, float32 median background (Nx, Ny) or None for the mean background)."""
    path = Path(path)
    stats = json.loads(path.read_text(encoding="utf-8"))
    if "background_file" not in stats:
        return stats, None
    background = np.load(path.parent / stats["background_file"])
    expected = (stats["Nx"], stats["Ny"])
    if background.shape != expected:
        raise ValueError(f"{path}: background image {stats['background_file']} has shape {background.shape}, "
                         f"expected (Nx, Ny) = {expected}")
    return stats, background


def apply_stats(in_path, out_path, stats_path) -> Path:
    """Standardize every hologram of ``in_path`` with the fitted stats and write a float32 zarr store.

    Particles and attrs are kept; attrs gain ``standardize_stats``, ``standardize_background``,
    ``standardize_log_transform`` (0/1), ``standardize_source`` and the fitted ``standardize_*`` scalars.
    """
    stats, median = read_stats(stats_path)
    ds = open_holodec(in_path)
    try:
        if median is None:
            background = stats["intensity_mean"]
        else:
            frame = (ds.sizes["xsize"], ds.sizes["ysize"])
            if median.shape != frame:
                raise ValueError(
                    f"{in_path}: frame (Nx, Ny) = {frame} does not match the median background "
                    f"{median.shape} of {stats_path} (fitted on {stats['source']}); regrid both alike"
                )
            background = median
        image = ds["image"].data.rechunk({0: 1, 1: -1, 2: -1})
        standardized = image.map_blocks(standardize_image, background, stats["log_transform"], dtype=np.float32)
        out = ds.assign(image=xr.DataArray(standardized, dims=IMAGE_DIMS, attrs=ds["image"].attrs))
        out = out.assign_attrs(
            standardize_stats=os.fspath(stats_path),
            standardize_background=stats["background"],
            standardize_log_transform=int(stats["log_transform"]),
            standardize_source=os.path.basename(os.fspath(in_path).rstrip("/")),
            standardize_intensity_mean=stats["intensity_mean"],
            standardize_contrast_mean=stats["contrast_mean"],
            standardize_contrast_std=stats["contrast_std"],
            holopipe_version=__version__,
        )
        return write_zarr(out, out_path)
    finally:
        ds.close()
