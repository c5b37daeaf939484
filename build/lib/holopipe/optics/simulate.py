"""Synthetic HOLODEC holograms: random opaque droplets, wave optics, camera noise.

Arrays here are laid out ``(ny, nx)`` like :mod:`holopipe.optics.propagation`; the file writer
(:meth:`~holopipe.core.io.HolodecWriter.write_image_yx`) stores them in the contract's x-first
``image(hologram_number, xsize, ysize)``. Lengths are metres in the API, µm in the file.

Two optical models:

``angular_spectrum`` (exact for opaque disks, with shading)
    The plane wave passes the particle volume from far to near in thin z slabs. At each slab the
    field is multiplied by the slab's screen ``1 - S`` and then propagated to the next slab, and
    finally to the sensor, so a particle's shadow is itself shaded by particles nearer the sensor.
    Particles of one slab share one full-frame propagation; each particle's offset from the slab's
    plane is applied exactly by propagating its own disk in a small window (the disk is built from
    its analytic spectrum, so sub-pixel positions and sizes are exact).
``fraunhofer`` (fast closed form, no shading)
    ``U = 1 + Σ i C e^{iΦ} 2J1(u)/u`` per particle, evaluated only where the term exceeds
    ``FRAUNHOFER_CUTOFF``; valid in the far field ``z >> D²/λ``.

The frame-sized array work runs in one array namespace ``xp``: numpy on the CPU, CuPy on a GPU
(``simulate.device``, :func:`holopipe.core.device.array_namespace_for`). Random numbers are drawn on the host from
the numpy Generator and uploaded, and the small per-particle windows are computed on the host, so a GPU gives
the CPU's holograms within float tolerance (the camera's draws stay on the host: its image is the host's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import array_api_compat
import array_api_compat.numpy as numpy_xp
import numpy as np
import scipy.fft
from tqdm.auto import tqdm

from holopipe import __version__
from holopipe.core.device import array_namespace_for, host_array, scipy_for
from holopipe.core.io import DUST_ATTRS, HolodecWriter, pixel_centres
from holopipe.optics.propagation import TransferFunction, fft2, ifft2

__all__ = [
    "Artifacts",
    "Camera",
    "DiameterModel",
    "Optics",
    "ParticleSet",
    "SimulationSettings",
    "camera_image",
    "fringe_pattern",
    "fringe_profile",
    "ideal_sensor_image",
    "fraunhofer_field",
    "opaque_disks_field",
    "sample_outside",
    "sample_particles",
    "simulate_file",
    "simulate_hologram",
    "window_dust",
]

FRAUNHOFER_CUTOFF = 1e-3
"""Amplitude below which a particle's Fraunhofer term is not evaluated (≈ 0.25 gray level at 128)."""

WINDOW_SPREAD_FACTOR = 4.0
"""Local windows extend this many diffraction spreads λ|δz|/D beyond the disk on each side."""

WINDOW_MARGIN_PIXELS = 8
"""Extra pixels around each local window for the band-limited disk's edge ringing."""


@dataclass(frozen=True)
class Optics:
    """Instrument geometry: wavelength, pixel pitch and z range in metres, frame size in pixels."""

    wavelength: float
    dx: float
    dy: float
    nx: int
    ny: int
    z_min: float
    z_max: float


@dataclass(frozen=True)
class DiameterModel:
    """Droplet diameters (m): NCAR's gamma n(D) ∝ D^µ e^(-λD), µ ~ U[mu_low, mu_high] per hologram,
    redrawn outside [d_min, d_max]; or uniform in [d_min, d_max]."""

    distribution: str = "gamma"
    gamma_lambda: float = 1.0e5
    mu_low: float = 1.0
    mu_high: float = 5.0
    d_min: float = 1.0e-5
    d_max: float = 7.0e-5

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.distribution == "uniform":
            return rng.uniform(self.d_min, self.d_max, n)
        mu = rng.uniform(self.mu_low, self.mu_high)
        diameters = np.empty(0)
        for _ in range(1000):
            draws = rng.gamma(mu + 1.0, 1.0 / self.gamma_lambda, max(2 * n, 16))
            draws = draws[(draws >= self.d_min) & (draws <= self.d_max)]
            diameters = np.concatenate([diameters, draws])
            if diameters.size >= n:
                return diameters[:n]
        raise ValueError(f"gamma diameters (µ={mu:.2f}, λ={self.gamma_lambda:g}/m) almost never fall in "
                         f"[{self.d_min:g}, {self.d_max:g}] m; widen the diameter range")


