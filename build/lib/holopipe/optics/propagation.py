"""Angular-spectrum wave propagation for numpy, cupy and torch arrays.

One implementation serves every array library (array-API style through ``array_api_compat``): the
output has the input's library, device and precision. Fields are laid out ``(..., ny, nx)``: the last
axis has pixel pitch ``dx``, the one before it ``dy`` (metres). Positive ``z`` propagates towards the
sensor (object to hologram); reconstruction of a hologram uses ``-z``.

Precision: the carrier ``exp(ikz)`` is dropped (it is one global phase per plane) and the remaining
phase ``k z (sqrt(1 - a) - 1)`` with ``a = λ²(fx² + fy²)`` is evaluated in the cancellation-free form
``-k z a / (1 + sqrt(1 - a))`` in float64, reduced modulo 2π and only then cast to the field's
precision; at z = 158 mm the naive float32 phase would be off by 0.1–0.3 rad.

Speed: a plane costs one pass over the spectrum besides its inverse FFT. H depends on |fx| and |fy| only and
the band limit keeps a prefix of each axis, so per plane H is evaluated on the kept rectangle of the quarter
grid alone (for far planes a few per cent of it) and multiplied into the spectrum through its mirror images;
everything outside is zero. The 1/N of the inverse FFT is folded into a :class:`Propagator`'s spectrum, and a
sweep (:meth:`Propagator.reconstruct`) runs plane by plane through one reused buffer, writing amplitude and
phase of the crop straight into its output.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from holopipe.core.device import cpu_threads

__all__ = [
    "Propagator",
    "Reconstruction",
    "TransferFunction",
    "device_planes_per_batch",
    "effective_depth_of_focus",
    "frame_edges",
    "in_focus_contrast",
    "in_focus_contrast_at",
    "numerical_aperture",
    "planes_in_memory",
    "fft2",
    "hologram_field",
    "ifft2",
    "propagate",
    "reconstruct",
]


def _is_numpy(xp) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def fft2(x, *, norm: str = "backward"):
    """2-D FFT over the last two axes; scipy's FFT on the job's threads (:func:`holopipe.core.device.cpu_threads`)
    for numpy, the native one otherwise. ``norm`` as in numpy: "forward" divides by the pixel count here."""
    xp = array_api_compat.array_namespace(x)
    if _is_numpy(xp):
        import scipy.fft

        return scipy.fft.fft2(x, workers=cpu_threads(), norm=norm)
    return xp.fft.fftn(x, axes=(-2, -1), norm=norm)


def ifft2(x, *, overwrite: bool = False, norm: str = "backward"):
    """Inverse of :func:`fft2` over the last two axes; ``overwrite`` lets numpy and torch transform ``x`` in
    place (a fresh output's pages cost torch 10-20 % of a plane), and ``norm="forward"`` leaves out the 1/N (for
    a spectrum that carries it already)."""
    xp = array_api_compat.array_namespace(x)
    if _is_numpy(xp):
        import scipy.fft

        return scipy.fft.ifft2(x, workers=cpu_threads(), overwrite_x=overwrite, norm=norm)
    if overwrite and array_api_compat.is_torch_array(x):
        import torch

        return torch.fft.ifftn(x, dim=(-2, -1), norm=norm, out=x)
    return xp.fft.ifftn(x, axes=(-2, -1), norm=norm)


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


def _real_and_imaginary(array):
    """Writable views of a complex array's real and imaginary parts (torch has no ``.real`` to write
    through ``out=``; numpy and cupy do)."""
    if array_api_compat.is_torch_array(array):
        import torch

        parts = torch.view_as_real(array)
        return parts[..., 0], parts[..., 1]
    return array.real, array.imag


def _unit_phasor(phase, xp, complex_dtype):
    """exp(i·phase), cos and sin written straight into the complex result (a complex exp, or a sum of
    two complex temporaries, costs several times more)."""
    out = xp.empty(phase.shape, dtype=complex_dtype, device=array_api_compat.device(phase))
    real, imaginary = _real_and_imaginary(out)
    _library(out).cos(phase, out=real)
    _library(out).sin(phase, out=imaginary)
    return out


def _library(array):
    """The array's own module (numpy, cupy, torch) for its ``out=`` ufuncs, which the array API lacks: the one that
    made the array, so already imported (CuPy is imported by holopipe.core.device alone, when a GPU is asked for)."""
    return sys.modules[type(array).__module__.partition(".")[0]]


def _host_depths(z) -> np.ndarray:
    """Plane depths (metres, scalar or 1-D) as float64 numpy: each plane's band limit is decided on the host
    and its depth goes to the device as a kernel argument, so no depth array has to travel there."""
    if array_api_compat.is_torch_array(z):
        z = z.detach().cpu().numpy()
    elif array_api_compat.is_cupy_array(z):
        z = z.get()
    depths = np.asarray(z, dtype=np.float64)
    if depths.ndim > 1:
        raise ValueError(f"z must be a scalar or 1-D (metres), got shape {depths.shape}")
    return depths


class TransferFunction:
    """Angular-spectrum transfer function H(z) on one FFT grid, for any number of planes.

    H depends on |fx| and |fy| only, so it is evaluated on the quarter grid of distinct
    frequencies (4x less trigonometry) and mirrored. The z-independent factor
    ``a / (1 + sqrt(1 - a)) / λ`` (cycles per metre of z, float64) is computed once on the target
    device; per plane the phase is formed in float64 cycles, reduced to [-0.5, 0.5] and only then
    cast to the field's precision. The band limit keeps the quarter grid's first rows and columns
    (:meth:`kept_extent`): only they are evaluated.
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
        self._fy = np.arange(ny // 2 + 1, dtype=np.float64) / (ny * self.dy)  # host: the band limit's test
        self._fx = np.arange(nx // 2 + 1, dtype=np.float64) / (nx * self.dx)
        fy, fx = (xp.asarray(f, device=device) for f in (self._fy, self._fx))
        a = self.wavelength**2 * (fy[:, None] ** 2 + fx[None, :] ** 2)
        propagating = a < 1.0
        # Evanescent components (a >= 1) decay within a wavelength: cut them.
        self._evanescent_cut = None if bool(xp.all(propagating)) else propagating
        root = xp.sqrt(xp.where(propagating, 1.0 - a, xp.zeros_like(a)))
        self._cycles_per_metre = -a / (1.0 + root) / self.wavelength

    def kept_extent(self, z: float) -> tuple[int, int]:
        """Rows and columns of the quarter grid that H keeps at ``z``: a prefix of each axis, as |f| grows
        with the index. Matsushima & Shimobaba (2009): keep |f| < 1 / (λ sqrt((2 Δf z)² + 1)) per axis."""
        if not self.band_limit:
            return self._fy.size, self._fx.size
        ny, nx = self.shape
        limit_x = 1.0 / (self.wavelength * math.sqrt((2.0 * z / (nx * self.dx)) ** 2 + 1.0))
        limit_y = 1.0 / (self.wavelength * math.sqrt((2.0 * z / (ny * self.dy)) ** 2 + 1.0))
        return int(np.count_nonzero(self._fy < limit_y)), int(np.count_nonzero(self._fx < limit_x))

    def kept_block(self, z: float, dtype) -> Any:
        """H at one depth on the kept rows and columns of the quarter grid (:meth:`kept_extent`).

        The phase is formed in float64 cycles, reduced to [-0.5, 0.5] in place and only then cast to
        ``dtype``'s precision; ``z`` is a Python float, so it reaches the device as a kernel argument.
        """
        xp = self.xp
        rows, cols = self.kept_extent(z)
        cycles = self._cycles_per_metre[:rows, :cols] * z
        cycles -= xp.round(cycles)
        phase = xp.astype(cycles, _real_dtype(xp, dtype))
        phase *= 2.0 * math.pi
        transfer = _unit_phasor(phase, xp, dtype)
        if self._evanescent_cut is not None:
            keep = self._evanescent_cut[:rows, :cols]
            transfer = xp.where(keep, transfer, xp.zeros_like(transfer))
        return transfer

    def quarter(self, z, dtype=None):
        """H on the quarter grid of distinct |fx|, |fy|: shape (nz, ny//2 + 1, nx//2 + 1)."""
        xp = self.xp
        dtype = xp.complex64 if dtype is None else dtype
        depths = _host_depths(z).reshape(-1)
        out = xp.zeros((depths.size, *self._cycles_per_metre.shape), dtype=dtype,
                       device=array_api_compat.device(self._cycles_per_metre))
        for plane, depth in enumerate(depths.tolist()):
            block = self.kept_block(depth, dtype)
            out[plane, :block.shape[0], :block.shape[1]] = block
        return out

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

        Per plane, the spectrum's four corners within the band limit are multiplied by the kept block
        of H or its mirror images (free views in numpy and cupy) and the rest of ``out`` is zeroed: one
        pass over the spectrum at most. A 1-D ``z`` inserts a plane axis before the last two. ``out``
        may be ``spectrum`` itself for a scalar ``z``.
        """
        xp = self.xp
        depths = _host_depths(z)
        if out is None:
            shape = spectrum.shape if depths.ndim == 0 else (*spectrum.shape[:-2], depths.size, *self.shape)
            out = xp.empty(shape, dtype=spectrum.dtype, device=array_api_compat.device(spectrum))
        if depths.ndim == 0:
            _multiply_mirrored(spectrum, self.kept_block(float(depths), spectrum.dtype), out, xp)
            return out
        for plane, depth in enumerate(depths.tolist()):
            _multiply_mirrored(spectrum, self.kept_block(depth, spectrum.dtype), out[..., plane, :, :], xp)
        return out


def _multiply_mirrored(spectrum, block, out, xp) -> None:
    """out = spectrum (..., ny, nx) times the full-grid H whose quarter grid is zero beyond ``block``.

    Row r of an FFT axis holds |f| of quarter row min(r, ny - r): the block's rows 0..ky-1 serve rows
    0..ky-1 and, mirrored, the last min(ky - 1, ny - ny//2 - 1) rows; likewise for columns.
    """
    rows, cols = block.shape
    ny, nx = out.shape[-2:]
    tail_rows, tail_cols = min(rows - 1, ny - ny // 2 - 1), min(cols - 1, nx - nx // 2 - 1)
    row_blocks = ((slice(0, rows), block),
                  (slice(ny - tail_rows, ny), xp.flip(block[1:tail_rows + 1, :], axis=0)))
    for row_slice, row_block in row_blocks:
        _multiply_into(spectrum[..., row_slice, :cols], row_block, out[..., row_slice, :cols])
        _multiply_into(spectrum[..., row_slice, nx - tail_cols:], xp.flip(row_block[:, 1:tail_cols + 1], axis=1),
                       out[..., row_slice, nx - tail_cols:])
    out[..., rows:ny - tail_rows, :] = 0
    out[..., :rows, cols:nx - tail_cols] = 0
    out[..., ny - tail_rows:, cols:nx - tail_cols] = 0


def _multiply_into(a, b, out) -> None:
    """out[...] = a * b without a temporary (the array API has no ``out=``; every library here does)."""
    _library(out).multiply(a, b, out=out)


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
    ``spectrum`` is the padded field's FFT divided by its pixel count (the Fourier coefficients), so
    that no plane pays for the inverse FFT's 1/N. A propagator keeps one padded plane of scratch for
    :meth:`reconstruct` between calls, so it serves one thread at a time.
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
        self.spectrum = fft2(field, norm="forward")
        self._scratch = None  # reconstruct's padded plane: fresh pages on every batch cost 25 % of a torch sweep
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
        field = ifft2(self.transfer.apply(self.spectrum, z, out=out), overwrite=True, norm="forward")
        if consume:
            self.spectrum = None
        return self._crop(field)

    def _crop(self, field):
        """The frame (..., ny, nx) inside a padded field."""
        pad_y, pad_x = self.pad
        ny, nx = self.shape
        return field[..., pad_y:pad_y + ny, pad_x:pad_x + nx] if (pad_y or pad_x) else field

    def planes_per_batch(self, complex_pixels: int = PLANE_BATCH_PIXELS) -> int:
        """How many planes of this (padded) frame fit in ``complex_pixels`` at once; at least one."""
        pad_y, pad_x = self.pad
        ny, nx = self.shape
        return max(1, complex_pixels // ((ny + 2 * pad_y) * (nx + 2 * pad_x)))

    def reconstruct(self, z) -> Reconstruction:
        """Amplitude and phase of the field propagated back by ``z`` (metres from the sensor).

        Plane by plane through one padded buffer (transfer function, in-place inverse FFT where the
        library allows it), each plane's crop written straight into the batch's amplitude and phase:
        no batch-sized complex temporaries, whose fresh pages cost as much as the arithmetic.
        Host-side depths (numpy) spare a GPU the copy back that each plane's band limit needs.
        """
        return Reconstruction(*self._sweep(z, with_phase=True))

    def amplitude(self, z):
        """|E| alone, as :meth:`reconstruct` makes it: for the focus metrics, which need no phase."""
        return self._sweep(z, with_phase=False)[0]

    def _sweep(self, z, *, with_phase: bool) -> tuple[Any, Any]:
        xp = self.xp
        depths = _host_depths(z)
        ny, nx = self.shape
        lead = self.spectrum.shape[:-2]
        shape = (*lead, ny, nx) if depths.ndim == 0 else (*lead, depths.size, ny, nx)
        device = array_api_compat.device(self.spectrum)
        amplitude = xp.empty(shape, dtype=_real_dtype(xp, self.dtype), device=device)
        phase = xp.empty(shape, dtype=_real_dtype(xp, self.dtype), device=device) if with_phase else None
        if self._scratch is None:
            self._scratch = xp.empty(self.spectrum.shape, dtype=self.dtype, device=device)
        for plane, depth in enumerate(depths.reshape(-1).tolist()):
            self.transfer.apply(self.spectrum, -depth, out=self._scratch)
            field = self._crop(ifft2(self._scratch, overwrite=True, norm="forward"))
            at = (...,) if depths.ndim == 0 else (..., plane, slice(None), slice(None))
            _amplitude_phase_into(field, amplitude[at], phase[at] if with_phase else None)
        return amplitude, phase


def _amplitude_phase_into(field, amplitude, phase) -> None:
    """|field| and arg field written into ``amplitude`` and ``phase`` (same shape, real dtype; None: no phase).

    torch's complex abs and strided atan2 run unvectorised (4-20x slower): its real and imaginary parts
    are first copied into two planes, and hypot and atan2 run on those."""
    if array_api_compat.is_torch_array(field):
        import torch

        real, imaginary = torch.view_as_real(field).movedim(-1, 0).contiguous()
        torch.hypot(real, imaginary, out=amplitude)
        if phase is not None:
            torch.atan2(imaginary, real, out=phase)
        return
    library = _library(field)
    library.abs(field, out=amplitude)
    if phase is not None:
        library.arctan2(field.imag, field.real, out=phase)


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


SWEEP_BYTES_PER_PIXEL = 48
"""Device bytes one padded pixel of one plane costs in a sweep batch at its peak: the complex64 product S·H and
its inverse FFT (8 + 8), cuFFT's work area (up to 8), H's quarter-grid temporaries (about 10 per full-grid pixel)
and the amplitudes (4 each) that a pipelined sweep still holds of the batches before it."""

SWEEP_MEMORY_SHARE = 0.5
"""Share of the device memory free for a sweep that one batch may take: the rest absorbs the allocator's
fragmentation and whatever else the job keeps there."""

MAX_BATCH_ELEMENTS = 2**31 - 1
"""Padded pixels of all the planes of one batch at most: some CUDA kernels index in 32-bit integers."""


def planes_in_memory(propagator: Propagator, free_bytes: int) -> int:
    """Planes per sweep batch of ``propagator``'s (padded) frame that :data:`SWEEP_MEMORY_SHARE` of
    ``free_bytes`` holds at :data:`SWEEP_BYTES_PER_PIXEL`, and at most :data:`MAX_BATCH_ELEMENTS` pixels; at
    least one."""
    budget = int(SWEEP_MEMORY_SHARE * free_bytes) // SWEEP_BYTES_PER_PIXEL
    return propagator.planes_per_batch(min(budget, MAX_BATCH_ELEMENTS))


def device_planes_per_batch(propagator: Propagator) -> int:
    """Planes per batch of a sweep of ``propagator``'s hologram, sized for the device its spectrum is on.

    On a CUDA device (torch or CuPy) :func:`planes_in_memory` of its free memory (the allocator's cached,
    unused blocks count as free): a full-size frame is 23 M padded pixels, so the fixed
    :data:`PLANE_BATCH_PIXELS` would leave a GPU one plane per batch. Elsewhere (numpy, a CPU tensor)
    :meth:`Propagator.planes_per_batch`'s default, which keeps the host's memory to one small batch.
    """
    spectrum = propagator.spectrum
    if array_api_compat.is_torch_array(spectrum) and spectrum.device.type == "cuda":
        import torch

        free = torch.cuda.mem_get_info(spectrum.device)[0]
        free += torch.cuda.memory_reserved(spectrum.device) - torch.cuda.memory_allocated(spectrum.device)
    elif array_api_compat.is_cupy_array(spectrum):
        cupy = _library(spectrum)
        with spectrum.device:
            free = cupy.cuda.runtime.memGetInfo()[0] + cupy.get_default_memory_pool().free_bytes()
    else:
        return propagator.planes_per_batch()
    return planes_in_memory(propagator, free)


def _smaller(a, b):
    """Elementwise minimum by arithmetic: the same for floats, numpy, cupy and torch."""
    return (a + b - abs(a - b)) / 2


def _larger(a, b):
    """Elementwise maximum, as :func:`_smaller`."""
    return (a + b + abs(a - b)) / 2


def frame_edges(x, y, *, nx: int, ny: int, dx: float, dy: float):
    """Distances (m) from a point ``x, y`` (m, origin at the frame centre) to the frame's edges, at least half a
    pixel: ``(left, right), (top, bottom)``, as :func:`numerical_aperture` takes them. Any array library."""
    half_x, half_y = nx * dx / 2, ny * dy / 2
    return ((_larger(half_x + x, dx / 2), _larger(half_x - x, dx / 2)),
            (_larger(half_y + y, dy / 2), _larger(half_y - y, dy / 2)))


def numerical_aperture(z, diameter, edges_x, edges_y, *, wavelength: float):
    """The numerical aperture a particle's pattern is recorded through.

    A particle of diameter D diffracts into angles up to about λ/D, so its pattern reaches ``z λ / D`` on
    the sensor; the frame cuts it where an edge is nearer (``edges_x = (left, right)``, ``edges_y = (top,
    bottom)``: distances from the particle to the frame's edges, m, :func:`frame_edges`). Per axis NA is the
    mean reach of the two sides over z; the narrower axis sets it. Any array library.
    """
    return _smaller(*_axis_apertures(z, diameter, edges_x, edges_y, wavelength=wavelength))


def _axis_apertures(z, diameter, edges_x, edges_y, *, wavelength: float):
    """The numerical aperture along x and along y: the mean reach of the two sides over z."""
    reach = z * wavelength / diameter
    half_aperture_x = (_smaller(edges_x[0], reach) + _smaller(edges_x[1], reach)) / 2
    half_aperture_y = (_smaller(edges_y[0], reach) + _smaller(edges_y[1], reach)) / 2
    return half_aperture_x / z, half_aperture_y / z


def effective_depth_of_focus(z, diameter, edges_x, edges_y, *, wavelength: float):
    """Depth (m) over which a particle looks in focus: λ / NA², NA the aperture the particle actually sees
    (:func:`numerical_aperture`). Uncut, NA = λ/D and the depth is D²/λ; a small far droplet near the frame's
    edge (or in a small frame) stays in focus much longer. Any array library."""
    return wavelength / numerical_aperture(z, diameter, edges_x, edges_y, wavelength=wavelength) ** 2


J0_FIRST_ZERO = 2.404825557695773
"""The first zero of the Bessel function J0."""


def _bessel_j0_to_first_zero(u):
    """J0(u) for 0 <= u <= :data:`J0_FIRST_ZERO` by its power series (14 terms: 1e-12 there), in arithmetic any array
    library runs."""
    quarter_square, term, total = u * u / 4, 1.0, 1.0
    for k in range(1, 15):
        term = -term * quarter_square / (k * k)
        total = total + term
    return total


def in_focus_contrast(z, diameter, edges_x, edges_y, *, wavelength: float):
    """The darkness 1 - |E| at the centre of an opaque disk of this diameter imaged in focus through the aperture
    it is seen through: 1 - J0(π D NA / λ), the disk's spectrum summed over a round pupil of radius NA/λ, with NA
    the geometric mean of the apertures along x and y (:func:`numerical_aperture`'s, per axis; it matches the
    reconstructed contrast of a droplet behind a rectangular frame within 0.03).

    A droplet smaller than the resolution λ/(2 NA) is imaged faint however sharp its focus, about (π D NA /
    2λ)²: 10 µm at 140 mm behind a 3 mm frame reaches 0.22. From the first zero of J0 on the disk is resolved and
    the value is 1 (its oscillations beyond are the rim's ringing, not a fainter droplet). Any array library.
    """
    aperture_x, aperture_y = _axis_apertures(z, diameter, edges_x, edges_y, wavelength=wavelength)
    argument = math.pi * diameter * (aperture_x * aperture_y) ** 0.5 / wavelength
    return 1 - _bessel_j0_to_first_zero(_smaller(argument, J0_FIRST_ZERO))


def in_focus_contrast_at(x, y, z, diameter, *, nx: int, ny: int, dx: float, dy: float, wavelength: float):
    """:func:`in_focus_contrast` of a droplet of ``diameter`` at ``x, y`` (m, origin at the frame centre) and
    ``z`` in front of an nx x ny frame of dx x dy pixels. Any array library."""
    return in_focus_contrast(z, diameter, *frame_edges(x, y, nx=nx, ny=ny, dx=dx, dy=dy), wavelength=wavelength)
