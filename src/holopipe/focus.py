"""Focus metrics of reconstructed amplitude, one home for the baseline, the ML particles' z refinement and
inference, on any array library (numpy, torch, cupy: the result has the input's library and device).

An opaque droplet in focus is a dark disk with a sharp edge; out of focus its shadow spreads into
fringes. Two measures of that, on amplitudes (background ~1) laid out (..., ny, nx):

- the darkest value after a :data:`SMOOTHING_PIXELS`-pixel box average (:func:`smoothed_amplitude`):
  a single interference speckle next to a focused droplet must not decide the plane;
- the Tamura coefficient ``sqrt(std / mean)`` of the gradient magnitude (:func:`gradient_magnitude`,
  :func:`tamura_coefficient`) over a window: a focused edge concentrates the gradient in a thin ring,
  fringes spread it evenly. Compare it across planes only over the same window.

One edge rule everywhere: the frame's edge pixels are repeated outward (the box average near the edge
averages repeated edge values; the gradient there is a central difference with the edge pixel repeated,
half the one-sided difference). Windows are gathered with indices clamped to the frame, which is that
same rule, so a metric over a window (:func:`window_scores`) or at listed pixels (:func:`pixel_values`)
equals the whole-plane function cut to the window or pixels: only the candidate regions cost anything.
"""

from __future__ import annotations

import array_api_compat
import numpy as np

__all__ = ["SMOOTHING_PIXELS", "WINDOW_MARGIN", "gather_windows", "gradient_magnitude", "host_array",
           "pixel_values", "reconstructed_amplitude", "smoothed_amplitude", "tamura_coefficient", "window_buckets",
           "window_scores"]

SMOOTHING_PIXELS = 5
"""Box width (pixels) of the amplitude average that the darkness measure looks at."""

WINDOW_MARGIN = SMOOTHING_PIXELS // 2
"""Pixels gathered around a window so that its box averages and gradients see the plane, not the cut."""

WINDOW_ELEMENTS = 2**22
"""Window pixels :func:`window_scores` evaluates at once (float64 plus a few temporaries: ~100 MB)."""


def _namespace(array):
    return array_api_compat.array_namespace(array)


def _on(xp, like, values):
    """Host integer ``values`` as an index array of ``like``'s library and device."""
    return xp.asarray(np.ascontiguousarray(values, dtype=np.int64), device=array_api_compat.device(like))


def _box_mean_valid(padded, size: int):
    """Box average over the last two axes where the whole ``size`` x ``size`` box is inside ``padded``
    (each side shrinks by ``size - 1``); rows summed first, then columns, whatever the library."""
    rows, cols = padded.shape[-2] - size + 1, padded.shape[-1] - size + 1
    acc = padded[..., 0:rows, :]
    for k in range(1, size):
        acc = acc + padded[..., k:k + rows, :]
    out = acc[..., :, 0:cols]
    for k in range(1, size):
        out = out + acc[..., :, k:k + cols]
    return out / (size * size)


def _gradient_valid(padded):
    """|∇a| by central differences where both neighbours are inside ``padded`` (each side shrinks by 2)."""
    xp = _namespace(padded)
    d_row = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    d_col = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    return xp.sqrt(d_row * d_row + d_col * d_col)


def _edge_padded(amplitude, margin: int):
    """``amplitude`` with its edge pixels repeated ``margin`` times outward on the last two axes."""
    xp = _namespace(amplitude)
    ny, nx = amplitude.shape[-2:]
    device = array_api_compat.device(amplitude)  # indices made on the device: a host copy would wait for its queue
    rows = xp.clip(xp.arange(-margin, ny + margin, device=device), 0, ny - 1)
    cols = xp.clip(xp.arange(-margin, nx + margin, device=device), 0, nx - 1)
    return amplitude[..., rows[:, None], cols[None, :]]