@dataclass(frozen=True)
class Camera:
    """Sensor model: Gaussian beam with optional straight fringes, Poisson shot noise, Gaussian read noise,
    gain, 8-bit clip."""

    noise: bool = True
    electrons: float = 20000.0
    read_noise: float = 12.0
    gray_level: float = 128.0
    beam_waist: float | None = 2.0e-3
    fringe_amplitude: float = 0.0
    fringe_period: float = 5.0e-4


@dataclass(frozen=True)
class Artifacts:
    """What real holograms carry beside droplets (``simulate.ice``, ``window_dust``, ``outside``): ice,
    contamination on the windows, particles just outside the sample volume. None of it by default."""

    ice_fraction: float = 0.0
    ice_aspect: tuple[float, float] = (1.5, 4.0)
    ice_column_fraction: float = 0.5
    dust_count: int = 0
    dust_diameter: tuple[float, float] = (2.0e-5, 8.0e-5)
    dust_z: float | None = None
    """Depth (m) of the window the dust sits on; None: the sample volume's near edge, z_min."""
    outside_count: tuple[int, int] = (0, 0)
    outside_margin: float = 2.0e-3


@dataclass(frozen=True)
class SimulationSettings:
    optics: Optics
    particles: tuple[int, int] = (3, 12)
    diameter: DiameterModel = DiameterModel()
    camera: Camera = Camera()
    artifacts: Artifacts = Artifacts()
    method: str = "angular_spectrum"
    slab_thickness: float = 1.0e-3
    pad: int = 64
    band_limit: bool = True
    device: str = "cpu"
    """Where the frame-sized array work runs (``simulate.device``): cpu, auto, cuda or cuda:N."""

    @classmethod
    def from_config(cls, config: dict) -> "SimulationSettings":
        """Settings from a validated holopipe config (``optics`` and ``simulate`` sections)."""
        o, s = config["optics"], config["simulate"]
        d, c = s["diameter"], s["camera"]
        return cls(
            optics=Optics(o["wavelength"], o["dx"], o["dy"], o["nx"], o["ny"], o["z_min"], o["z_max"]),
            particles=(int(s["particles"][0]), int(s["particles"][1])),
            diameter=DiameterModel(d["distribution"], d["gamma_lambda"], d["gamma_mu"][0],
                                   d["gamma_mu"][1], d["min"], d["max"]),
            camera=Camera(c["noise"], c["electrons"], c["read_noise"], c["gray_level"],
                          c["beam_waist"], c["fringe_amplitude"], c["fringe_period"]),
            artifacts=Artifacts(
                ice_fraction=s["ice"]["fraction"], ice_aspect=tuple(s["ice"]["aspect"]),
                ice_column_fraction=s["ice"]["column_fraction"], dust_count=s["window_dust"]["count"],
                dust_diameter=tuple(s["window_dust"]["diameter"]), dust_z=s["window_dust"]["z"],
                outside_count=tuple(s["outside"]["count"]), outside_margin=s["outside"]["margin"]),
            method=s["method"],
            slab_thickness=s["slab_thickness"],
            pad=s["pad"],
            band_limit=s["band_limit"],
            device=s["device"],
        )


