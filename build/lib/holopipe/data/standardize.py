"""Standardize holograms: each one divided by its own illumination; training statistics only scale.

A standardized hologram is ``I / B``, where the background ``B`` is estimated for every hologram from
that hologram's own data (or its neighbours in the same split), never from another split: the beam
profile, the optics' fringes and the sensor pattern belong to the instrument and the moment of
acquisition, so a background fitted on the training split and divided into a differently lit file
would wreck it. The background sits at ~1 afterwards, so a standardized hologram is still the in-line
field ``I / I0`` and reconstructs physically (``hologram_field(h, background=1.0)``), whatever its frame.

``standardize.background`` chooses the estimator:

``smooth`` (default)
    A robust smooth surface of the hologram itself (:func:`smooth_background`): the weighted
    least-squares cubic spline, knots ``block_pixels`` apart from edge to edge, of the means of small
    cells, with the cells that stand out from it (particle shadows and their rings, which are local and
    sparse) left out. The beam profile, the optics' fringes and the sensor's shading span many knots,
    so the spline follows them: a Gaussian beam giving the corners of a 768 x 640 frame 18 % of the
    centre's light is followed to within 1 % everywhere. It needs no other hologram, works on any frame
    size, and runs on numpy, cupy or torch arrays (array-API operations).
``running_median``
    The per-pixel median over ``window`` neighbouring holograms of the same split (centred, shifted to
    stay inside the split), scaled to the hologram's own median level (laser power varies shot to shot).
    Fixed sensor patterns finer than a block are removed too; a particle is rejected as long as fewer
    than half of the window's holograms shadow the same pixel. Each hologram is read once (one-hologram
    chunks; a task holds ``window`` of them).
``mean``
    The hologram's own mean intensity, one scalar: for flat illumination.

``standardize.stationary`` then takes out what stays at one place across a split's holograms (dust on a window,
a scratch: in every hologram of a file, where a particle is in one of them). Each hologram's own background comes
first, so a beam that moves from shot to shot (augmentation's) is still followed. ``windows`` (default) reconstructs
every hologram at the probe's window planes (the sample volume's ends); where the median of a hologram's ``window``
neighbours' reconstructions is dark, an object sits on a window in all of them, and the in-line hologram of that
opaque object (its whole ring pattern) is taken out of the hologram: nothing changes in a file without one.
``everywhere`` divides by the per-pixel median of the neighbours' contrasts (a fixed sensor pattern too): on dense
holograms that median carries their rings (a few % where nothing is stationary) into every hologram. Without
either, a speck of window dust reconstructs as a particle at the volume's edge in every hologram.

Regrid's pad is not data (regrid pads a frame to whole tiles with the hologram's median, a step no smooth
background of a beamed hologram follows): the background is fitted on the area that regrid recorded as the
hologram's (:func:`holopipe.data.regrid.data_area`; the whole frame of a store without the record) and the pad's
contrast is 1, the background's level. The record, not the look of the image, says where the pad is: a
saturated or dead edge band of the sensor is as constant as a pad, but it is data. The background is floored
at ``DEAD_BACKGROUND_FRACTION`` of the hologram's median level, so dead pixels of the running median (or a
spline undershoot in a dark corner) never divide by ~0; a dead pixel of the image itself gives contrast 0,
which the log floor keeps finite.

A hologram without data is skipped (:func:`blank_reason`): more than ``BLANK_SHARE`` of its pixels dark (at
0) or saturated (at its maximum), or every pixel one value. Its contrast is 1, it is left out of the
training statistics, logged with a warning, and listed in the store's attributes (``skipped_holograms``,
``skipped_reasons``: :func:`holopipe.core.io.skipped_holograms`) so that every later stage leaves it out and
evaluation lists it. A split whose every hologram is skipped fails, naming the file. A hologram with some
light but a background that reaches 0 somewhere fails, naming the file and the hologram. With ``log_transform`` the
stored value is ``1 + log(max(I / B, LOG_EPS))``, which is ~``I / B`` near the background and compresses bright fringes.

The only statistics fitted on the training split are the scale factors of what the model sees: the
contrast mean and std of the standardized training holograms (``stats.json``), computed in one pass
over the training store (one-hologram chunks, per-hologram moments pooled exactly). ``stats.json`` also
records the ``standardize`` settings, and ``standardize apply`` uses those, so every split is
standardized as the training split was.

The per-hologram array work (blank check, background, division) runs in one array namespace: numpy on the
CPU, CuPy on a GPU (``standardize.device``, :func:`holopipe.core.device.array_namespace_for`), with the CPU's
results within float tolerance. The device is where the job runs, not part of the standardization: it is not
recorded in ``stats.json``, and ``apply`` takes it from its caller.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import array_api_compat
import array_api_compat.numpy as numpy_xp
import dask
import dask.array as da
import numpy as np
import scipy.interpolate
import xarray as xr

from holopipe import __version__
from holopipe.core.device import array_namespace_for, host_array
from holopipe.core.files import write_atomically
from holopipe.core.io import IMAGE_DIMS, SKIPPED_ATTR, SKIPPED_REASONS_ATTR, open_holodec, write_zarr
from holopipe.data.regrid import data_area
from holopipe.optics.propagation import propagate
from holopipe.optics.reconstruction import SampleVolume

__all__ = ["apply_stats", "blank_reason", "contrast_images", "fit_stats", "read_stats", "running_median_background",
           "smooth_background", "standardize_image", "write_stats"]

log = logging.getLogger("holopipe")

LOG_EPS = 1e-3
"""Floor of I / B before the log: below one gray level in 128 (dead pixels, saturated shadows)."""

CELLS_PER_BLOCK = 16
"""A block's side in cells (see :func:`smooth_background`): 256 cell means per block."""

