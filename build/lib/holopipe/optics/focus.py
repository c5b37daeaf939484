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

from holopipe.core.device import host_array

__all__ = ["SMOOTHING_PIXELS", "WINDOW_MARGIN", "device_indices", "gather_windows", "gradient_magnitude",
           "host_windows", "pixel_values", "reconstructed_amplitude", "smoothed_amplitude", "tamura_coefficient",
           "window_buckets", "window_scores"]

SMOOTHING_PIXELS = 5
"""Box width (pixels) of the amplitude average that the darkness measure looks at."""

WINDOW_MARGIN = SMOOTHING_PIXELS // 2
"""Pixels gathered around a window so that its box averages and gradients see the plane, not the cut."""

WINDOW_ELEMENTS = 2**22
"""Window pixels :func:`window_scores` evaluates at once (float64 plus a few temporaries: ~100 MB)."""


def _namespace(array):
    return array_api_compat.array_namespace(array)


def device_indices(like, *arrays) -> tuple:
    """Host integer arrays as int64 arrays (same shapes) of ``like``'s library and device, in one upload.

    Every host-to-device copy costs a launch and, from pageable memory, a wait for the copy engine: so the index
    arrays of a set of windows are packed into one contiguous buffer, pinned and copied without blocking for a
    CUDA tensor, and split on the device into views. On the host (numpy, a CPU tensor) nothing is copied twice.
    """
    xp = _namespace(like)
    host = [np.asarray(values, dtype=np.int64) for values in arrays]
    offsets = np.cumsum([0, *(values.size for values in host)])
    packed = np.concatenate([values.ravel() for values in host]) if host else np.zeros(0, np.int64)
    if array_api_compat.is_torch_array(like):
        import torch

        packed = torch.from_numpy(packed)
        if like.device.type != "cpu":
            packed = packed.pin_memory().to(like.device, non_blocking=True)
    else:
        packed = xp.asarray(packed, device=array_api_compat.device(like))
    return tuple(xp.reshape(packed[int(offsets[i]):int(offsets[i + 1])], values.shape)
                 for i, values in enumerate(host))


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
    """|E| (planes, ny, nx) of a :class:`~holopipe.optics.propagation.Propagator`'s hologram reconstructed at ``z``
    (metres from the sensor, 1-D), in its library: the focus metrics need no phase (an atan2 per pixel), nor a
    batch of complex fields (:meth:`~holopipe.optics.propagation.Propagator.amplitude` sweeps plane by plane through one
    buffer); the depths stay on the host, which spares a GPU a copy back per plane."""
    return propagator.amplitude(np.asarray(z, np.float64))


def window_buckets(heights, widths) -> list[np.ndarray]:
    """Windows grouped by size: indices whose heights and widths round up to the same powers of two, so
    padding each group to its largest window wastes at most 3/4 of it, whatever the sizes' spread."""
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    keys = np.ceil(np.log2(np.maximum(heights, 1))) * 64 + np.ceil(np.log2(np.maximum(widths, 1)))
    return [np.flatnonzero(keys == key) for key in np.unique(keys)]


def gather_windows(stack, planes, row0, col0, height: int, width: int):
    """Windows (k, height, width) of a stack (planes, ny, nx): window i is plane ``planes[i]`` from pixel
    ``(row0[i], col0[i])``, indices clamped to the frame (edges repeated); one upload of the host integer
    index arrays (k,) and one indexing op, on the device."""
    return _gather(stack, *device_indices(stack, planes, row0, col0), height, width)


def _gather(stack, planes, row0, col0, height: int, width: int):
    """:func:`gather_windows` with its index arrays already on the stack's device: the pixel indices of
    each window are made there, not uploaded."""
    xp = _namespace(stack)
    ny, nx = stack.shape[-2:]
    device = array_api_compat.device(stack)
    rows = xp.clip(row0[:, None] + xp.arange(height, dtype=xp.int64, device=device), 0, ny - 1)  # (k, height)
    cols = xp.clip(col0[:, None] + xp.arange(width, dtype=xp.int64, device=device), 0, nx - 1)  # (k, width)
    return stack[planes[:, None, None], rows[:, :, None], cols[:, None, :]]


def host_windows(stack, planes, row0, row1, col0, col1) -> list[np.ndarray]:
    """Windows ``[row0, row1) x [col0, col1)`` of planes ``planes`` of a stack (planes, ny, nx) of any library
    (host int arrays (k,)), as float64 numpy arrays: gathered on the device in groups of similar size
    (:func:`window_buckets`), their indices uploaded once and the groups copied to the host in one transfer."""
    xp = _namespace(stack)
    planes, row0, row1, col0, col1 = (np.asarray(v, np.int64) for v in (planes, row0, row1, col0, col1))
    heights, widths = row1 - row0, col1 - col0
    buckets = window_buckets(heights, widths)
    order = np.concatenate([np.zeros(0, np.int64), *buckets])
    on_device = device_indices(stack, planes[order], row0[order], col0[order])
    sizes = [(int(heights[bucket].max()), int(widths[bucket].max())) for bucket in buckets]
    gathered, first = [], 0
    for bucket, (height, width) in zip(buckets, sizes):
        part = (values[first:first + bucket.size] for values in on_device)
        gathered.append(xp.reshape(_gather(stack, *part, height, width), (-1,)))
        first += bucket.size
    flat = host_array(xp.concat(gathered)) if gathered else np.zeros(0)
    windows, first = [None] * planes.size, 0
    for bucket, (height, width) in zip(buckets, sizes):
        padded = flat[first:first + bucket.size * height * width].reshape(bucket.size, height, width)
        for i, k in enumerate(bucket):
            windows[k] = padded[i, :heights[k], :widths[k]]
        first += bucket.size * height * width
    return windows


