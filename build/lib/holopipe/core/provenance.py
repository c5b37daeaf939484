"""Provenance: what produced each result, from what, with which code, on which machine.

Every ``holopipe`` stage run with ``--provenance RECORD.json`` writes, after it succeeds, one JSON record
(:func:`job_record`): the command line; the SHA-256 of the config it used (canonical JSON of the validated
config, so the same settings give the same hash whatever the YAML spelling); the versions of the packages
that shape results; the git commit of the holopipe source (and whether it had uncommitted changes); every
input and output path with its size and SHA-256 (a directory, e.g. a zarr store, hashes its files' relative
paths and contents in sorted order); and the hardware it ran on (host, CPU model and cores, memory, GPUs,
PBS job id), with start time and duration. The Snakemake rules keep one record per job under
``results/provenance/jobs/``; :func:`summarize_records` turns them into the tables of the report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml

from holopipe import __version__
from holopipe.core.credentials import mask_secrets
from holopipe.core.device import cpu_threads
from holopipe.core.files import file_sha256, write_atomically

__all__ = [
    "PACKAGES", "checksum", "code_identity", "config_sha256", "environment", "git_commit", "job_record",
    "read_records", "summarize_records", "write_record",
]

PACKAGES = ("holopipe", "numpy", "scipy", "xarray", "zarr", "dask", "netCDF4", "pandas", "torch", "torchvision",
            "segmentation-models-pytorch", "optuna", "cupy-cuda13x", "cupy", "snakemake", "matplotlib")
"""Distributions whose versions can change results; those installed are recorded."""

def checksum(path) -> dict:
    """``{"path", "kind", "bytes", "files", "sha256"}`` of a file or a directory tree (files in sorted
    relative order, each contributing its relative path and its own SHA-256; hidden temporaries of
    Snakemake such as ``.snakemake_timestamp`` are left out, they change without the data changing)."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "kind": "file", "bytes": path.stat().st_size, "files": 1,
                "sha256": file_sha256(path)}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory to checksum")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".snakemake"))
    with ThreadPoolExecutor(max_workers=min(8, cpu_threads())) as pool:  # hashlib releases the GIL
        digests = list(pool.map(file_sha256, files))
    tree = hashlib.sha256()
    for file, digest in zip(files, digests):
        tree.update(f"{file.relative_to(path).as_posix()}\0{digest}\n".encode())
    return {"path": str(path), "kind": "directory", "bytes": sum(f.stat().st_size for f in files),
            "files": len(files), "sha256": tree.hexdigest()}


def config_sha256(config: dict | None) -> str | None:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of a config; None without one."""
    if config is None:
        return None
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def code_identity(source_dir=None) -> dict:
    """``{"holopipe_version", "source_sha256"}`` of the code that runs: the SHA-256 over the relative paths
    and bytes of every ``*.py`` under the holopipe package (``source_dir``), in sorted order.

    Resume fingerprints hold it, so results computed by the code before a ``git pull`` are never mixed
    with those of the code after it (the version alone stays 0.1.0 between releases). Every module counts,
    not only those a stage imports: a needless restart costs time, a missed import would cost correctness.
    Computed once per process (about 0.6 MB read).
    """
    source_dir = Path(source_dir or Path(__file__).resolve().parents[1])  # the holopipe package
    digest = hashlib.sha256()
    for path in sorted(source_dir.rglob("*.py")):
        digest.update(f"{path.relative_to(source_dir).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    return {"holopipe_version": __version__, "source_sha256": digest.hexdigest()}


def git_commit(source_dir=None) -> dict:
    """``{"commit", "dirty"}`` of the git checkout holding the holopipe source (both None outside one)."""
    source_dir = Path(source_dir or Path(__file__).resolve().parents[1])  # the holopipe package
    git = shutil.which("git")
    if git is None:
        return {"commit": None, "dirty": None}
    try:
        commit = subprocess.run([git, "-C", str(source_dir), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run([git, "-C", str(source_dir), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return None


def _gpus() -> list[str]:
    """Names of the GPUs this process may use: from torch or cupy when already loaded (no import just for
    this), else from nvidia-smi, else none."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        result = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def _package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment() -> dict:
    """The software and hardware of this process: versions, commit, host, CPU, memory, GPUs, PBS job."""
    return {
        "holopipe": __version__,
        "python": platform.python_version(),
        "packages": _package_versions(),
        "git": git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(),
        "pbs_job_id": os.environ.get("PBS_JOBID"),
    }