@dataclass(frozen=True)
class ParticleSet:
    """Particle positions and diameters in metres; x, y from the frame centre, z from the sensor.

    ``d`` is the equal-area diameter. Without ``aspect`` every particle is a disk (a droplet); with it,
    particle ``i`` of ``aspect[i] > 1`` is ice: an ellipse (a plate seen at an angle, or an irregular
    crystal) or, where ``column[i]``, a rectangle, ``aspect[i]`` times longer than wide, its long axis at
    ``angle[i]`` (radians from x).
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    d: np.ndarray
    aspect: np.ndarray | None = None
    angle: np.ndarray | None = None
    column: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.z)

    def subset(self, index) -> "ParticleSet":
        shape = (None, None, None) if self.aspect is None else (self.aspect[index], self.angle[index],
                                                                 self.column[index])
        return ParticleSet(self.x[index], self.y[index], self.z[index], self.d[index], *shape)

    def shapes(self) -> list[tuple[float, float, bool]]:
        """(aspect, angle, column) per particle: (1, 0, False) for a disk."""
        if self.aspect is None:
            return [(1.0, 0.0, False)] * len(self)
        return list(zip(self.aspect.tolist(), self.angle.tolist(), self.column.tolist()))

    @staticmethod
    def joined(*sets: "ParticleSet") -> "ParticleSet":
        """One set of several, shapes kept (disks where a set has none)."""
        shapes = [shape for part in sets for shape in part.shapes()]
        aspect, angle, column = (np.array([shape[i] for shape in shapes], dtype)
                                 for i, dtype in enumerate((np.float64, np.float64, bool)))
        return ParticleSet(*(np.concatenate([getattr(part, name) for part in sets]) for name in "xyzd"),
                           aspect, angle, column)


def sample_particles(rng: np.random.Generator, settings: SimulationSettings) -> ParticleSet:
    """Count, x, y uniform over the frame, z uniform in [z_min, z_max], diameters from the model; with
    ``artifacts.ice_fraction``, that share of them ice (:class:`ParticleSet`'s shapes: aspect uniform in
    ``ice_aspect``, any angle, columns with ``ice_column_fraction``). Ice is drawn after everything else, so
    a split without it keeps its holograms."""
    o, artifacts = settings.optics, settings.artifacts
    n = int(rng.integers(settings.particles[0], settings.particles[1] + 1))
    x = rng.uniform(-o.nx * o.dx / 2, o.nx * o.dx / 2, n)
    y = rng.uniform(-o.ny * o.dy / 2, o.ny * o.dy / 2, n)
    z = rng.uniform(o.z_min, o.z_max, n)
    d = settings.diameter.sample(rng, n)
    if artifacts.ice_fraction <= 0:
        return ParticleSet(x, y, z, d)
    ice = rng.uniform(size=n) < artifacts.ice_fraction
    aspect = np.where(ice, rng.uniform(*artifacts.ice_aspect, n), 1.0)
    angle = np.where(ice, rng.uniform(0, np.pi, n), 0.0)
    return ParticleSet(x, y, z, d, aspect, angle, ice & (rng.uniform(size=n) < artifacts.ice_column_fraction))


def sample_outside(rng: np.random.Generator, settings: SimulationSettings) -> ParticleSet:
    """Droplets just outside the sample volume (``artifacts.outside_count`` of them, up to ``outside_margin``
    nearer than z_min, but no nearer than z_min / 2 (the sensor is at 0), or up to ``outside_margin`` farther
    than z_max, either side alike): their rings cross the frame, but they are not in the truth, and a method
    that reports them reports particles that are not there."""
    o, artifacts = settings.optics, settings.artifacts
    n = int(rng.integers(artifacts.outside_count[0], artifacts.outside_count[1] + 1))
    beyond = rng.uniform(0, 1, n)
    near = rng.uniform(size=n) < 0.5
    z = np.where(near, o.z_min - beyond * min(artifacts.outside_margin, o.z_min / 2),
                 o.z_max + beyond * artifacts.outside_margin)
    x = rng.uniform(-o.nx * o.dx / 2, o.nx * o.dx / 2, n)
    y = rng.uniform(-o.ny * o.dy / 2, o.ny * o.dy / 2, n)
    return ParticleSet(x, y, z, settings.diameter.sample(rng, n))


DUST_STREAM = (0, 1)
"""Appended to a file's seed for its window dust: a stream that no hologram's ``(seed, index)`` is."""


def window_dust(seed: int, settings: SimulationSettings) -> ParticleSet:
    """The contamination on a file's window (``artifacts.dust_count`` specks, diameters uniform in
    ``dust_diameter``, at ``dust_z``): drawn once per file from ``(seed, *DUST_STREAM)``, so every hologram of
    the file carries it at the same place, as dust on a probe's window does through a flight."""
    o, artifacts = settings.optics, settings.artifacts
    rng = np.random.default_rng([seed, *DUST_STREAM])
    n = artifacts.dust_count
    x = rng.uniform(-o.nx * o.dx / 2, o.nx * o.dx / 2, n)
    y = rng.uniform(-o.ny * o.dy / 2, o.ny * o.dy / 2, n)
    z = np.full(n, o.z_min if artifacts.dust_z is None else artifacts.dust_z)
    return ParticleSet(x, y, z, rng.uniform(*artifacts.dust_diameter, n))


def dust_attrs(dust: ParticleSet) -> dict:
    """The file attributes of ``dust`` (metres; :data:`holopipe.core.io.DUST_ATTRS`, µm), none when there is none."""
    if not len(dust):
        return {}
    return {name: [float(v) * 1e6 for v in getattr(dust, axis)] for axis, name in DUST_ATTRS.items()}