OUTLIER_SIGMAS = 3.0
"""Cells this many robust deviations (1.4826 x median absolute) from the background surface get no weight."""

ROBUST_ITERATIONS = 2
"""Refits of the background surface without its outlier cells (shadows and fringes of particles)."""

ROUGHNESS = 0.001
"""Weight of the background surface's roughness against one knot's worth of cells (see _weighted_spline_fit)."""

MAD_TO_SD = 1.4826
"""A normal sample's standard deviation per median absolute deviation."""

STATIONARY_MODES = ("off", "windows", "everywhere")
"""``standardize.stationary``: how what stays put across a split's holograms is taken out (module docstring)."""

OBJECT_EDGE_DARKNESS = 0.5
"""An opaque object's edge in its reconstruction: where the amplitude is half the background's."""

DEAD_BACKGROUND_FRACTION = 0.01
"""The background is never below this fraction of the hologram's median level (dead pixels, dark corners)."""

BLANK_SHARE = 0.99
"""A hologram with more than this share of its pixels dark (at 0) or saturated (at its maximum) holds no
hologram: a particle's shadow and rings cover well under 1 % of a frame, a closed shutter or a blinded
sensor nearly all of it."""


def blank_reason(image) -> str | None:
    """Why the hologram ``image`` (its data area, any shape; numpy or CuPy) holds no data, or None when it
    does: more than :data:`BLANK_SHARE` of its pixels at 0 (dark) or at its maximum (saturated: 255 for 8
    bits), or one value throughout (zero variance)."""
    xp = array_api_compat.array_namespace(image)
    if image.size == 0:
        return "no pixels"
    lowest, highest = float(xp.min(image)), float(xp.max(image))
    dark = float(xp.count_nonzero(image == 0)) / image.size
    if dark > BLANK_SHARE:
        return f"dark: {dark:.1%} of its pixels at 0"
    if lowest == highest:
        return f"constant: every pixel {highest:g} (zero variance)"
    saturated = float(xp.count_nonzero(image == highest)) / image.size
    if saturated > BLANK_SHARE:
        return f"saturated: {saturated:.1%} of its pixels at its maximum {highest:g}"
    return None


def standardize_image(intensity, background, log_transform: bool):
    """Standardized float32 hologram(s): I / B, or 1 + log(max(I / B, LOG_EPS)); B broadcasts. Arrays of one
    namespace (numpy or CuPy), the result in it."""
    xp = array_api_compat.array_namespace(intensity, background)
    ratio = xp.astype(intensity, xp.float32, copy=False) / xp.astype(background, xp.float32, copy=False)
    if log_transform:
        ratio = 1 + xp.log(xp.maximum(ratio, np.float32(LOG_EPS)))
    return xp.astype(ratio, xp.float32, copy=False)


