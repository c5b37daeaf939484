"""Device, precision and CPU-thread choice, one policy for every stage: which device a config key names,
the autocast dtype of a precision on it, and how many CPU threads a job may use.

torch is imported only by the functions that need it, so the numpy stages (simulate, regrid, standardize)
can follow the thread policy without loading torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["array_mover", "autocast", "autocast_dtype", "cpu_threads", "job_threads", "resolve_device", "use_threads"]

ALLOCATION_VARIABLES = ("OMP_NUM_THREADS", "NCPUS")
"""Environment variables stating a job's CPU allocation, first found wins: Snakemake sets OMP_NUM_THREADS to
the rule's ``threads`` in every shell job, PBS sets it (and NCPUS) to the job's ``ncpus``."""

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""Set by :func:`use_threads` for the libraries that read them when they load (torch among them)."""

_threads: int | None = None  # set once per process by use_threads (the CLI's main)


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device (``key`` names the config key
    in the error when CUDA is asked for and missing)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} is {name!r} but CUDA is not available")
    return device


def array_mover(name: str, key: str):
    """numpy -> the array a plane sweep reconstructs in, for the device ``name`` of config key ``key``
    (named in errors): numpy on the CPU (scipy's multithreaded FFT, twice torch's speed on a CPU), a
    torch tensor on a GPU. ``auto`` takes CUDA when torch sees one."""
    if name == "cpu":
        return lambda array: array
    device = resolve_device(name, key)
    if device.type == "cpu":
        return lambda array: array
    import torch

    return lambda array: torch.from_numpy(array).to(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device``; None runs in fp32 without autocast.

    ``auto`` picks bf16 (same range as fp32, no scaler needed) where the GPU supports it, fp16 otherwise,
    and fp32 on CPU, where autocast is slower than fp32 for convolutions.
    """
    import torch

    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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
