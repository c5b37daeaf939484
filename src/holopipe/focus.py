"""Focus metrics of reconstructed amplitude, shared by the baseline and the ML particles' z refinement.

An opaque droplet in focus is a dark disk with a sharp edge; out of focus its shadow spreads into
fringes. Two measures of that, on amplitudes (background ~1) laid out (..., ny, nx):

- the darkest value after a :data:`SMOOTHING_PIXELS`-pixel box average (:func:`smoothed_amplitude`):
  a single interference speckle next to a focused droplet must not decide the plane;
- the Tamura coefficient ``sqrt(std / mean)`` of the gradient magnitude (:func:`gradient_magnitude`,
  :func:`tamura_coefficient`) over a window: a focused edge concentrates the gradient in a thin ring,
  fringes spread it evenly. Compare it across planes only over the same window.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

__all__ = ["SMOOTHING_PIXELS", "gradient_magnitude", "smoothed_amplitude", "tamura_coefficient"]

SMOOTHING_PIXELS = 5
"""Box width (pixels) of the amplitude average that the darkness measure looks at."""


def smoothed_amplitude(amplitude: np.ndarray) -> np.ndarray:
    """Box average over the last two axes (:data:`SMOOTHING_PIXELS` wide, edges repeated)."""
    size = (1,) * (amplitude.ndim - 2) + (SMOOTHING_PIXELS, SMOOTHING_PIXELS)
    return ndi.uniform_filter(amplitude, size, mode="nearest")


def gradient_magnitude(amplitude: np.ndarray) -> np.ndarray:
    """|∇a| per pixel over the last two axes (central differences, one-sided at the edges), per pixel."""
    return np.hypot(*np.gradient(amplitude, axis=(-2, -1)))


def tamura_coefficient(total, total_squares, count):
    """sqrt(std / mean) of values given their sum, sum of squares and count (arrays broadcast).

    A window whose mean is not positive (no gradient at all) scores 0, never in focus.
    """
    total, total_squares, count = (np.asarray(v, dtype=np.float64) for v in (total, total_squares, count))
    mean = total / count
    std = np.sqrt(np.clip(total_squares / count - mean**2, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, np.sqrt(std / np.where(mean > 0, mean, 1.0)), 0.0)