def _median_last_axis(x, xp):
    if array_api_compat.is_numpy_namespace(xp):
        return np.median(x, axis=-1)
    ordered = xp.sort(x, axis=-1)
    n = ordered.shape[-1]
    return (ordered[..., (n - 1) // 2] + ordered[..., n // 2]) / 2


def _median(x, xp) -> float:
    return float(_median_last_axis(xp.reshape(x, (-1,)), xp))


def _cell_means(intensity, cell: int, xp):
    """Means of cell x cell squares tiling an image (a last partial cell along an axis is left out)."""
    n0, n1 = intensity.shape
    m0, m1 = n0 // cell, n1 // cell
    return xp.mean(xp.reshape(intensity[:m0 * cell, :m1 * cell], (m0, cell, m1, cell)), axis=(1, 3))


def _spline_basis(knots: np.ndarray, at: np.ndarray) -> np.ndarray:
    """(len(at), len(knots)): the not-a-knot cubic spline through values at ``knots``, evaluated ``at``
    (a line through 2 knots, a parabola through 3, a constant for 1; extrapolated past the outer ones)."""
    if knots.size == 1:
        return np.ones((at.size, 1))
    return scipy.interpolate.CubicSpline(knots, np.eye(knots.size), axis=0)(at)


def _axis_bases(n: int, cell: int, block_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Along an axis of n pixels, k knots about one block apart from edge to edge (one for a single pixel):
    the spline basis at every pixel (n, k) and at the centres of the n // cell cells (m, k)."""
    knots = np.linspace(0, n - 1, max(1, round(n / block_pixels)) + 1 if n > 1 else 1)
    return _spline_basis(knots, np.arange(n, dtype=np.float64)), _spline_basis(knots, np.arange(n // cell) * cell
                                                                                 + (cell - 1) / 2)


def _roughness(k: int) -> np.ndarray:
    """(k, k): the sum of squared second differences of k knot values, as a quadratic form."""
    second = np.diff(np.eye(k), n=2, axis=0)
    return second.T @ second


def _weighted_spline_fit(cells, weights, basis0, basis1, previous, xp):
    """Knot values (k0, k1) of the tensor-product spline ``basis0 @ K @ basis1.T`` that fits ``cells`` (m0,
    m1) in weighted least squares, plus a weak roughness penalty (``ROUGHNESS`` x the cells per knot times
    the squared second differences of K): where cells have no weight (a large shadow and its fringes),
    the surface continues smoothly from its neighbours instead of following what is left there. The
    normal equations are built from the separable bases (two matmuls, never an (m0 m1, k0 k1) design
    matrix); a vanishing pull towards ``previous`` keeps them solvable."""
    (m0, k0), (m1, k1) = basis0.shape, basis1.shape
    device = array_api_compat.device(cells)
    pairs0 = xp.reshape(basis0[:, :, None] * basis0[:, None, :], (m0, k0 * k0))
    pairs1 = xp.reshape(basis1[:, :, None] * basis1[:, None, :], (m1, k1 * k1))
    normal = xp.reshape(xp.matmul(xp.matrix_transpose(pairs0), xp.matmul(weights, pairs1)), (k0, k0, k1, k1))
    normal = xp.reshape(xp.permute_dims(normal, (0, 2, 1, 3)), (k0 * k1, k0 * k1))
    roughness = np.kron(_roughness(k0), np.eye(k1)) + np.kron(np.eye(k0), _roughness(k1))
    pull = 1e-9 * float(xp.max(xp.abs(normal)))
    normal = normal + xp.asarray(ROUGHNESS * m0 * m1 / (k0 * k1) * roughness + pull * np.eye(k0 * k1),
                                 dtype=normal.dtype, device=device)
    right = xp.matmul(xp.matmul(xp.matrix_transpose(basis0), weights * cells), basis1) + pull * previous
    return xp.reshape(xp.linalg.solve(normal, xp.reshape(right, (k0 * k1, 1))), (k0, k1))


def smooth_background(intensity, block_pixels: int):
    """The smooth background (float32, same shape) of one image (n0, n1); numpy, cupy or torch.

    1. Cell means: squares of ``block_pixels / CELLS_PER_BLOCK`` pixels (8 for 128-pixel blocks). Means
       are continuous where 8-bit gray levels are not (a median of a dim region's few distinct levels
       would be off by up to half a level, 2 % at 25 gray).
    2. The least-squares cubic spline surface of the cells, knots about ``block_pixels`` apart from
       edge to edge (a tensor product of two 1-D bases). Least squares over every cell rather than
       medians at block centres: a block's median sits ~(block / waist)² below a curved beam's value at
       its centre, and the frame's outer half-blocks would only be extrapolated.
    3. ``ROBUST_ITERATIONS`` times: cells farther than ``OUTLIER_SIGMAS`` robust deviations (1.4826 x the
       median absolute deviation) from the surface, such as particle shadows and strong fringes, get no
       weight, and the surface is fitted again. Particles are local and sparse; the beam, the optics'
       fringes and the sensor's shading span many knots.

    Floored at ``DEAD_BACKGROUND_FRACTION`` of the image's median level (of its cells). Both image axes
    are treated alike, so (xsize, ysize) and (ny, nx) layouts give the same surface.
    """
    xp = array_api_compat.array_namespace(intensity)
    n0, n1 = intensity.shape
    cell = max(1, min(block_pixels // CELLS_PER_BLOCK, n0, n1))
    device = array_api_compat.device(intensity)
    # The fit is small (cells and knots) and in float64; only the last product is a full frame.
    cells = xp.astype(_cell_means(xp.astype(intensity, xp.float32), cell, xp), xp.float64)
    (pixels0, basis0), (pixels1, basis1) = [[xp.asarray(matrix, dtype=xp.float64, device=device)
                                             for matrix in _axis_bases(n, cell, block_pixels)] for n in (n0, n1)]
    knots = xp.zeros((basis0.shape[1], basis1.shape[1]), dtype=xp.float64, device=device)
    knots = _weighted_spline_fit(cells, xp.ones_like(cells), basis0, basis1, knots, xp)
    for _ in range(ROBUST_ITERATIONS):
        deviation = xp.abs(cells - xp.matmul(xp.matmul(basis0, knots), xp.matrix_transpose(basis1)))
        weights = xp.astype(deviation <= OUTLIER_SIGMAS * MAD_TO_SD * _median(deviation, xp), xp.float64)
        knots = _weighted_spline_fit(cells, weights, basis0, basis1, knots, xp)
    rows = xp.astype(xp.matmul(pixels0, knots), xp.float32)  # (n0, k1)
    background = xp.matmul(rows, xp.astype(xp.matrix_transpose(pixels1), xp.float32))
    return xp.maximum(background, xp.asarray(_median(cells, xp) * DEAD_BACKGROUND_FRACTION, dtype=xp.float32,
                                             device=device))


def running_median_background(window_images, position: int):
    """Background (float32, frame shape) of ``window_images[position]`` from its window of holograms.

    ``window_images`` is (w, n0, n1), the hologram and its neighbours of the same split (numpy or CuPy): their
    per-pixel median, scaled by the ratio of the hologram's median level to the median's, floored as in the
    module docstring.
    """
    xp = array_api_compat.array_namespace(window_images)
    images = xp.astype(window_images, xp.float32, copy=False)
    median = xp.median(images, axis=0)
    level, median_level = xp.median(images[position]), xp.median(median)
    scaled = median * xp.astype(level / median_level, xp.float32) if median_level > 0 else median
    return xp.maximum(scaled, xp.astype(level * DEAD_BACKGROUND_FRACTION, xp.float32))


def _window(h: int, n: int, window: int) -> range:
    """The ``window`` holograms around index h, shifted to stay inside 0..n-1 (all of them when n < window)."""
    start = min(max(h - window // 2, 0), max(n - window, 0))
    return range(start, min(start + window, n))


def _contrast_block(*blocks, settings: dict, where: str, area: tuple[slice, slice], position: int = 0,
                    hologram: int | None = None, xp=numpy_xp, block_info=None):
    """One hologram's standardized image (1, nx, ny) from its chunk, or from its window's chunks (the
    hologram at ``position``), computed in the namespace ``xp`` and returned on the host; ``hologram`` (else
    the chunk's location) names it in errors.

    Only ``area`` (regrid's record of the hologram's pixels, :func:`holopipe.data.regrid.data_area`) is data: the
    background is fitted on it, and the pad around it has contrast 1, the background's level. A hologram
    without data (:func:`blank_reason`) has contrast 1 throughout (the caller lists it), and is left out of
    its neighbours' running-median windows (which then hold one hologram fewer).
    """
    images = xp.astype(xp.asarray(np.concatenate(blocks, axis=0)), xp.float32, copy=False)[:, area[0], area[1]]
    image = images[position]
    contrast = xp.ones((1, *blocks[0].shape[1:]), dtype=xp.float32)
    if blank_reason(image) is not None:
        return host_array(contrast, np.float32)
    # A running median's window: neighbours without data say nothing about this hologram's light, and a
    # window left with fewer than 3 holograms has no median that rejects a shadow: it would erase the particles.
    lit = [i for i in range(len(images)) if i == position or blank_reason(images[i]) is None]
    if len(lit) < min(3, len(images)):
        hologram = block_info[0]["array-location"][0][0] if hologram is None else hologram
        raise ValueError(f"{where}: the running-median window of hologram index {hologram} holds {len(lit)} "
                         f"hologram(s) with data of {len(images)}; widen standardize.window or use "
                         "standardize.background smooth")
    images, position = images[xp.asarray(lit)], lit.index(position)
    method = settings["background"]
    if method == "smooth":
        background = smooth_background(image, int(settings["block_pixels"]))
    elif method == "running_median":
        background = running_median_background(images, position)
    elif method == "mean":
        background = xp.astype(image.mean(dtype=xp.float64), xp.float32)
    else:
        raise ValueError(f"{where}: unknown standardize.background {method!r}; expected smooth, running_median "
                         "or mean")
    darkest = float(xp.min(background))
    if not darkest > 0:
        hologram = block_info[0]["array-location"][0][0] if hologram is None else hologram
        raise ValueError(f"{where}: hologram index {hologram} has no light (its background reaches {darkest:g}); "
                         "cannot divide it by its background")
    contrast[0, area[0], area[1]] = standardize_image(image, background, bool(settings["log_transform"]))
    return host_array(contrast, np.float32)


def contrast_images(image: da.Array, settings: dict, where: str = "<image>",
                    area: tuple[slice, slice] | None = None, xp=numpy_xp,
                    windows: WindowPlanes | None = None) -> da.Array:
    """Lazy standardized images (hologram, xsize, ysize) float32, one hologram per chunk.

    ``image`` is a dask array of raw intensities in the contract layout; ``settings`` the ``standardize``
    section; ``where`` names the file in errors; ``area`` the (x, y) slices that hold the hologram (the
    whole frame by default); ``xp`` the namespace each hologram is computed in (its chunk stays a host
    array); ``windows`` the file's window planes, which ``stationary: windows`` needs. Each input chunk is
    read once per computation.
    """
    image = image.rechunk({0: 1, 1: -1, 2: -1})
    n, nx, ny = image.shape
    area = area or (slice(0, nx), slice(0, ny))
    mode = stationary_mode(settings, where)
    own = {**settings, "log_transform": False} if mode != "off" else settings
    if settings["background"] != "running_median":
        contrast = image.map_blocks(_contrast_block, settings=own, where=where, area=area, xp=xp,
                                    dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    else:
        contrast = _windowed(_contrast_block, image, int(settings["window"]), settings=own, where=where,
                             area=area, xp=xp)
    log_transform = bool(settings["log_transform"])
    if mode == "off":
        return contrast
    if mode == "everywhere":
        return _windowed(_stationary_block, contrast, int(settings["window"]), where=where,
                         log_transform=log_transform, xp=xp)
    if windows is None:
        raise ValueError(f"{where}: standardize.stationary windows needs the file's optics (wavelength, pixel "
                         "pitch, sample volume) to reconstruct its windows")
    amplitudes = contrast.map_blocks(_window_amplitude_block, windows=windows, xp=xp, new_axis=1,
                                     chunks=((1,) * n, (len(windows.depths_m),), (nx,), (ny,)),
                                     dtype=np.float32, meta=np.empty((0, 0, 0, 0), np.float32))
    both = da.concatenate([contrast[:, None], amplitudes], axis=1)
    return _windowed(_window_objects_block, both, int(settings["window"]), where=where,
                     log_transform=log_transform, windows=windows,
                     darkness=float(settings["stationary_darkness"]), xp=xp)


def stationary_mode(settings: dict, where: str = "<standardize>") -> str:
    """What ``standardize`` settings divide out as stationary after each hologram's own background
    (:data:`STATIONARY_MODES`): off under a running median, which does it by itself. Stats fitted before the
    key had modes record a switch: true was everywhere's division, false (or no key) off."""
    mode = settings.get("stationary", False)
    if isinstance(mode, bool):
        mode = "everywhere" if mode else "off"
    if mode not in STATIONARY_MODES:
        raise ValueError(f"{where}: unknown standardize.stationary {mode!r}; expected one of "
                         f"{', '.join(STATIONARY_MODES)}")
    return "off" if settings["background"] == "running_median" else mode


def _windowed(function, images: da.Array, window: int, **kwargs) -> da.Array:
    """``function`` of each hologram's window of ``images`` (one-hologram chunks along the first axis, any
    more axes), given the hologram's ``position`` in it and its index ``hologram``; it returns the hologram's
    image (1, nx, ny) of the last two axes. Each chunk is read once per computation."""
    n, nx, ny = images.shape[0], images.shape[-2], images.shape[-1]
    holograms = []
    for h in range(n):
        neighbours = _window(h, n, window)
        holograms.append(da.map_blocks(function, *(images[i:i + 1] for i in neighbours),
                                       position=h - neighbours.start, hologram=h, chunks=((1,), (nx,), (ny,)),
                                       drop_axis=list(range(1, images.ndim - 2)),
                                       dtype=np.float32, meta=np.empty((0, 0, 0), np.float32), **kwargs))
    return da.concatenate(holograms, axis=0)


def _lit_window(contrasts, position: int, hologram: int, where: str, xp) -> list[int] | None:
    """The window's holograms with data (the hologram's own included), or None when fewer than 3 are left:
    no median of so few rejects a particle (logged). A hologram without data has contrast 1 throughout."""
    lit = [i for i in range(contrasts.shape[0]) if i == position or not bool(xp.all(contrasts[i] == 1))]
    if len(lit) >= 3:
        return lit
    log.warning("%s: hologram index %d: %d hologram(s) with data in its window, too few to tell what is "
                "stationary; divided by its own background alone", where, hologram, len(lit))
    return None


def _stationary_block(*blocks, position: int, hologram: int, where: str, log_transform: bool, xp=numpy_xp):
    """``stationary: everywhere``: one hologram's contrast (1, nx, ny) divided by the per-pixel median of its
    window's contrasts, holograms without data left out; with fewer than 3 left, by its own background alone."""
    contrasts = xp.astype(xp.asarray(np.concatenate(blocks, axis=0)), xp.float32, copy=False)
    contrast = contrasts[position]
    lit = None if bool(xp.all(contrast == 1)) else _lit_window(contrasts, position, hologram, where, xp)
    if lit is None:
        return host_array(standardize_image(contrast, xp.ones_like(contrast), log_transform)[None], np.float32)
    median = xp.median(contrasts[xp.asarray(lit)], axis=0)
    stationary = xp.maximum(median, xp.asarray(np.float32(DEAD_BACKGROUND_FRACTION)))
    return host_array(standardize_image(contrast, stationary, log_transform)[None], np.float32)


class WindowPlanes(NamedTuple):
    """A file's window planes, where its probe's windows bound the sample volume (``zMin``, ``zMax``), and
    the optics that reconstruct them. Pitches are the file's (x along the contract's first image axis)."""

    depths_m: tuple[float, ...]
    wavelength_m: float
    dx_m: float
    dy_m: float

    @classmethod
    def of(cls, attrs) -> WindowPlanes:
        volume = SampleVolume.of(attrs)
        return cls((volume.z_min_m, volume.z_max_m), float(attrs["lambda"]), float(attrs["dx"]),
                   float(attrs["dy"]))

    def pad(self, nx: int, ny: int, z_m: float) -> tuple[int, int]:
        """Pixels added on each side of an ``nx`` x ``ny`` frame (x, y) to propagate it by ``z_m``: the reach of
        its band-limited rings at that depth, λ|z|/(2 pitch²), at most half the frame."""
        return (min(math.ceil(self.wavelength_m * abs(z_m) / (2 * self.dx_m**2)), nx // 2),
                min(math.ceil(self.wavelength_m * abs(z_m) / (2 * self.dy_m**2)), ny // 2))

    def grid_pixels(self, nx: int, ny: int) -> int:
        """Padded pixels of one propagation of an ``nx`` x ``ny`` frame to every window plane, summed."""
        return sum((nx + 2 * px) * (ny + 2 * py) for px, py in (self.pad(nx, ny, z) for z in self.depths_m))

    def propagate(self, field, z_m: float):
        """``field`` (..., nx, ny) of the contract layout propagated by ``z_m``, padded by :meth:`pad`."""
        # propagate's last axis is its x: the contract's y.
        return propagate(field, z_m, wavelength=self.wavelength_m, dx=self.dy_m, dy=self.dx_m,
                         pad=self.pad(*field.shape[-2:], z_m), band_limit=True)


def _window_amplitude_block(block, windows: WindowPlanes, xp=numpy_xp):
    """One hologram's contrast (1, nx, ny) reconstructed at each window plane: |E| (1, planes, nx, ny)."""
    contrast = xp.astype(xp.asarray(block[0]), xp.complex64)
    return host_array(xp.stack([xp.abs(windows.propagate(contrast, -z)) for z in windows.depths_m])[None],
                      np.float32)


def _window_objects_block(*blocks, position: int, hologram: int, where: str, log_transform: bool,
                          windows: WindowPlanes, darkness: float, xp=numpy_xp):
    """``stationary: windows``: one hologram's contrast (1, nx, ny) with the terms of the objects its window's
    holograms all show at a window plane taken out, contrast - objects' hologram + 1
    (:func:`window_objects_hologram`): a division would blow up the noise in their opaque shadows. Each block
    holds a hologram's contrast and its window-plane amplitudes (1, 1 + planes, nx, ny)."""
    stacked = xp.astype(xp.asarray(np.concatenate(blocks, axis=0)), xp.float32, copy=False)
    contrasts, amplitudes = stacked[:, 0], stacked[:, 1:]
    contrast = contrasts[position]
    lit = None if bool(xp.all(contrast == 1)) else _lit_window(contrasts, position, hologram, where, xp)
    if lit is not None:
        lit = xp.asarray(lit)
        objects = window_objects_hologram(amplitudes[lit], windows, darkness)
        if objects is not None:
            log.info("%s: hologram index %d: objects on a window taken out", where, hologram)
            contrast = contrast - objects + 1
    return host_array(standardize_image(contrast, xp.ones_like(contrast), log_transform)[None], np.float32)


def window_objects_hologram(amplitudes, windows: WindowPlanes, darkness: float):
    """The in-line hologram (nx, ny) of the opaque objects a window of holograms all show on the probe's
    windows, None where they show nothing there.

    ``amplitudes`` (k, planes, nx, ny) are the window's holograms (by their own backgrounds) reconstructed at
    ``windows.depths_m`` (numpy or CuPy). Dust on a window is a compact dark object at its plane in every
    hologram of a file; a droplet is there in one, and a dense hologram's rings spread over every plane. So the
    median of the window's reconstructions is dark only where something stays: where it is darker than
    ``darkness`` (1 - amplitude), grown over what is darker than :data:`OBJECT_EDGE_DARKNESS`, an opaque object
    is propagated back to the sensor. That is its whole ring pattern, which reaches far beyond any mask of the
    sensor plane (a mask there leaves the outer rings, and they still focus), and nothing of the droplets'
    chance scatter (4-6 % for the median of nine of the default's holograms), which dividing by the median
    itself prints into every hologram. The object is modelled, not cut from the median's reconstruction: that
    holds its twin image too, and took out more than the dust.
    """
    xp = array_api_compat.array_namespace(amplitudes)
    hologram = None
    for plane, depth in enumerate(windows.depths_m):
        dark = 1 - xp.median(amplitudes[:, plane], axis=0)
        seeds = dark > darkness
        if not bool(xp.any(seeds)):
            continue
        opaque = _grown_within(seeds, dark > min(darkness, OBJECT_EDGE_DARKNESS), xp)
        objects = xp.abs(windows.propagate(1 - xp.astype(opaque, xp.complex64), depth)) ** 2
        hologram = objects if hologram is None else hologram * objects
    return None if hologram is None else xp.astype(hologram, xp.float32)


def _grown_within(seeds, region, xp):
    """The pixels of ``region`` (2-D boolean) 8-connected to ``seeds`` through it (seeds outside it kept)."""
    grown = seeds
    while True:
        more = _grown_by_one(grown, xp) & (region | seeds)
        if bool(xp.all(more == grown)):
            return grown
        grown = more


def _grown_by_one(mask, xp):
    """A 2-D boolean ``mask`` with every neighbour (8-connected) of a True pixel set too."""
    m0, m1 = mask.shape
    padded = xp.zeros((m0 + 2, m1 + 2), dtype=xp.bool, device=array_api_compat.device(mask))
    padded[1:-1, 1:-1] = mask
    grown = xp.zeros_like(mask)
    for i in range(3):
        for j in range(3):
            grown = grown | padded[i:i + m0, j:j + m1]
    return grown


def _blank_block(block: np.ndarray, area: tuple[slice, slice]) -> np.ndarray:
    return np.array([blank_reason(block[0][area]) or ""], dtype=object)


def _blank_reasons(image: da.Array, area: tuple[slice, slice]) -> da.Array:
    """Lazy (hologram,) object array: each hologram's :func:`blank_reason` on ``area``, "" for one with data."""
    image = image.rechunk({0: 1, 1: -1, 2: -1})
    return image.map_blocks(_blank_block, area, drop_axis=(1, 2), dtype=object, meta=np.empty((0,), object))


def _skipped(reasons, where: str) -> dict[int, str]:
    """hid (1-based) -> reason of the holograms without data among computed ``reasons``, each logged with a
    warning; a split without any hologram that holds data fails, naming ``where``."""
    skipped = {h + 1: str(reason) for h, reason in enumerate(reasons) if reason}
    for hid, reason in skipped.items():
        log.warning("%s: hologram %d (index %d) skipped, no data: %s", where, hid, hid - 1, reason)
    if skipped and len(skipped) == len(reasons):
        first = next(iter(skipped.items()))
        raise ValueError(f"{where}: none of its {len(reasons)} hologram(s) holds data (hologram {first[0]}: "
                         f"{first[1]}); nothing to standardize")
    return skipped


def _moments(block: np.ndarray) -> np.ndarray:
    """(1, 3) float64: count, mean and sum of squared deviations of one hologram's contrast."""
    values = block.astype(np.float64).ravel()
    mean = values.mean()
    return np.array([[values.size, mean, np.square(values - mean).sum()]])


def _pooled(moments: np.ndarray) -> tuple[float, float]:
    """Mean and (population) std of the union of groups given by rows (count, mean, M2)."""
    counts, means, m2 = moments.T
    total = counts.sum()
    mean = float((counts * means).sum() / total)
    variance = float((m2.sum() + (counts * np.square(means - mean)).sum()) / total)
    return mean, math.sqrt(variance)


def fit_stats(train_path, config: dict) -> dict:
    """The scale factors of the model's inputs: contrast mean and std of the standardized training split.

    One pass over the training store; holograms without data (:func:`blank_reason`) are left out. Returns a
    JSON-serialisable dict: ``contrast_mean``, ``contrast_std``, ``n_holograms`` (those used),
    ``skipped_holograms`` (1-based), ``source``, the ``standardize`` settings (which ``apply`` uses),
    ``log_transform`` and ``holopipe_version``. The holograms are standardized on ``standardize.device``.
    """
    settings = {key: value for key, value in config["standardize"].items() if key != "device"}
    optics = config["optics"]
    xp = array_namespace_for(config["standardize"]["device"], "standardize.device")
    name = os.fspath(train_path)
    ds = open_holodec(name, z_limits=(optics["z_min"], optics["z_max"]))
    try:
        area = data_area(ds.attrs, ds.sizes["xsize"], ds.sizes["ysize"], name)
        contrast = contrast_images(ds["image"].data, settings, where=name, area=area, xp=xp,
                                   windows=WindowPlanes.of(ds.attrs))
        moments = contrast.map_blocks(_moments, chunks=(contrast.chunks[0], (3,)), drop_axis=2, dtype=np.float64)
        # (n_holograms, 3) and (n_holograms,): small, and one pass (both share each hologram's read).
        moments, reasons = dask.compute(moments, _blank_reasons(ds["image"].data, area))
        skipped = _skipped(reasons, name)
        used = [h for h in range(len(reasons)) if h + 1 not in skipped]
        contrast_mean, contrast_std = _pooled(moments[used])
    finally:
        ds.close()
    return {"contrast_mean": contrast_mean, "contrast_std": contrast_std, "n_holograms": len(used),
            "skipped_holograms": sorted(skipped), "source": name, "standardize": settings,
            "log_transform": bool(settings["log_transform"]), "holopipe_version": __version__}


def write_stats(stats: dict, path) -> Path:
    """Write ``stats`` as JSON at ``path`` atomically."""
    path = Path(path)
    text = json.dumps(stats, indent=2, sort_keys=True) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_stats(path) -> dict:
    """The stats that :func:`write_stats` wrote; a file of the former training-split background image is refused."""
    path = Path(path)
    stats = json.loads(path.read_text(encoding="utf-8"))
    if "background_file" in stats:
        raise ValueError(f"{path}: fitted with a training-split background image ({stats['background_file']}); "
                         "backgrounds are now per hologram: rerun `holopipe standardize fit`")
    return stats


def apply_stats(in_path, out_path, stats_path, device: str = "cpu") -> Path:
    """Standardize every hologram of ``in_path`` by its own background and write a float32 zarr store.

    The estimator and its settings are those recorded in ``stats_path`` (the training split's). Particles
    and attrs are kept; holograms without data have contrast 1 and are listed in ``skipped_holograms`` and
    ``skipped_reasons`` (module docstring); attrs also gain ``standardize_stats``, ``standardize_background``,
    ``standardize_block_pixels`` or ``standardize_window`` (the estimator's setting),
    ``standardize_stationary`` (off, windows or everywhere; but off, ``standardize_window`` too, and with windows
    ``standardize_stationary_darkness``), ``standardize_log_transform`` (0/1),
    ``standardize_source`` and ``standardize_contrast_mean``/``_std``.
    ``device`` (``standardize.device``) is where the holograms are standardized.
    """
    stats = read_stats(stats_path)
    settings = stats["standardize"]
    xp = array_namespace_for(device, "standardize.device")
    name = os.fspath(in_path)
    ds = open_holodec(name)
    try:
        area = data_area(ds.attrs, ds.sizes["xsize"], ds.sizes["ysize"], name)
        # A pass of its own: the store's attributes, written first, must already list the skipped holograms.
        skipped = _skipped(_blank_reasons(ds["image"].data, area).compute(scheduler="synchronous"), name)
        standardized = contrast_images(ds["image"].data, settings, where=name, area=area, xp=xp,
                                       windows=WindowPlanes.of(ds.attrs))
        out = ds.assign(image=xr.DataArray(standardized, dims=IMAGE_DIMS, attrs=ds["image"].attrs))
        mode = stationary_mode(settings, name)
        recorded = {"smooth": ["block_pixels"], "running_median": ["window"]}.get(settings["background"], [])
        recorded += ["window"] if mode != "off" and "window" not in recorded else []
        darkness = {"standardize_stationary_darkness": float(settings["stationary_darkness"])} if mode == "windows" \
            else {}
        out = out.assign_attrs(
            standardize_stats=os.fspath(stats_path),
            standardize_background=settings["background"],
            **{f"standardize_{setting}": int(settings[setting]) for setting in recorded},
            standardize_stationary=mode,
            **darkness,
            standardize_log_transform=int(settings["log_transform"]),
            standardize_source=os.path.basename(name.rstrip("/")),
            standardize_contrast_mean=stats["contrast_mean"],
            standardize_contrast_std=stats["contrast_std"],
            holopipe_version=__version__,
            **{SKIPPED_ATTR: sorted(skipped), SKIPPED_REASONS_ATTR: [skipped[hid] for hid in sorted(skipped)]},
        )
        return write_zarr(out, out_path)
    finally:
        ds.close()