def _airy(u):
    """The Airy amplitude 2 J1(u) / u of a disk (1 at u = 0), in its far field and its spectrum alike."""
    xp = array_api_compat.array_namespace(u)
    return xp.where(u > 0, 2.0 * scipy_for(xp, "special").j1(u) / xp.where(u > 0, u, 1.0), 1.0)


def _shape_axes(diameter: float, aspect: float, column: bool) -> tuple[float, float]:
    """(long, short) extent in m of a shape of equal-area ``diameter``: an ellipse's semi-axes (a disk's
    radius twice), a rectangle's sides."""
    area = np.pi * diameter**2 / 4
    if column:
        long = math.sqrt(area * aspect)
        return long, long / aspect
    short = math.sqrt(area / (np.pi * aspect))
    return aspect * short, short


def _sinc(xp, x):
    """sin(πx)/(πx), 1 at 0, in any array library."""
    return xp.where(x != 0, xp.sin(np.pi * x) / (np.pi * xp.where(x != 0, x, 1.0)), 1.0)


def _aperture(fx, fy, diameter: float, aspect: float = 1.0, angle: float = 0.0, column: bool = False):
    """The shape's Fourier transform over its area (1 at zero frequency) at spatial frequencies ``fx``, ``fy``
    (1/m, any array library): a disk's 2J1(u)/u (u = πDρ), an ellipse's the same over its scaled axes, a
    rectangle's sinc · sinc. It is the opaque screen's angular spectrum and, at f = x/λz, its Fraunhofer
    pattern alike."""
    xp = array_api_compat.array_namespace(fx, fy)
    long, short = _shape_axes(diameter, aspect, column)
    if aspect == 1.0 and not column:
        return _airy(np.pi * diameter * xp.sqrt(fx**2 + fy**2))
    along = fx * math.cos(angle) + fy * math.sin(angle)
    across = fy * math.cos(angle) - fx * math.sin(angle)
    if column:
        return _sinc(xp, long * along) * _sinc(xp, short * across)
    return _airy(2 * np.pi * xp.sqrt((long * along) ** 2 + (short * across) ** 2))


def _smallest_width(diameter: float, shape: tuple) -> float:
    """The narrowest width in m of a particle (``shape`` as :meth:`ParticleSet.shapes`): it sets how far
    its diffraction spreads."""
    short = _shape_axes(diameter, shape[0], shape[2])[1]
    return short if shape[2] else 2 * short


def _disk_window(particle_x: float, particle_y: float, diameter: float, dz: float, optics: Optics,
                 origin_x: float, origin_y: float, transfer_cache: dict, shape: tuple = (1.0, 0.0, False)):
    """The particle's field ``P_dz(A)`` in a small window; returns (window, first row, first column).

    ``origin_x``/``origin_y`` are the coordinates (m) of pixel (0, 0) of the frame the window goes
    into. The window is centred on the pixel nearest the particle; the sub-pixel offset is a phase
    ramp on the shape's analytic spectrum, area · :func:`_aperture` (a disk's (πD²/4)·2J1(πDρ)/(πDρ));
    ``shape`` is ``(aspect, angle, column)`` (:meth:`ParticleSet.shapes`).
    """
    long, short = _shape_axes(diameter, shape[0], shape[2])
    extent = math.hypot(long, short) / 2 if shape[2] else long
    spread = WINDOW_SPREAD_FACTOR * optics.wavelength * abs(dz) / _smallest_width(diameter, shape)
    half_x = math.ceil((extent + spread) / optics.dx) + WINDOW_MARGIN_PIXELS
    half_y = math.ceil((extent + spread) / optics.dy) + WINDOW_MARGIN_PIXELS
    width_x = scipy.fft.next_fast_len(2 * half_x)
    width_y = scipy.fft.next_fast_len(2 * half_y)
    centre_col = round((particle_x - origin_x) / optics.dx)
    centre_row = round((particle_y - origin_y) / optics.dy)
    offset_x = particle_x - (origin_x + centre_col * optics.dx)
    offset_y = particle_y - (origin_y + centre_row * optics.dy)
    fx = np.fft.fftfreq(width_x, optics.dx)
    fy = np.fft.fftfreq(width_y, optics.dy)
    aperture = _aperture(fx[None, :], fy[:, None], diameter, *shape)
    spectrum = (np.pi * diameter**2 / 4) * aperture / (optics.dx * optics.dy)
    spectrum = spectrum * np.exp(-2j * np.pi * (fx[None, :] * offset_x + fy[:, None] * offset_y))
    key = (width_y, width_x)
    if key not in transfer_cache:
        transfer_cache[key] = TransferFunction(key, wavelength=optics.wavelength, dx=optics.dx,
                                               dy=optics.dy)
    spectrum = spectrum * transfer_cache[key](dz, dtype=np.complex128)
    window = np.fft.fftshift(np.fft.ifft2(spectrum))
    return window.astype(np.complex64), centre_row - width_y // 2, centre_col - width_x // 2


