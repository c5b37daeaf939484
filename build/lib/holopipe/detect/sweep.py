"""The z-plane sweep engine: a hologram's planes reconstructed on the device, segmented by a model (or any
:data:`Segmenter`) in batches, and the pixels above the threshold grouped into detections on the host while the
device computes the next batch (:func:`sweep_hologram`). :mod:`holopipe.detect.infer` runs it over a chunk of a
split's planes; :mod:`holopipe.detect.coarse` over a coarse-to-fine subset; the physics baseline groups its
pixels with :func:`pixel_components`. How it keeps the device busy is told in :mod:`holopipe.detect.infer`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import scipy.ndimage
import scipy.sparse
import scipy.sparse.csgraph
import torch

from holopipe.core.device import autocast
from holopipe.core.io import PARTICLE_VARS, equivalent_diameter, pixel_position
from holopipe.optics.focus import SMOOTHING_PIXELS
from holopipe.optics.propagation import Propagator, hologram_field
from holopipe.optics.reconstruction import normalize_channels

log = logging.getLogger("holopipe")

DETECTION_COLUMNS = (PARTICLE_VARS[0], "plane", *PARTICLE_VARS[1:], "area", "prob_max", "prob_mean", "logit_mean",
                     "amplitude_min")
"""Columns of an inference CSV: hid (1-based), plane (0-based global index), x, y, z, d (µm), area
(pixels), prob_max and prob_mean (probability over the detection's pixels), logit_mean (the model's mean
logit there: unlike the probability it does not saturate, so it peaks at the focus), amplitude_min (the lowest
reconstructed amplitude over the detection, box-averaged over :data:`holopipe.optics.focus.SMOOTHING_PIXELS` pixels
by :func:`holopipe.optics.focus.smoothed_amplitude`, since a single pixel's minimum is speckle: how dark, so how sharply
in focus, the particle is on that plane)."""

_FORWARD_NEIGHBOURS = ((0, 1), (1, -1), (1, 0), (1, 1))
"""Half of the 8-neighbourhood: linking each pixel to these links every neighbouring pair once."""

Segmenter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(amplitude, phase) (B, ny, nx) -> logits (B, ny, nx) of the in-focus probability, on the inputs' device."""

PIXEL_VALUES = ("probability", "logit", "amplitude")
"""Columns of the per-pixel values :func:`sweep_hologram` hands over for the pixels above the threshold."""


class Timing(NamedTuple):
    """Seconds one hologram took, in total and per part.

    ``propagation``, ``model`` (the segmenter: normalisation and network) and the device part of
    ``postprocess`` (sigmoid, thresholding, quantisation, copies) are device time: CUDA events on a GPU,
    wall time on the CPU. ``postprocess`` adds the worker thread's waiting, component analysis and hand-over
    to the volume writers, which overlap the next batches on the device, so the parts may add up to more
    than ``seconds``.
    """

    seconds: float
    propagation: float
    model: float
    postprocess: float
    planes: int

    @property
    def planes_per_second(self) -> float:
        return self.planes / self.seconds if self.seconds > 0 else float("inf")

    def shares(self) -> dict:
        """Each part's share of the wall time (0..1)."""
        total = self.seconds if self.seconds > 0 else 1.0
        return {part: getattr(self, part) / total for part in ("propagation", "model", "postprocess")}


