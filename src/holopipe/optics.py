"""Angular-spectrum wave propagation for numpy, cupy and torch arrays.

One implementation serves every array library (array-API style through ``array_api_compat``): the
output has the input's library, device and precision. Fields are laid out ``(..., ny, nx)``: the last
axis has pixel pitch ``dx``, the one before it ``dy`` (metres). Positive ``z`` propagates towards the
sensor (object to hologram); reconstruction of a hologram uses ``-z``.

Precision: the carrier ``exp(ikz)`` is dropped (it is one global phase per plane) and the remaining
phase ``k z (sqrt(1 - a) - 1)`` with ``a = λ²(fx² + fy²)`` is evaluated in the cancellation-free form
``-k z a / (1 + sqrt(1 - a))`` in float64, reduced modulo 2π and only then cast to the field's
precision; at z = 158 mm the naive float32 phase would be off by 0.1–0.3 rad.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import array_api_compat

from holopipe.device import cpu_threads

__all__ = [
    "Propagator",
    "Reconstruction",
    "TransferFunction",
    "fft2",
    "hologram_field",
    "ifft2",
    "propagate",
    "reconstruct",
]


def _is_numpy(xp) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def fft2(x):
    """2-D FFT over the last two axes; scipy's FFT on the job's threads (:func:`holopipe.device.cpu_threads`)
    for numpy, the native one otherwise."""
    xp = array_api_compat.array_namespace(x)
    if _is_numpy(xp):
        import scipy.fft

        return scipy.fft.fft2(x, workers=cpu_threads())
    return xp.fft.fftn(x, axes=(-2, -1))


def ifft2(x, *, overwrite: bool = False):
    """Inverse of :func:`fft2` over the last two axes; ``overwrite`` lets numpy reuse ``x``'s memory."""
    xp = array_api_compat.array_namespace(x)
    if _is_numpy(xp):
        import scipy.fft

        return scipy.fft.ifft2(x, workers=cpu_threads(), overwrite_x=overwrite)
    return xp.fft.ifftn(x, axes=(-2, -1))


def _complex_dtype(xp, dtype):
    """complex128 for double-precision input, complex64 for everything else (uint8, float32, ...)."""
    if dtype in (xp.float64, xp.complex128):
        return xp.complex128
    return xp.complex64


def _real_dtype(xp, complex_dtype):
    return xp.float64 if complex_dtype == xp.complex128 else xp.float32


