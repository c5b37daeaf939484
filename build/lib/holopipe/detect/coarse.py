"""Coarse-to-fine depth search: the model sees whole planes only every ``k``-th plane, and elsewhere only
windows around what those planes showed.

A droplet stays visible over its depth of focus (about D²/λ: 1.1 mm, eight 144 µm planes, for a 20 µm droplet,
and far more for larger ones), so a sparse hologram needs the model's full attention on few planes:

1. **Coarse pass.** Every ``k``-th plane (:func:`coarse_planes`, centred so no plane is more than ``k // 2``
   planes from one) is swept whole by :func:`holopipe.detect.sweep.sweep_hologram`. Its pixels above
   ``threshold`` are detections like any others; its pixels above ``coarse_threshold`` (lower: a droplet
   between two coarse planes is seen out of focus, less sure) form 8-connected components whose bounding
   boxes, widened by ``coarse_margin`` pixels (the model's context), are the windows (:func:`component_boxes`).
2. **Fine pass.** Every other plane within ``k`` planes of a coarse plane with windows is reconstructed whole
   (one inverse FFT: cheap next to the model) and swept again by :func:`~holopipe.detect.sweep.sweep_hologram`,
   whose segmenter (:class:`WindowSegmenter`) runs the model only on that plane's windows (those of its
   coarse neighbours, merged where they overlap: :func:`fine_windows`) and writes their logits into a
   plane-sized canvas of :data:`FILL_LOGIT` (probability 0); thresholding and the detections are then
   exactly the full sweep's. Planes without a window are skipped.

Windows grow to a few fixed sides (:func:`window_side`: multiples of the model's stride, at most 50 % longer
than needed) centred on their box and kept inside the frame, so windows of one size batch together and
the model sees few shapes (cuDNN autotuning and ``torch.compile`` specialise per shape). Where windows
of a plane overlap after growing, the canvas keeps the larger logit.

With ``k = 1`` the search is the full sweep itself. A chunk chooses its coarse planes among its own
planes, so with ``k > 1`` a split's result depends (slightly) on its chunking. The probability volume is
not written (it would be the canvas: zero outside the windows).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch

from holopipe.detect import sweep

__all__ = ["FILL_LOGIT", "WindowSegmenter", "coarse_planes", "coarse_to_fine_sweep", "component_boxes",
           "fine_windows", "merge_boxes", "place_windows", "window_side"]

log = logging.getLogger("holopipe")

FILL_LOGIT = -1.0e4
"""Logit of the canvas outside every window: its probability is exactly 0 in float32, below any threshold."""

_SIDE_FACTORS = (1, 3)
"""Window sides are stride·2^j or stride·3·2^j: one of them is within 1.5x of any length, and few shapes."""


def coarse_planes(n_planes: int, coarse_stride: int) -> np.ndarray:
    """Indices of the planes the coarse pass sweeps whole: every ``coarse_stride``-th from ``coarse_stride // 2``,
    and the last plane where it would otherwise lie more than ``coarse_stride // 2`` planes from one."""
    if coarse_stride < 1:
        raise ValueError(f"coarse_stride must be >= 1, got {coarse_stride}")
    if n_planes <= 0:
        return np.zeros(0, np.int64)
    half = coarse_stride // 2
    indices = np.arange(min(half, n_planes - 1), n_planes, coarse_stride)
    if n_planes - 1 - indices[-1] > half:
        indices = np.append(indices, n_planes - 1)
    return indices


def component_boxes(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], margin: int) -> np.ndarray:
    """Boxes (m, 4) ``row0, row1, col0, col1`` (half-open, pixels) of the 8-connected components of the listed
    pixels (raster order), each widened by ``margin`` on every side and clipped to the frame ``shape``."""
    count, labels = sweep.pixel_components(rows, cols, shape)
    if count == 0:
        return np.zeros((0, 4), np.int64)
    boxes = np.tile(np.array([np.iinfo(np.int64).max, -1, np.iinfo(np.int64).max, -1], np.int64), (count, 1))
    np.minimum.at(boxes[:, 0], labels, rows)
    np.maximum.at(boxes[:, 1], labels, rows)
    np.minimum.at(boxes[:, 2], labels, cols)
    np.maximum.at(boxes[:, 3], labels, cols)
    ny, nx = shape
    boxes[:, [0, 2]] = np.maximum(boxes[:, [0, 2]] - margin, 0)
    boxes[:, 1] = np.minimum(boxes[:, 1] + 1 + margin, ny)
    boxes[:, 3] = np.minimum(boxes[:, 3] + 1 + margin, nx)
    return boxes


