"""The regridded frame's size: how many pixels one axis keeps after `regrid` resamples it to
regrid.pixel_pitch (method antialias or bin) and crops or pads it to whole tiles (regrid.frame).

The one home of that arithmetic, without numpy: holopipe.data.regrid plans its resampling with it, the
config's tile check (holopipe.core.config.check_tiles_fit) and the workflow's cost model
(holopipe.run.resources) size frames with it before any file exists.
"""

import math

__all__ = ["PITCH_TOLERANCE", "bin_ratio", "framed_pixels", "regridded_pixels", "resampled_pixels", "resamples"]

PITCH_TOLERANCE = 1e-6
"""Relative difference below which two pixel pitches are the same (no resampling) and a pitch ratio is whole;
also the allowance for floating-point rounding when pixels × pitch ratio should be a whole number."""


def resamples(pitch_m: float, target_pitch_m: float | None) -> bool:
    """Whether regridding from ``pitch_m`` to ``target_pitch_m`` (None: keep the pitch) resamples the axis."""
    return target_pitch_m is not None and abs(target_pitch_m / pitch_m - 1) >= PITCH_TOLERANCE


def bin_ratio(pitch_m: float, target_pitch_m: float) -> int | None:
    """The pixels binning averages into one, ``target_pitch_m / pitch_m`` when that is a whole number of at least
    1 (to :data:`PITCH_TOLERANCE`); None when it is not, and method bin cannot reach that pitch."""
    ratio = target_pitch_m / pitch_m
    whole = round(ratio)
    return whole if whole >= 1 and abs(ratio - whole) <= PITCH_TOLERANCE * ratio else None


def resampled_pixels(n_pixels: int, pitch_m: float, target_pitch_m: float | None, method: str) -> int:
    """Pixels along an axis of ``n_pixels`` at ``pitch_m`` once resampled to ``target_pitch_m``: antialias keeps
    the whole pixels of the new pitch that the axis spans, bin the whole blocks of :func:`bin_ratio` pixels.
    Raises ValueError for a method it does not know or a pitch bin cannot reach."""
    if not resamples(pitch_m, target_pitch_m):
        return n_pixels
    if method == "antialias":
        return math.floor(n_pixels * pitch_m / target_pitch_m + PITCH_TOLERANCE)
    if method == "bin":
        ratio = bin_ratio(pitch_m, target_pitch_m)
        if ratio is None:
            raise ValueError(f"regrid method 'bin' needs an integer pitch ratio, got {target_pitch_m:g} m / "
                             f"{pitch_m:g} m = {target_pitch_m / pitch_m:.6g}")
        return n_pixels // ratio
    raise ValueError(f"unknown regrid method {method!r}; expected 'antialias' or 'bin'")


def framed_pixels(n_resampled: int, frame: str, tile: int) -> int:
    """Pixels along an axis of ``n_resampled`` after the frame step: crop keeps the whole tiles of ``tile`` pixels
    it holds (0 when it holds none), pad adds pixels up to the next whole tile."""
    if frame == "crop":
        return n_resampled // tile * tile
    if frame == "pad":
        return -(-n_resampled // tile) * tile
    raise ValueError(f"unknown regrid frame {frame!r}; expected 'crop' or 'pad'")


def regridded_pixels(n_pixels: int, pitch_m: float, target_pitch_m: float | None, *, method: str, frame: str,
                     tile: int) -> int:
    """Pixels along an axis of ``n_pixels`` at ``pitch_m`` after regridding: resampled to ``target_pitch_m``
    (regrid.pixel_pitch, None to keep it) by ``method``, then cropped or padded to whole tiles by ``frame``."""
    return framed_pixels(resampled_pixels(n_pixels, pitch_m, target_pitch_m, method), frame, tile)