def _as_pair(value, name: str) -> tuple[int, int]:
    """An int or a (along y, along x) pair of non-negative ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 0 for v in pair):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _unit_phasor(phase, xp, complex_dtype):
    """exp(i·phase) built from cos and sin (cheaper than a complex exp on every library)."""
    return xp.astype(xp.cos(phase), complex_dtype) + 1j * xp.astype(xp.sin(phase), complex_dtype)


class TransferFunction:
    """Angular-spectrum transfer function H(z) on one FFT grid, for any number of planes.

    H depends on |fx| and |fy| only, so it is evaluated on the quarter grid of distinct
    frequencies (4x less trigonometry) and mirrored. The z-independent factor
    ``a / (1 + sqrt(1 - a)) / λ`` (cycles per metre of z, float64) is computed once on the target
    device; per plane the phase is formed in float64 cycles, reduced to [-0.5, 0.5] and only then
    cast to the field's precision.
    """

    def __init__(self, shape, *, wavelength: float, dx: float, dy: float | None = None,
                 band_limit: bool = False, xp=None, device=None):
        dy = dx if dy is None else dy
        if wavelength <= 0 or dx <= 0 or dy <= 0:
            raise ValueError(f"wavelength, dx and dy must be positive metres, got {wavelength}, {dx}, {dy}")
        if xp is None:
            import numpy as xp
        self.xp = xp = array_api_compat.array_namespace(xp.empty(0))
        self.shape = (int(shape[-2]), int(shape[-1]))
        self.wavelength, self.dx, self.dy = float(wavelength), float(dx), float(dy)
        self.band_limit = band_limit
        ny, nx = self.shape
        # Index k of an FFT axis holds frequency k/(n d) or (k - n)/(n d): |f| = min(k, n - k)/(n d),
        # so indices 0..n//2 hold every distinct |f| and the rest mirror them.
        self._fy = xp.arange(ny // 2 + 1, dtype=xp.float64, device=device) / (ny * self.dy)
        self._fx = xp.arange(nx // 2 + 1, dtype=xp.float64, device=device) / (nx * self.dx)
        a = self.wavelength**2 * (self._fy[:, None] ** 2 + self._fx[None, :] ** 2)
        propagating = a < 1.0
        # Evanescent components (a >= 1) decay within a wavelength: cut them.
        self._evanescent_cut = None if bool(xp.all(propagating)) else propagating
        root = xp.sqrt(xp.where(propagating, 1.0 - a, xp.zeros_like(a)))
        self._cycles_per_metre = -a / (1.0 + root) / self.wavelength

    def band_mask(self, z):
        """Matsushima & Shimobaba (2009): keep |f| < 1 / (λ sqrt((2 Δf z)² + 1)) per axis, per plane.

        Returned on the quarter grid, shape (nz, ny//2 + 1, nx//2 + 1).
        """
        xp = self.xp
        z = xp.reshape(z, (-1, 1, 1))
        ny, nx = self.shape
        limit_x = 1.0 / (self.wavelength * xp.sqrt((2.0 * z / (nx * self.dx)) ** 2 + 1.0))
        limit_y = 1.0 / (self.wavelength * xp.sqrt((2.0 * z / (ny * self.dy)) ** 2 + 1.0))
        return (self._fx[None, None, :] < limit_x) & (self._fy[None, :, None] < limit_y)

    def quarter(self, z, dtype=None):
        """H on the quarter grid of distinct |fx|, |fy|: shape (nz, ny//2 + 1, nx//2 + 1)."""
        xp = self.xp
        dtype = xp.complex64 if dtype is None else dtype
        device = array_api_compat.device(self._cycles_per_metre)
        z_planes = xp.reshape(xp.asarray(z, dtype=xp.float64, device=device), (-1, 1, 1))
        cycles = z_planes * self._cycles_per_metre[None, ...]
        cycles = cycles - xp.round(cycles)
        phase = xp.astype(cycles, _real_dtype(xp, dtype)) * (2.0 * math.pi)
        transfer = _unit_phasor(phase, xp, dtype)
        keep = self._evanescent_cut
        if self.band_limit:
            band = self.band_mask(z_planes)
            keep = band if keep is None else (band & keep[None, ...])
        if keep is not None:
            transfer = xp.where(keep, transfer, xp.zeros_like(transfer))
        return transfer

    def __call__(self, z, dtype=None):
        """H for ``z`` (metres, scalar or 1-D): shape (ny, nx) or (nz, ny, nx), complex64 by default."""
        xp = self.xp
        quarter = self.quarter(z, dtype)
        ny, nx = self.shape
        full = xp.concat([quarter, xp.flip(quarter[:, 1:ny - ny // 2, :], axis=-2)], axis=-2)
        full = xp.concat([full, xp.flip(full[:, :, 1:nx - nx // 2], axis=-1)], axis=-1)
        return full[0, ...] if xp.asarray(z).ndim == 0 else full

    def apply(self, spectrum, z, out=None):
        """``spectrum * H(z)`` for a spectrum (..., ny, nx), without building the full H.

        Each quadrant of the spectrum is multiplied by the quarter-grid H or its mirror image (a free
        view in numpy), so the product costs one pass over the spectrum. A 1-D ``z`` inserts a plane
        axis before the last two. ``out`` may be ``spectrum`` itself for a scalar ``z``.
        """
        xp = self.xp
        quarter = self.quarter(z, spectrum.dtype)
        ny, nx = self.shape
        if xp.asarray(z).ndim == 0:
            quarter = quarter[0, ...]
            out_shape = spectrum.shape
        else:
            spectrum = spectrum[..., None, :, :]
            out_shape = (*spectrum.shape[:-3], quarter.shape[0], ny, nx)
        head_y, head_x = ny // 2 + 1, nx // 2 + 1
        tail_y = xp.flip(quarter[..., 1:ny - ny // 2, :], axis=-2)
        if out is None:
            out = xp.empty(out_shape, dtype=spectrum.dtype, device=array_api_compat.device(spectrum))
        for rows, block in ((slice(0, head_y), quarter), (slice(head_y, ny), tail_y)):
            _multiply_into(spectrum[..., rows, :head_x], block, out[..., rows, :head_x])
            _multiply_into(spectrum[..., rows, head_x:], xp.flip(block[..., 1:nx - nx // 2], axis=-1),
                           out[..., rows, head_x:])
        return out


def _multiply_into(a, b, out) -> None:
    """out[...] = a * b without a temporary (the array API has no ``out=``; every library here does)."""
    if array_api_compat.is_torch_array(out):
        import torch

        torch.mul(a, b, out=out)
    else:
        array_api_compat.get_namespace(out).multiply(a, b, out=out)


@functools.lru_cache(maxsize=4)
def _cached_transfer_function(shape, wavelength, dx, dy, band_limit, xp, device) -> TransferFunction:
    """Repeated calls on one grid (a loop over holograms) share the z-independent part of H."""
    return TransferFunction(shape, wavelength=wavelength, dx=dx, dy=dy, band_limit=band_limit,
                            xp=xp, device=device)


class Reconstruction(NamedTuple):
    """Amplitude |E| and phase arg E (radians) of a reconstructed field, same shape."""

    amplitude: Any
    phase: Any


PLANE_BATCH_PIXELS = 2**24
"""Complex pixels a plane sweep reconstructs at once by default (128 MiB of complex64): memory stays one
batch whatever the frame and the number of planes."""


class Propagator:
    """Propagates one field (or a stack of fields) to many planes, reusing its FFT.

    A reconstruction sweep over 1000 planes costs one forward FFT and 1000 inverse FFTs, not 2000.
    ``pad`` adds that many pixels of ``pad_value`` on each side before the FFT (background 1 for a
    normalised hologram: zero padding would add edge diffraction as strong as a droplet's signal).
    """

    def __init__(self, field, *, wavelength: float, dx: float, dy: float | None = None,
                 pad: int | tuple[int, int] = 0, pad_value: float = 1.0, band_limit: bool = False):
        xp = array_api_compat.array_namespace(field)
        self.xp = xp
        self.dtype = _complex_dtype(xp, field.dtype)
        self.shape = tuple(field.shape[-2:])
        self.pad = _as_pair(pad, "pad")
        field = xp.astype(field, self.dtype, copy=False)
        if any(self.pad):
            field = _pad(field, self.pad, pad_value)
        self.spectrum = fft2(field)
        self.transfer = _cached_transfer_function(tuple(field.shape[-2:]), float(wavelength),
                                                  float(dx), None if dy is None else float(dy),
                                                  bool(band_limit), xp,
                                                  array_api_compat.device(field))

    def __call__(self, z, *, consume: bool = False):
        """Field at ``z`` (metres): shape (..., ny, nx) for scalar z, (..., nz, ny, nx) for 1-D z.

        ``consume=True`` multiplies the stored spectrum in place (scalar z): the one-plane path of
        :func:`propagate`, which needs the spectrum only once.
        """
        out = self.spectrum if consume else None
        field = ifft2(self.transfer.apply(self.spectrum, z, out=out), overwrite=True)
        if consume:
            self.spectrum = None
        pad_y, pad_x = self.pad
        ny, nx = self.shape
        return field[..., pad_y:pad_y + ny, pad_x:pad_x + nx] if (pad_y or pad_x) else field

    def planes_per_batch(self, complex_pixels: int = PLANE_BATCH_PIXELS) -> int:
        """How many planes of this (padded) frame fit in ``complex_pixels`` at once; at least one."""
        pad_y, pad_x = self.pad
        ny, nx = self.shape
        return max(1, complex_pixels // ((ny + 2 * pad_y) * (nx + 2 * pad_x)))

    def reconstruct(self, z) -> Reconstruction:
        """Amplitude and phase of the field propagated back by ``z`` (metres from the sensor)."""
        xp = self.xp
        z = xp.asarray(z, dtype=xp.float64, device=array_api_compat.device(self.spectrum))
        return amplitude_phase(self(-z))


def _pad(field, pad: tuple[int, int], value: float):
    xp = array_api_compat.array_namespace(field)
    pad_y, pad_x = pad
    ny, nx = field.shape[-2:]
    out = xp.full((*field.shape[:-2], ny + 2 * pad_y, nx + 2 * pad_x), value, dtype=field.dtype,
                  device=array_api_compat.device(field))
    out[..., pad_y:pad_y + ny, pad_x:pad_x + nx] = field
    return out


def propagate(field, z, *, wavelength: float, dx: float, dy: float | None = None,
              pad: int | tuple[int, int] = 0, pad_value: float = 1.0, band_limit: bool = False):
    """Angular-spectrum propagation of ``field`` (..., ny, nx) by ``z`` metres (scalar or 1-D).

    For a 1-D ``z`` a plane axis is inserted before the last two axes and all planes go through one
    batched inverse FFT. Real input becomes complex64 (complex128 for float64 input).
    """
    propagator = Propagator(field, wavelength=wavelength, dx=dx, dy=dy, pad=pad, pad_value=pad_value,
                            band_limit=band_limit)
    return propagator(z, consume=array_api_compat.array_namespace(field).asarray(z).ndim == 0)


def amplitude_phase(field) -> Reconstruction:
    xp = array_api_compat.array_namespace(field)
    return Reconstruction(xp.abs(field), xp.atan2(xp.imag(field), xp.real(field)))


def hologram_field(hologram, background=None):
    """Complex field ``I / background`` of an intensity hologram (..., ny, nx), the in-line norm.

    ``I / I0 = |1 + s|² = 1 + s + s* + |s|²``: back-propagated, ``s`` refocuses to ``-disk`` and
    ``s*`` to a spread-out twin image, so an opaque particle reconstructs dark (amplitude ~0.2).
    (``sqrt(I / I0) ≈ 1 + Re s`` would refocus only half the disk.) ``background`` defaults to each
    hologram's mean intensity; pass an image (e.g. the beam profile) for non-uniform illumination.
    """
    xp = array_api_compat.array_namespace(hologram)
    real = _real_dtype(xp, _complex_dtype(xp, hologram.dtype))
    intensity = xp.astype(hologram, real)
    if background is None:
        background = xp.mean(intensity, axis=(-2, -1), keepdims=True)
    positive = background > 0 if isinstance(background, (int, float)) else bool(xp.all(background > 0))
    if not positive:
        raise ValueError("hologram background intensity must be positive everywhere")
    return xp.astype(intensity / background, _complex_dtype(xp, real))


def reconstruct(hologram, z, *, wavelength: float, dx: float, dy: float | None = None,
                background=None, pad: int | tuple[int, int] = 0,
                band_limit: bool = False) -> Reconstruction:
    """Amplitude and phase of an intensity hologram reconstructed at ``z`` metres from the sensor.

    For sweeps over many planes build ``Propagator(hologram_field(h), ...)`` once and call its
    ``reconstruct`` per batch of planes, so the hologram's FFT is computed only once.
    """
    propagator = Propagator(hologram_field(hologram, background), wavelength=wavelength, dx=dx,
                            dy=dy, pad=pad, pad_value=1.0, band_limit=band_limit)
    return propagator.reconstruct(z)