def pixel_components(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> tuple[int, np.ndarray]:
    """8-connected components of the listed pixels: (count, label per pixel).

    ``rows``, ``cols`` must be in raster order (as ``numpy.nonzero`` and ``torch.nonzero`` give them);
    labels 0.. then follow the raster order of each component's first pixel, as scipy.ndimage.label's do.
    """
    n = rows.size
    if n == 0:
        return 0, np.zeros(0, np.int64)
    nx = int(shape[1])
    linear = rows.astype(np.int64) * nx + cols
    if np.any(np.diff(linear) <= 0):
        raise ValueError("pixel_components: pixels must be unique and in raster order")
    sources, targets = [], []
    for d_row, d_col in _FORWARD_NEIGHBOURS:
        wanted = linear + d_row * nx + d_col
        inside = (cols + d_col >= 0) & (cols + d_col < nx)  # no wrap-around into the next row
        found = np.minimum(np.searchsorted(linear, wanted), n - 1)
        linked = inside & (linear[found] == wanted)
        sources.append(np.flatnonzero(linked))
        targets.append(found[linked])
    sources, targets = np.concatenate(sources), np.concatenate(targets)
    graph = scipy.sparse.coo_matrix((np.ones(sources.size, np.int8), (sources, targets)), shape=(n, n))
    count, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
    return int(count), labels.astype(np.int64)


def detections_from_pixels(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, *, shape: tuple[int, int],
                           min_area: int, dx: float, dy: float) -> pd.DataFrame:
    """Detections (x, y, d µm; area pixels; prob_max, prob_mean, logit_mean, amplitude_min) of the
    above-threshold pixels of a plane.

    ``rows``, ``cols`` (raster order) list the pixels above the threshold and ``values`` (k, 3) their
    :data:`PIXEL_VALUES` (probability, logit, smoothed amplitude); ``shape`` is (ny, nx) and ``dx``,
    ``dy`` the pitch (m) along columns and rows.
    """
    count, labels = pixel_components(rows, cols, shape)
    weights = values[:, 0].astype(np.float64)
    logit = values[:, 1].astype(np.float64)
    amplitude = values[:, 2]
    area = np.bincount(labels, minlength=count)
    mass = np.bincount(labels, weights=weights, minlength=count)
    row_c = np.bincount(labels, weights=weights * rows, minlength=count) / np.where(mass > 0, mass, 1.0)
    col_c = np.bincount(labels, weights=weights * cols, minlength=count) / np.where(mass > 0, mass, 1.0)
    prob_max = scipy.ndimage.maximum(weights, labels, np.arange(count)) if count else np.zeros(0)
    amplitude_min = scipy.ndimage.minimum(amplitude, labels, np.arange(count)) if count else np.zeros(0)
    keep = area >= min_area
    ny, nx = shape
    return pd.DataFrame({
        "x": pixel_position(col_c[keep], nx, dx) * 1e6,
        "y": pixel_position(row_c[keep], ny, dy) * 1e6,
        "d": equivalent_diameter(area[keep], dx, dy) * 1e6,
        "area": area[keep].astype(np.int64),
        "prob_max": np.asarray(prob_max, np.float64)[keep],
        "prob_mean": mass[keep] / area[keep],
        "logit_mean": np.bincount(labels, weights=logit, minlength=count)[keep] / area[keep],
        "amplitude_min": np.asarray(amplitude_min, np.float64)[keep],
    })


def batch_detections(rows_cols: np.ndarray, values: np.ndarray, *, shape: tuple[int, int], min_area: int,
                     dx: float, dy: float) -> list[tuple[int, pd.DataFrame]]:
    """(slot, detections) of each plane of a batch with any, from :func:`sweep_hologram`'s pixel lists."""
    found = []
    slots = rows_cols[:, 0]
    for slot in np.unique(slots):
        lo, hi = np.searchsorted(slots, [slot, slot + 1])
        table = detections_from_pixels(rows_cols[lo:hi, 1], rows_cols[lo:hi, 2], values[lo:hi], shape=shape,
                                       min_area=min_area, dx=dx, dy=dy)
        if len(table):
            found.append((int(slot), table))
    return found


def detections_in_plane(logits: np.ndarray, amplitude: np.ndarray, *, threshold: float, min_area: int,
                        dx: float, dy: float) -> pd.DataFrame:
    """:func:`detections_from_pixels` of a whole plane of logits (ny, nx) whose probability exceeds
    ``threshold``, with the plane's reconstructed amplitude (ny, nx); the pixels and their values are
    :func:`sparse_pixels`'."""
    logits = torch.as_tensor(np.asarray(logits, np.float32))
    amplitude = torch.as_tensor(np.asarray(amplitude, np.float32))
    count = int((logits >= logit_threshold(threshold, logits.device)).sum())
    pixels = sparse_pixels(logits[None], amplitude[None], threshold, count)
    rows, cols = np.divmod(pixels.flat.numpy(), logits.shape[1])
    return detections_from_pixels(rows, cols, pixels.values.numpy(), shape=tuple(logits.shape), min_area=min_area,
                                  dx=dx, dy=dy)


ACTIVATION_ELEMENT_LIMIT = 2**31
"""A model run's largest activation stays below this many elements: some of PyTorch's kernels index in 32-bit
integers (the channels-last max-pool computes ``batch_id * in_stride_n`` in int32), and a ResNet stem's output is
293.6 M elements per full-size HOLODEC plane, so 8 such planes are the most, and a U-Net's full-resolution
decoder features are larger still. Past the limit such a kernel crashes or writes the wrong memory."""


def largest_activation(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Elements of the largest tensor that enters or leaves any module of ``model`` for one input of
    ``input_shape`` (channels, ny, nx), traced on the meta device: shapes only, no memory and no arithmetic, so a
    full-size frame costs milliseconds. Activations computed between modules (a decoder's concatenation) are
    seen as the next module's input. The model's own forward hooks see the meta tensors too."""
    sizes = [math.prod(input_shape)]

    def record(module, inputs, output):
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        sizes.extend(tensor.numel() for tensor in (*inputs, *outputs) if isinstance(tensor, torch.Tensor))

    hooks = [module.register_forward_hook(record) for module in model.modules()]
    try:
        meta = {name: torch.empty_like(tensor, device="meta")
                for name, tensor in (*model.named_parameters(), *model.named_buffers())}
        with torch.no_grad():
            torch.func.functional_call(model, meta, (torch.empty((1, *input_shape), device="meta"),))
    finally:
        for hook in hooks:
            hook.remove()
    return max(sizes)


def activation_counter(model: torch.nn.Module, channels: int, stride: int) -> Callable[[int, int], int]:
    """``(ny, nx) -> ``:func:`largest_activation` of one plane of ``channels`` channels padded to ``stride``,
    traced once per frame shape."""

    @functools.cache
    def activation_elements(ny: int, nx: int) -> int:
        return largest_activation(model, (channels, ny + -ny % stride, nx + -nx % stride))

    return activation_elements


def planes_per_run(activation_elements: int, planes: int) -> int:
    """Planes the model takes at once out of ``planes``: the fewest runs whose largest activation
    (``activation_elements`` per plane) stays below :data:`ACTIVATION_ELEMENT_LIMIT`, the planes shared evenly
    among them (12 planes at most 5 per run: 3 runs of 4, not 5 + 5 + 2)."""
    most = (ACTIVATION_ELEMENT_LIMIT - 1) // int(activation_elements)
    if most < 1:
        raise ValueError(f"infer: one plane's largest activation has {activation_elements} elements, not below "
                         f"2^31 = {ACTIVATION_ELEMENT_LIMIT}: the frame is too large for this model; infer it "
                         "in smaller pieces (a smaller regrid frame) or choose a model with fewer full-resolution "
                         "channels")
    runs = -(-int(planes) // most)
    return -(-int(planes) // runs)


def model_segmenter(model: torch.nn.Module, channels, stats: dict, stride: int, *,
                    amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                    batch_planes: int | None = None, compile: bool = False,
                    activation_elements: Callable[[int, int], int] | None = None) -> Segmenter:
    """Segmenter running ``model`` (logits out) on whole planes, normalised as in training.

    Sides that are not multiples of ``stride`` are padded at the bottom and right with the normalised
    background (0) and the probabilities cropped back to the frame. The model takes a batch in runs of
    :func:`planes_per_run` planes, the largest activation traced once per frame shape
    (:func:`activation_counter`, or the given ``activation_elements``). With ``batch_planes`` every run of a batch of up
    to ``batch_planes`` planes has the same length, a short one (a chunk's last) padded with background planes, so a
    compiled model (``compile``: ``torch.compile`` without dynamic shapes; the eager model is what is traced) sees one
    shape only. The segmenter carries ``stride`` and ``activation_elements(ny, nx)``, the largest activation of one
    plane of a frame, as attributes.
    """
    channels = list(channels)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network = torch.compile(model, dynamic=False) if compile else model
    activation_elements = activation_elements or activation_counter(model, len(channels), stride)

    def segment(amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        inputs = normalize_channels(amplitude, phase, channels, stats)  # (B, C, ny, nx)
        n_planes, (ny, nx) = inputs.shape[0], inputs.shape[-2:]
        pad_rows, pad_cols = -ny % stride, -nx % stride
        if pad_rows or pad_cols:
            inputs = torch.nn.functional.pad(inputs, (0, pad_cols, 0, pad_rows))
        fixed = batch_planes is not None and n_planes <= batch_planes
        run = planes_per_run(activation_elements(ny, nx), batch_planes if fixed else n_planes)
        logits = []
        for first in range(0, n_planes, run):
            part = inputs[first:first + run]
            count = part.shape[0]
            if fixed and count < run:
                part = torch.nn.functional.pad(part, (0, 0, 0, 0, 0, 0, 0, run - count))
            with torch.inference_mode(), autocast(inputs.device, amp_dtype):
                out = network(part.contiguous(memory_format=memory_format))  # (run, 1, ny + pad_rows, nx + pad_cols)
            logits.append(out[:count, 0, :ny, :nx])
        return (logits[0] if len(logits) == 1 else torch.cat(logits)).float()

    segment.stride = stride  # the coarse-to-fine search sizes its windows in multiples of it
    segment.activation_elements = activation_elements
    return segment


@contextmanager
def cudnn_autotune(device: torch.device):
    """Let cuDNN pick its fastest convolutions on ``device`` (every plane has one shape), then restore."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = previous or device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


BATCHES_IN_FLIGHT = 2
"""Plane batches whose detections (and volume slices) may wait for the host at once: the worker groups one
while another's copies land and the device computes the next, so neither side waits on the other, and memory
stays a few batches."""

MIN_PIXEL_CAPACITY = 2**16
PIXEL_CAPACITY_SHARE = 1024
"""A batch hands at most 1/1024 of its pixels (at least :data:`MIN_PIXEL_CAPACITY`) above the threshold to the
host without a wait (:func:`sparse_pixels`): 20 B per slot, 2.5 MB per batch of 8 full-size planes, copied
whatever the count (500 droplets of 40-900 pixels each mark far fewer). A batch that marks more (random
weights, say) costs one exact, waiting pass in the worker, and the capacity grows for the next ones."""


class SparsePixels(NamedTuple):
    """The pixels of a batch above the threshold, in fixed-size device tensors (no host wait to size them).

    ``count`` () int64: how many pixels are above; ``flat`` (capacity,) int64: the first ``min(count,
    capacity)`` of them as flat indices into (B, ny, nx) in raster order (the rest padding); ``values``
    (capacity, 3) float32: their :data:`PIXEL_VALUES`. ``count > capacity`` means some were left out.
    """

    count: torch.Tensor
    flat: torch.Tensor
    values: torch.Tensor


_SIGMOID_LANES = 64
"""Values :func:`_sigmoid` pads to a multiple of: on the CPU torch's vectorised sigmoid and its scalar loop for
a tensor's tail round differently in the last bit, so every value goes through the vectorised one, as nearly
every pixel of a whole plane did."""


def _sigmoid(values: torch.Tensor) -> torch.Tensor:
    """``torch.sigmoid`` of a 1-D float32 tensor, each value rounded as within a whole plane
    (:data:`_SIGMOID_LANES`)."""
    pad = -values.numel() % _SIGMOID_LANES
    return torch.sigmoid(torch.nn.functional.pad(values, (0, pad)))[:values.numel()]


def _float32_order(keys: np.ndarray) -> np.ndarray:
    """float32 values of integer ``keys`` that order them as the keys do (sign and magnitude bits unfolded)."""
    keys = np.asarray(keys, np.int64)
    bits = np.where(keys < 0, -keys | 0x80000000, keys).astype(np.uint32)
    return bits.view(np.float32)


@functools.cache
def logit_threshold(threshold: float, device: torch.device) -> float:
    """The smallest float32 logit whose probability, ``torch.sigmoid`` on ``device``, exceeds ``threshold``:
    ``logits >= logit_threshold`` selects exactly the pixels ``sigmoid(logits) > threshold`` does (the sigmoid
    is monotonic) without a sigmoid per pixel. Not ``log(t / (1 - t))`` itself: float32 rounding of the sigmoid
    moves the boundary (for t = 0.5 from 0 to 6e-8), so it is found by bisection over the float32 values in
    order, once per threshold and device; -inf or inf when every or no logit passes."""
    lowest, highest = -0x7F800000, 0x7F800000  # the keys of -inf and inf

    def passes(key: int) -> bool:
        value = torch.full((_SIGMOID_LANES,), float(_float32_order(key)), dtype=torch.float32, device=device)
        return bool(torch.sigmoid(value)[0] > threshold)

    if passes(lowest):
        return float("-inf")
    if not passes(highest):
        return float("inf")
    while highest - lowest > 1:  # passes(highest), not passes(lowest)
        middle = (lowest + highest) // 2
        lowest, highest = (lowest, middle) if passes(middle) else (middle, highest)
    return float(_float32_order(highest))


def smoothed_amplitude_at(amplitude: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """:func:`holopipe.optics.focus.smoothed_amplitude` of planes (B, ny, nx) at the pixels ``flat`` (k,), flat indices
    into them, on their device: each pixel's :data:`~holopipe.optics.focus.SMOOTHING_PIXELS`-wide box is gathered (edges
    repeated) and summed in the whole-plane function's order (rows first, then columns), so the values are its,
    bit for bit, at the cost of the selected pixels only."""
    ny, nx = amplitude.shape[-2:]
    rest, cols = torch.div(flat, nx, rounding_mode="floor"), flat % nx
    planes, rows = torch.div(rest, ny, rounding_mode="floor"), rest % ny
    reach = torch.arange(-(SMOOTHING_PIXELS // 2), SMOOTHING_PIXELS // 2 + 1, device=flat.device)
    box_rows = (rows[:, None] + reach).clamp_(0, ny - 1)  # (k, SMOOTHING_PIXELS)
    box_cols = (cols[:, None] + reach).clamp_(0, nx - 1)
    index = (planes[:, None, None] * ny + box_rows[:, :, None]) * nx + box_cols[:, None, :]
    box = amplitude.reshape(-1)[index].float()  # (k, rows, columns)
    across = box[:, 0]
    for k in range(1, SMOOTHING_PIXELS):
        across = across + box[:, k]
    total = across[:, 0]
    for k in range(1, SMOOTHING_PIXELS):
        total = total + across[:, k]
    return total / (SMOOTHING_PIXELS * SMOOTHING_PIXELS)


def sparse_pixels(logits: torch.Tensor, amplitude: torch.Tensor, threshold: float, capacity: int) -> SparsePixels:
    """:class:`SparsePixels` of the float32 logits (B, ny, nx) whose probability exceeds ``threshold``, with the
    smoothed amplitude of the same planes' amplitude (B, ny, nx), on their device.

    The logits are compared with :func:`logit_threshold` (the same pixels as comparing probabilities); the
    sigmoid and the box average (:func:`smoothed_amplitude_at`) are computed at the slots only, not on every
    pixel of every plane. ``torch.nonzero`` would wait for the device to learn its size;
    ``torch.nonzero_static`` fills ``capacity`` slots instead, in the same raster order, so the pixels equal
    ``torch.nonzero``'s whenever they fit.
    """
    flat_logits = logits.reshape(-1)
    above = flat_logits >= logit_threshold(float(threshold), flat_logits.device)
    flat = torch.nonzero_static(above, size=int(capacity), fill_value=0)[:, 0]
    selected = flat_logits.index_select(0, flat).float()
    values = torch.stack([_sigmoid(selected), selected, smoothed_amplitude_at(amplitude, flat)], dim=1)
    return SparsePixels(above.sum(), flat, values)


def pixel_capacity(batch_pixels: int) -> int:
    """Slots of :func:`sparse_pixels` for a batch of ``batch_pixels`` pixels (:data:`PIXEL_CAPACITY_SHARE`)."""
    return max(MIN_PIXEL_CAPACITY, batch_pixels // PIXEL_CAPACITY_SHARE)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the host: a CPU tensor as it is; a device tensor copied without waiting into pinned
    memory (valid once the next event recorded on the stream has completed)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class _Clock:
    """Stage boundaries of the plane loop: CUDA events on a GPU (recorded without waiting, read once after the
    hologram), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, begin, end) -> float:
        return begin.elapsed_time(end) / 1000.0 if self.cuda else end - begin


@dataclass
class _BatchOnHost:
    """One batch on its way to the host: pinned copies that have landed once ``ready`` (an event; None on the
    CPU) has, and the device tensors (logits, amplitude) an overflow of the pixel capacity recomputes from
    (dropped as soon as the count is known, so device memory is not held while the worker groups components)."""

    first: int
    count: torch.Tensor
    flat: torch.Tensor
    values: torch.Tensor
    volume: torch.Tensor | None
    ready: object
    logits: torch.Tensor | None
    amplitude: torch.Tensor | None

    def pixels(self, threshold: float) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, flat, values) on the host, all of them (waits for the copies: call it in the worker)."""
        if self.ready is not None:
            self.ready.synchronize()
        count, flat, values = int(self.count), self.flat, self.values
        if count > flat.numel():  # more pixels above the threshold than slots: recompute them all, exactly
            exact = sparse_pixels(self.logits, self.amplitude, threshold, count)
            flat, values = exact.flat.cpu(), exact.values.cpu()
        self.logits = self.amplitude = None
        return count, flat[:count], values[:count]


def sweep_hologram(image_yx: np.ndarray, planes_m: np.ndarray, segment: Segmenter, *, wavelength: float,
                   dx: float, dy: float, pad: int, band_limit: bool, batch_planes: int, threshold: float,
                   device: torch.device, pool: ThreadPoolExecutor, consume, quantize=None,
                   capacity: int | None = None) -> Timing:
    """Reconstruct and segment one contrast hologram (ny, nx) at ``planes_m`` (metres); returns its timing.

    For each batch, ``consume(first, rows_cols, values, probability)`` runs in ``pool`` while the device
    works on the next batches: ``first`` is the batch's first index into ``planes_m``, ``rows_cols`` an
    int64 array (k, 3) of (slot in batch, row, column) of the pixels above ``threshold`` in raster order,
    ``values`` (k, 3) float32 their :data:`PIXEL_VALUES`, and ``probability`` the batch's planes as
    ``quantize(probability)`` on the host (None without ``quantize``).

    The loop never waits for the device: the plane depths stay on the host, the pixels above the
    threshold are gathered into ``capacity`` slots (default :func:`pixel_capacity`; :func:`sparse_pixels`)
    and they, the quantised planes and their count come over in pinned, asynchronous copies on which the
    worker, not the loop, waits. Only when :data:`BATCHES_IN_FLIGHT` batches are still with the worker does
    the loop wait for the oldest: bounded memory, and a worker's error surfaces here.
    """
    clock = _Clock(device)
    start = time.perf_counter()
    hologram = torch.from_numpy(np.ascontiguousarray(image_yx, dtype=np.float32)).to(device)
    z_m = torch.as_tensor(np.asarray(planes_m, dtype=np.float64))  # host: reconstruct reads depths there
    propagator = Propagator(hologram_field(hologram, background=1.0), wavelength=wavelength, dx=dx,  # standardized
                            dy=dy, pad=pad, band_limit=band_limit)
    ny, nx = hologram.shape
    slots = [int(capacity or pixel_capacity(min(batch_planes, z_m.numel()) * ny * nx))]  # grows on overflow
    busy = [0.0]  # seconds the worker spent on this hologram

    def hand_over(batch: _BatchOnHost) -> None:
        begin = time.perf_counter()
        count, flat, values = batch.pixels(threshold)
        if count > slots[0]:
            slots[0] = 2 * count  # later batches fit without the exact pass
        rest, cols = np.divmod(flat.numpy(), nx)
        rows_cols = np.stack([*np.divmod(rest, ny), cols], axis=1)
        volume = batch.volume.numpy() if batch.volume is not None else None
        consume(batch.first, rows_cols, values.numpy(), volume)
        busy[0] += time.perf_counter() - begin

    marks, in_flight = [], deque()
    for first in range(0, z_m.numel(), batch_planes):
        t0 = clock.mark()
        amplitude, phase = propagator.reconstruct(z_m[first:first + batch_planes])  # (B, ny, nx)
        t1 = clock.mark()
        logits = segment(amplitude, phase)  # (B, ny, nx)
        t2 = clock.mark()
        pixels = sparse_pixels(logits, amplitude, threshold, slots[0])
        volume = quantize(torch.sigmoid(logits)) if quantize is not None else None
        del phase
        host = [_host_copy(tensor) for tensor in (pixels.count, pixels.flat, pixels.values)]
        volume = _host_copy(volume) if volume is not None else None
        t3 = clock.mark()  # also the event the worker waits on: every copy above precedes it
        marks.append((t0, t1, t2, t3))
        if len(in_flight) >= BATCHES_IN_FLIGHT:
            in_flight.popleft().result()
        in_flight.append(pool.submit(hand_over, _BatchOnHost(first, *host, volume, t3 if clock.cuda else None,
                                                             logits, amplitude)))
        del logits, amplitude, pixels
    while in_flight:
        in_flight.popleft().result()
    if clock.cuda and marks:
        marks[-1][3].synchronize()  # every event has completed: read them, once per hologram
    propagation = sum(clock.seconds(t0, t1) for t0, t1, _, _ in marks)
    model = sum(clock.seconds(t1, t2) for _, t1, t2, _ in marks)
    postprocess = sum(clock.seconds(t2, t3) for _, _, t2, t3 in marks)
    return Timing(time.perf_counter() - start, propagation, model, postprocess + busy[0], z_m.numel())