def smoothed_amplitude(amplitude):
    """Box average over the last two axes (:data:`SMOOTHING_PIXELS` wide, edges repeated)."""
    return _box_mean_valid(_edge_padded(amplitude, SMOOTHING_PIXELS // 2), SMOOTHING_PIXELS)


def gradient_magnitude(amplitude):
    """|∇a| per pixel over the last two axes (central differences, edges repeated)."""
    return _gradient_valid(_edge_padded(amplitude, 1))


def tamura_coefficient(total, total_squares, count):
    """sqrt(std / mean) of values given their sum, sum of squares and count (arrays broadcast; numpy for
    scalars and pandas objects, else the arrays' own library).

    A window whose mean is not positive (no gradient at all) scores 0, never in focus.
    """
    if array_api_compat.is_array_api_obj(total) and not isinstance(total, np.ndarray):
        xp = _namespace(total)
    else:
        xp = np
        total, total_squares, count = (np.asarray(v, dtype=np.float64) for v in (total, total_squares, count))
    mean = total / count
    std = xp.sqrt(xp.clip(total_squares / count - mean * mean, 0.0, None))
    positive = mean > 0
    return xp.where(positive, xp.sqrt(std / xp.where(positive, mean, xp.ones_like(mean))), xp.zeros_like(mean))


def reconstructed_amplitude(propagator, z):
    """|E| (planes, ny, nx) of a :class:`~holopipe.optics.Propagator`'s hologram reconstructed at ``z``
    (metres from the sensor, 1-D), in its library: the focus metrics need no phase (an atan2 per pixel)."""
    xp = propagator.xp
    z = xp.asarray(np.asarray(z, np.float64), device=array_api_compat.device(propagator.spectrum))
    return xp.abs(propagator(-z))


def host_array(array, dtype=np.float64) -> np.ndarray:
    """Any library's array as numpy ``dtype``, copied from the GPU (torch, cupy) when it is there: only
    windows, scores and dark pixels travel, the planes stay on the device."""
    if array_api_compat.is_torch_array(array):
        array = array.detach().cpu().numpy()
    elif array_api_compat.is_cupy_array(array):
        array = array.get()
    return np.asarray(array, dtype=dtype)


def window_buckets(heights, widths) -> list[np.ndarray]:
    """Windows grouped by size: indices whose heights and widths round up to the same powers of two, so
    padding each group to its largest window wastes at most 3/4 of it, whatever the sizes' spread."""
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    keys = np.ceil(np.log2(np.maximum(heights, 1))) * 64 + np.ceil(np.log2(np.maximum(widths, 1)))
    return [np.flatnonzero(keys == key) for key in np.unique(keys)]


def gather_windows(stack, planes, row0, col0, height: int, width: int):
    """Windows (k, height, width) of a stack (planes, ny, nx): window i is plane ``planes[i]`` from pixel
    ``(row0[i], col0[i])``, indices clamped to the frame (edges repeated); one indexing op, on the device.
    The index arrays are host integers (k,)."""
    xp = _namespace(stack)
    ny, nx = stack.shape[-2:]
    rows = np.clip(np.asarray(row0, np.int64)[:, None] + np.arange(height), 0, ny - 1)  # (k, height)
    cols = np.clip(np.asarray(col0, np.int64)[:, None] + np.arange(width), 0, nx - 1)  # (k, width)
    return stack[_on(xp, stack, planes)[:, None, None], _on(xp, stack, rows)[:, :, None],
                 _on(xp, stack, cols)[:, None, :]]


def window_scores(stack, planes, row0, row1, col0, col1, metric: str):
    """Focus score (larger is sharper, float64) of windows ``[row0, row1) x [col0, col1)`` of planes
    ``planes`` of a stack (planes, ny, nx), all host int arrays (k,); the scores are in the stack's library.

    ``tamura``: the Tamura coefficient of :func:`gradient_magnitude` over the window; ``min_amplitude``:
    minus the darkest :func:`smoothed_amplitude` in it. Both equal the whole-plane functions cut to the
    window. Windows are evaluated in groups of similar size (:func:`window_buckets`), padded to the
    group's largest with a validity mask, at most :data:`WINDOW_ELEMENTS` window pixels at once.
    """
    if metric not in ("tamura", "min_amplitude"):
        raise ValueError(f"window_scores: unknown metric {metric!r} (tamura or min_amplitude)")
    xp = _namespace(stack)
    planes, row0, row1, col0, col1 = (np.asarray(v, np.int64) for v in (planes, row0, row1, col0, col1))
    heights, widths = row1 - row0, col1 - col0
    scores = xp.zeros(planes.size, dtype=xp.float64, device=array_api_compat.device(stack))
    m = WINDOW_MARGIN
    for bucket in window_buckets(heights, widths):
        height, width = int(heights[bucket].max()), int(widths[bucket].max())
        step = max(1, WINDOW_ELEMENTS // ((height + 2 * m) * (width + 2 * m)))
        for start in range(0, bucket.size, step):
            chosen = bucket[start:start + step]
            windows = gather_windows(stack, planes[chosen], row0[chosen] - m, col0[chosen] - m, height + 2 * m,
                                     width + 2 * m)
            windows = xp.astype(windows, xp.float64)  # (k, height + 2m, width + 2m)
            valid = ((_on(xp, stack, np.arange(height))[None, :, None] < _on(xp, stack, heights[chosen])[:, None, None])
                     & (_on(xp, stack, np.arange(width))[None, None, :] < _on(xp, stack, widths[chosen])[:, None, None]))
            if metric == "tamura":
                gradient = _gradient_valid(windows[:, m - 1:m + height + 1, m - 1:m + width + 1])  # (k, h, w)
                gradient = xp.where(valid, gradient, xp.zeros_like(gradient))
                count = xp.astype(xp.sum(xp.astype(valid, xp.int64), axis=(-2, -1)), xp.float64)
                score = tamura_coefficient(xp.sum(gradient, axis=(-2, -1)),
                                           xp.sum(gradient * gradient, axis=(-2, -1)), count)
            else:
                smooth = _box_mean_valid(windows, SMOOTHING_PIXELS)  # (k, h, w): margin m = SMOOTHING // 2
                score = -xp.min(xp.where(valid, smooth, xp.full_like(smooth, np.inf)), axis=(-2, -1))
            scores[_on(xp, stack, chosen)] = score
    return scores


def pixel_values(stack, planes, rows, cols, measure: str, *, chunk: int = 2**18):
    """:func:`smoothed_amplitude` (``measure`` ``smoothed``) or :func:`gradient_magnitude` (``gradient``)
    of a stack (planes, ny, nx) at the listed pixels (host int arrays (k,)), in float64 and the stack's
    library; only each pixel's neighbourhood is gathered, ``chunk`` pixels at a time."""
    if measure not in ("smoothed", "gradient"):
        raise ValueError(f"pixel_values: unknown measure {measure!r} (smoothed or gradient)")
    xp = _namespace(stack)
    planes, rows, cols = (np.asarray(v, np.int64) for v in (planes, rows, cols))
    reach = SMOOTHING_PIXELS // 2 if measure == "smoothed" else 1
    parts = []
    for start in range(0, planes.size, chunk):
        part = slice(start, start + chunk)
        patches = xp.astype(gather_windows(stack, planes[part], rows[part] - reach, cols[part] - reach,
                                           2 * reach + 1, 2 * reach + 1), xp.float64)
        value = _box_mean_valid(patches, SMOOTHING_PIXELS) if measure == "smoothed" else _gradient_valid(patches)
        parts.append(value[:, 0, 0])
    if not parts:
        return xp.zeros(0, dtype=xp.float64, device=array_api_compat.device(stack))
    return xp.concat(parts)
