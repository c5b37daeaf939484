"""The workflow's cost model: the memory (mem_mb, MB) and walltime (runtime, minutes) each rule's job asks for.

Both are functions of the data and of the attempt. A job's memory and walltime follow from the frame it holds
(after regridding, plus the reconstruction padding where it propagates), the planes it reconstructs, the
holograms of its split and ``attempt`` (Snakemake passes it to resource functions: a job killed at its walltime
or memory limit and resubmitted by ``retries`` asks for more). workflow/rules/common.smk gathers those numbers
from the config and the splits' sources and calls these functions, which know nothing of Snakemake.

A ``kind`` is the device a job computes on: 'cpu' where the config pins its stage to the CPU, else 'gpu' (its
rule asks for one); see :func:`device_kind`.
"""

import math

from holopipe.core.grid import regridded_pixels
from holopipe.data.standardize import WindowPlanes, stationary_mode
from holopipe.detect.host_memory import (
    INFER_BYTES_PER_PADDED_PIXEL,
    INFER_BYTES_PER_PADDED_PIXEL_PLANE,
    INFER_CPU_BYTES_PER_PIXEL_PLANE,
    INFER_GPU_HOST_BYTES_PER_PIXEL_PLANE,
    INFER_LIBRARIES_BYTES,
)
from holopipe.optics.propagation import PLANE_BATCH_PIXELS

PYTHON_LIBRARIES_MB = 512
"""Resident memory of Python, numpy, xarray and dask before any frame."""
TORCH_LIBRARIES_MB = 1536
"""The same for a job that imports torch: `import torch` alone is 650 MB, and `holopipe infer` on the
embedded default peaks at 1.4 GB (measured with /usr/bin/time -v)."""
INFER_BYTES_PER_PIXEL_PLANE = {"cpu": INFER_CPU_BYTES_PER_PIXEL_PLANE, "gpu": INFER_GPU_HOST_BYTES_PER_PIXEL_PLANE}
"""Inference's host bytes per frame pixel per plane of a batch, by device kind (holopipe.detect.host_memory)."""
TRAIN_GPU_HOST_MB = 16000
"""Host memory of a training process on a GPU node: torch with CUDA, the DataLoader workers, pinned batches."""
TRAIN_CPU_BYTES_PER_TILE_PIXEL = 2000
"""Training on the CPU holds the activations for the backward pass in host memory, per pixel of a batch's
tiles: plain_unet (width 16, depth 5) with 16 tiles of 512² peaked at 7.3 GB (1.4 kB per tile pixel)."""
LABEL_CANDIDATES_BATCH_BYTES = PLANE_BATCH_PIXELS * 16
"""A batch of planes as holopipe.optics.propagation.PLANE_BATCH_PIXELS complex64 pixels, with their amplitude
and phase."""

URL_HOLOGRAMS_BOUND = 600
"""Holograms assumed for a url split without max_holograms, whose count is known only once downloaded:
NCAR's real hour-long files hold about 560 (CSET RF07 20:00-21:00 holds 559)."""

# Seconds of work per unit. CPU figures are per job on this project's 2-core node (threads 2); GPU figures
# are assumed rates for one A100/H100-class GPU, with the CPU rates as the fallback when the config pins a
# stage to the CPU (`<section>.device: cpu`). Each runtime is RUNTIME_MARGIN times the estimate plus
# RUNTIME_FLOOR_MIN minutes of start-up (imports, opening stores), times the attempt.
SECONDS_PER_PADDED_PIXEL_SLAB = 1e-7
"""Simulation, per hologram per z slab (benchmarks/bench_simulate.py: 0.04 µs; 24 s per full-size hologram)."""
SECONDS_PER_PIXEL_COPY = 2e-8
"""Validating and copying a file split, regridding, standardizing: per pixel per hologram (a few passes over
the frame; resampling by matrix products on both axes)."""
DOWNLOAD_WAIT_S = 1500
"""Seconds a file or url split's copy allows for a download's wait."""
SECONDS_PER_PIXEL_AUGMENT = 3e-7
"""Augmentation, per regridded pixel per corrupted variant (clutter particles propagate a frame each)."""
SECONDS_PER_PADDED_PIXEL_PLANE = {"cpu": 1.5e-7, "gpu": 1e-8}
"""Reconstructing one plane (angular spectrum, |E| and arg E), per padded pixel: the baseline took 54 s for 24
planes of a 23.1 Mpx padded frame on 2 cores in issue 10 (0.1 µs); the GPU rate is assumed."""
SECONDS_PER_PADDED_PIXEL_PROPAGATION = {"cpu": 6.5e-8, "gpu": 1e-8}
"""One propagation of a hologram (FFT, transfer function, inverse FFT, |E|), per padded pixel: standardize's
window planes took 6.0 s for 97 Mpx (both planes of a full-size HOLODEC frame) on 2 cores
(benchmarks/bench_dataprep.py); the GPU rate is assumed, as the plane's."""
SECONDS_PER_PADDED_PIXEL_PLANE_INFER = {"cpu": 8e-6, "gpu": 5e-8}
"""Inference, per padded pixel per plane: plain_unet took 67 s per 23.1 Mpx plane on 2 cores in issue 10
(2.9 µs), LinkNet/ResNet-18 about 6 µs (a third of its training step); on a GPU an assumed 1.2 s per
full-size plane (propagation, U-Net in bf16, labelling)."""
SECONDS_PER_TILE_PIXEL_EPOCH = {"cpu": 2e-5, "gpu": 2e-8}
"""Training, per tile pixel per epoch over the training and validation examples (forward and backward):
LinkNet/ResNet-18 took 20 s for 4 tiles of 512² on 2 shared cores (19 µs); on a GPU an assumed 200 tiles/s."""
TRAIN_START_S = 300
"""Seconds of a training run (or of a tuning worker) besides its epochs' work: an allowance, not measured."""
RUNTIME_MARGIN = 2
"""Times the estimated work a walltime allows."""
RUNTIME_FLOOR_MIN = 5
"""Minutes of start-up every walltime adds (imports, opening stores)."""


