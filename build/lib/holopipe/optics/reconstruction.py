"""Reconstruction of standardized holograms, one home for every stage that sweeps planes (examples, infer,
particles, baseline): the plane grid (bin edges and centres in metres between zMin and zMax) and the
propagator of a standardized hologram (contrast I/B, background 1), and the model's input channels computed
from the reconstructed field (:func:`normalize_channels`, the one definition examples, training and inference
share)."""

from __future__ import annotations

import os
from typing import NamedTuple

import array_api_compat
import numpy as np
import xarray as xr

from holopipe.core.io import HolodecFormatError, open_holodec
from holopipe.optics.propagation import Propagator, hologram_field

__all__ = ["CHANNEL_OFFSETS", "SampleVolume", "check_channels", "contrast_scale", "field_channels",
           "hologram_propagator", "normalize_channels", "scale_channels", "open_standardized", "z_bin_centres",
           "z_bin_edges", "z_bin_of"]


def z_bin_edges(z_min: float, z_max: float, n_bins: int) -> np.ndarray:
    """Edges (metres, ``n_bins + 1`` values) of ``n_bins`` equal depth bins from ``z_min`` to ``z_max``."""
    if n_bins < 1 or not z_min < z_max:
        raise ValueError(f"need n_bins >= 1 and z_min < z_max, got {n_bins}, {z_min}, {z_max}")
    return np.linspace(z_min, z_max, n_bins + 1)


def z_bin_centres(z_min: float, z_max: float, n_bins: int) -> np.ndarray:
    """The reconstruction planes (metres): centres of the bins of :func:`z_bin_edges`."""
    edges = z_bin_edges(z_min, z_max, n_bins)
    return 0.5 * (edges[:-1] + edges[1:])


class SampleVolume(NamedTuple):
    """The depths a store's holograms sample, its ``zMin`` and ``zMax`` (metres): particles are reported only
    inside it. Both methods also search planes beyond it (:meth:`planes`), so that a particle in focus out
    there is known to be outside, not taken for one inside at the nearest plane; one home for both."""

    z_min_m: float
    z_max_m: float

    @classmethod
    def of(cls, attrs) -> SampleVolume:
        return cls(float(attrs["zMin"]), float(attrs["zMax"]))

    def planes(self, z_bins: int, beyond: int = 0) -> np.ndarray:
        """The reconstruction planes (:func:`z_bin_centres`) and ``beyond`` more at their spacing past each
        end, none at or before the sensor (z <= 0)."""
        planes = z_bin_centres(self.z_min_m, self.z_max_m, z_bins)
        if beyond == 0 or planes.size < 2:
            return planes
        step = planes[1] - planes[0]
        extended = np.concatenate([planes[0] - step * np.arange(beyond, 0, -1), planes,
                                   planes[-1] + step * np.arange(1, beyond + 1)])
        return extended[extended > 0]

    def contains(self, z_m) -> np.ndarray:
        """Whether depths ``z_m`` (metres) lie inside the volume, its ends included."""
        z_m = np.asarray(z_m, dtype=np.float64)
        return (z_m >= self.z_min_m) & (z_m <= self.z_max_m)


def z_bin_of(z_m, z_min: float, z_max: float, n_bins: int) -> np.ndarray:
    """Bin index (0-based int) of depths ``z_m`` (metres); depths outside the range go to the end bins.

    Clipping keeps particles that the contract's 1 µm tolerance lets sit just outside [zMin, zMax].
    """
    z_bin_edges(z_min, z_max, n_bins)  # validates the arguments
    index = np.floor((np.asarray(z_m, dtype=np.float64) - z_min) / ((z_max - z_min) / n_bins))
    return np.clip(index, 0, n_bins - 1).astype(np.int64)


def open_standardized(path, config: dict) -> xr.Dataset:
    """Open a standardized split store for the stages that reconstruct it (examples, infer, baseline).

    Its image must be float contrast holograms I/B (background ~1); zMin and zMax come from the store or,
    for real data without them, from ``optics.z_min``/``optics.z_max`` of the validated ``config``.
    """
    name = os.fspath(path)
    optics = config["optics"]
    ds = open_holodec(name, z_limits=(optics["z_min"], optics["z_max"]))
    if ds["image"].dtype.kind != "f":
        ds.close()
        raise HolodecFormatError(f"{name}: image has dtype {ds['image'].dtype}; expected a standardized store "
                                 "(float contrast I/B with background ~1, from `holopipe standardize apply`)")
    return ds