def merge_boxes(boxes: np.ndarray) -> np.ndarray:
    """Boxes (m, 4) ``row0, row1, col0, col1`` merged until none overlap: each group of (transitively)
    overlapping boxes becomes its bounding box, which may overlap further boxes, so repeat."""
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    while len(boxes) > 1:
        overlap = ((boxes[:, None, 0] < boxes[None, :, 1]) & (boxes[None, :, 0] < boxes[:, None, 1])
                   & (boxes[:, None, 2] < boxes[None, :, 3]) & (boxes[None, :, 2] < boxes[:, None, 3]))
        count, labels = scipy.sparse.csgraph.connected_components(scipy.sparse.coo_matrix(overlap), directed=False)
        if count == len(boxes):
            break
        merged = np.empty((count, 4), np.int64)
        for column, reduce in ((0, np.minimum), (1, np.maximum), (2, np.minimum), (3, np.maximum)):
            merged[:, column] = np.iinfo(np.int64).max if reduce is np.minimum else -1
            reduce.at(merged[:, column], labels, boxes[:, column])
        boxes = merged
    return boxes


def fine_windows(coarse_indices: np.ndarray, coarse_boxes: list[np.ndarray], n_planes: int,
                 coarse_stride: int) -> dict[int, np.ndarray]:
    """The fine pass's boxes per plane: for each plane that is not a coarse one, the merged boxes
    (:func:`merge_boxes`) of every coarse plane within ``coarse_stride`` planes; planes without any are left out.

    ``coarse_boxes[i]`` (m_i, 4) are the boxes found on plane ``coarse_indices[i]``.
    """
    coarse_indices = np.asarray(coarse_indices, np.int64)
    with_boxes = [i for i, boxes in enumerate(coarse_boxes) if len(boxes)]
    is_coarse = np.zeros(n_planes, bool)
    is_coarse[coarse_indices] = True
    sources: dict[int, list[int]] = {}  # plane -> the coarse planes (positions in coarse_indices) it looks at
    for i in with_boxes:
        centre = int(coarse_indices[i])
        for plane in range(max(0, centre - coarse_stride), min(n_planes, centre + coarse_stride + 1)):
            if not is_coarse[plane]:
                sources.setdefault(plane, []).append(i)
    merged: dict[tuple[int, ...], np.ndarray] = {}  # planes between the same coarse planes share their boxes
    windows = {}
    for plane in sorted(sources):
        key = tuple(sources[plane])
        if key not in merged:
            merged[key] = merge_boxes(np.concatenate([coarse_boxes[i] for i in key]))
        windows[plane] = merged[key]
    return windows


