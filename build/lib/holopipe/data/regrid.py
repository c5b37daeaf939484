"""Bring a split to the model's grid: a common pixel pitch, then a frame of whole tiles.

Two steps per image axis, applied to each hologram lazily (one dask chunk per hologram):

1. Resample to the target pitch ``p``. The new frame keeps ``floor(N * d / p)`` pixels.

   ``antialias`` is an ideal low-pass followed by exact sampling: the hologram's band-limited
   interpolant, with every frequency at or above the new Nyquist ``1 / (2 p)`` removed, evaluated at
   the new pixel centres. Fourier resampling rather than a Gaussian pre-filter and spline zoom,
   because a hologram's information is in its fringes: a Gaussian both attenuates fringes the new
   grid can hold and lets through some it cannot (aliasing), whereas the ideal low-pass keeps the
   first untouched and removes the second. The image is first mirrored (half-sample symmetric, as
   in the DCT-II), so its periodic extension has no jump at the frame edges: the low-pass does not
   ring from a wrap-around (fringes cut off by the edge still leak a little within a few pixels).
   The operator is a dense matrix per axis (rows sum to 1: a constant image, hence the mean level,
   is kept exactly); any pitch ratio works, up or down. The new pixel centres sit symmetrically
   about the old frame centre, so the frame centre does not move.

   ``bin`` averages ``r x r`` blocks (``r = p / d`` an integer), what a camera with larger pixels
   records. ``N - r * floor(N / r)`` leftover pixels are split between the two edges; when they are
   odd the new frame centre moves by half an old pixel.

2. Crop (largest multiple of ``examples.tile_size``) or pad (next multiple) each axis, centred. Padding
   uses the hologram's median intensity: the background level that particle shadows, bright fringes
   and hot pixels do not bias (the mean is pulled down by shadows), so the pad looks like empty
   sky to the propagation and the model. When the size difference is odd, the frame centre moves by
   half a pixel.

The pixels that hold the hologram, the frame less its pad, are recorded as ``regrid_data_x`` and
``regrid_data_y`` (``[start, stop)`` along each axis; :func:`data_area` reads them): later stages know
the pad from this record instead of guessing it from the image, where a saturated or dead edge band of
the sensor looks just as constant as the pad.

Particle coordinates (µm from the frame centre) follow the frame centre, so ``um_to_pixel`` in the new
file points to the same physical spot; particles whose centre falls outside the new frame are dropped.

The images' array work (resampling products, crop, median and pad) runs in one array namespace: numpy on the
CPU, CuPy on a GPU (``regrid.device``, :func:`holopipe.core.device.array_namespace_for`), each hologram uploaded
with its axes' operators and its result brought back to be written; results equal the CPU's within float
tolerance.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import array_api_compat
import array_api_compat.numpy as numpy_xp
import numpy as np
import xarray as xr

from holopipe import __version__
from holopipe.core.device import array_namespace_for, host_array
from holopipe.core.grid import PITCH_TOLERANCE, bin_ratio, framed_pixels, resampled_pixels, resamples
from holopipe.core.io import DUST_ATTRS, IMAGE_DIMS, IN_MEMORY, open_holodec, pixel_centres, write_zarr

__all__ = ["AxisPlan", "antialias_matrix", "bin_matrix", "data_area", "plan_axis", "regrid_dataset", "regrid_file"]

log = logging.getLogger("holopipe")

STALE_PARTICLE_VARS = ("x_pixels", "y_pixels")
"""Real-data columns in the old pixel grid: dropped when the grid changes, rather than left wrong."""

DATA_AREA_ATTRS = {"x": "regrid_data_x", "y": "regrid_data_y"}
"""Attributes holding ``[start, stop)``, the pixels along x and y that hold the hologram (not regrid's pad)."""


def data_area(attrs, nx: int, ny: int, where: str = IN_MEMORY) -> tuple[slice, slice]:
    """The (x, y) slices of an (nx, ny) frame that hold the hologram: regrid's record, else the whole frame
    (a store that regrid did not write has no pad). A record that does not fit the frame fails, naming
    ``where``."""
    area = []
    for axis, n in (("x", nx), ("y", ny)):
        start, stop = (int(v) for v in attrs.get(DATA_AREA_ATTRS[axis], (0, n)))
        if not 0 <= start < stop <= n:
            raise ValueError(f"{where}: attribute {DATA_AREA_ATTRS[axis]!r} = [{start}, {stop}] is not a part of "
                             f"the frame's {n} pixels along {axis}")
        area.append(slice(start, stop))
    return area[0], area[1]


def antialias_matrix(n_in: int, pitch_in: float, n_out: int, pitch_out: float) -> np.ndarray:
    """(n_out, n_in) float32 operator: ideal low-pass at 1/(2 pitch_out), sampled at the new centres.

    Both grids are centred on the same frame centre. The input is mirrored to 2 n_in samples (period
    L = 2 n_in pitch_in), whose band-limited interpolant with frequencies k / L kept for
    |k / L| < 1/(2 pitch_out) is the Dirichlet kernel; a frequency exactly at the new Nyquist gets
    half weight (its sine part cannot be sampled). The mirrored sequence has no energy at the old
    Nyquist, so upsampling needs no special case.
    """
    period = 2 * n_in * pitch_in
    cutoff = period / (2 * pitch_out)  # new Nyquist in units of 1/L
    k_nyquist = round(cutoff)
    at_nyquist = abs(cutoff - k_nyquist) < PITCH_TOLERANCE * cutoff and k_nyquist < n_in
    k_max = min(math.ceil(cutoff) - 1, n_in - 1)
    x_out = pixel_centres(n_out, pitch_out)
    x_in = pixel_centres(n_in, pitch_in)
    mirrored = n_in * pitch_in - x_in  # sample 2 n_in - 1 - n of the mirrored sequence

    def kernel(t):
        phase = np.pi * t / period
        sin_phase = np.sin(phase)
        small = np.abs(sin_phase) < 1e-12
        dirichlet = np.where(small, 2 * k_max + 1,
                             np.sin((2 * k_max + 1) * phase) / np.where(small, 1.0, sin_phase))
        if at_nyquist:
            dirichlet = dirichlet + np.cos(2 * k_nyquist * phase)
        return dirichlet / (2 * n_in)

    matrix = kernel(x_out[:, None] - x_in[None, :]) + kernel(x_out[:, None] - mirrored[None, :])
    return matrix.astype(np.float32)


def bin_matrix(n_in: int, ratio: int, start: int) -> np.ndarray:
    """(n_in // ratio, n_in) float32 operator averaging blocks of ``ratio`` pixels from ``start``."""
    n_out = n_in // ratio
    matrix = np.zeros((n_out, n_in), np.float32)
    for j in range(n_out):
        matrix[j, start + j * ratio:start + (j + 1) * ratio] = 1.0 / ratio
    return matrix


@dataclass(frozen=True)
class AxisPlan:
    """How one image axis changes: optional resampling matrix, then crop or pad, and the centre shift.

    ``offset_m`` is the new frame centre in the old frame's coordinates (metres): new = old - offset.
    """

    n_in: int
    pitch_in: float
    pitch_out: float
    matrix: np.ndarray | None
    n_resampled: int
    crop_start: int
    pad_before: int
    n_out: int
    offset_m: float

    @property
    def changes(self) -> bool:
        return self.matrix is not None or self.n_out != self.n_in

    @property
    def scale(self) -> float:
        return self.pitch_out / self.pitch_in

    @property
    def data(self) -> list[int]:
        """``[start, stop)`` of the new axis's pixels that hold the hologram: all but the pad."""
        return [self.pad_before, self.pad_before + min(self.n_out, self.n_resampled)]


def plan_axis(n_in: int, pitch_in: float, pitch_out: float | None, *, method: str, frame: str,
              tile: int, where: str) -> AxisPlan:
    """Plan one axis (``where`` names the file and axis in errors); its sizes are holopipe.core.grid's."""
    pitch_out = pitch_in if pitch_out is None else float(pitch_out)
    offset = 0.0
    try:
        n_resampled = resampled_pixels(n_in, pitch_in, pitch_out, method)
        n_out = framed_pixels(n_resampled, frame, tile)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if not resamples(pitch_in, pitch_out):
        pitch_out, matrix = pitch_in, None
    elif method == "antialias":
        matrix = antialias_matrix(n_in, pitch_in, n_resampled, pitch_out)
    else:
        ratio = bin_ratio(pitch_in, pitch_out)
        start = (n_in - n_resampled * ratio) // 2
        matrix = bin_matrix(n_in, ratio, start)
        offset = (start + n_resampled * ratio / 2 - n_in / 2) * pitch_in
    if n_resampled < 1:
        raise ValueError(f"{where}: pitch {pitch_out:g} m leaves no pixel of {n_in} at {pitch_in:g} m")
    if frame == "crop":
        if n_out == 0:
            raise ValueError(f"{where}: {n_resampled} pixels after resampling hold no tile of {tile}; "
                             "use regrid.frame pad or a smaller examples.tile_size")
        crop_start, pad_before = (n_resampled - n_out) // 2, 0
        offset += (crop_start + n_out / 2 - n_resampled / 2) * pitch_out
    else:
        crop_start, pad_before = 0, (n_out - n_resampled) // 2
        offset += (n_out / 2 - pad_before - n_resampled / 2) * pitch_out
    return AxisPlan(n_in, pitch_in, pitch_out, matrix, n_resampled, crop_start, pad_before, n_out,
                    offset)


def _regrid_image(image, plan_x: AxisPlan, plan_y: AxisPlan):
    """One contract image (xsize, ysize), numpy or CuPy: resample (float32), crop, pad with its median; the
    result in the image's namespace."""
    xp = array_api_compat.array_namespace(image)
    if plan_x.matrix is not None or plan_y.matrix is not None:
        image = xp.astype(image, xp.float32)
    if plan_x.matrix is not None:
        image = xp.asarray(plan_x.matrix) @ image
    if plan_y.matrix is not None:
        image = image @ xp.asarray(plan_y.matrix).T
    image = image[plan_x.crop_start:plan_x.crop_start + min(plan_x.n_out, plan_x.n_resampled),
                  plan_y.crop_start:plan_y.crop_start + min(plan_y.n_out, plan_y.n_resampled)]
    if image.shape == (plan_x.n_out, plan_y.n_out):
        return image
    background = float(xp.median(image))
    if xp.isdtype(image.dtype, "integral"):
        background = round(background)  # half to even, as numpy's rint
    padded = xp.full((plan_x.n_out, plan_y.n_out), background, dtype=image.dtype)
    padded[plan_x.pad_before:plan_x.pad_before + image.shape[0],
           plan_y.pad_before:plan_y.pad_before + image.shape[1]] = image
    return padded


def _regrid_block(block: np.ndarray, plan_x: AxisPlan, plan_y: AxisPlan, dtype, xp=numpy_xp) -> np.ndarray:
    """A chunk of holograms regridded in the namespace ``xp``, on the host."""
    regridded = xp.stack([_regrid_image(xp.asarray(image), plan_x, plan_y) for image in block])
    return host_array(regridded, dtype)


def regrid_dataset(ds: xr.Dataset, config: dict, source: str = IN_MEMORY) -> xr.Dataset:
    """The regridded dataset, images still lazy (one hologram per chunk), particles moved and filtered; the
    images are computed on ``regrid.device``."""
    settings, tile = config["regrid"], config["examples"]["tile_size"]
    plans = {
        axis: plan_axis(ds.sizes[f"{axis}size"], float(ds.attrs[f"d{axis}"]), settings["pixel_pitch"],
                        method=settings["method"], frame=settings["frame"], tile=tile,
                        where=f"{source} ({axis} axis)")
        for axis in ("x", "y")
    }
    plan_x, plan_y = plans["x"], plans["y"]
    if not (plan_x.changes or plan_y.changes):
        log.info("%s: already on the grid (pitch %g x %g m, %d x %d pixels); images pass through",
                 source, plan_x.pitch_in, plan_y.pitch_in, plan_x.n_in, plan_y.n_in)
        return ds.assign_attrs(_provenance(plans, settings, source, dropped=0))

    image = ds["image"].data.rechunk({0: 1, 1: -1, 2: -1})
    resampled = plan_x.matrix is not None or plan_y.matrix is not None
    dtype = np.dtype(np.float32) if resampled else image.dtype
    xp = array_namespace_for(settings["device"], "regrid.device")
    new_image = image.map_blocks(_regrid_block, plan_x, plan_y, dtype, xp,
                                 chunks=(image.chunks[0], (plan_x.n_out,), (plan_y.n_out,)),
                                 dtype=dtype)

    x = ds["x"].values.astype(np.float64) - plan_x.offset_m * 1e6
    y = ds["y"].values.astype(np.float64) - plan_y.offset_m * 1e6
    inside = ((np.abs(x) <= plan_x.n_out * plan_x.pitch_out * 1e6 / 2)
              & (np.abs(y) <= plan_y.n_out * plan_y.pitch_out * 1e6 / 2))
    dropped = int((~inside).sum())
    if dropped:
        log.info("%s: dropped %d of %d particle(s) outside the regridded frame", source, dropped, inside.size)
    stale = [name for name, var in ds.variables.items()
             if name != "image" and ({"xsize", "ysize"} & set(var.dims) or name in STALE_PARTICLE_VARS)]
    if stale:
        log.info("%s: dropped variable(s) %s that refer to the old pixel grid", source, ", ".join(stale))
    out = ds.drop_vars(["image", *stale]).assign(x=ds["x"].copy(data=x.astype(ds["x"].dtype)),
                                                  y=ds["y"].copy(data=y.astype(ds["y"].dtype)))
    out = out.isel(particle=np.flatnonzero(inside))
    out["image"] = xr.DataArray(new_image, dims=IMAGE_DIMS, attrs=ds["image"].attrs)
    dust = {DUST_ATTRS[axis]: [float(v) - plan.offset_m * 1e6 for v in np.atleast_1d(ds.attrs[DUST_ATTRS[axis]])]
            for axis, plan in plans.items() if DUST_ATTRS[axis] in ds.attrs}  # moved as the particles are
    return out.assign_attrs(Nx=plan_x.n_out, Ny=plan_y.n_out, dx=plan_x.pitch_out, dy=plan_y.pitch_out,
                            **dust, **_provenance(plans, settings, source, dropped, stale))


def _provenance(plans: dict, settings: dict, source: str, dropped: int, stale=()) -> dict:
    attrs = {
        "regrid_source": os.path.basename(os.fspath(source).rstrip("/")),
        "regrid_method": settings["method"] if any(p.matrix is not None for p in plans.values()) else "none",
        "regrid_frame": settings["frame"],
        "regrid_dropped_particles": dropped,
        "regrid_dropped_variables": ",".join(stale),
        "holopipe_version": __version__,
    }
    for axis, plan in plans.items():
        attrs[f"regrid_scale_{axis}"] = plan.scale
        attrs[f"regrid_offset_{axis}_um"] = plan.offset_m * 1e6
        attrs[f"regrid_source_N{axis}"] = plan.n_in
        attrs[f"regrid_source_d{axis}"] = plan.pitch_in
        attrs[DATA_AREA_ATTRS[axis]] = plan.data
    return attrs


def regrid_file(in_path, out_path, config: dict) -> Path:
    """Regrid a split (netCDF file or zarr store) to ``config['regrid']`` and write it as zarr.

    Attrs gain ``regrid_scale_{x,y}`` (new / old pitch), ``regrid_offset_{x,y}_um`` (the new frame
    centre in the old frame's coordinates: x_new = x_old - offset), ``regrid_method``, ``regrid_frame``,
    ``regrid_source`` and the old ``Nx``/``Ny``/``dx``/``dy`` as ``regrid_source_*``.
    """
    optics = config["optics"]
    ds = open_holodec(in_path, z_limits=(optics["z_min"], optics["z_max"]))
    try:
        out = regrid_dataset(ds, config, source=os.fspath(in_path))
        return write_zarr(out, out_path)
    finally:
        ds.close()
