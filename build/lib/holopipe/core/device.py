"""Device, precision and CPU-thread choice, one policy for every stage: which device a config key names,
the autocast dtype of a precision on it, and how many CPU threads a job may use.

No silent slow path: a job to which the scheduler allocated a GPU (``CUDA_VISIBLE_DEVICES`` names one, as
PBS and Snakemake's GPU profiles set it) but in which torch finds none fails with :class:`GPUNotFoundError`
rather than running for hours on the CPU; ``auto`` without such an allocation (a laptop, ``make run``) runs on
the CPU. Where one job sees several GPUs (a workstation or an interactive node, ``--resources gpu=N``), each
GPU job takes a free one for its lifetime (:func:`gpu_slot`), so N jobs use N GPUs.

torch is imported only by the functions that need it, so the numpy stages (simulate, regrid, standardize)
can follow the thread policy without loading torch; CuPy only where a data-preparation stage's device is a GPU
(:func:`array_namespace_for`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "CUDA_MAJOR",
    "GPUNotFoundError",
    "allocated_gpus",
    "array_mover",
    "array_namespace_for",
    "autocast",
    "autocast_dtype",
    "cpu_threads",
    "describe_device",
    "gpu_slot",
    "host_array",
    "job_threads",
    "resolve_device",
    "scipy_for",
    "use_threads",
]

log = logging.getLogger("holopipe")

CUDA_MAJOR = 13
"""The CUDA major version of holopipe's one GPU stack: the pinned torch wheel (``torch==2.14.1`` is built for
CUDA 13.0), ``envs/gpu.yaml``'s ``cuda-version`` and the ``gpu`` extra's CuPy wheel (``cupy-cuda13x``). CUDA 13
needs an NVIDIA driver of the R580 series or newer (``nvidia-smi`` shows 580.65 or higher)."""

NO_GPU_VALUES = ("", "-1", "none", "nodevfiles", "void")
"""``CUDA_VISIBLE_DEVICES`` values that allocate no GPU (``NoDevFiles`` is what some schedulers set)."""

GPU_LOCK_DIRECTORY_VARIABLE = "HOLOPIPE_GPU_LOCKS"
"""Folder of the per-GPU lock files of :func:`gpu_slot`; default a node-local folder under the system's
temporary directory (never a shared file system: the locks are per node)."""

ALLOCATION_VARIABLES = ("OMP_NUM_THREADS", "NCPUS")
"""Environment variables stating a job's CPU allocation, first found wins: Snakemake sets OMP_NUM_THREADS to
the rule's ``threads`` in every shell job, PBS sets it (and NCPUS) to the job's ``ncpus``."""

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""Set by :func:`use_threads` for the libraries that read them when they load (torch among them)."""

_threads: int | None = None  # set once per process by use_threads (the CLI's main)
_slot_lock = None  # the open lock file of this process's GPU slot, held until the process exits
_slot_taking = threading.Lock()  # trials in threads of one tuning worker take one slot, not one each


class GPUNotFoundError(RuntimeError):
    """A job was allocated a GPU (or asked for CUDA) and torch cannot use one."""


def allocated_gpus(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The GPUs the scheduler allocated to this job: the entries of ``CUDA_VISIBLE_DEVICES`` (indices or
    UUIDs); ``[]`` when it is set to allocate none; None when it is unset (no scheduler said anything)."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    if value.strip().lower() in NO_GPU_VALUES:
        return []
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def _why_no_cuda() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install the CUDA one (envs/gpu.yaml)"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} and finds no usable GPU: is the "
            f"NVIDIA driver at least R580 (CUDA {CUDA_MAJOR}), and does `nvidia-smi` see the device?")


