"""Camera and optics corruptions that make clean synthetic holograms look like real ones.

The anchor project's detector beat the standard method on real holograms only once noise was added to
its synthetic training data, so the training split is augmented here with physical corruptions. They act
on raw intensities (gray levels, background near the hologram's mean gray, e.g. 128), before
standardization, in the order the config lists them.

Each corruption is a small frozen dataclass built from one config item: its fields are named exactly as
the item's keys (``Blur.sigma`` is ``sigma``), so a parameter cannot be read from a neighbour's key.
``corruption(image, rng)`` takes a float array ``(..., ny, nx)`` and a :class:`numpy.random.Generator`
and returns a new array of the same type, dtype and device; one call draws one set of random parameters
(beam centre, fringe angle, brightness factor, clutter particles) shared by the leading axes, and
independent noise per pixel. Every item first draws whether it applies (``probability``), so the random
stream does not depend on the outcome.

numpy arrays are the reference; CuPy arrays (the stage on a GPU, ``augment.device``) and torch (or any
array-API) tensors work too for every corruption: the randomness is drawn on the host with ``rng`` and moved
to the array's device (``shot_noise``'s Poisson draws too, so every library gets numpy's law), and ``blur``
is cupyx.scipy's ``gaussian_filter`` on CuPy and a direct separable convolution equal to scipy's elsewhere.
A rejection sampler's stream can drift from numpy's once float rounding moves a Poisson mean across one of
its thresholds, so a GPU's noisy variants equal the CPU's in law, and its noise-free ones within float
tolerance.

:func:`augment_file` is the workflow stage: ``variants`` corrupted copies of every hologram of a
regridded store, with the particle table remapped to the new hologram numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import array_api_compat
import array_api_compat.numpy as numpy_xp
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from holopipe import __version__
from holopipe.core.config import ConfigError, load_config
from holopipe.core.device import array_namespace_for, host_array, scipy_for
from holopipe.core.files import write_atomically
from holopipe.core.io import (
    IMAGE_DIMS,
    file_layout,
    hologram_image_yx,
    open_holodec,
    pixel_centres,
    row_major,
    write_zarr,
)
from holopipe.optics.simulate import Optics, ParticleSet, fringe_pattern, opaque_disks_field

__all__ = [
    "CORRUPTIONS",
    "Blur",
    "BrightnessContrast",
    "Clutter",
    "Corruption",
    "DeadHotPixels",
    "Illumination",
    "Pipeline",
    "Quantize",
    "ReadNoise",
    "ShotNoise",
    "augment_file",
    "build_corruptions",
    "optics_from_attrs",
]

FULL_SCALE_GRAY = 255.0
"""Largest gray level of the 8-bit scale the holograms are stored in (hot pixels, quantize's input range)."""

DEFAULT_MEAN_ELECTRONS = 20000.0
"""Electrons at the image mean assumed by read_noise when no shot_noise precedes it (NCAR's camera)."""

CLUTTER_PAD_PIXELS = 64
"""Background pixels added on each side while propagating clutter, so its fringes do not wrap around."""

BLUR_TRUNCATE = 4.0
"""The blur kernel reaches this many sigmas (scipy's default)."""


def _namespace(image):
    return array_api_compat.array_namespace(image)


def _to_like(values: np.ndarray, image):
    """A host numpy array as an array of ``image``'s library, dtype and device."""
    xp = _namespace(image)
    return xp.asarray(values, dtype=image.dtype, device=array_api_compat.device(image))


def _image_mean(image):
    """Mean gray level of each image over its last two axes, kept broadcastable: (..., 1, 1)."""
    return _namespace(image).mean(image, axis=(-2, -1), keepdims=True)


@dataclass(frozen=True, kw_only=True)
class Corruption:
    """Base: ``__call__`` draws whether to apply (``probability``), then calls :meth:`apply`."""

    PARAMETERS: ClassVar[tuple[str, ...]] = ()
    """The config keys besides ``type`` and ``probability``; the dataclass fields of the same names."""

    probability: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")

    def __call__(self, image, rng: np.random.Generator):
        if rng.random() < self.probability:
            return self.apply(image, rng)
        return image

    def apply(self, image, rng: np.random.Generator):
        raise NotImplementedError



@dataclass(frozen=True, kw_only=True)
class ShotNoise(Corruption):
    """Poisson photon noise with ``electrons`` at the image mean: variance in electrons equals the mean.

    Gray levels become electrons with the scale ``electrons / mean gray`` of each image, get Poisson
    noise and are scaled back, so the noise follows the local intensity (fringes, beam profile).
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ("electrons",)
    electrons: float = DEFAULT_MEAN_ELECTRONS

    def __post_init__(self):
        super().__post_init__()
        if not self.electrons > 0:
            raise ValueError(f"electrons must be positive, got {self.electrons}")

    def apply(self, image, rng):
        xp = _namespace(image)
        mean = _image_mean(image)
        if not bool(xp.all(mean > 0)):
            raise ValueError("shot_noise needs images with a positive mean gray level")
        per_gray = self.electrons / mean  # electrons per gray level, (..., 1, 1)
        electrons = xp.clip(image * per_gray, 0.0, None)
        if array_api_compat.is_numpy_array(image):
            noisy = rng.poisson(electrons)
        else:  # drawn on the host, as numpy's
            noisy = _to_like(rng.poisson(host_array(electrons, np.float32)), image)
        return xp.astype(noisy / per_gray, image.dtype)


@dataclass(frozen=True, kw_only=True)
class ReadNoise(Corruption):
    """Gaussian read noise of ``electrons`` rms, independent of the signal.

    Electrons per gray level as for shot noise: ``mean_electrons`` at the image mean, where
    ``mean_electrons`` is the ``electrons`` of the nearest preceding shot_noise item, or
    :data:`DEFAULT_MEAN_ELECTRONS` (20000 e-) when none precedes (:func:`build_corruptions` sets it).
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ("electrons",)
    electrons: float = 12.0
    mean_electrons: float = DEFAULT_MEAN_ELECTRONS

    def __post_init__(self):
        super().__post_init__()
        if not (self.electrons > 0 and self.mean_electrons > 0):
            raise ValueError(f"electrons ({self.electrons}) and mean_electrons ({self.mean_electrons}) "
                             "must be positive")

    def apply(self, image, rng):
        xp = _namespace(image)
        sigma_gray = self.electrons * _image_mean(image) / self.mean_electrons
        noise = _to_like(rng.standard_normal(image.shape, dtype=np.float32), image)
        return xp.astype(image + sigma_gray * noise, image.dtype)


@dataclass(frozen=True, kw_only=True)
class Quantize(Corruption):
    """Round to integers and clip to ``0 .. 2**bits - 1``.

    The input is on the 8-bit gray scale (0..255); for ``bits != 8`` it is first rescaled by
    ``(2**bits - 1) / 255`` so that 0..255 spans the new range, and the output stays on that scale
    (e.g. 0..4095 for 12 bits; standardization divides by the background, so the scale drops out).
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ("bits",)
    bits: int = 8

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {self.bits}")

    def apply(self, image, rng):
        xp = _namespace(image)
        levels = float(2**self.bits - 1)
        scaled = image if self.bits == 8 else image * (levels / FULL_SCALE_GRAY)
        return xp.clip(xp.round(scaled), 0.0, levels)


def _gaussian_weights(sigma: float) -> np.ndarray:
    """The sampled, normalised Gaussian kernel scipy's gaussian_filter uses (radius truncate·sigma)."""
    radius = int(BLUR_TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _blur_last_axis(image, weights: np.ndarray):
    """Correlate the last axis with ``weights`` (odd length), edges mirrored as scipy's 'reflect' mode."""
    xp = _namespace(image)
    radius, n = len(weights) // 2, image.shape[-1]
    if radius > n:
        raise ValueError(f"blur kernel radius {radius} exceeds the image size {n} pixels")
    padded = xp.concat([xp.flip(image[..., :radius], axis=-1), image,
                        xp.flip(image[..., n - radius:], axis=-1)], axis=-1)
    out = float(weights[0]) * padded[..., :n]
    for shift in range(1, len(weights)):
        out = out + float(weights[shift]) * padded[..., shift:shift + n]
    return out


@dataclass(frozen=True, kw_only=True)
class Blur(Corruption):
    """Gaussian blur of ``sigma`` pixels over the last two axes (defocus, motion, optics).

    Multiplies the spectrum by exp(-2π²σ²f²) (f in cycles per pixel), i.e. the power by exp(-(2πσf)²).
    numpy: scipy.ndimage.gaussian_filter; CuPy: cupyx.scipy's; other arrays: the same kernel as a direct
    separable convolution.
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ("sigma",)
    sigma: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")

    def apply(self, image, rng):
        xp = _namespace(image)
        if array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_cupy_namespace(xp):
            sigmas = (0.0,) * (image.ndim - 2) + (self.sigma, self.sigma)  # 0: leading axes left alone
            return scipy_for(xp, "ndimage").gaussian_filter(image, sigmas, mode="reflect", truncate=BLUR_TRUNCATE)
        weights = _gaussian_weights(self.sigma)
        along_x = _blur_last_axis(image, weights)
        return xp.matrix_transpose(_blur_last_axis(xp.matrix_transpose(along_x), weights))


@dataclass(frozen=True, kw_only=True)
class Illumination(Corruption):
    """Uneven lighting: a Gaussian beam ``exp(-2r²/w²)`` (``beam_waist`` w in m; None: flat) centred at a
    uniformly random point of the frame, times slow fringes ``1 + a·sin(2π k·r + φ)`` of
    ``fringe_period`` (m) at a random angle and phase.

    The beam's peak is 1 and lies inside the frame, so the mean gray level can only drop (to no less
    than exp(-2·diagonal²/w²)·(1 - a) of its value) apart from the fringes' ±a. ``optics`` gives the
    pixel pitch; the frame size is the image's.
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ("beam_waist", "fringe_amplitude", "fringe_period")
    beam_waist: float | None = None
    fringe_amplitude: float = 0.0
    fringe_period: float = 1.0e-3
    optics: Optics | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.optics is None:
            raise ValueError("illumination needs the optics (pixel pitch dx, dy)")
        if self.beam_waist is not None and not self.beam_waist > 0:
            raise ValueError(f"beam_waist must be positive or None, got {self.beam_waist}")
        if not 0 <= self.fringe_amplitude <= 1:
            raise ValueError(f"fringe_amplitude must be in [0, 1] (intensity stays >= 0), "
                             f"got {self.fringe_amplitude}")
        if not self.fringe_period > 0:
            raise ValueError(f"fringe_period must be positive, got {self.fringe_period}")

    def profile(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """Relative intensity (ny, nx) for a frame of ``shape`` (..., ny, nx), drawing its randomness."""
        ny, nx = shape[-2:]
        dx, dy = self.optics.dx, self.optics.dy
        x, y = pixel_centres(nx, dx)[None, :], pixel_centres(ny, dy)[:, None]
        profile = np.ones((ny, nx))
        if self.beam_waist is not None:
            centre_x = rng.uniform(-nx * dx / 2, nx * dx / 2)
            centre_y = rng.uniform(-ny * dy / 2, ny * dy / 2)
            profile = np.exp(-2 * ((x - centre_x) ** 2 + (y - centre_y) ** 2) / self.beam_waist**2)
        angle, phase = rng.uniform(0, 2 * np.pi, 2)
        return profile * fringe_pattern(x, y, self.fringe_amplitude, self.fringe_period, angle, phase)

    def apply(self, image, rng):
        return image * _to_like(self.profile(image.shape, rng), image)


@dataclass(frozen=True, kw_only=True)
class BrightnessContrast(Corruption):
    """Exposure jitter: mean × U[1-brightness, 1+brightness], deviations from the mean × U[1-contrast,
    1+contrast] (one draw per call; the mean is each image's)."""

    PARAMETERS: ClassVar[tuple[str, ...]] = ("brightness", "contrast")
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not (0 <= self.brightness <= 1 and 0 <= self.contrast <= 1):
            raise ValueError(f"brightness ({self.brightness}) and contrast ({self.contrast}) must be in [0, 1]")

    def apply(self, image, rng):
        gain = rng.uniform(1 - self.brightness, 1 + self.brightness)
        contrast = rng.uniform(1 - self.contrast, 1 + self.contrast)
        mean = _image_mean(image)
        return gain * mean + contrast * (image - mean)


@dataclass(frozen=True, kw_only=True)
class DeadHotPixels(Corruption):
    """round(``fraction`` × pixels) distinct pixels of each image stuck: half (rounded down) at 0 (dead),
    the rest at :data:`FULL_SCALE_GRAY` (hot, 255)."""

    PARAMETERS: ClassVar[tuple[str, ...]] = ("fraction",)
    fraction: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")

    def apply(self, image, rng):
        xp = _namespace(image)
        n_pixels = image.shape[-2] * image.shape[-1]
        stuck = round(self.fraction * n_pixels)
        if stuck == 0:
            return image
        state = np.zeros((math.prod(image.shape[:-2]), n_pixels), np.int8)  # 0 fine, 1 dead, 2 hot
        for row in state:
            chosen = rng.choice(n_pixels, stuck, replace=False)
            row[chosen[:stuck // 2]] = 1
            row[chosen[stuck // 2:]] = 2
        state = state.reshape(image.shape)
        device = array_api_compat.device(image)
        dead, hot = xp.asarray(state == 1, device=device), xp.asarray(state == 2, device=device)
        zero = xp.asarray(0.0, dtype=image.dtype, device=device)
        full = xp.asarray(FULL_SCALE_GRAY, dtype=image.dtype, device=device)
        return xp.where(dead, zero, xp.where(hot, full, image))


@dataclass(frozen=True, kw_only=True)
class Clutter(Corruption):
    """Shadows of particles outside the sample volume (e.g. on the windows, or nearer the sensor).

    ``count`` [min, max] particles (inclusive), diameters uniform in ``diameter`` [m], distances uniform
    in ``z`` [m], x and y uniform over the frame; their field U at the sensor
    (:func:`holopipe.optics.simulate.opaque_disks_field`) multiplies the intensity by |U|², the first-order
    shadowing of the recorded hologram. ``optics`` gives wavelength and pitch; the frame size is the image's.
    The field is propagated on the GPU for a CuPy image, on the host otherwise.
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ("count", "diameter", "z")
    count: tuple[int, int] = (0, 0)
    diameter: tuple[float, float] = (1.0e-5, 4.0e-5)
    z: tuple[float, float] = (1.2e-2, 2.0e-2)
    optics: Optics | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.optics is None:
            raise ValueError("clutter needs the optics (wavelength, pixel pitch)")
        for name in ("count", "diameter", "z"):
            low, high = getattr(self, name)
            if not 0 <= low <= high or (name != "count" and low <= 0):
                raise ValueError(f"{name} must be an increasing positive range [min, max], got [{low}, {high}]")

    def apply(self, image, rng):
        n = int(rng.integers(self.count[0], self.count[1] + 1))
        if n == 0:
            return image
        ny, nx = image.shape[-2:]
        optics = dataclasses.replace(self.optics, nx=nx, ny=ny, z_min=self.z[0], z_max=self.z[1])
        particles = ParticleSet(x=rng.uniform(-nx * optics.dx / 2, nx * optics.dx / 2, n),
                                y=rng.uniform(-ny * optics.dy / 2, ny * optics.dy / 2, n),
                                z=rng.uniform(self.z[0], self.z[1], n),
                                d=rng.uniform(self.diameter[0], self.diameter[1], n))
        xp = _namespace(image)
        if array_api_compat.is_cupy_namespace(xp):
            field = opaque_disks_field(particles, optics, pad=CLUTTER_PAD_PIXELS, band_limit=True, xp=xp)
            return image * xp.astype(xp.abs(field) ** 2, image.dtype)
        field = opaque_disks_field(particles, optics, pad=CLUTTER_PAD_PIXELS, band_limit=True)
        return image * _to_like(np.abs(field) ** 2, image)


CORRUPTIONS: dict[str, type[Corruption]] = {
    "shot_noise": ShotNoise,
    "read_noise": ReadNoise,
    "quantize": Quantize,
    "blur": Blur,
    "illumination": Illumination,
    "brightness_contrast": BrightnessContrast,
    "dead_hot_pixels": DeadHotPixels,
    "clutter": Clutter,
}
"""Config ``type`` → corruption class."""


@dataclass(frozen=True)
class Pipeline:
    """Corruptions applied in order; deterministic for a given ``rng`` state."""

    corruptions: tuple[Corruption, ...] = ()

    def __call__(self, image, rng: np.random.Generator):
        for corruption in self.corruptions:
            image = corruption(image, rng)
        return image

    def __iter__(self):
        return iter(self.corruptions)

    def __len__(self) -> int:
        return len(self.corruptions)


def _corruption_from_item(item, optics: Optics | None, mean_electrons: float, where: str) -> Corruption:
    """One corruption from its config item; every parameter is read under its own key."""
    if not isinstance(item, dict) or item.get("type") not in CORRUPTIONS:
        kind = item.get("type") if isinstance(item, dict) else item
        raise ConfigError(f"{where}.type: unknown corruption {kind!r}; expected one of {', '.join(CORRUPTIONS)}")
    cls = CORRUPTIONS[item["type"]]
    unknown = sorted(set(item) - {"type", "probability", *cls.PARAMETERS})
    missing = [name for name in cls.PARAMETERS if name not in item]
    problems = [f"{label} {', '.join(names)}" for label, names in (("unknown key(s)", unknown),
                                                                  ("missing key(s)", missing)) if names]
    if problems:
        raise ConfigError(f"{where} ({item['type']}): {'; '.join(problems)}; "
                          f"its keys are type, probability, {', '.join(cls.PARAMETERS)}")
    kwargs = {name: tuple(item[name]) if isinstance(item[name], list) else item[name] for name in cls.PARAMETERS}
    kwargs["probability"] = float(item.get("probability", 1.0))
    fields = {field.name for field in dataclasses.fields(cls)}
    if "optics" in fields:
        kwargs["optics"] = optics
    if "mean_electrons" in fields:
        kwargs["mean_electrons"] = mean_electrons
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} ({item['type']}): {exc}") from exc


def build_corruptions(items: list[dict], optics: Optics | None = None) -> Pipeline:
    """The pipeline of the config's ``augment.corruptions`` list, in order.

    ``optics`` (wavelength, pixel pitch) is needed by illumination and clutter. read_noise takes its
    electrons-per-gray scale from the nearest preceding shot_noise (else 20000 e- at the mean).
    Raises ConfigError naming the item for an unknown type, key or value.
    """
    corruptions, mean_electrons = [], DEFAULT_MEAN_ELECTRONS
    for index, item in enumerate(items):
        corruption = _corruption_from_item(item, optics, mean_electrons, f"augment.corruptions.{index}")
        if isinstance(corruption, ShotNoise):
            mean_electrons = corruption.electrons
        corruptions.append(corruption)
    return Pipeline(tuple(corruptions))


def optics_from_attrs(attrs) -> Optics:
    """Optics from a contract dataset's attributes (metres); z limits are NaN where the file lacks them."""
    return Optics(wavelength=float(attrs["lambda"]), dx=float(attrs["dx"]), dy=float(attrs["dy"]),
                  nx=int(attrs["Nx"]), ny=int(attrs["Ny"]), z_min=float(attrs.get("zMin", math.nan)),
                  z_max=float(attrs.get("zMax", math.nan)))


def augment_hologram(image: np.ndarray, pipeline: Pipeline, *, seed: int, hologram: int,
                     variants: int, xp=numpy_xp) -> np.ndarray:
    """``variants`` corrupted copies (variants, ny, nx) float32 on the host of one image (ny, nx) of gray
    levels, corrupted in the namespace ``xp`` (the image uploaded once).

    Variant ``v`` of hologram index ``hologram`` (0-based) uses the stream ``default_rng([seed, hologram, v])``,
    so any variant can be regenerated alone.
    """
    image = xp.asarray(np.asarray(image, dtype=np.float32))
    return np.stack([host_array(pipeline(image, np.random.default_rng([seed, hologram, variant])), np.float32)
                     for variant in range(variants)])


def _remapped_particles(ds: xr.Dataset, variants: int) -> dict[str, xr.Variable]:
    """Every particle variable, rows repeated per variant with hid = (hid - 1) * variants + v + 1."""
    names = [name for name, var in ds.variables.items() if var.dims == ("particle",)]
    columns = {name: ds[name].values for name in names}
    hid = columns["hid"].astype(np.int64)
    rows = np.tile(np.arange(hid.size), variants)
    new_hid = ((hid - 1) * variants)[rows] + np.repeat(np.arange(variants), hid.size) + 1
    order = np.argsort(new_hid, kind="stable")  # grouped by new hologram, original order within
    rows, new_hid = rows[order], new_hid[order]
    out = {name: xr.Variable(("particle",), values[rows], attrs=ds[name].attrs) for name, values in columns.items()}
    out["hid"] = xr.Variable(("particle",), new_hid.astype(np.float32), attrs=ds["hid"].attrs)
    return out


def augment_file(in_path, out_path, config: dict, gallery_path=None) -> Path:
    """Write ``augment.variants`` corrupted copies of every hologram of ``in_path`` to the zarr ``out_path``.

    Variant v of hologram index h becomes hologram index ``h * variants + v`` (its particles are copied
    with the new 1-based hid); images are float32 gray levels. Holograms are corrupted a few at a time
    as the store is written (atomically), on ``augment.device``. Provenance attrs: augment_variants,
    augment_seed, augment_corruptions (JSON), augment_source. ``gallery_path``: a PNG of clean | corrupted |
    difference.
    """
    section = load_config(config)["augment"]
    variants, seed = section["variants"], section["seed"]
    xp = array_namespace_for(section["device"], "augment.device")
    ds = open_holodec(in_path)
    try:
        pipeline = build_corruptions(section["corruptions"], optics_from_attrs(ds.attrs))
        n, nx, ny = (ds.sizes[dim] for dim in IMAGE_DIMS)
        clean = ds["image"].data.rechunk({0: 1, 1: -1, 2: -1})
        with tqdm(total=n, desc=f"augment {Path(in_path).name}", unit="hologram") as bar:
            def corrupt_block(block, block_info=None):
                hologram = block_info[0]["array-location"][0][0]
                out = augment_hologram(row_major(block[0]), pipeline, seed=seed, hologram=hologram, variants=variants,
                                       xp=xp)
                bar.update(1)
                return np.ascontiguousarray(file_layout(out))

            images = clean.map_blocks(corrupt_block, dtype=np.float32, chunks=((variants,) * n, (nx,), (ny,)),
                                      meta=np.empty((0, 0, 0), np.float32))
            attrs = {**ds.attrs, "augment_variants": variants, "augment_seed": seed,
                     "augment_corruptions": json.dumps(section["corruptions"]),
                     "augment_source": os.fspath(in_path), "augment_holopipe_version": __version__}
            out = xr.Dataset({"image": (IMAGE_DIMS, images), **_remapped_particles(ds, variants)}, attrs=attrs)
            write_zarr(out, out_path)
        if gallery_path is not None:
            _write_gallery(gallery_path, ds, out_path, min(section["gallery"], n), variants)
    finally:
        ds.close()
    return Path(out_path)


def _write_gallery(path, clean: xr.Dataset, augmented_path, rows: int, variants: int) -> Path:
    """PNG, one row per hologram: clean | its first corrupted variant | corrupted - clean (gray levels)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    path = Path(path)
    augmented = open_holodec(augmented_path)
    try:
        figure = Figure(figsize=(10, 3.2 * rows), layout="constrained")
        axes = figure.subplots(rows, 3, squeeze=False)
        for hologram, row in enumerate(axes):
            before = hologram_image_yx(clean, hologram).astype(np.float32)
            after = hologram_image_yx(augmented, hologram * variants).astype(np.float32)
            difference = after - before
            low, high = np.percentile(np.concatenate([before.ravel(), after.ravel()]), [0.5, 99.5])
            # A percentile, so that a few dead or hot pixels do not wash out the rest of the difference.
            limit = float(np.percentile(np.abs(difference), 99.5)) or 1.0
            panels = [(before, f"hologram {hologram + 1}: clean", "gray", low, high),
                      (after, f"hologram {hologram + 1}: corrupted, variant 1 of {variants}", "gray", low, high),
                      (difference, "corrupted - clean (gray levels)", "RdBu_r", -limit, limit)]
            for axis, (image, title, cmap, vmin, vmax) in zip(row, panels):
                shown = axis.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
                axis.set_title(title, fontsize=9)
                axis.set_xlabel("x (pixels)")
                axis.set_ylabel("y (pixels)")
                figure.colorbar(shown, ax=axis, shrink=0.8)
        write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))
    finally:
        augmented.close()
    return path