def _add_clipped(frame, window, row0: int, col0: int) -> None:
    """frame[row0:, col0:] += window, dropping what falls outside the frame."""
    rows = slice(max(row0, 0), min(row0 + window.shape[0], frame.shape[0]))
    cols = slice(max(col0, 0), min(col0 + window.shape[1], frame.shape[1]))
    if rows.start < rows.stop and cols.start < cols.stop:
        frame[rows, cols] += window[rows.start - row0:rows.stop - row0, cols.start - col0:cols.stop - col0]


def opaque_disks_field(particles: ParticleSet, optics: Optics, *, slab_thickness: float = 1.0e-3,
                       pad: int = 0, band_limit: bool = True, xp=numpy_xp):
    """Complex field (ny, nx) at the sensor behind opaque disks lit by a unit plane wave, an ``xp`` array.

    Angular spectrum through z slabs, far to near, with shading (see the module docstring). Cost:
    one full-frame FFT pair per occupied slab (in ``xp``), plus one small FFT per particle (on the host,
    its window uploaded).
    """
    ny, nx = optics.ny + 2 * pad, optics.nx + 2 * pad
    field = xp.ones((ny, nx), dtype=xp.complex64)
    if len(particles) == 0:
        return field[pad:pad + optics.ny, pad:pad + optics.nx]
    origin_x = (pixel_centres(optics.nx, optics.dx)[0] - pad * optics.dx)
    origin_y = (pixel_centres(optics.ny, optics.dy)[0] - pad * optics.dy)
    transfer = TransferFunction((ny, nx), wavelength=optics.wavelength, dx=optics.dx, dy=optics.dy,
                                band_limit=band_limit, xp=xp)
    window_transfers: dict = {}
    slab_index = np.floor((particles.z - optics.z_min) / slab_thickness).astype(int)
    plane = None
    for slab in sorted(set(slab_index.tolist()), reverse=True):
        members = particles.subset(slab_index == slab)
        slab_z = 0.5 * (members.z.min() + members.z.max())
        if plane is not None:
            field = ifft2(transfer.apply(fft2(field), plane - slab_z), overwrite=True)
        screen = xp.zeros((ny, nx), dtype=xp.complex64)
        for x, y, z, d, shape in zip(members.x, members.y, members.z, members.d, members.shapes()):
            window, row0, col0 = _disk_window(x, y, d, z - slab_z, optics, origin_x, origin_y,
                                              window_transfers, shape)
            _add_clipped(screen, xp.asarray(window), row0, col0)
        field *= 1 - screen
        plane = slab_z
    field = ifft2(transfer.apply(fft2(field), plane), overwrite=True)
    return field[pad:pad + optics.ny, pad:pad + optics.nx]