def window_scores(stack, planes, row0, row1, col0, col1, metric: str):
    """Focus score (larger is sharper, float64) of windows ``[row0, row1) x [col0, col1)`` of planes
    ``planes`` of a stack (planes, ny, nx), all host int arrays (k,); the scores are in the stack's library.

    ``tamura``: the Tamura coefficient of :func:`gradient_magnitude` over the window; ``min_amplitude``:
    minus the darkest :func:`smoothed_amplitude` in it. Both equal the whole-plane functions cut to the
    window. Windows are evaluated in groups of similar size (:func:`window_buckets`), padded to the
    group's largest with a validity mask, at most :data:`WINDOW_ELEMENTS` window pixels at once; their index
    arrays reach the device in one upload (:func:`device_indices`), ordered by group so that each group's
    are a slice of it.
    """
    if metric not in ("tamura", "min_amplitude"):
        raise ValueError(f"window_scores: unknown metric {metric!r} (tamura or min_amplitude)")
    xp = _namespace(stack)
    planes, row0, row1, col0, col1 = (np.asarray(v, np.int64) for v in (planes, row0, row1, col0, col1))
    heights, widths = row1 - row0, col1 - col0
    device = array_api_compat.device(stack)
    scores = xp.zeros(planes.size, dtype=xp.float64, device=device)
    m = WINDOW_MARGIN
    buckets = window_buckets(heights, widths)
    order = np.concatenate([np.zeros(0, np.int64), *buckets])  # the windows, group by group
    on_device = device_indices(stack, planes[order], row0[order] - m, col0[order] - m, heights[order],
                               widths[order], order)
    first = 0
    for bucket in buckets:
        height, width = int(heights[bucket].max()), int(widths[bucket].max())
        step = max(1, WINDOW_ELEMENTS // ((height + 2 * m) * (width + 2 * m)))
        for start in range(first, first + bucket.size, step):
            chosen_planes, chosen_row0, chosen_col0, chosen_heights, chosen_widths, chosen = (
                values[start:min(start + step, first + bucket.size)] for values in on_device)
            windows = _gather(stack, chosen_planes, chosen_row0, chosen_col0, height + 2 * m, width + 2 * m)
            windows = xp.astype(windows, xp.float64)  # (k, height + 2m, width + 2m)
            valid = ((xp.arange(height, dtype=xp.int64, device=device)[None, :, None] < chosen_heights[:, None, None])
                     & (xp.arange(width, dtype=xp.int64, device=device)[None, None, :] < chosen_widths[:, None, None]))
            if metric == "tamura":
                gradient = _gradient_valid(windows[:, m - 1:m + height + 1, m - 1:m + width + 1])  # (k, h, w)
                gradient = xp.where(valid, gradient, xp.zeros_like(gradient))
                count = xp.astype(xp.sum(xp.astype(valid, xp.int64), axis=(-2, -1)), xp.float64)
                score = tamura_coefficient(xp.sum(gradient, axis=(-2, -1)),
                                           xp.sum(gradient * gradient, axis=(-2, -1)), count)
            else:
                smooth = _box_mean_valid(windows, SMOOTHING_PIXELS)  # (k, h, w): margin m = SMOOTHING // 2
                score = -xp.min(xp.where(valid, smooth, xp.full_like(smooth, np.inf)), axis=(-2, -1))
            scores[chosen] = score
        first += bucket.size
    return scores


def pixel_values(stack, planes, rows, cols, measure: str, *, chunk: int = 2**18):
    """:func:`smoothed_amplitude` (``measure`` ``smoothed``) or :func:`gradient_magnitude` (``gradient``)
    of a stack (planes, ny, nx) at the listed pixels (host int arrays (k,)), in float64 and the stack's
    library; only each pixel's neighbourhood is gathered, ``chunk`` pixels at a time, their indices
    uploaded once."""
    if measure not in ("smoothed", "gradient"):
        raise ValueError(f"pixel_values: unknown measure {measure!r} (smoothed or gradient)")
    xp = _namespace(stack)
    planes, rows, cols = (np.asarray(v, np.int64) for v in (planes, rows, cols))
    reach = SMOOTHING_PIXELS // 2 if measure == "smoothed" else 1
    on_device = device_indices(stack, planes, rows - reach, cols - reach)
    parts = []
    for start in range(0, planes.size, chunk):
        part_planes, part_row0, part_col0 = (values[start:start + chunk] for values in on_device)
        patches = xp.astype(_gather(stack, part_planes, part_row0, part_col0, 2 * reach + 1, 2 * reach + 1),
                            xp.float64)
        value = _box_mean_valid(patches, SMOOTHING_PIXELS) if measure == "smoothed" else _gradient_valid(patches)
        parts.append(value[:, 0, 0])
    if not parts:
        return xp.zeros(0, dtype=xp.float64, device=array_api_compat.device(stack))
    return xp.concat(parts)
