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

numpy arrays are the reference; torch (or any array-API) tensors work too for every corruption: the
randomness is drawn on the host with ``rng`` and moved to the tensor's device. On non-numpy arrays
``shot_noise`` uses the Gaussian limit of the Poisson law (variance = mean, exact to < 1 % above ~100
electrons) and ``blur`` a direct separable convolution equal to scipy's ``gaussian_filter``.

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
import dask.array as da
import numpy as np
import scipy.ndimage
import xarray as xr
from tqdm.auto import tqdm

from holopipe import __version__
from holopipe.config import ConfigError, load_config
from holopipe.io import IMAGE_DIMS, open_holodec, pixel_centres, write_zarr
from holopipe.simulate import Optics, ParticleSet, opaque_disks_field

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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ShotNoise(Corruption):
    """Poisson photon noise: the image mean is ``electrons``; variance in electrons equals the mean.

    Gray levels become electrons with the scale ``electrons / mean gray`` of each image, get Poisson
    noise and are scaled back, so the noise follows the local intensity (fringes, beam profile).
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ("electrons",)
    electrons: float = DEFAULT_MEAN_ELECTRONS

    def __post_init__(self):
        super().__post_init__()
        if not self.electrons > 0:
            raise ValueError(f"shot_noise electrons must be positive, got {self.electrons}")

    def apply(self, image, rng):
        xp = _namespace(image)
        mean = _image_mean(image)
        if not bool(xp.all(mean > 0)):
            raise ValueError("shot_noise needs images with a positive mean gray level")
        per_gray = self.electrons / mean  # electrons per gray level, (..., 1, 1)
        electrons = xp.clip(image * per_gray, 0.0, None)
        if array_api_compat.is_numpy_array(image):
            noisy = rng.poisson(electrons)
        else:  # Gaussian limit of the Poisson law, drawn on the host
            noisy = electrons + xp.sqrt(electrons) * _to_like(
                rng.standard normal(image.shape, dtype=np.float32), image)
        return xp.astype(noisy / per_gray, image.dtype) if array_api_compat.is_numpy_array(image) \
            else noisy / per_gray

    def __repr__(self):
        return f"ShotNoise(electrons={self.electrons}, probability={self.probability})"


@dataclass(frozen=True)
class ReadNoise(Corruption):
    """Gaussian read noise of ``electrons`` rms, independent of the signal.

    The electrons-per-gray scale is that of shot noise: ``mean_electrons`` at the image mean, where
    ``mean_electrons`` is the ``electrons`` of the nearest preceding shot_noise item, or
    :data:`DEFAULT_MEAN_ELECTRONS` (20000 e-) when none precedes (:func:`build_corruptions` sets it).
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ("electrons",)
    electrons: float = 12.0
    mean_electrons: float = DEFAULT_MEAN_ELECTRONS

    def __post_init__(self):
        super().__post_init__()
        if not (self.electrons > 0 and self.mean_electrons > 0):
            raise ValueError(f"read_noise electrons ({self.electrons}) and mean_electrons "
                             f"({self.mean_electrons}) must be positive")

    def apply(self, image, rng):
        xp = _namespace(image)
        sigma_gray = self.electrons * _image_mean(image) / self.mean_electrons
        noise = _to_like(rng.standard_normal(image.shape, dtype=np.float32), image)
        return xp.astype(image + sigma_gray * noise, image.dtype)