def fraunhofer_field(particles: ParticleSet, optics: Optics, xp=numpy_xp):
    """Complex field (ny, nx) at the sensor from the far-field closed form, summed over particles (an ``xp``
    array; each particle's rows and columns are chosen on the host).

    Each term ``i C e^{iΦ} 2J1(u)/u`` (C = πD²/4λz, Φ = πr²/λz, u = πDr/λz) is evaluated out to the
    radius where its envelope ``1.6 C u^-1.5`` drops below ``FRAUNHOFER_CUTOFF``, and no further than
    where its fringes pass the pixel Nyquist frequency (r = λz/2dx), beyond which pixels average them.
    """
    field = xp.ones((optics.ny, optics.nx), dtype=xp.complex64)
    xs, ys = pixel_centres(optics.nx, optics.dx), pixel_centres(optics.ny, optics.dy)
    xs_on_device, ys_on_device = xp.asarray(xs), xp.asarray(ys)
    for x, y, z, d, shape in zip(particles.x, particles.y, particles.z, particles.d, particles.shapes()):
        c = np.pi * d**2 / (4 * optics.wavelength * z)
        u_max = (1.6 * c / FRAUNHOFER_CUTOFF) ** (2 / 3)
        radius = min(u_max * optics.wavelength * z / (np.pi * _smallest_width(d, shape)),
                     optics.wavelength * z / (2 * max(optics.dx, optics.dy)))
        cols = np.flatnonzero(np.abs(xs - x) <= radius)
        rows = np.flatnonzero(np.abs(ys - y) <= radius)
        if cols.size == 0 or rows.size == 0:
            continue
        rows, cols = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)  # the pixels within radius
        offset_y, offset_x = ys_on_device[rows, None] - y, xs_on_device[None, cols] - x
        r2 = offset_y**2 + offset_x**2
        pattern = _aperture(offset_x / (optics.wavelength * z), offset_y / (optics.wavelength * z), d, *shape)
        term = 1j * c * xp.exp(1j * np.pi * r2 / (optics.wavelength * z)) * pattern
        field[rows, cols] += xp.astype(term, xp.complex64)
    return field


def beam_profile(optics: Optics, beam_waist: float | None, xp=numpy_xp):
    """Relative intensity (ny, nx) of a Gaussian beam exp(-2r²/w²) centred on the frame; 1 if flat."""
    if beam_waist is None:
        return xp.ones((optics.ny, optics.nx), dtype=xp.float32)
    xs, ys = pixel_centres(optics.nx, optics.dx), pixel_centres(optics.ny, optics.dy)
    profile_x = xp.asarray(np.exp(-2 * xs**2 / beam_waist**2))
    profile_y = xp.asarray(np.exp(-2 * ys**2 / beam_waist**2))
    return xp.astype(profile_y[:, None] * profile_x[None, :], xp.float32)


def fringe_pattern(x_m, y_m, amplitude: float, period_m: float, angle: float, phase: float):
    """Relative intensity 1 + a·sin(2π(x cos θ + y sin θ)/period + φ) of straight optics fringes at pixel
    centres ``x_m`` (1, nx) and ``y_m`` (ny, 1), in metres, arrays of any namespace; the camera model and the
    augmentation share it."""
    along = (np.cos(angle) * x_m + np.sin(angle) * y_m) / period_m  # cycles
    return 1 + amplitude * array_api_compat.array_namespace(along).sin(2 * np.pi * along + phase)


def fringe_profile(rng: np.random.Generator, optics: Optics, amplitude: float, period: float, xp=numpy_xp):
    """Relative intensity (ny, nx) of the camera's straight optics fringes (:func:`fringe_pattern`), with the
    angle θ ∈ [0, π) and phase φ drawn from ``rng`` and the cosine form cos(...) = sin(... + π/2); 1 (and
    nothing drawn) when ``amplitude`` is 0."""
    if amplitude == 0:
        return xp.ones((optics.ny, optics.nx), dtype=xp.float32)
    angle, phase = rng.uniform(0.0, np.pi), rng.uniform(0.0, 2 * np.pi)
    x = xp.asarray(pixel_centres(optics.nx, optics.dx)[None, :])
    y = xp.asarray(pixel_centres(optics.ny, optics.dy)[:, None])
    return xp.astype(fringe_pattern(x, y, amplitude, period, angle, phase + np.pi / 2), xp.float32)


def camera_image(field, rng: np.random.Generator, optics: Optics, camera: Camera) -> np.ndarray:
    """uint8 image (ny, nx) on the host that the sensor records for ``field`` (any namespace): |U|²·beam·fringes
    → electrons (+ shot and read noise, drawn on the host from ``rng``) → gain to ``gray_level`` → round and
    clip to 0..255."""
    _check_frame(field, optics)
    xp = array_api_compat.array_namespace(field)
    light = beam_profile(optics, camera.beam_waist, xp) * fringe_profile(
        rng, optics, camera.fringe_amplitude, camera.fringe_period, xp)
    electrons = (xp.abs(field) ** 2) * light * camera.electrons
    if camera.noise:
        electrons = rng.poisson(host_array(electrons, np.float32)).astype(np.float32)
        electrons += rng.normal(0.0, camera.read_noise, electrons.shape).astype(np.float32)
        xp = numpy_xp  # the noisy electrons are on the host, with the draws
    gray = electrons * (camera.gray_level / camera.electrons)
    return host_array(xp.astype(xp.clip(xp.round(gray), 0, 255), xp.uint8), np.uint8)