def runtime_min(seconds: float, attempt: int = 1) -> int:
    """Walltime in minutes for ``seconds`` of estimated work, with margin and start-up; doubled on the first
    retry (a job killed at its walltime is resubmitted with twice as much), tripled on the second."""
    return attempt * (RUNTIME_FLOOR_MIN + math.ceil(RUNTIME_MARGIN * seconds / 60))


def memory_mb(frame_bytes: float, attempt: int = 1, libraries_mb: float = PYTHON_LIBRARIES_MB) -> int:
    """mem_mb for ``frame_bytes`` of frames held at once on top of the libraries; half as much again per retry."""
    return math.ceil((libraries_mb + frame_bytes / 2**20) * (1 + (attempt - 1) / 2))


def device_kind(config: dict, section: str) -> str:
    """'cpu' where ``<section>.device`` pins a stage to the CPU; otherwise the GPU its rule asks for ('gpu')."""
    return "cpu" if config[section]["device"] == "cpu" else "gpu"


def regridded_axes(config: dict, nx: int, ny: int, dx: float, dy: float) -> tuple[int, int]:
    """Pixels along x and y of an ``nx`` × ``ny`` frame at pitches ``dx``, ``dy`` (m) once regridded by the
    config's regrid section to whole examples.tile_size tiles (holopipe.core.grid)."""
    settings = {"method": config["regrid"]["method"], "frame": config["regrid"]["frame"],
                "tile": config["examples"]["tile_size"]}
    pitch = config["regrid"]["pixel_pitch"]
    return regridded_pixels(nx, dx, pitch, **settings), regridded_pixels(ny, dy, pitch, **settings)


def regridded_frame_pixels(config: dict, nx: int, ny: int, dx: float, dy: float, padding: int = 0) -> int:
    """Pixels of an ``nx`` × ``ny`` frame at pitches ``dx``, ``dy`` (m) once regridded (:func:`regridded_axes`),
    with ``padding`` pixels added on each side."""
    rx, ry = regridded_axes(config, nx, ny, dx, dy)
    return (rx + 2 * padding) * (ry + 2 * padding)


def simulation_slabs(config: dict) -> int:
    """z slabs a simulated hologram propagates through: optics.z_min to z_max in simulate.slab_thickness."""
    optics = config["optics"]
    return math.ceil((optics["z_max"] - optics["z_min"]) / config["simulate"]["slab_thickness"])


def acquire_mem_mb(nx: int, ny: int, pad: int, attempt: int = 1) -> int:
    """About eight double-precision complex frames (128 B per pixel of the frame padded by ``pad``, simulate.pad);
    a copied or downloaded file is validated a hologram at a time, within the same."""
    return memory_mb(128 * (nx + 2 * pad) * (ny + 2 * pad), attempt)


def simulate_runtime_min(nx: int, ny: int, holograms: int, slabs: int, pad: int, attempt: int = 1) -> int:
    """Simulation: holograms × z slabs × pixels of the frame padded by ``pad`` (simulate.pad)."""
    padded = (nx + 2 * pad) * (ny + 2 * pad)
    return runtime_min(holograms * slabs * padded * SECONDS_PER_PADDED_PIXEL_SLAB, attempt)


def copy_runtime_min(source_pixels: int, holograms: int, attempt: int = 1) -> int:
    """A file or url split: a validated copy of every hologram, after a download's wait."""
    return runtime_min(holograms * source_pixels * SECONDS_PER_PIXEL_COPY + DOWNLOAD_WAIT_S, attempt)