def resolve_device(name: str, key: str = "train.device", environ: Mapping[str, str] | None = None) -> torch.device:
    """The torch device config key ``key`` names (``name``): ``auto`` -> a GPU when torch sees one, else the
    CPU, unless the scheduler allocated a GPU (:func:`allocated_gpus`): then a missing GPU is an error, not a
    slow CPU run. ``cuda`` without an index takes a free GPU of several (:func:`gpu_slot`).

    Raises :class:`GPUNotFoundError` (naming ``key``) when CUDA is asked for, or allocated, and missing, and
    when this torch has no kernels for the GPU (a V100 under the CUDA 13 stack).
    """
    import torch

    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto" and not available:
        allocated = allocated_gpus(environ)
        if allocated:
            raise GPUNotFoundError(
                f"{key} is 'auto' and this job was allocated GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{','.join(allocated)}), but {_why_no_cuda()}. Refusing to run on the CPU instead; to run on "
                f"the CPU on purpose, set {key}: cpu")
        return torch.device("cpu")
    device = torch.device("cuda" if name == "auto" else name)
    if device.type == "cuda" and not available:
        raise GPUNotFoundError(f"{key} is {name!r} but {_why_no_cuda()}")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", gpu_slot(torch.cuda.device_count(), environ))
        unsupported = _unsupported_gpu(device)
        if unsupported:
            raise GPUNotFoundError(f"{key} is {name!r}: {unsupported}; use a GPU of compute capability 7.5 or "
                                   f"newer (gpu_type a100 or h100 on Casper) or set {key}: cpu")
        torch.cuda.set_device(device)
    return device