def hologram_propagator(image_yx, attrs, reconstruction: dict, *, to_device=None) -> Propagator:
    """The :class:`~holopipe.optics.propagation.Propagator` of one standardized hologram,
    as every plane sweep builds it.

    ``image_yx`` is the row-major (ny, nx) contrast I/B (background 1) of
    :func:`~holopipe.core.io.hologram_image_yx`; optics come from the store's ``attrs``, padding and band limit
    from the ``reconstruction`` config section. ``to_device`` moves the float32 array first (e.g. to a GPU
    tensor); without it the sweep runs on numpy.
    """
    image_yx = np.ascontiguousarray(image_yx, dtype=np.float32)
    if to_device is not None:
        image_yx = to_device(image_yx)
    return Propagator(hologram_field(image_yx, background=1.0), wavelength=float(attrs["lambda"]),
                      dx=float(attrs["dx"]), dy=float(attrs["dy"]), pad=int(reconstruction["pad"]),
                      band_limit=bool(reconstruction["band_limit"]))


CHANNEL_OFFSETS = {"amplitude": 1.0, "phase": 0.0, "real": 1.0, "imaginary": 0.0}
"""Value of each channel where there is no particle (background E = 1): it maps to 0."""


def contrast_scale(stats: dict | None) -> float:
    """The normalising scale ``s``: ``stats["contrast_std"]`` (1 when ``stats`` has none)."""
    scale = float((stats or {}).get("contrast_std", 1.0))
    if not scale > 0:
        raise ValueError(f"channel_scale contrast_std must be positive, got {scale}")
    return scale


def check_channels(channels, source: str) -> None:
    """Raise ValueError naming ``source`` when ``channels`` holds a name not in :data:`CHANNEL_OFFSETS`."""
    unknown = [name for name in channels if name not in CHANNEL_OFFSETS]
    if unknown:
        raise ValueError(f"{source}: unknown channels {unknown}; expected some of {', '.join(CHANNEL_OFFSETS)}")


def field_channels(amplitude, phase, channels) -> list:
    """The raw (unnormalised) planes of ``channels`` from the field's ``amplitude`` and ``phase`` (..., H, W):
    amplitude, phase, real = a cos(phase), imaginary = a sin(phase). Any array library; an array a channel
    does not need may be None."""
    check_channels(channels, "field_channels")
    needs = {"amplitude": ("amplitude",), "phase": ("phase",), "real": ("amplitude", "phase"),
             "imaginary": ("amplitude", "phase")}
    sources = {"amplitude": amplitude, "phase": phase}
    missing = sorted({source for name in channels for source in needs[name] if sources[source] is None})
    if missing or not channels:
        raise ValueError(f"field_channels: needs at least one channel and an array for each, got "
                         f"channels {list(channels)} without {missing}")
    xp = array_api_compat.array_namespace(*(v for v in sources.values() if v is not None))
    values = {"amplitude": lambda: amplitude, "phase": lambda: phase,
              "real": lambda: amplitude * xp.cos(phase), "imaginary": lambda: amplitude * xp.sin(phase)}
    return [values[name]() for name in channels]


def scale_channels(planes, channels, stats: dict | None):
    """Model inputs ``(..., C, H, W)`` from raw ``planes`` of ``channels``: minus the background, over ``s``."""
    scale = contrast_scale(stats)
    planes = [(plane - CHANNEL_OFFSETS[name]) / scale for plane, name in zip(planes, channels, strict=True)]
    return array_api_compat.array_namespace(*planes).stack(planes, axis=-3)


def normalize_channels(amplitude, phase, channels, stats: dict | None):
    """Model inputs ``(..., C, H, W)`` from ``amplitude`` and ``phase`` ``(..., H, W)``, channels in order.

    The one definition training (:class:`holopipe.ml.dataset.TileDataset`) and inference share (:func:`field_channels`,
    then :func:`scale_channels` with ``s = stats["contrast_std"]``). Works on numpy, torch (any device) and cupy arrays
    and keeps their precision; an array no channel needs may be None.
    """
    return scale_channels(field_channels(amplitude, phase, channels), channels, stats)