def regrid_mem_mb(source_pixels: int, frame_pixels: int, attempt: int = 1) -> int:
    """Two holograms in flight, 40 B per pixel of the larger of the source and the regridded frame."""
    return memory_mb(2 * 40 * max(source_pixels, frame_pixels), attempt)


def regrid_runtime_min(source_pixels: int, frame_pixels: int, holograms: int, attempt: int = 1) -> int:
    """A pass over each hologram at the larger of the source and the regridded frame."""
    return runtime_min(holograms * max(source_pixels, frame_pixels) * SECONDS_PER_PIXEL_COPY, attempt)


def augment_mem_mb(frame_pixels: int, padded_pixels: int, attempt: int = 1) -> int:
    """A clean and a corrupted hologram in double precision, and a padded clutter field (complex128)."""
    return memory_mb(40 * frame_pixels * 2 + 32 * padded_pixels, attempt)


def augment_runtime_min(frame_pixels: int, holograms: int, attempt: int = 1) -> int:
    """Every corrupted variant (``holograms`` counts them) of the training split's frame."""
    return runtime_min(holograms * frame_pixels * SECONDS_PER_PIXEL_AUGMENT, attempt)


STANDARDIZE_WORK_BYTES_PER_PIXEL = 24
"""A standardize task's float32 frames of work (background, ratio, the written chunk) per thread: measured on a
4872 x 3248 frame (smooth, no stationary division), 447 MB peak with one thread, 524 MB with two."""
WINDOW_PROPAGATION_BYTES_PER_PIXEL = 4 * 8 * 4
"""A ``stationary: windows`` division's complex64 grids (spectrum, transfer function, field, the object's field),
each padded up to twice the frame on each axis (4 frames), per frame pixel."""


def standardize_bytes_per_pixel(settings: dict) -> int:
    """Host bytes per frame pixel of a standardize task: its hologram, or its window (of raw holograms for a
    running median, of contrasts for a stationary division, with their reconstructions at both window planes
    for ``windows``) as float32, its work frames, and a window division's propagation."""
    mode = stationary_mode(settings)
    window = settings["window"] if settings["background"] == "running_median" or mode != "off" else 1
    planes = 2 if mode == "windows" else 0
    return (4 * window * (1 + planes) + STANDARDIZE_WORK_BYTES_PER_PIXEL
            + (WINDOW_PROPAGATION_BYTES_PER_PIXEL if planes else 0))


def window_grid_pixels(config: dict, nx: int, ny: int, dx: float, dy: float) -> int:
    """Padded pixels that a ``stationary: windows`` standardization propagates per hologram of an ``nx`` x ``ny``
    frame at pitches ``dx``, ``dy`` (m), once regridded, summed over the window planes
    (holopipe.data.standardize.WindowPlanes.grid_pixels); 0 for another mode."""
    if stationary_mode(config["standardize"]) != "windows":
        return 0
    pitch, optics = config["regrid"]["pixel_pitch"], config["optics"]
    windows = WindowPlanes((optics["z_min"], optics["z_max"]), optics["wavelength"], pitch or dx, pitch or dy)
    return windows.grid_pixels(*regridded_axes(config, nx, ny, dx, dy))


def standardize_runtime_min(frame_pixels: int, holograms: int, attempt: int = 1, window_grid_pixels: int = 0,
                            kind: str = "cpu") -> int:
    """Fitting or applying the standardization: a few passes over each hologram, and with ``window_grid_pixels``
    (:func:`window_grid_pixels`) its reconstruction at the window planes and, where a window holds dust, the
    dust's hologram propagated back (two propagations per plane at most) on the device ``kind``."""
    propagation = 2 * window_grid_pixels * SECONDS_PER_PADDED_PIXEL_PROPAGATION[kind]
    return runtime_min(holograms * (4 * frame_pixels * SECONDS_PER_PIXEL_COPY + propagation), attempt)


def examples_mem_mb(padded_pixels: int, attempt: int = 1) -> int:
    """Two holograms in flight, each with its padded spectrum and reconstructed planes (64 B per padded pixel)."""
    return memory_mb(2 * 64 * padded_pixels, attempt)


def examples_runtime_min(padded_pixels: int, holograms: int, planes: int, attempt: int = 1) -> int:
    """One reconstructed plane per tile, ``planes`` per hologram (positives + negatives), on the CPU."""
    return runtime_min(holograms * planes * padded_pixels * SECONDS_PER_PADDED_PIXEL_PLANE["cpu"], attempt)


def largest_batch_size(config: dict) -> int:
    """train.batch_size, or the largest a tuning trial may draw (tune.search_space's train.batch_size)."""
    space = config["tune"]["search_space"].get("train.batch_size", {})
    return max([config["train"]["batch_size"], *space.get("choices", []), space.get("high") or 0])


