"""Device policy: which device a config key gets, what a job allocated a GPU does without one, the precision
``auto`` picks from a GPU's compute capability, one GPU slot per job of several, and the log line each torch
stage writes saying where it runs.

Every test here runs on a CPU: "torch sees no GPU" is made true with a monkeypatch (so the tests mean the
same on a GPU node), and a GPU's properties are faked where only the policy is under test.
"""

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from holopipe.core import device as device_module
from holopipe.core.device import (
    GPUNotFoundError,
    allocated_gpus,
    array_mover,
    autocast_dtype,
    describe_device,
    gpu_slot,
    resolve_device,
)

GPU_UUID = "GPU-8f6a1c2e-3b4d-5e6f-7a8b-9c0d1e2f3a4b"


@pytest.fixture
def no_gpu(monkeypatch):
    """torch sees no GPU, and no scheduler allocated one (CUDA_VISIBLE_DEVICES unset)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


# ---- resolve_device: local CPU runs keep working, an allocated GPU that is missing is an error ----

def test_auto_without_an_allocation_runs_on_the_cpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("allocated", ["0", "2,3", GPU_UUID, f"MIG-{GPU_UUID[4:]}"])
def test_auto_with_an_allocated_gpu_that_torch_cannot_use_fails(no_gpu, allocated):
    no_gpu.setenv("CUDA_VISIBLE_DEVICES", allocated)
    with pytest.raises(GPUNotFoundError) as error:
        resolve_device("auto", "infer.device")
    message = str(error.value)
    assert "infer.device" in message and f"CUDA_VISIBLE_DEVICES={allocated}" in message
    assert "infer.device: cpu" in message  # says how to run on the CPU on purpose
    assert resolve_device("cpu", "infer.device") == torch.device("cpu")  # ... which then works


@pytest.mark.parametrize("none_allocated", ["", "-1", "NoDevFiles", " none "])
def test_auto_where_the_scheduler_allocated_no_gpu_runs_on_the_cpu(no_gpu, none_allocated):
    no_gpu.setenv("CUDA_VISIBLE_DEVICES", none_allocated)
    assert allocated_gpus() == []
    assert resolve_device("auto") == torch.device("cpu")


def test_allocated_gpus_reads_indices_and_uuids():
    assert allocated_gpus({}) is None
    assert allocated_gpus({"CUDA_VISIBLE_DEVICES": f"1, {GPU_UUID}"}) == ["1", GPU_UUID]
    assert allocated_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_asked_for_without_cuda_fails_naming_the_key(no_gpu, name):
    with pytest.raises(GPUNotFoundError, match=f"train.device is '{name}'"):
        resolve_device(name, "train.device")


def test_the_cpu_is_the_cpu_even_where_a_gpu_was_allocated(no_gpu):
    no_gpu.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert resolve_device("cpu", "baseline.device") == torch.device("cpu")


CU130_ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1+cu130's list


@pytest.mark.parametrize("capability, arches, runs", [
    ((7, 0), CU130_ARCHES, False),  # V100: CUDA 13 dropped it
    ((6, 1), CU130_ARCHES, False),
    ((7, 5), CU130_ARCHES, True),  # T4
    ((8, 9), CU130_ARCHES, True),  # L40S runs sm_86 code (same major, later minor)
    ((9, 0), CU130_ARCHES, True),  # H100, H200
    ((11, 0), CU130_ARCHES, False),  # a major without a cubin and no PTX
    ((11, 0), [*CU130_ARCHES, "compute_120"], False),  # PTX runs only on its own capability and later
    ((13, 0), [*CU130_ARCHES, "compute_120"], True),
    ((7, 0), [], True),  # torch cannot tell: let it try
])
def test_a_gpu_this_torch_has_no_kernels_for_fails_before_the_job_starts(monkeypatch, capability, arches, runs):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arches)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    if runs:
        assert resolve_device("auto", "infer.device") == torch.device("cuda", 0) and chosen
        return
    with pytest.raises(GPUNotFoundError) as error:
        resolve_device("auto", "infer.device")
    message = str(error.value)
    for part in ("infer.device", "Tesla V100-SXM2-32GB", f"compute capability {capability[0]}.{capability[1]}",
                 "sm_75", "infer.device: cpu"):
        assert part in message, f"{part!r} not in {message!r}"
    assert not chosen


# ---- precision auto: bf16 only from compute capability 8.0 ----

@pytest.mark.parametrize("capability, expected", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                                  ((8, 6), torch.bfloat16), ((7, 0), torch.float16),
                                                  ((7, 5), torch.float16)])
def test_auto_precision_follows_the_compute_capability(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    gpu = torch.device("cuda", 0)
    assert autocast_dtype("auto", gpu) is expected
    assert asked == [gpu]  # the capability of the device the stage runs on, not of GPU 0 by default


def test_precision_on_the_cpu_and_when_forced(monkeypatch):
    def no_capability(device=None):
        raise AssertionError("the CPU has no compute capability to ask for")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_capability)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert [autocast_dtype(name, cpu) for name in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]


def test_describe_device_names_the_gpu_its_capability_memory_cuda_and_precision(monkeypatch):
    h100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    text = describe_device(torch.device("cuda", 1), torch.bfloat16)
    for part in ("cuda:1", "NVIDIA H100 80GB HBM3", "compute capability 9.0", "80 GiB", f"torch {torch.__version__}",
                 f"CUDA {torch.version.cuda}", "bfloat16 autocast"):
        assert part in text, f"{part!r} not in {text!r}"
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert describe_device(torch.device("cpu")) == "CPU (1 thread), fp32"
        torch.set_num_threads(2)
        assert describe_device(torch.device("cpu")) == "CPU (2 threads), fp32"
    finally:
        torch.set_num_threads(previous)
    assert "float16 autocast" in describe_device(torch.device("cpu"), torch.float16)


# ---- one GPU slot per job: node-local lock files, held by separate processes ----

HOLD_A_SLOT = """
import sys
from holopipe.core.device import gpu_slot
print(gpu_slot(int(sys.argv[1]), poll_seconds=0.05), flush=True)
sys.stdin.read()  # hold the slot until the test closes stdin (or kills this process)
"""


def start_job(locks, n_devices=2, **environ):
    """A process that takes a GPU slot of ``n_devices`` (as a GPU job's resolve_device does) and holds it."""
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    env.update(HOLOPIPE_GPU_LOCKS=str(locks), **environ)
    return subprocess.Popen([sys.executable, "-c", HOLD_A_SLOT, str(n_devices)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def slot_of(job, timeout=20.0) -> int | None:
    """The slot ``job`` printed within ``timeout`` seconds, or None if it is still waiting for one."""
    ready, _, _ = select.select([job.stdout], [], [], timeout)
    return int(job.stdout.readline()) if ready else None


def finish(job) -> str:
    """Stop ``job`` (closing its stdin ends it; kill if it still waits) and return what it wrote to stderr."""
    try:
        _, stderr = job.communicate(input="", timeout=10)
    except subprocess.TimeoutExpired:
        job.kill()
        _, stderr = job.communicate(timeout=10)
    return stderr


def lock_holders(folder) -> dict[str, int]:
    """GPU name (the lock file's CUDA_VISIBLE_DEVICES entry) -> pid recorded in its lock file."""
    return {path.stem.split("-gpu-", 1)[1]: int(path.read_text()) for path in folder.glob("*-gpu-*.lock")
            if path.read_text().strip()}


def test_each_job_takes_its_own_gpu_and_a_third_waits_until_one_ends(tmp_path):
    first, second = start_job(tmp_path), start_job(tmp_path)
    waiting = None
    try:
        slots = {first.pid: slot_of(first), second.pid: slot_of(second)}
        assert sorted(slots.values()) == [0, 1]
        assert lock_holders(tmp_path) == {str(slot): pid for pid, slot in slots.items()}
        waiting = start_job(tmp_path)
        assert slot_of(waiting, timeout=1.0) is None  # both GPUs taken: it waits
        first.send_signal(signal.SIGKILL)  # a job killed (walltime, node failure) frees its GPU: flock
        first.wait(timeout=10)
        started = time.perf_counter()
        assert slot_of(waiting, timeout=10.0) == slots[first.pid]
        assert time.perf_counter() - started < 5  # polls, 0.05 s here
    finally:
        stderr = [finish(job) for job in (first, second, waiting) if job is not None]
    assert "all 2 GPUs are taken by other holopipe jobs" in stderr[2] and "waiting for one" in stderr[2]


def test_slots_follow_the_allocated_gpu_names(tmp_path):
    other = "GPU-1a2b3c4d-0000-1111-2222-333344445555"
    jobs = [start_job(tmp_path, CUDA_VISIBLE_DEVICES=f"{GPU_UUID},{other}") for _ in range(2)]
    try:
        slots = {job.pid: slot_of(job) for job in jobs}
        holders = lock_holders(tmp_path)
        assert set(holders) == {GPU_UUID, other}  # locks name the GPUs, so jobs with other lists never clash
        assert holders[GPU_UUID] == next(pid for pid, slot in slots.items() if slot == 0)
    finally:
        for job in jobs:
            finish(job)


def test_threads_of_one_job_share_its_slot(tmp_path, monkeypatch):
    """Tuning runs tune.trials_per_gpu trials in threads of one process: they share one GPU, and one lock."""
    monkeypatch.setattr(device_module, "_slot_lock", None)
    monkeypatch.setenv("HOLOPIPE_GPU_LOCKS", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    start = threading.Barrier(6)

    def trial():
        start.wait()
        return gpu_slot(2, poll_seconds=0.05)

    with ThreadPoolExecutor(6) as pool:
        slots = list(pool.map(lambda _: trial(), range(6)))
    assert slots == [slots[0]] * 6
    other = start_job(tmp_path)  # the other GPU is still free for another job
    try:
        assert slot_of(other, timeout=10.0) == 1 - slots[0]
    finally:
        finish(other)


def test_one_gpu_is_slot_0_without_a_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("HOLOPIPE_GPU_LOCKS", str(tmp_path / "locks"))
    assert gpu_slot(1) == 0 and gpu_slot(0) == 0
    assert not (tmp_path / "locks").exists()


def test_resolve_device_takes_the_free_gpu_of_several(tmp_path, monkeypatch):
    """A faked two-GPU node where another job holds GPU 0: ``cuda`` and ``auto`` land on cuda:1."""
    holder = start_job(tmp_path)
    try:
        assert slot_of(holder) == 0
        chosen = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        monkeypatch.setattr(device_module, "_slot_lock", None)  # this process holds no slot yet (restored after)
        monkeypatch.setenv("HOLOPIPE_GPU_LOCKS", str(tmp_path))
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        assert resolve_device("auto") == torch.device("cuda", 1)
        assert resolve_device("cuda") == torch.device("cuda", 1)  # the process keeps its slot
        assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is taken as asked
        assert chosen == [torch.device("cuda", 1)] * 2 + [torch.device("cuda", 0)]
    finally:
        finish(holder)


# ---- the baseline's and the particles' plane sweeps: numpy on the CPU, saying so ----

@pytest.mark.parametrize("name", ["auto", "cpu"])
def test_array_mover_on_the_cpu_is_the_identity_and_logs_it(no_gpu, caplog, name):
    array = np.ones((3, 5), np.float32)
    with caplog.at_level(logging.INFO, logger="holopipe"):
        for key in ("baseline.device", "particles.device"):
            assert array_mover(name, key)(array) is array
    for key in ("baseline.device", "particles.device"):
        assert f"{key}: CPU (numpy" in caplog.text


def test_array_mover_refuses_the_cpu_where_a_gpu_was_allocated(no_gpu):
    no_gpu.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(GPUNotFoundError, match="particles.device is 'auto'.*CUDA_VISIBLE_DEVICES=0"):
        array_mover("auto", "particles.device")


# ---- every torch stage says where it runs ----

def tiny_config(**sections):
    from holopipe.core.config import load_config

    return load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 1, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 3.6e-6, "nx": 48, "ny": 32,
                   "z_min": 2e-3, "z_max": 6e-3},
        "reconstruction": {"z_bins": 4, "pad": 8},
        "model": {"architecture": "plain_unet", "width": 4, "depth": 2},
        **sections,
    })


@pytest.mark.parametrize("precision, scaler", [("fp32", False), ("fp16", True)])
def test_training_logs_its_device_precision_and_scaler(tmp_path, caplog, no_gpu, precision, scaler):
    from holopipe.data.standardize import write_stats
    from holopipe.ml.dataset import write_synthetic_examples
    from holopipe.ml.train import train_model

    stores = [write_synthetic_examples(tmp_path / f"{name}.zarr", 8, 16, seed=seed)
              for name, seed in (("train", 1), ("valid", 2))]
    stats = write_stats({"contrast_mean": 1.0, "contrast_std": 0.2}, tmp_path / "stats.json")
    config = tiny_config(train={"epochs": 1, "batch_size": 8, "num_workers": 0, "device": "auto",
                                "precision": precision})
    with caplog.at_level(logging.INFO, logger="holopipe"):
        train_model(config, *stores, tmp_path / "run", stats_path=stats, progress=False)
    amp = None if precision == "fp32" else torch.float16
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("train.device: ")]
    assert lines == [f"train.device: {describe_device(torch.device('cpu'), amp)}"
                     + (", gradients through a GradScaler" if scaler else "")]  # once per run


def test_inference_logs_its_device_and_precision(tmp_path, caplog, no_gpu):
    import xarray as xr

    from holopipe.core.io import write_zarr
    from holopipe.detect.infer import infer_chunk

    flat = xr.Dataset({"image": (("hologram_number", "xsize", "ysize"), np.ones((1, 48, 32), np.float32))},
                      attrs={"Nx": 48, "Ny": 32, "dx": 2.96e-6, "dy": 3.6e-6, "lambda": 3.55e-7,
                             "zMin": 2e-3, "zMax": 6e-3})
    store = write_zarr(flat, tmp_path / "test.zarr")
    config = tiny_config(infer={"device": "auto", "precision": "auto"})
    with caplog.at_level(logging.INFO, logger="holopipe"):
        infer_chunk(config, None, store, tmp_path / "chunk.csv", chunk=0, n_chunks=1, progress=False,
                    segment=lambda amplitude, phase: torch.full_like(amplitude, -20.0))
    described = describe_device(torch.device("cpu"), None)
    assert [record for record in caplog.records if "infer" in record.getMessage()
            and described in record.getMessage()], f"no infer log line says {described!r}:\n{caplog.text}"
