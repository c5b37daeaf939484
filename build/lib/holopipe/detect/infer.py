"""Z-plane inference: every reconstruction plane of every hologram through the segmentation model.

Per hologram the intensity is moved to the device once and Fourier-transformed once
(:class:`holopipe.optics.propagation.Propagator`); planes are then reconstructed in batches of ``infer.batch_planes``,
normalised exactly as in training (:func:`holopipe.optics.reconstruction.normalize_channels`) and segmented on WHOLE
planes (the model is fully convolutional), under autocast (bf16 on a GPU with ``infer.precision`` auto, fp32 on CPU).
Any ``infer.batch_planes`` is safe: a batch holds no more planes than the job's memory does (:func:`plane_batch`: on the
CPU what the rule declared, ``--mem-mb``, or the machine has; on a GPU its free memory), and the model takes a batch in
runs whose largest activation, traced from the model and the frame (:func:`~holopipe.detect.sweep.largest_activation`),
stays below 2³¹ elements (:func:`~holopipe.detect.sweep.planes_per_run`: some kernels index in 32 bits). A log line says
what was used. Frames whose sides are not multiples of the model's stride are padded at the bottom and right with the
normalised background (0, i.e. amplitude 1 and phase 0) and the probabilities cropped back.

The model is loaded for inference with its batch norms folded into the convolutions
(:func:`holopipe.ml.models.fold_batchnorm`), channels-last on a GPU, and ``torch.compile``-d for the one plane shape
with ``infer.compile``. The plane loop never waits for the device (:func:`~holopipe.detect.sweep.sweep_hologram`): the
depths stay on the host (each plane's is a kernel argument of its transfer function), stages are timed with CUDA events
read after the hologram, and results come to the host in pinned, asynchronous copies on which a worker thread waits.

Detections: pixels with probability > ``infer.threshold`` are found on the device by comparing the logits with the
threshold's logit (:func:`~holopipe.detect.sweep.logit_threshold`), into fixed-size slots
(:func:`~holopipe.detect.sweep.sparse_pixels`), and only at them are the sigmoid and the box-averaged amplitude
computed; only they (row, column, probability, logit, smoothed amplitude) travel to the host, where a worker thread
groups them into 8-connected components (a sparse pixel graph, so the cost is that of the bright pixels, not of the
frame) while the device computes the next batch. Components of at least ``infer.min_area`` pixels become detections: hid
(1-based), plane (global index), probability-weighted centroid x, y and plane z, equivalent diameter ``d = 2 sqrt(area
dx dy / π)`` (all µm; x, y from the frame centre with the contract's pixel centres ``(i + 0.5 - n/2) · pitch``), area
(pixels), prob_max, prob_mean.

A split's planes are sharded into ``n_chunks`` contiguous chunks (``numpy.array_split``), each a separate
job; :mod:`holopipe.detect.particles` gathers them. Every plane is computed the same way whichever chunk holds it.

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
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import psutil
import torch
import zarr
from tqdm.auto import tqdm

from holopipe import __version__
from holopipe.core.device import autocast_dtype, describe_device, resolve_device
from holopipe.core.files import HologramParts, input_identity, remove_path
from holopipe.core.io import hologram_image_yx, usable_holograms
from holopipe.core.provenance import code_identity
from holopipe.detect import coarse  # the module: it builds on this one
from holopipe.detect.host_memory import (
    INFER_BYTES_PER_PADDED_PIXEL,
    INFER_BYTES_PER_PADDED_PIXEL_PLANE,
    INFER_CPU_BYTES_PER_PIXEL_PLANE,
    INFER_LIBRARIES_BYTES,
)
from holopipe.detect.sweep import (
    DETECTION_COLUMNS,
    Segmenter,
    activation_counter,
    batch_detections,
    cudnn_autotune,
    model_segmenter,
    planes_per_run,
    sweep_hologram,
)
from holopipe.ml.models import fold_batchnorm, load_model
from holopipe.optics.reconstruction import SampleVolume, open_standardized

log = logging.getLogger("holopipe")

def chunk_planes(n_planes: int, chunk: int, n_chunks: int) -> np.ndarray:
    """Global indices of the planes of chunk ``chunk`` (0-based) of ``n_chunks`` contiguous chunks."""
    if n_chunks < 1 or not 0 <= chunk < n_chunks:
        raise ValueError(f"chunk must be in 0..n_chunks-1 with n_chunks >= 1, got chunk {chunk} of {n_chunks}")
    return np.array_split(np.arange(n_planes), n_chunks)[chunk]


def inference_model(model_path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A model file's network for inference on ``device``, with its info: batch norms folded into the
    convolutions (:func:`holopipe.ml.models.fold_batchnorm`, on the CPU, probed on one stride-sized random
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
    ``precision`` (:func:`holopipe.core.device.autocast_dtype`), and with ``compile`` ``torch.compile`` for the one
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
    """What a chunk's finished holograms depend on: the code (:func:`holopipe.core.provenance.code_identity`), the
    stage's config, the chunk, the model and store files (:func:`holopipe.core.files.input_identity`) and whether a
    probability volume is written. A ``segment`` given in
    place of the model counts by identity (it cannot be fingerprinted), so it resumes only in its process."""
    infer = {key: value for key, value in config["infer"].items() if key not in RESUME_IGNORES}
    return {"stage": "infer", "code": code_identity(), "reconstruction": config["reconstruction"],
            "infer": infer, "chunk": int(chunk), "n_chunks": int(n_chunks),
            "inputs": input_identity(*[path for path in (model_path, store_path) if path is not None]),
            "segment": None if segment is None else repr(segment),
            "probabilities": None if probabilities_path is None else os.fspath(probabilities_path)}


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
    with the rule's own figures (holopipe.detect.host_memory), so a job computes the planes its rule
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
    (:class:`holopipe.core.files.HologramParts`, keyed by :func:`resume_fingerprint`) and the volume being written
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
        planes = SampleVolume.of(attrs).planes(int(reconstruction["z_bins"]))
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

                timing = sweep(
                    hologram_image_yx(ds, h), z_m, segment, wavelength=float(attrs["lambda"]), dx=dx, dy=dy,
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