def epoch_tile_pixels(config: dict, holograms: int) -> int:
    """Pixels of the tiles a training epoch passes over: the examples of ``holograms`` (the training and
    validation splits' together)."""
    examples = config["examples"]
    per_hologram = examples["positives_per_hologram"] + examples["negatives_per_hologram"]
    return per_hologram * holograms * examples["tile_size"] ** 2


def train_mem_mb(kind: str, batch_size: int, tile_size: int, attempt: int = 1) -> int:
    """One training process (a tuning worker runs tune.trials_per_gpu of them at once): on a GPU node the host's
    share; on the CPU the activations of a batch of ``batch_size`` tiles of ``tile_size``²."""
    if kind == "gpu":
        return memory_mb(0, attempt, TRAIN_GPU_HOST_MB)
    return memory_mb(TRAIN_CPU_BYTES_PER_TILE_PIXEL * batch_size * tile_size**2, attempt, TORCH_LIBRARIES_MB)


def train_runtime_min(epochs: int, epoch_pixels: int, kind: str, attempt: int = 1) -> int:
    """``epochs`` over ``epoch_pixels`` tile pixels (:func:`epoch_tile_pixels`) on a ``kind`` device."""
    return runtime_min(TRAIN_START_S + epochs * epoch_pixels * SECONDS_PER_TILE_PIXEL_EPOCH[kind], attempt)


def tune_worker_runtime_min(n_trials: int, workers: int, epochs: int, epoch_pixels: int, kind: str,
                            attempt: int = 1) -> int:
    """A worker's share of the ``n_trials`` trials, ``epochs`` each (tune.epochs), on a ``kind`` device."""
    trials = math.ceil(n_trials / workers)
    return train_runtime_min(trials * epochs, epoch_pixels, kind, attempt)


def infer_host_bytes(frame_pixels: int, padded_pixels: int, planes: int, kind: str) -> int:
    """Host bytes of an infer job on a ``kind`` device with ``planes`` planes per batch, beyond its libraries."""
    per_plane = INFER_BYTES_PER_PADDED_PIXEL_PLANE * padded_pixels + INFER_BYTES_PER_PIXEL_PLANE[kind] * frame_pixels
    return INFER_BYTES_PER_PADDED_PIXEL * padded_pixels + planes * per_plane


def infer_mem_mb(frame_pixels: int, padded_pixels: int, batch_planes: int, kind: str, attempt: int = 1, *,
                 auto: bool = False) -> int:
    """Torch and the model, a hologram's spectrum and ``batch_planes`` planes (infer.batch_planes), on the host
    of the device the job will use. With ``auto`` (infer.device auto) a job on a node without a GPU runs on the
    CPU, so it asks for the larger of the ``kind`` figure and one plane on the CPU: `holopipe infer --mem-mb`
    then runs as many planes per batch as that memory holds."""
    held = infer_host_bytes(frame_pixels, padded_pixels, batch_planes, kind)
    if auto:
        held = max(held, infer_host_bytes(frame_pixels, padded_pixels, 1, "cpu"))
    return memory_mb(held, attempt, INFER_LIBRARIES_BYTES / 2**20)


def infer_runtime_min(padded_pixels: int, holograms: int, planes: int, kind: str, attempt: int = 1) -> int:
    """Every hologram × ``planes`` (an inference chunk's) × padded pixels, on a ``kind`` device."""
    work = holograms * planes * padded_pixels
    return runtime_min(work * SECONDS_PER_PADDED_PIXEL_PLANE_INFER[kind], attempt)


def sweep_mem_mb(padded_pixels: int, attempt: int = 1) -> int:
    """The particles' refinement and the baseline: torch and a hologram's padded spectrum with a plane batch
    (80 B per padded pixel), two holograms' worth."""
    return memory_mb(2 * 80 * padded_pixels, attempt, TORCH_LIBRARIES_MB)


def sweep_runtime_min(padded_pixels: int, holograms: int, planes: int, kind: str, attempt: int = 1) -> int:
    """Reconstructing up to ``planes`` (reconstruction.z_bins) planes of every hologram on a ``kind`` device:
    the particles' refinement, the baseline, the label candidates."""
    return runtime_min(holograms * planes * padded_pixels * SECONDS_PER_PADDED_PIXEL_PLANE[kind], attempt)


def label_candidates_mem_mb(padded_pixels: int, kind: str, attempt: int = 1) -> int:
    """A hologram's padded spectrum and transfer function (40 B per padded pixel) and one batch of planes on
    numpy (torch's libraries too on a GPU); the crops of one hologram's candidates are small (130 kB each)."""
    libraries_mb = TORCH_LIBRARIES_MB if kind == "gpu" else PYTHON_LIBRARIES_MB
    return memory_mb(40 * padded_pixels + LABEL_CANDIDATES_BATCH_BYTES, attempt, libraries_mb)
