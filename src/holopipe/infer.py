"""Z-plane inference: every reconstruction plane of every hologram through the segmentation model.

Per hologram the intensity is moved to the device once and Fourier-transformed once
(:class:`holopipe.optics.Propagator`); planes are then reconstructed in batches of
``infer.batch_planes``, normalised exactly as in training (:func:`holopipe.dataset.normalize_channels`)
and segmented on WHOLE planes (the model is fully convolutional), under autocast (bf16 on a GPU with
``infer.precision`` auto, fp32 on CPU). Frames whose sides are not multiples of the model's stride are
padded at the bottom and right with the normalised background (0, i.e. amplitude 1 and phase 0) and the
probabilities cropped back.

Detections: pixels with probability > ``infer.threshold`` are found on the device and only they (row,
column, probability) travel to the host, where a worker thread groups them into 8-connected components
(a sparse pixel graph, so the cost is that of the bright pixels, not of the frame) while the device
computes the next batch. Components of at least ``infer.min_area`` pixels become detections: hid
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
``z`` (m).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import scipy.ndimage
import scipy.sparse
import scipy.sparse.csgraph
import torch
import zarr
from tqdm.auto import tqdm

from holopipe import __version__
from holopipe.dataset import normalize_channels
from holopipe.focus import smoothed_amplitude
from holopipe.io import HologramParts, equivalent_diameter, input_identity, pixel_position, remove_path
from holopipe.optics import Propagator, hologram_field
from holopipe.reconstruction import open_standardized, z_bin_centres
from holopipe.device import autocast, autocast_dtype, resolve_device
from holopipe.train import load_model

__all__ = [
    "DETECTION_COLUMNS",
    "Timing",
    "batch_detections",
    "chunk_planes",
    "cudnn_autotune",
    "detections_from_pixels",
    "detections_in_plane",
    "infer_chunk",
    "model_segmenter",
    "pixel_components",
    "resume_fingerprint",
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

    ``model`` includes the sigmoid; ``postprocess`` is the device-side thresholding and copy plus the
    worker thread's component analysis and probability writing, which overlap the next batch on the
    device, so the parts may add up to more than ``seconds``.
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
    ``threshold``, with the plane's reconstructed amplitude (ny, nx)."""
    logits = torch.as_tensor(np.asarray(logits, np.float32))
    probability = torch.sigmoid(logits).numpy()
    smoothed = smoothed_amplitude(torch.as_tensor(np.asarray(amplitude, np.float32))[None])[0].numpy()
    rows, cols = np.nonzero(probability > threshold)
    values = np.column_stack([probability[rows, cols], logits.numpy()[rows, cols], smoothed[rows, cols]])
    return detections_from_pixels(rows, cols, values, shape=probability.shape, min_area=min_area, dx=dx, dy=dy)