def job_record(*, command: list[str], stage: str, config: dict | None, inputs, outputs, started: float,
               finished: float) -> dict:
    """The provenance of one finished stage run (``started``/``finished`` from :func:`time.time`); the
    command and config with any URL password masked, since records end up in the report."""
    config = mask_secrets(config)
    return {
        "stage": stage,
        "command": mask_secrets(command),
        "config_sha256": config_sha256(config),
        "config": config,
        "inputs": [checksum(path) for path in inputs],
        "outputs": [checksum(path) for path in outputs],
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(finished - started, 3),
        **environment(),
    }


def write_record(record: dict, path) -> Path:
    """Write a record as indented JSON, atomically."""
    text = json.dumps(record, indent=1, sort_keys=True, default=str) + "\n"
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def read_records(paths) -> list[dict]:
    """Records from JSON files; a file that is not a record is an error naming it."""
    records = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable provenance record ({error})") from error
        if not isinstance(record, dict) or not {"stage", "inputs", "outputs", "host"} <= set(record):
            raise ValueError(f"{path}: not a holopipe provenance record (needs stage, inputs, outputs, host)")
        records.append({**record, "record": Path(path).stem})
    return records


def summarize_records(records: list[dict]) -> dict[str, pd.DataFrame]:
    """The report's tables: ``jobs`` (one row per job: hardware, time, config hash, commit), ``files``
    (every input and output of every job with its checksum) and ``packages`` (each version seen, and
    which jobs used it: a mixed-version run shows up as two rows for one package)."""
    jobs = pd.DataFrame([{
        "job": r["record"], "stage": r["stage"], "started": r["started"], "seconds": r["seconds"],
        "host": r["host"], "cpu_model": r["cpu_model"], "cpus_allowed": r["cpus_allowed"],
        "memory_gib": None if r["memory_bytes"] is None else round(r["memory_bytes"] / 2**30, 1),
        "gpus": "; ".join(r["gpus"]) or "none", "pbs_job_id": r["pbs_job_id"],
        "config_sha256": r["config_sha256"], "git_commit": r["git"]["commit"], "git_dirty": r["git"]["dirty"],
    } for r in records], columns=["job", "stage", "started", "seconds", "host", "cpu_model", "cpus_allowed",
                                  "memory_gib", "gpus", "pbs_job_id", "config_sha256", "git_commit", "git_dirty"])
    files = pd.DataFrame([
        {"job": r["record"], "role": role, **{k: entry[k] for k in ("path", "kind", "bytes", "files", "sha256")}}
        for r in records for role in ("input", "output") for entry in r[f"{role}s"]
    ], columns=["job", "role", "path", "kind", "bytes", "files", "sha256"])
    seen: dict[tuple[str, str], list[str]] = {}
    for r in records:
        for name, version in {**r["packages"], "python": r["python"]}.items():
            seen.setdefault((name, version), []).append(r["record"])
    packages = pd.DataFrame([{"package": name, "version": version, "jobs": len(jobs_)}
                             for (name, version), jobs_ in sorted(seen.items())],
                            columns=["package", "version", "jobs"])
    return {"jobs": jobs, "files": files, "packages": packages}


def write_summary(record_paths, config: dict, out_dir) -> dict[str, Path]:
    """jobs.csv, files.csv, packages.csv and config.yaml (the resolved config, any URL password masked, with
    its hash in a comment) in ``out_dir``, each written atomically; returns their paths by name."""
    out_dir = Path(out_dir)
    config = mask_secrets(config)
    tables = summarize_records(read_records(record_paths))
    written = {name: write_atomically(out_dir / f"{name}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
               for name, table in tables.items()}
    header = f"# Resolved holopipe config; sha256 of its canonical JSON: {config_sha256(config)}\n"
    text = header + yaml.safe_dump(config, sort_keys=False)
    written["config"] = write_atomically(out_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    return written