def _unsupported_gpu(device: torch.device) -> str | None:
    """Why this torch has no kernels for the GPU ``device`` (None when it has): CUDA 13 builds drop compute
    capabilities below 7.5 (V100 is 7.0), and torch would fail at its first kernel with "no kernel image".
    A cubin for sm_XY runs on X.Y and later minors of major X; PTX (compute_XY) on any X.Y and later."""
    import torch

    arches = torch.cuda.get_arch_list()  # e.g. ['sm_75', 'sm_80', ..., 'sm_120']; [] if torch cannot tell
    if not arches:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    capability = major * 10 + minor
    built = [(kind, int(number)) for kind, number in (arch.split("_", 1) for arch in arches) if number.isdigit()]
    if any((kind == "sm" and number // 10 == major and number <= capability)
           or (kind == "compute" and number <= capability) for kind, number in built):
        return None
    return (f"{device} is a {torch.cuda.get_device_name(device)} of compute capability {major}.{minor}, and "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) has kernels for {', '.join(arches)} only")


def _lock_directory(environ: Mapping[str, str]) -> Path:
    stated = environ.get(GPU_LOCK_DIRECTORY_VARIABLE)
    folder = Path(stated) if stated else Path(tempfile.gettempdir()) / f"holopipe-gpu-slots-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def gpu_slot(n_devices: int, environ: Mapping[str, str] | None = None, *, poll_seconds: float = 5.0) -> int:
    """The index of the GPU this process takes, of the ``n_devices`` it sees: 0 when it sees one (a scheduler
    gave the job its own GPU); else the first whose node-local lock file no other holopipe job holds, kept
    for the process's lifetime, so that local GPU jobs (``snakemake --resources gpu=N``) spread over the N
    GPUs. Waits, saying so, while every GPU is taken. Threads of one process share its slot."""
    if n_devices <= 1:
        return 0
    with _slot_taking:
        return _take_slot(n_devices, os.environ if environ is None else environ, poll_seconds)


def _take_slot(n_devices: int, environ: Mapping[str, str], poll_seconds: float) -> int:
    global _slot_lock
    if _slot_lock is not None:
        return _slot_lock[1]
    names = allocated_gpus(environ) or [str(index) for index in range(n_devices)]
    folder = _lock_directory(environ)
    host = socket.gethostname()
    waited = False
    while True:
        for index, name in enumerate(names[:n_devices]):
            handle = open(folder / f"{host}-gpu-{name}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _slot_lock = (handle, index)
            log.info("GPU slot: cuda:%d (CUDA_VISIBLE_DEVICES entry %s) of %d, lock %s", index, name, n_devices,
                     handle.name)
            return index
        if not waited:
            log.warning("all %d GPUs are taken by other holopipe jobs (locks in %s); waiting for one", n_devices,
                        folder)
            waited = True
        time.sleep(poll_seconds)


def describe_device(device: torch.device, amp_dtype: torch.dtype | None = None) -> str:
    """What a job runs on, for its log: the device, the GPU model and its compute capability and memory, the
    CUDA of torch's build, and the precision (``amp_dtype`` from :func:`autocast_dtype`)."""
    import torch

    precision = "fp32" if amp_dtype is None else f"{str(amp_dtype).removeprefix('torch.')} autocast"
    if device.type != "cuda":
        threads = torch.get_num_threads()
        return f"CPU ({threads} thread{'s' if threads != 1 else ''}), {precision}"
    properties = torch.cuda.get_device_properties(device)
    return (f"{device} ({properties.name}, compute capability {properties.major}.{properties.minor}, "
            f"{properties.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}), "
            f"{precision}")


def array_mover(name: str, key: str):
    """numpy -> the array a plane sweep reconstructs in, for the device ``name`` of config key ``key``
    (named in errors and in the log line saying where the stage runs): numpy on the CPU (scipy's
    multithreaded FFT, twice torch's speed on a CPU), a torch tensor on a GPU. ``auto`` takes CUDA when torch
    sees one, and fails where a GPU was allocated but none is found (:func:`resolve_device`)."""
    if name == "cpu":
        log.info("%s: CPU (numpy, %d threads)", key, cpu_threads())
        return lambda array: array
    device = resolve_device(name, key)
    if device.type == "cpu":
        log.info("%s: CPU (numpy, %d threads; torch sees no GPU)", key, cpu_threads())
        return lambda array: array
    import torch

    log.info("%s: %s", key, describe_device(device))
    return lambda array: torch.from_numpy(array).to(device)


def _cupy_gpus():
    """(cupy or None, GPUs CuPy sees, why it sees none): CuPy is imported here only, when a GPU is asked for."""
    try:
        import cupy
    except ImportError as exc:
        return None, 0, (f"CuPy cannot be imported ({exc}); install the gpu extra (pip install -e '.[gpu]', "
                         f"cupy-cuda{CUDA_MAJOR}x) or envs/gpu.yaml")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return cupy, 0, f"CuPy {cupy.__version__} finds no usable GPU ({exc}); does `nvidia-smi` see one?"
    return cupy, count, "" if count else f"CuPy {cupy.__version__} sees no GPU"


def array_namespace_for(name: str, key: str, environ: Mapping[str, str] | None = None):
    """The array namespace a data-preparation stage computes in, for the device ``name`` of config key ``key``:
    numpy on the CPU, CuPy on a GPU (made CuPy's current device), both as ``array_api_compat`` namespaces.
    The same rule as :func:`resolve_device`, with CuPy in torch's place: ``auto`` takes a GPU when CuPy sees
    one and is the CPU otherwise, unless the scheduler allocated a GPU; ``cuda`` (a free GPU, :func:`gpu_slot`)
    and ``cuda:N`` need one. Raises :class:`GPUNotFoundError` naming ``key`` rather than running on the CPU."""
    import array_api_compat.numpy

    if name == "cpu":
        log.info("%s: CPU (numpy, %d threads)", key, cpu_threads())
        return array_api_compat.numpy
    cupy, count, why = _cupy_gpus()
    if count == 0:
        allocated = allocated_gpus(environ)
        if name == "auto" and not allocated:
            log.info("%s: CPU (numpy, %d threads; %s)", key, cpu_threads(), why)
            return array_api_compat.numpy
        allocation = f" and this job was allocated GPU(s) (CUDA_VISIBLE_DEVICES={','.join(allocated)})" if (
            allocated) else ""
        raise GPUNotFoundError(f"{key} is {name!r}{allocation}, but {why}. Refusing to run on the CPU instead; "
                               f"to run on the CPU on purpose, set {key}: cpu")
    index = int(name.split(":", 1)[1]) if ":" in name else gpu_slot(count, environ)
    if index >= count:
        raise GPUNotFoundError(f"{key} is {name!r} but CuPy sees {count} GPU(s) (cuda:0 to cuda:{count - 1})")
    cupy.cuda.Device(index).use()
    properties = cupy.cuda.runtime.getDeviceProperties(index)
    log.info("%s: cuda:%d (%s, %.0f GiB; CuPy %s)", key, index, properties["name"].decode(),
             properties["totalGlobalMem"] / 2**30, cupy.__version__)
    import array_api_compat.cupy

    return array_api_compat.cupy


def scipy_for(xp, submodule: str):
    """scipy's ``submodule`` (``"special"``, ``"ndimage"``, ``"fft"``) for arrays of the namespace ``xp``:
    ``cupyx.scipy``'s on CuPy, whose functions take and return CuPy arrays."""
    import importlib

    import array_api_compat

    if array_api_compat.is_cupy_namespace(xp):
        return importlib.import_module(f"cupyx.scipy.{submodule}")
    if array_api_compat.is_numpy_namespace(xp):
        return importlib.import_module(f"scipy.{submodule}")
    raise TypeError(f"no scipy.{submodule} for the array namespace {xp.__name__}; expected numpy or CuPy")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``precision`` key on ``device``; None runs in fp32 without autocast.

    ``auto`` picks bf16 (same range as fp32, no scaler needed) only on GPUs with native bf16 (compute
    capability 8.0 and up: A100, H100), fp16 on older ones (T4, and a V100 under a CUDA 12 build of torch;
    training then needs a gradient scaler), and fp32 on the CPU, where autocast is slower than fp32 for
    convolutions. (``torch.cuda.is_bf16_supported`` says yes to emulated bf16 too, which runs far slower than
    fp16 on those GPUs.)
    """
    import torch

    if precision == "auto":
        if device.type != "cuda":
            return None
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device`` (from :func:`autocast_dtype`); None runs in fp32 as it is."""
    import torch

    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _allowed_cpus() -> int:
    """CPUs this process may run on (its affinity: a PBS cpuset or taskset), not the node's cores."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # no affinity on macOS/Windows: the machine is the allocation


def _positive_int(text: str | None) -> int | None:
    """The thread count an environment value states (OpenMP's nested form "4,2" counts its first level)."""
    try:
        value = int((text or "").split(",")[0])
    except ValueError:
        return None
    return value if value >= 1 else None


def job_threads(requested: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """CPU threads for this job: ``requested`` (``holopipe --threads``) as given; else the allocation the
    environment states (:data:`ALLOCATION_VARIABLES`), at most the CPUs this process may use; else those CPUs
    (``os.sched_getaffinity``). Never ``os.cpu_count()``: under PBS that counts the node's cores, which
    other jobs share."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return int(requested)
    environ = os.environ if environ is None else environ
    allowed = _allowed_cpus()
    for variable in ALLOCATION_VARIABLES:
        stated = _positive_int(environ.get(variable))
        if stated is not None:
            return min(stated, allowed)
    return allowed


def use_threads(threads: int) -> int:
    """Make ``threads`` this process's CPU thread count, once, before the work starts: torch's intra-op
    threads, dask's threaded scheduler, the scipy FFTs and holopipe's own pools (through
    :func:`cpu_threads`), and OpenMP/MKL/OpenBLAS of libraries loaded later. Returns ``threads``."""
    global _threads
    import dask

    _threads = int(threads)
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(_threads)
    dask.config.set(num_workers=_threads)
    if "torch" in sys.modules:  # loaded already: it has read OMP_NUM_THREADS; otherwise it will
        sys.modules["torch"].set_num_threads(_threads)
    return _threads


def cpu_threads() -> int:
    """Threads for a CPU pool or FFT of this process: what :func:`use_threads` set, else :func:`job_threads`."""
    return _threads if _threads is not None else job_threads()


def host_array(array, dtype=np.float64) -> np.ndarray:
    """Any library's array as numpy ``dtype``, copied from the GPU (torch, cupy) when it is there: only
    windows, scores and dark pixels travel, the planes stay on the device."""
    import array_api_compat

    if array_api_compat.is_torch_array(array):
        array = array.detach().cpu().numpy()
    elif array_api_compat.is_cupy_array(array):
        array = array.get()
    return np.asarray(array, dtype=dtype)
