"""Z-plane inference: every reconstruction plane of every hologram through the segmentation model.

Per hologram the intensity is moved to the device once and Fourier-transformed once
(:class:`holopipe.optics.Propagator`); planes are then reconstructed in batches of
``infer.batch_planes``, normalised exactly as in training (:func:`holopipe.reconstruction.normalize_channels`)
and segmented on WHOLE planes (the model is fully convolutional), under autocast (bf16 on a GPU with
``infer.precision`` auto, fp32 on CPU). Any ``infer.batch_planes`` is safe: a batch holds no more planes than
the job's memory does (:func:`plane_batch`: on the CPU what the rule declared, ``--mem-mb``, or the machine
has; on a GPU its free memory), and the model takes a batch in runs whose largest activation, traced from the
model and the frame (:func:`largest_activation`), stays below 2³¹ elements (:func:`planes_per_run`: some
kernels index in 32 bits). A log line says what was used. Frames whose sides are not multiples of the model's stride are
padded at the bottom and right with the normalised background (0, i.e. amplitude 1 and phase 0) and the
probabilities cropped back.

The model is loaded for inference with its batch norms folded into the convolutions
(:func:`holopipe.models.fold_batchnorm`), channels-last on a GPU, and ``torch.compile``-d for the one plane
shape with ``infer.compile``. The plane loop never waits for the device (:func:`sweep_hologram`): the depths
stay on the host (each plane's is a kernel argument of its transfer function), stages are timed with CUDA
events read after the hologram, and results come to the host in pinned, asynchronous copies on which a worker
thread waits.

Detections: pixels with probability > ``infer.threshold`` are found on the device by comparing the logits
with the threshold's logit (:func:`logit_threshold`), into fixed-size slots (:func:`sparse_pixels`), and only
at them are the sigmoid and the box-averaged amplitude computed; only they (row, column, probability, logit, smoothed amplitude) travel to the
host, where a worker thread groups them into 8-connected components (a sparse pixel graph, so the cost is
that of the bright pixels, not of the frame) while the device computes the next batch. Components of at least ``infer.min_area`` pixels become detections: hid
(1-based), plane (global index), probability-weighted centroid x, y and plane z, equivalent diameter
``d = 2 sqrt(area dx dy / π)`` (all µm; x, y from the frame centre with the contract's pixel centres
``(i + 0.5 - n/2) · pitch``), area (pixels), prob_max, prob_mean.

A split's planes are sharded into ``n_chunks`` contiguous chunks (``numpy.array_split``), each a separate
job; :mod:`holopipe.particles` gathers them. Every plane is computed the same way whichever chunk holds it.

A killed job resumes: every finished hologram's detections (and its slices of the probability volume) are
kept beside the output until the chunk is complete, and a rerun sweeps only the others (:func:`infer_chunk`).

The optional probability volume is a zarr (v3) group with ``probability (hologram_number, plane, y, x)``
(uint8 ``round(255 p)`` with attribute ``scale_factor`` 1/255, which xarray decodes, or float16), one
plane per chunk, compressed with zarr's default codec, and the coordinates ``plane`` (global index) and
``z`` (m). It is quantised on the device and written by ``infer.writers`` threads (:class:`VolumeWriter`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import psutil
import scipy.ndimage
import scipy.sparse
import scipy.sparse.csgraph
import torch
import zarr
from tqdm.auto import tqdm

from holopipe import __version__
from holopipe import coarse  # the module: it builds on this one
from holopipe.reconstruction import normalize_channels
from holopipe.focus import SMOOTHING_PIXELS
from holopipe.io import (HologramParts, equivalent_diameter, input_identity, pixel_position, remove_path,
                         usable_holograms)
from holopipe.optics import Propagator, hologram_field
from holopipe.provenance import code_identity
from holopipe.reconstruction import open_standardized, z_bin_centres
from holopipe.device import autocast, autocast_dtype, describe_device, resolve_device
from holopipe.models import fold_batchnorm
from holopipe.train import load_model

__all__ = [
    "ACTIVATION_ELEMENT_LIMIT",
    "BATCHES_IN_FLIGHT",
    "DETECTION_COLUMNS",
    "InferMemory",
    "SparsePixels",
    "Timing",
    "VolumeWriter",
    "activation_counter",
    "batch_detections",
    "chunk_planes",
    "cudnn_autotune",
    "detections_from_pixels",
    "detections_in_plane",
    "infer_chunk",
    "infer_memory",
    "inference_model",
    "largest_activation",
    "load_segmenter",
    "logit_threshold",
    "model_segmenter",
    "pixel_capacity",
    "pixel_components",
    "plane_batch",
    "planes_per_run",
    "resume_fingerprint",
    "smoothed_amplitude_at",
    "sparse_pixels",
    "sweep_hologram",
]

log = logging.getLogger("holopipe")

DETECTION_COLUMNS = ("hid", "plane", "x", "y", "z", "d", "area", "prob_max", "prob_mean", "logit_mean",
                     "amplitude_min")
"""Columns of an inference CSV: hid (1-based), plane (0-based global index), x, y, z, d (µm), area
(pixels), prob_max and prob_mean (probability over the detection's pixels), logit_mean (the model's mean
logit there: unlike the probability it does not saturate, so it peaks at the focus), amplitude_min (the lowest
reconstructed amplitude over the detection, box-averaged over :data:`holopipe.focus.SMOOTHING_PIXELS` pixels
by :func:`holopipe.focus.smoothed_amplitude`, since a single pixel's minimum is speckle: how dark, so how sharply in
focus, the particle is on that plane)."""

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


def chunk_planes(n_planes: int, chunk: int, n_chunks: int) -> np.ndarray:
    """Global indices of the planes of chunk ``chunk`` (0-based) of ``n_chunks`` contiguous chunks."""
    if n_chunks < 1 or not 0 <= chunk < n_chunks:
        raise ValueError(f"chunk must be in 0..n_chunks-1 with n_chunks >= 1, got chunk {chunk} of {n_chunks}")
    return np.array_split(np.arange(n_planes), n_chunks)[chunk]


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
    (:func:`activation_counter`, or the given ``activation_elements``). With ``batch_planes`` every run of a batch of up to ``batch_planes`` planes
    has the same length, a short one (a chunk's last) padded with background planes, so a compiled model
    (``compile``: ``torch.compile`` without dynamic shapes; the eager model is what is traced) sees one shape
    only. The segmenter carries ``stride`` and ``activation_elements(ny, nx)``, the largest activation of one
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
    """``torch.sigmoid`` of a 1-D float32 tensor, each value rounded as within a whole plane (:data:`_SIGMOID_LANES`)."""
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
    """:func:`holopipe.focus.smoothed_amplitude` of planes (B, ny, nx) at the pixels ``flat`` (k,), flat indices
    into them, on their device: each pixel's :data:`~holopipe.focus.SMOOTHING_PIXELS`-wide box is gathered (edges
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