def model_segmenter(model: torch.nn.Module, channels, stats: dict, stride: int, *,
                    amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> Segmenter:
    """Segmenter running ``model`` (logits out) on whole planes, normalised as in training.

    Sides that are not multiples of ``stride`` are padded at the bottom and right with the normalised
    background (0) and the probabilities cropped back to the frame.
    """
    channels = list(channels)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def segment(amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        inputs = normalize_channels(amplitude, phase, channels, stats)  # (B, C, ny, nx)
        ny, nx = inputs.shape[-2:]
        pad_rows, pad_cols = -ny % stride, -nx % stride
        if pad_rows or pad_cols:
            inputs = torch.nn.functional.pad(inputs, (0, pad_cols, 0, pad_rows))
        inputs = inputs.contiguous(memory_format=memory_format)
        with torch.inference_mode(), autocast(inputs.device, amp_dtype):
            logits = model(inputs)  # (B, 1, ny + pad_rows, nx + pad_cols)
        return logits[:, 0, :ny, :nx].float()

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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sweep_hologram(image_yx: np.ndarray, planes_m: np.ndarray, segment: Segmenter, *, wavelength: float,
                   dx: float, dy: float, pad: int, band_limit: bool, batch_planes: int, threshold: float,
                   device: torch.device, pool: ThreadPoolExecutor, consume, quantize=None) -> Timing:
    """Reconstruct and segment one contrast hologram (ny, nx) at ``planes_m`` (metres); returns its timing.

    For each batch, ``consume(first, rows_cols, values, probability)`` runs in ``pool`` while the device
    works on the next batch: ``first`` is the batch's first index into ``planes_m``, ``rows_cols`` an
    int64 array (k, 3) of (slot in batch, row, column) of the pixels above ``threshold`` in raster order,
    ``values`` (k, 3) float32 their :data:`PIXEL_VALUES`, and ``probability`` the batch's planes as
    ``quantize(probability)`` on the host (None without ``quantize``).
    """
    start = time.perf_counter()
    propagation = model = postprocess = 0.0
    hologram = torch.from_numpy(np.ascontiguousarray(image_yx, dtype=np.float32)).to(device)
    propagator = Propagator(hologram_field(hologram, background=1.0), wavelength=wavelength, dx=dx,  # standardized
                            dy=dy, pad=pad, band_limit=band_limit)
    busy = [0.0]  # seconds the worker spent on this hologram

    def timed_consume(*args):
        begin = time.perf_counter()
        consume(*args)
        busy[0] += time.perf_counter() - begin

    pending = None
    for first in range(0, len(planes_m), batch_planes):
        t0 = time.perf_counter()
        amplitude, phase = propagator.reconstruct(planes_m[first:first + batch_planes])  # (B, ny, nx)
        _synchronize(device)
        t1 = time.perf_counter()
        logits = segment(amplitude, phase)  # (B, ny, nx)
        _synchronize(device)
        t2 = time.perf_counter()
        probability = torch.sigmoid(logits)
        above = probability > threshold
        rows_cols = torch.nonzero(above).cpu().numpy()
        values = torch.stack([probability[above], logits[above], smoothed_amplitude(amplitude.float())[above]],
                             dim=1).float().cpu().numpy()
        del amplitude, phase, logits
        volume = quantize(probability).cpu().numpy() if quantize is not None else None
        t3 = time.perf_counter()
        if pending is not None:
            pending.result()  # at most one batch waits on the host: bounded memory, errors surface here
        pending = pool.submit(timed_consume, first, rows_cols, values, volume)
        propagation, model, postprocess = propagation + t1 - t0, model + t2 - t1, postprocess + t3 - t2
    if pending is not None:
        pending.result()
    return Timing(time.perf_counter() - start, propagation, model, postprocess + busy[0], len(planes_m))


def _load_segmenter(model_path, device: torch.device, precision: str) -> Segmenter:
    model, info = load_model(model_path, device)
    return model_segmenter(model.to(memory_format=torch.channels_last) if device.type == "cuda" else model,
                           info["channel_names"], info["stats"], int(info["stride"]),
                           amp_dtype=autocast_dtype(precision, device), channels_last=device.type == "cuda")


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


RESUME_IGNORES = ("batch_planes", "splits")
"""``infer`` keys that change no chunk's result: a rerun with another plane batch (after running out of
memory, say) keeps the holograms finished before."""


def resume_fingerprint(config: dict, model_path, store_path, *, chunk: int, n_chunks: int, probabilities_path,
                       segment: Segmenter | None = None) -> dict:
    """What a chunk's finished holograms depend on: the stage's config, the chunk, the model and store files
    (:func:`holopipe.io.input_identity`) and whether a probability volume is written. A ``segment`` given in
    place of the model counts by identity (it cannot be fingerprinted), so it resumes only in its process."""
    infer = {key: value for key, value in config["infer"].items() if key not in RESUME_IGNORES}
    return {"stage": "infer", "holopipe_version": __version__, "reconstruction": config["reconstruction"],
            "infer": infer, "chunk": int(chunk), "n_chunks": int(n_chunks),
            "inputs": input_identity(*[path for path in (model_path, store_path) if path is not None]),
            "segment": None if segment is None else repr(segment),
            "probabilities": None if probabilities_path is None else os.fspath(probabilities_path)}


def _detection_table(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """One table of :data:`DETECTION_COLUMNS` sorted by (hid, plane); headers only when there is none."""
    columns = list(DETECTION_COLUMNS)
    tables = [table for table in tables if len(table)]
    table = (pd.concat(tables, ignore_index=True)[columns] if tables
             else pd.DataFrame({column: pd.Series(dtype=float) for column in columns}))
    return table.sort_values(["hid", "plane"], kind="stable", ignore_index=True)


def infer_chunk(config: dict, model_path, store_path, out_csv, *, chunk: int, n_chunks: int,
                probabilities_path=None, progress=True, segment: Segmenter | None = None) -> Path:
    """Detections of chunk ``chunk`` of ``n_chunks`` of the planes, for every hologram of a standardized store.

    Writes the CSV ``out_csv`` (:data:`DETECTION_COLUMNS`, header only when nothing is found) and, when
    ``probabilities_path`` is given or ``infer.save_probabilities`` is true (then next to ``out_csv`` as
    ``<stem>.probabilities.zarr``), the probability volume of this chunk's planes; both atomically.
    ``segment`` replaces the model (tests: an oracle); ``model_path`` may then be None.

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
        todo = [h for h in range(n_holograms) if h + 1 not in done]
        log.info("%s chunk %d/%d: %d of %d holograms to sweep (%d finished before, kept in %s)", name, chunk + 1,
                 n_chunks, len(todo), n_holograms, len(done), parts.directory)
        batch_planes = int(infer["batch_planes"])
        if segment is None:
            segment = _load_segmenter(model_path, device, infer["precision"])
        # A full-size hologram takes minutes: the bar counts planes, not holograms.
        with ThreadPoolExecutor(1) as pool, cudnn_autotune(device), \
                tqdm(total=len(todo) * indices.size, desc=f"infer chunk {chunk + 1}/{n_chunks}", unit="plane",
                     disable=not progress) as bar:
            for h in todo:
                bar.set_postfix_str(f"hologram {h + 1}/{n_holograms}")
                found: list[pd.DataFrame] = []

                def consume(first, rows_cols, values, probability, h=h, found=found):
                    if probability is not None:
                        volume[h, first:first + probability.shape[0]] = probability
                    for slot, table in batch_detections(rows_cols, values, shape=(ny, nx),
                                                        min_area=int(infer["min_area"]), dx=dx, dy=dy):
                        found.append(table.assign(hid=h + 1, plane=int(indices[first + slot]),
                                                  z=z_m[first + slot] * 1e6))
                    bar.update(min(batch_planes, z_m.size - first))

                image = ds["image"].isel(hologram_number=h).compute(scheduler="synchronous").values
                timing = sweep_hologram(
                    image.T, z_m, segment, wavelength=float(attrs["lambda"]), dx=dx, dy=dy,
                    pad=int(reconstruction["pad"]), band_limit=bool(reconstruction["band_limit"]),
                    batch_planes=batch_planes, threshold=float(infer["threshold"]),
                    device=device, pool=pool, consume=consume, quantize=quantize)
                # Every batch's volume slices are written (sweep_hologram waited for them): now it is done.
                parts.save(h + 1, _detection_table(found))
                shares = timing.shares()
                log.info("%s hologram %d, planes %d-%d: %.2f s, %.1f planes/s (propagation %.0f%%, model "
                         "%.0f%%, post-processing %.0f%%)", name, h + 1, indices[0] if indices.size else 0,
                         indices[-1] if indices.size else -1, timing.seconds, timing.planes_per_second,
                         100 * shares["propagation"], 100 * shares["model"], 100 * shares["postprocess"])
        table = _detection_table(parts.load(range(1, n_holograms + 1)))
        if probabilities_path is not None:
            probabilities_path.parent.mkdir(parents=True, exist_ok=True)
            remove_path(probabilities_path)
            os.replace(partial_volume, probabilities_path)
        # Last: a CSV on disk means the chunk is complete.
        return parts.finish(lambda tmp: table.to_csv(tmp, index=False))
    finally:
        ds.close()