def ideal_sensor_image(field, optics: Optics, camera: Camera) -> np.ndarray:
    """float32 image (ny, nx) on the host of an ideal sensor for ``field`` (any namespace): |U|² ·
    ``gray_level`` under flat light, without noise or quantisation. For holograms that augmentation
    corrupts, so that it adds the camera once, not twice."""
    _check_frame(field, optics)
    xp = array_api_compat.array_namespace(field)
    return host_array(xp.astype(xp.abs(field) ** 2 * camera.gray_level, xp.float32), np.float32)


def _check_frame(field, optics: Optics) -> None:
    if field.shape != (optics.ny, optics.nx):
        raise ValueError(f"field shape {field.shape} is not the frame (ny, nx) = {(optics.ny, optics.nx)}")


def simulate_hologram(rng: np.random.Generator, settings: SimulationSettings, *, ideal_sensor: bool = False,
                      xp=numpy_xp, dust: ParticleSet | None = None) -> tuple[np.ndarray, ParticleSet]:
    """One hologram: (image (ny, nx) on the host, its particles in metres), its field computed in ``xp``. The
    image is the camera's uint8 one, or with ``ideal_sensor`` :func:`ideal_sensor_image`'s float32 one (the
    particles are the same either way). The particles returned are the sample volume's: the ``dust`` (its
    file's :func:`window_dust`) and the droplets just outside (:func:`sample_outside`) are in the image only."""
    particles = seen = sample_particles(rng, settings)
    if settings.artifacts.outside_count[1] > 0 or (dust is not None and len(dust)):
        seen = ParticleSet.joined(particles, sample_outside(rng, settings),
                                  *([dust] if dust is not None else []))
    if settings.method == "fraunhofer":
        field = fraunhofer_field(seen, settings.optics, xp)
    elif settings.method == "angular_spectrum":
        field = opaque_disks_field(seen, settings.optics, slab_thickness=settings.slab_thickness,
                                   pad=settings.pad, band_limit=settings.band_limit, xp=xp)
    else:
        raise ValueError(f"unknown simulation method {settings.method!r}; "
                         "expected 'angular_spectrum' or 'fraunhofer'")
    if ideal_sensor:
        return ideal_sensor_image(field, settings.optics, settings.camera), particles
    return camera_image(field, rng, settings.optics, settings.camera), particles


def simulate_file(path, *, n_holograms: int, seed: int, settings: SimulationSettings,
                  ideal_sensor: bool = False, progress: bool = True) -> Path:
    """Write ``n_holograms`` synthetic holograms to a contract netCDF file, one at a time.

    Hologram ``i`` uses the random stream ``(seed, i)``, so a file is reproducible and any hologram
    can be regenerated alone. Memory stays at one hologram; the file appears only when complete.
    ``ideal_sensor`` stores float32 noise-free images (:func:`ideal_sensor_image`) instead of the camera's.
    The fields are computed on ``settings.device`` (a GPU fails here, before any file is written, if missing).
    """
    if n_holograms < 1:
        raise ValueError(f"n_holograms must be at least 1, got {n_holograms}")
    xp = array_namespace_for(settings.device, "simulate.device")
    o = settings.optics
    dust = window_dust(seed, settings)
    attrs = {"holopipe_version": __version__, "simulation_method": settings.method, "seed": seed,
             "sensor": "ideal" if ideal_sensor else "camera", **dust_attrs(dust)}
    with HolodecWriter(path, n_holograms=n_holograms, nx=o.nx, ny=o.ny, dx=o.dx, dy=o.dy,
                       wavelength=o.wavelength, z_min=o.z_min, z_max=o.z_max, attrs=attrs,
                       image_dtype=np.float32 if ideal_sensor else np.uint8) as writer:
        for index in tqdm(range(n_holograms), desc=f"simulate {Path(path).name}", unit="hologram",
                          disable=not progress):
            image, particles = simulate_hologram(np.random.default_rng([seed, index]), settings,
                                                 ideal_sensor=ideal_sensor, xp=xp, dust=dust)
            writer.write_image_yx(index, image)
            writer.append_particles(np.full(len(particles), index + 1), particles.x * 1e6,
                                    particles.y * 1e6, particles.z * 1e6, particles.d * 1e6)
    return Path(path)