def inference_model(model_path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A model file's network for inference on ``device``, with its info: batch norms folded into the
    convolutions (:func:`holopipe.models.fold_batchnorm`, on the CPU, probed on one stride-sized random
    frame), channels-last on a GPU."""
    model, info = load_model(model_path, "cpu")
    stride = int(info["stride"])
    probe = torch.randn(1, int(info["in_channels"]), stride, stride, generator=torch.Generator().manual_seed(0))
    model = fold_batchnorm(model, probe).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, info


def _file_segmenter(model: torch.nn.Module, info: dict, device: torch.device, precision: str, *, compile: bool,
                    batch_planes: int | None, activation_elements=None) -> Segmenter:
    """:func:`model_segmenter` of an :func:`inference_model`."""
    log.info("infer model: %s, batch norms folded%s", info["model"]["architecture"],
             f", torch.compile for batches of {batch_planes} planes" if compile else "")
    return model_segmenter(model, info["channel_names"], info["stats"], int(info["stride"]),
                           amp_dtype=autocast_dtype(precision, device), channels_last=device.type == "cuda",
                           batch_planes=batch_planes if compile else None, compile=compile,
                           activation_elements=activation_elements)


def load_segmenter(model_path, device: torch.device, precision: str, *, compile: bool = False,
                   batch_planes: int | None = None) -> Segmenter:
    """The segmenter of a model file for inference on ``device`` (:func:`inference_model`), autocast to
    ``precision`` (:func:`holopipe.device.autocast_dtype`), and with ``compile`` ``torch.compile`` for the one
    plane shape: batches padded to ``batch_planes``, no dynamic shapes."""
    model, info = inference_model(model_path, device)
    return _file_segmenter(model, info, device, precision, compile=compile, batch_planes=batch_planes)


def _quantizer(dtype: str):
    if dtype == "uint8":
        return lambda probability: torch.round(probability * 255).to(torch.uint8)
    return lambda probability: probability.to(torch.float16)


def _create_volume(path: Path, shape: tuple[int, int, int, int], dtype: str, planes: np.ndarray,
                   z_m: np.ndarray, attrs: dict) -> zarr.Array:
    """The probability group at ``path`` (a temporary name); returns its ``probability`` array."""
    group = zarr.open_group(path, mode="w", zarr_format=3, attributes=attrs)
    array_attrs = {"long_name": "in-focus particle probability"}
    if dtype == "uint8":
        array_attrs["scale_factor"] = 1.0 / 255.0
    probability = group.create_array("probability", shape=shape, chunks=(1, 1, *shape[2:]), dtype=dtype,
                                     fill_value=0, dimension_names=("hologram_number", "plane", "y", "x"),
                                     attributes=array_attrs)
    group.create_array("plane", data=planes.astype(np.int32), dimension_names=("plane",),
                       attributes={"long_name": "plane (z bin) index, 0-based"})
    group.create_array("z", data=z_m.astype(np.float64), dimension_names=("plane",),
                       attributes={"units": "m", "long_name": "plane depth (bin centre)"})
    return probability


class VolumeWriter:
    """Writes probability planes into a zarr array (one plane per chunk) from a pool of ``threads``, so the
    compression and the file system do not hold up the plane loop.

    At most ``max_planes`` planes wait to be written: :meth:`write` blocks beyond that, so memory stays a
    few batches and a slow disk slows the sweep instead of filling the host. A write's error is raised by
    the :meth:`write` or :meth:`flush` that next collects it.
    """

    def __init__(self, array, threads: int, max_planes: int):
        self.array, self.max_planes = array, max(1, int(max_planes))
        self._pool = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="holopipe-volume")
        self._pending: deque = deque()

    def write(self, hologram: int, first: int, planes: np.ndarray) -> None:
        """Queue ``planes`` (B, ny, nx) as planes ``first``.. of hologram ``hologram`` (0-based indices)."""
        for offset in range(planes.shape[0]):
            while len(self._pending) >= self.max_planes:
                self._collect_oldest()
            self._pending.append(self._pool.submit(self._write_plane, hologram, first + offset, planes[offset]))

    def _write_plane(self, hologram: int, plane: int, values: np.ndarray) -> None:
        self.array[hologram, plane] = values

    def _collect_oldest(self) -> None:
        self._pending[0].result()  # counted as queued until written
        self._pending.popleft()

    def flush(self) -> None:
        """Wait until every queued plane is written; raises the first write's error."""
        while self._pending:
            self._collect_oldest()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._pool.shutdown(wait=True, cancel_futures=exc_info[0] is not None)


RESUME_IGNORES = ("batch_planes", "splits", "compile", "writers")
"""``infer`` keys that change no chunk's result: a rerun with another plane batch (after running out of
memory, say), compiled or not, with more or fewer volume writers, keeps the holograms finished before."""


def resume_fingerprint(config: dict, model_path, store_path, *, chunk: int, n_chunks: int, probabilities_path,
                       segment: Segmenter | None = None) -> dict:
    """What a chunk's finished holograms depend on: the code (:func:`holopipe.provenance.code_identity`), the
    stage's config, the chunk, the model and store files (:func:`holopipe.io.input_identity`) and whether a
    probability volume is written. A ``segment`` given in
    place of the model counts by identity (it cannot be fingerprinted), so it resumes only in its process."""
    infer = {key: value for key, value in config["infer"].items() if key not in RESUME_IGNORES}
    return {"stage": "infer", "code": code_identity(), "reconstruction": config["reconstruction"],
            "infer": infer, "chunk": int(chunk), "n_chunks": int(n_chunks),
            "inputs": input_identity(*[path for path in (model_path, store_path) if path is not None]),
            "segment": None if segment is None else repr(segment),
            "probabilities": None if probabilities_path is None else os.fspath(probabilities_path)}


INFER_LIBRARIES_BYTES = 1100 * 2**20
"""Host memory of torch and the model (workflow/rules/common.smk's INFER_LIBRARIES_MB: the rule declares memory
by the same figures, measured by benchmarks/bench_infer_memory.py; tests/test_infer.py keeps the two equal)."""
INFER_BYTES_PER_PADDED_PIXEL = 40
"""The hologram's spectrum and transfer function, once, per padded pixel (common.smk's, as above)."""
INFER_BYTES_PER_PADDED_PIXEL_PLANE = 30
"""Per plane of a batch, the propagated field, its amplitude and phase, per padded pixel (common.smk's)."""
INFER_CPU_BYTES_PER_PIXEL_PLANE = 470
"""Per plane of a batch on the CPU, the model's activations per frame pixel (common.smk's
INFER_BYTES_PER_PIXEL_PLANE["cpu"]: 9.3 GB for a full-size HOLODEC plane)."""
DEVICE_ACTIVATIONS_HELD = 3
"""On a GPU, a plane's model memory is taken as this many copies of its largest activation (the largest
layer's input and output and a skip connection) in the autocast dtype: an assumption until
benchmarks/device_checks.sh measures it."""
DEVICE_MEMORY_SHARE = 0.9
"""Share of the GPU's free memory (once the model is loaded) a batch may fill: the rest for cuDNN's
workspaces and the caching allocator's fragmentation."""


class InferMemory(NamedTuple):
    """Memory a plane batch must fit in: ``budget`` bytes, of which ``fixed`` are taken before any plane and
    ``per_plane`` by each plane of a batch; ``source`` says where the budget comes from."""

    budget: int
    fixed: int
    per_plane: int
    source: str


def infer_memory(device: torch.device, *, frame_pixels: int, padded_pixels: int, mem_mb: int | None = None,
                 activation_elements: int = 0, element_bytes: int = 4) -> InferMemory:
    """The memory an infer job's plane batches may use on ``device``. On the CPU: the job's declared memory
    ``mem_mb`` or the machine's (this process's resident memory plus what is available), whichever is less,
    with the rule's own cost model (:data:`INFER_LIBRARIES_BYTES`, ...), so a job computes the planes its rule
    declared memory for. On CUDA: :data:`DEVICE_MEMORY_SHARE` of the free device memory, a plane costing
    its propagation and :data:`DEVICE_ACTIVATIONS_HELD` of its largest activation (``activation_elements``
    of ``element_bytes``)."""
    spectrum = INFER_BYTES_PER_PADDED_PIXEL * padded_pixels
    propagation = INFER_BYTES_PER_PADDED_PIXEL_PLANE * padded_pixels
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return InferMemory(int(DEVICE_MEMORY_SHARE * free), spectrum,
                           propagation + DEVICE_ACTIVATIONS_HELD * activation_elements * element_bytes,
                           f"{DEVICE_MEMORY_SHARE:.0%} of the free memory of {device}")
    machine = psutil.Process().memory_info().rss + psutil.virtual_memory().available
    budget, source = machine, "the machine's available memory"
    if mem_mb is not None and int(mem_mb) * 2**20 < machine:
        budget, source = int(mem_mb) * 2**20, f"the job's memory (--mem-mb {int(mem_mb)})"
    return InferMemory(budget, INFER_LIBRARIES_BYTES + spectrum,
                       propagation + INFER_CPU_BYTES_PER_PIXEL_PLANE * frame_pixels, source)


def plane_batch(requested: int, memory: InferMemory, *, what: str) -> int:
    """Planes per batch: ``requested`` (``infer.batch_planes``), or as many as ``memory`` holds if fewer. Raises
    MemoryError naming ``what`` (the store and frame) when not even one plane fits."""
    fits = (memory.budget - memory.fixed) // memory.per_plane
    if fits < 1:
        raise MemoryError(f"infer: {what}: one plane needs about {(memory.fixed + memory.per_plane) / 2**20:.0f} MB "
                          f"({memory.fixed / 2**20:.0f} MB before the planes, {memory.per_plane / 2**20:.0f} MB per "
                          f"plane) but {memory.source} is {memory.budget / 2**20:.0f} MB: give the job more memory "
                          "or run it on a GPU (infer.device)")
    return int(min(requested, fits))


def _detection_table(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """One table of :data:`DETECTION_COLUMNS` sorted by (hid, plane); headers only when there is none."""
    columns = list(DETECTION_COLUMNS)
    tables = [table for table in tables if len(table)]
    table = (pd.concat(tables, ignore_index=True)[columns] if tables
             else pd.DataFrame({column: pd.Series(dtype=float) for column in columns}))
    return table.sort_values(["hid", "plane"], kind="stable", ignore_index=True)


def infer_chunk(config: dict, model_path, store_path, out_csv, *, chunk: int, n_chunks: int,
                probabilities_path=None, progress=True, segment: Segmenter | None = None,
                mem_mb: int | None = None) -> Path:
    """Detections of chunk ``chunk`` of ``n_chunks`` of the planes, for every hologram of a standardized store.

    Writes the CSV ``out_csv`` (:data:`DETECTION_COLUMNS`, header only when nothing is found) and, when
    ``probabilities_path`` is given or ``infer.save_probabilities`` is true (then next to ``out_csv`` as
    ``<stem>.probabilities.zarr``), the probability volume of this chunk's planes; both atomically.
    ``segment`` replaces the model (tests: an oracle); ``model_path`` may then be None. ``mem_mb`` is the memory
    the job was given (the rule's declared ``mem_mb``): on the CPU a batch holds no more planes than fit in it
    (:func:`plane_batch`), nor than the machine has available.

    Resumes after a kill: each finished hologram's detections are kept in ``<out_csv>.parts/``
    (:class:`holopipe.io.HologramParts`, keyed by :func:`resume_fingerprint`) and the volume being written
    lives there too, so a rerun sweeps only the holograms not yet done. A hologram counts as done only once
    its volume slices are written; the volume is renamed into place, then the CSV written, at the very end.
    """
    infer, reconstruction = config["infer"], config["reconstruction"]
    name, out_csv = os.fspath(store_path), Path(out_csv)
    device = resolve_device(infer["device"], "infer.device")
    if segment is None and model_path is None:
        raise ValueError("infer_chunk: give model_path (a model.pt written by holopipe train) or segment")
    if probabilities_path is None and infer["save_probabilities"]:
        probabilities_path = out_csv.with_name(f"{out_csv.stem}.probabilities.zarr")
    ds = open_standardized(name, config)
    try:
        attrs = ds.attrs
        planes = z_bin_centres(float(attrs["zMin"]), float(attrs["zMax"]), int(reconstruction["z_bins"]))
        indices = chunk_planes(planes.size, chunk, n_chunks)
        z_m = planes[indices]
        n_holograms, ny, nx = ds.sizes["hologram_number"], ds.sizes["ysize"], ds.sizes["xsize"]
        dx, dy = float(attrs["dx"]), float(attrs["dy"])
        fingerprint = resume_fingerprint(config, model_path, store_path, chunk=chunk, n_chunks=n_chunks,
                                         probabilities_path=probabilities_path, segment=segment)
        parts = HologramParts(out_csv, fingerprint)
        done = parts.done() & set(range(1, n_holograms + 1))
        volume, quantize = None, None
        if probabilities_path is not None:
            probabilities_path = Path(probabilities_path)
            partial_volume = parts.directory / "probabilities.zarr"
            if done and not partial_volume.is_dir():  # renamed into place, then killed before the CSV
                remove_path(parts.directory)
                parts, done = HologramParts(out_csv, fingerprint), set()
            dtype = infer["probability_dtype"]
            if done:
                volume = zarr.open_group(partial_volume, mode="r+")["probability"]
            else:
                volume = _create_volume(partial_volume, (n_holograms, indices.size, ny, nx), dtype, indices, z_m, {
                    "source": name, "chunk": int(chunk), "n_chunks": int(n_chunks), "dx": dx, "dy": dy,
                    "threshold": float(infer["threshold"]), "holopipe_version": __version__})
            quantize = _quantizer(dtype)
        usable = usable_holograms(ds)  # standardization's skipped holograms (no data) are not swept
        todo = [hid - 1 for hid in usable if hid not in done]
        log.info("%s chunk %d/%d: %d of %d holograms to sweep (%d finished before, kept in %s)", name, chunk + 1,
                 n_chunks, len(todo), n_holograms, len(done), parts.directory)
        amp_dtype = autocast_dtype(infer["precision"], device)
        log.info("infer.device: %s%s", describe_device(device, amp_dtype),
                 "" if segment is None else " (propagation; the segmenter is given)")
        if segment is None:
            model, info = inference_model(model_path, device)
            activation_elements = activation_counter(model, int(info["in_channels"]), int(info["stride"]))
        else:
            activation_elements = getattr(segment, "activation_elements", None)
        plane_activation = activation_elements(ny, nx) if activation_elements is not None else 0
        pad = int(reconstruction["pad"])
        memory = infer_memory(device, frame_pixels=ny * nx, padded_pixels=(ny + 2 * pad) * (nx + 2 * pad),
                              mem_mb=mem_mb, activation_elements=plane_activation,
                              element_bytes=torch.finfo(amp_dtype or torch.float32).bits // 8)
        batch_planes = plane_batch(int(infer["batch_planes"]), memory, what=f"{name}: a {nx} x {ny} frame")
        log.info("infer: batches of %d planes (infer.batch_planes %d; %s holds %d: %.0f MB, %.0f MB before the "
                 "planes and %.0f MB per plane)%s", batch_planes, infer["batch_planes"], memory.source,
                 (memory.budget - memory.fixed) // memory.per_plane, memory.budget / 2**20, memory.fixed / 2**20,
                 memory.per_plane / 2**20,
                 f"; the model takes {planes_per_run(plane_activation, batch_planes)} at a time (largest activation "
                 f"{plane_activation} elements per plane, below 2^31 per run)" if plane_activation else "")
        if segment is None:
            segment = _file_segmenter(model, info, device, infer["precision"], compile=bool(infer["compile"]),
                                      batch_planes=batch_planes, activation_elements=activation_elements)
        coarse_stride = int(infer["coarse_stride"])
        sweep = sweep_hologram
        if coarse_stride > 1:
            sweep = functools.partial(coarse.coarse_to_fine_sweep, coarse_stride=coarse_stride,
                                      coarse_threshold=float(infer["coarse_threshold"]),
                                      coarse_margin=int(infer["coarse_margin"]), stride=getattr(segment, "stride", 1))
            log.info("infer: coarse-to-fine depth search, every %d-th plane whole, windows elsewhere", coarse_stride)
        writers = int(infer["writers"])
        # The writers' queue holds two batches (or two planes per writer): bounded host memory.
        writer = VolumeWriter(volume, writers, 2 * max(batch_planes, writers)) if volume is not None else None
        # A full-size hologram takes minutes: the bar counts planes, not holograms. The writers close last:
        # the detection worker, which feeds them, has finished by then.
        with writer or nullcontext(), ThreadPoolExecutor(1) as pool, cudnn_autotune(device), \
                tqdm(total=len(todo) * indices.size, desc=f"infer chunk {chunk + 1}/{n_chunks}", unit="plane",
                     disable=not progress) as bar:
            for h in todo:
                bar.set_postfix_str(f"hologram {h + 1}/{n_holograms}")
                found: list[pd.DataFrame] = []

                def consume(first, rows_cols, values, probability, h=h, found=found):
                    if probability is not None:
                        writer.write(h, first, probability)
                    for slot, table in batch_detections(rows_cols, values, shape=(ny, nx),
                                                        min_area=int(infer["min_area"]), dx=dx, dy=dy):
                        found.append(table.assign(hid=h + 1, plane=int(indices[first + slot]),
                                                  z=z_m[first + slot] * 1e6))
                    if coarse_stride == 1:
                        bar.update(min(batch_planes, z_m.size - first))

                image = ds["image"].isel(hologram_number=h).compute(scheduler="synchronous").values
                timing = sweep(
                    image.T, z_m, segment, wavelength=float(attrs["lambda"]), dx=dx, dy=dy,
                    pad=int(reconstruction["pad"]), band_limit=bool(reconstruction["band_limit"]),
                    batch_planes=batch_planes, threshold=float(infer["threshold"]),
                    device=device, pool=pool, consume=consume, quantize=quantize)
                if coarse_stride > 1:  # the fine pass skips planes without windows: the bar counts planes searched
                    bar.update(z_m.size)
                if writer is not None:
                    writer.flush()  # every slice of this hologram's volume is written: now it is done
                parts.save(h + 1, _detection_table(found))
                shares = timing.shares()
                log.info("%s hologram %d, planes %d-%d: %.2f s, %.1f planes/s (propagation %.0f%%, model "
                         "%.0f%%, post-processing %.0f%%)", name, h + 1, indices[0] if indices.size else 0,
                         indices[-1] if indices.size else -1, timing.seconds, timing.planes_per_second,
                         100 * shares["propagation"], 100 * shares["model"], 100 * shares["postprocess"])
        table = _detection_table(parts.load(usable))
        if probabilities_path is not None:
            probabilities_path.parent.mkdir(parents=True, exist_ok=True)
            remove_path(probabilities_path)
            os.replace(partial_volume, probabilities_path)
        # Last: a CSV on disk means the chunk is complete.
        return parts.finish(lambda tmp: table.to_csv(tmp, index=False))
    finally:
        ds.close()