def window_side(length, stride: int, limit: int) -> np.ndarray:
    """The side (pixels) a window of ``length`` pixels grows to: the smallest stride·2^j or stride·3·2^j at
    least ``length``, or the frame side ``limit`` where that is no longer (the segmenter pads that to the
    stride as for a whole plane)."""
    length = np.maximum(np.asarray(length, np.int64), 1)
    units = -(-length // stride)  # ceil(length / stride)
    best = np.full(units.shape, np.iinfo(np.int64).max, np.int64)
    for factor in _SIDE_FACTORS:
        candidate = factor * 2 ** np.ceil(np.log2(np.maximum(units / factor, 1.0))).astype(np.int64)
        best = np.minimum(best, np.where(candidate >= units, candidate, 2 * candidate))  # float log2 rounding
    return np.minimum(best * stride, limit)


def place_windows(boxes: np.ndarray, shape: tuple[int, int], stride: int) -> np.ndarray:
    """Windows (m, 4) ``row0, col0, height, width`` for boxes (m, 4) ``row0, row1, col0, col1``: sides from
    :func:`window_side`, centred on the box and shifted to lie inside the frame ``shape`` (ny, nx)."""
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    ny, nx = shape
    height = window_side(boxes[:, 1] - boxes[:, 0], stride, ny)
    width = window_side(boxes[:, 3] - boxes[:, 2], stride, nx)
    row0 = np.clip((boxes[:, 0] + boxes[:, 1] - height) // 2, 0, ny - height)
    col0 = np.clip((boxes[:, 2] + boxes[:, 3] - width) // 2, 0, nx - width)
    return np.stack([row0, col0, height, width], axis=1)


class WindowSegmenter:
    """The fine pass's segmenter: logits (B, ny, nx) of a batch of planes, the model run on their windows only
    and :data:`FILL_LOGIT` elsewhere (where windows overlap, the larger logit).

    ``windows`` (m, 5) lists ``position, row0, col0, height, width``: ``position`` is the plane's place in the
    order the sweep reconstructs the fine planes, which calls this once per batch, in that order (as
    :func:`holopipe.detect.sweep.sweep_hologram` does); :meth:`check_finished` verifies it saw them all. The table
    goes to ``device`` once; each batch then slices it by host-known offsets, so the loop waits on nothing.
    The model gets at most ``batch_pixels`` window pixels at a time (a whole batch's worth) and, with
    ``pad_counts``, a power-of-two number of windows (repeats, discarded): fewer distinct shapes for cuDNN's
    autotuning and ``torch.compile`` on a GPU. ``pixels`` counts the pixels the model saw.
    """

    def __init__(self, segment: sweep.Segmenter, windows: np.ndarray, shape: tuple[int, int], *, n_planes: int,
                 batch_pixels: int, device: torch.device, pad_counts: bool):
        windows = np.asarray(windows, np.int64).reshape(-1, 5)
        self.segment, self.shape, self.n_planes, self.pad_counts = segment, tuple(shape), int(n_planes), pad_counts
        self.batch_pixels = max(1, int(batch_pixels))
        # Sorted by shape, then plane: a batch's windows of one shape are one contiguous run of rows.
        order = np.lexsort((windows[:, 0], windows[:, 4], windows[:, 3]))
        windows = windows[order]
        self.shapes = [(int(h), int(w)) for h, w in np.unique(windows[:, 3:5], axis=0)]
        self.offsets = {(h, w): np.flatnonzero((windows[:, 3] == h) & (windows[:, 4] == w))[[0, -1]]
                        for h, w in self.shapes}
        self.positions = windows[:, 0]
        table = torch.from_numpy(np.ascontiguousarray(windows[:, :3]))
        self.table = (table.pin_memory().to(device, non_blocking=True) if device.type == "cuda"
                      else table.to(device))  # (m, 3): position, row0, col0
        self.done = 0
        self.pixels = 0

    def _rows(self, shape: tuple[int, int], first: int, count: int) -> tuple[int, int]:
        """Rows [lo, hi) of the window table of ``shape`` on planes first..first + count - 1."""
        start, last = self.offsets[shape]
        run = self.positions[start:last + 1]
        lo, hi = np.searchsorted(run, [first, first + count])
        return int(start + lo), int(start + hi)

    def __call__(self, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        count, (ny, nx) = amplitude.shape[0], self.shape
        first, self.done = self.done, self.done + count
        canvas = torch.full((count, ny, nx), FILL_LOGIT, dtype=torch.float32, device=amplitude.device)
        flat_canvas = canvas.view(-1)
        for height, width in self.shapes:
            lo, hi = self._rows((height, width), first, count)
            step = max(1, self.batch_pixels // (height * width))
            arange_h = torch.arange(height, device=amplitude.device)
            arange_w = torch.arange(width, device=amplitude.device)
            for begin in range(lo, hi, step):
                end = min(begin + step, hi)
                n = end - begin
                padded = min(1 << (n - 1).bit_length(), step) if self.pad_counts else n
                index = torch.arange(begin, begin + padded, device=amplitude.device).clamp_(max=end - 1)
                windows = self.table[index]  # (padded, 3) on the device
                slots = (windows[:, 0] - first)[:, None, None]
                rows = (windows[:, 1, None] + arange_h)[:, :, None]  # (padded, height, 1)
                cols = (windows[:, 2, None] + arange_w)[:, None, :]  # (padded, 1, width)
                logits = self.segment(amplitude[slots, rows, cols], phase[slots, rows, cols])[:n]  # (n, h, w)
                flat = ((slots[:n] * ny + rows[:n]) * nx + cols[:n]).expand(n, height, width)
                flat_canvas.scatter_reduce_(0, flat.reshape(-1), logits.reshape(-1).float(), reduce="amax")
                self.pixels += padded * height * width
        return canvas

    def check_finished(self) -> None:
        if self.done != self.n_planes:
            raise RuntimeError(f"WindowSegmenter: segmented {self.done} planes, expected {self.n_planes}: the sweep "
                               "did not call it once per batch over all planes in order")


def _forward(consume, indices: np.ndarray, threshold: float):
    """``consume`` of a sweep over the full plane list, fed from a sweep over ``planes[indices]``: each
    batch's slots become offsets from its first plane (the batch's planes need not be adjacent) and only
    the pixels above ``threshold`` pass (the coarse sweep thresholds lower for its windows)."""

    def forward(first, rows_cols, values, probability):
        keep = values[:, 0] > threshold
        rows_cols = rows_cols[keep]
        origin = int(indices[first])
        rows_cols = np.column_stack([indices[first + rows_cols[:, 0]] - origin, rows_cols[:, 1:]])
        consume(origin, rows_cols.astype(np.int64), values[keep], None)

    return forward


def coarse_to_fine_sweep(image_yx: np.ndarray, planes_m: np.ndarray, segment: sweep.Segmenter, *, wavelength: float,
                         dx: float, dy: float, pad: int, band_limit: bool, batch_planes: int, threshold: float,
                         device: torch.device, pool: ThreadPoolExecutor, consume, quantize=None,
                         capacity: int | None = None, coarse_stride: int, coarse_threshold: float, coarse_margin: int,
                         stride: int, pad_window_counts: bool | None = None) -> sweep.Timing:
    """:func:`holopipe.detect.sweep.sweep_hologram` (same arguments, same ``consume`` calls and
    :class:`~holopipe.detect.sweep.Timing`) searching depth coarse to fine (module docstring);
    ``coarse_stride`` 1 is the full sweep itself.

    ``coarse_threshold`` starts windows, ``coarse_margin`` pixels widen them, ``stride`` is the model's
    (window sides are its multiples). ``consume(first, rows_cols, values, None)`` gets each batch's slots as
    offsets of its planes from ``first`` (not necessarily adjacent planes); planes without a window are never
    consumed. ``pad_window_counts`` (default: on CUDA) batches windows in power-of-two counts
    (:class:`WindowSegmenter`). The timing's ``planes`` is ``len(planes_m)``: planes searched, not swept.
    """
    common = dict(wavelength=wavelength, dx=dx, dy=dy, pad=pad, band_limit=band_limit, batch_planes=batch_planes,
                  device=device, pool=pool, capacity=capacity)
    if coarse_stride == 1:
        return sweep.sweep_hologram(image_yx, planes_m, segment, threshold=threshold, consume=consume,
                                    quantize=quantize, **common)
    if quantize is not None:
        raise ValueError(f"coarse_to_fine_sweep: coarse_stride {coarse_stride} segments only windows of most planes, "
                         "so it writes no probability volume (quantize must be None; set infer.save_probabilities "
                         "false or infer.coarse_stride 1)")
    start = time.perf_counter()
    planes_m = np.asarray(planes_m)
    shape = tuple(int(side) for side in np.shape(image_yx))
    coarse = coarse_planes(len(planes_m), coarse_stride)
    coarse_boxes = [np.zeros((0, 4), np.int64)] * coarse.size
    forward_coarse = _forward(consume, coarse, threshold)

    def consume_coarse(first, rows_cols, values, probability):
        seen = values[:, 0] > coarse_threshold
        slots, rows, cols = rows_cols[seen].T
        for slot in np.unique(slots):
            lo, hi = np.searchsorted(slots, [slot, slot + 1])
            coarse_boxes[first + slot] = component_boxes(rows[lo:hi], cols[lo:hi], shape, coarse_margin)
        forward_coarse(first, rows_cols, values, probability)

    coarse_timing = sweep.sweep_hologram(image_yx, planes_m[coarse], segment,
                                         threshold=min(threshold, coarse_threshold), consume=consume_coarse, **common)
    begin = time.perf_counter()
    windows = fine_windows(coarse, coarse_boxes, len(planes_m), coarse_stride)
    fine = np.array(sorted(windows), np.int64)
    table = np.concatenate([np.zeros((0, 5), np.int64)] + [
        np.column_stack([np.full(len(windows[plane]), position), place_windows(windows[plane], shape, stride)])
        for position, plane in enumerate(fine)])
    placing = time.perf_counter() - begin
    parts = [coarse_timing]
    model_pixels = coarse.size * shape[0] * shape[1]
    if fine.size:
        segmenter = WindowSegmenter(segment, table, shape, n_planes=fine.size,
                                    batch_pixels=batch_planes * shape[0] * shape[1], device=device,
                                    pad_counts=(device.type == "cuda" if pad_window_counts is None
                                                else pad_window_counts))
        parts.append(sweep.sweep_hologram(image_yx, planes_m[fine], segmenter, threshold=threshold,
                                          consume=_forward(consume, fine, threshold), **common))
        segmenter.check_finished()
        model_pixels += segmenter.pixels
    log.info("coarse-to-fine (coarse_stride %d): %d coarse planes, %d windows on %d of the %d other planes; the "
             "model saw %.1f%% of a full sweep's pixels", coarse_stride, coarse.size, len(table), fine.size,
             len(planes_m) - coarse.size, 100 * model_pixels / max(1, len(planes_m) * shape[0] * shape[1]))
    return parts[-1]._replace(
        seconds=time.perf_counter() - start, propagation=sum(part.propagation for part in parts),
        model=sum(part.model for part in parts), postprocess=sum(part.postprocess for part in parts) + placing,
        planes=len(planes_m))
