"""Full-size smoke run: the workflow on config/holodec.yaml through `evaluate`, with every job measured.

    python benchmarks/smoke_fullsize.py                          # 2/1/1 holograms, 500 particles, 24 planes
    python benchmarks/smoke_fullsize.py --nx 1536 --ny 1024 --planes 4   # a reduced frame, minutes
    python benchmarks/smoke_fullsize.py --dry-run                # the plan and its check only, seconds

Runs exactly the splits it names: train, valid and test with --holograms holograms each, test alone
evaluated (infer.splits is replaced, not merged), --particles each, --planes z bins, a one-trial study of one
epoch, one training epoch and plain_unet (LinkNet's cost on a CPU is bench_infer.py's business; this run
checks the workflow and its declared resources), and pins every stage that has a `device` (read from the
schema, so a stage that gains one is pinned too) to the CPU so that the rules declare CPU rates. Other splits
of config/holodec.yaml stay configured (Snakemake merges nested keys of --configfile) but nothing reads them.
Before running, a dry run plans the jobs and the run refuses to start when a job touches a split it does not
name, reads another size, or asks for a GPU: a split added to config/holodec.yaml cannot slip into it.

Each job's `holopipe` command runs under `/usr/bin/time -v` (a `holopipe` wrapper first on PATH), and the run
prints per job: wall time, peak resident memory, the declared runtime and mem_mb, and whether the declaration
covers the measurement. Peak RSS is the largest single process of the job (GNU time), not the sum over
DataLoader workers.

Exit status: 0 when the run finished and every declaration covers its job (or the dry run's plan is what the
smoke names), 1 when the workflow failed, 2 when the plan runs something the smoke does not name, 3 when it
finished but some job outgrew its declaration. Keeps the run's directory (--workdir) for its logs.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from holopipe.core.config import schema

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "config" / "holodec.yaml"
TIME = Path("/usr/bin/time")
WRAPPER = """#!/bin/sh
exec {time} -v -o "$HOLOPIPE_SMOKE_TIMES/$$.txt" {holopipe} "$@"
"""
NAMED_SPLITS = ("train", "valid", "test")
EVALUATED_SPLITS = ("test",)


@dataclass(frozen=True)
class Plan:
    """What the smoke states it runs: holograms per split, the evaluated splits, the frame and the planes."""

    holograms: dict
    evaluated: tuple
    frame: tuple  # (nx, ny)
    z_bins: int

    def describe(self) -> str:
        splits = ", ".join(f"{split} {count}" for split, count in self.holograms.items())
        return (f"splits {splits} holograms of {self.frame[0]} x {self.frame[1]} pixels, {self.z_bins} planes; "
                f"evaluates {', '.join(self.evaluated)}")


@dataclass(frozen=True)
class Job:
    """One job block of Snakemake's log (a dry run's or a real run's)."""

    rule: str
    wildcards: dict
    resources: dict
    provenance: str | None = None
    config: dict = field(default_factory=dict)  # the --config-json the job's command passes, if any


def device_sections() -> list[str]:
    """The config sections with a `device` key, from the schema: every one is pinned to the CPU."""
    return [name for name, section in schema()["properties"].items() if "device" in section.get("properties", {})]


def stated_plan(args) -> Plan:
    optics = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))["optics"]
    return Plan(holograms=dict(zip(NAMED_SPLITS, args.holograms)), evaluated=EVALUATED_SPLITS,
                frame=(args.nx or optics["nx"], args.ny or optics["ny"]), z_bins=args.planes)


def overrides(args) -> dict:
    """The config merged over config/holodec.yaml for this run."""
    plan = stated_plan(args)
    config = {
        "splits": {split: {"source": "simulate", "n_holograms": count} for split, count in plan.holograms.items()},
        "optics": {"nx": plan.frame[0], "ny": plan.frame[1]},
        "simulate": {"particles": [args.particles, args.particles]},
        "reconstruction": {"z_bins": plan.z_bins},
        "model": {"architecture": "plain_unet", "depth": 5, "width": 16},
        "train": {"epochs": 1, "num_workers": 1, "warmup_epochs": 0},
        "tune": {"n_trials": 1, "workers": 1, "epochs": 1, "startup_trials": 1},
        # A list replaces the base config's list: only the named splits are evaluated.
        "infer": {"splits": list(plan.evaluated), "chunks": 2, "batch_planes": 1},  # 9.3 GB per full-size plane
    }
    for section in device_sections():
        config.setdefault(section, {})["device"] = "cpu"
    return config


def config_json(command: str) -> dict:
    words = shlex.split(command)
    return json.loads(words[words.index("--config-json") + 1]) if "--config-json" in words else {}


def parse_jobs(snakemake_log: str) -> list[Job]:
    """The job blocks of a Snakemake log written with --printshellcmds."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", snakemake_log):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        if not rule:
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.MULTILINE)
        resources = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        record = re.search(r"results/provenance/jobs/[\w.-]+\.json", block)
        command = re.search(r"^Shell command: (.*)$", block, re.MULTILINE)
        jobs.append(Job(
            rule=rule.group(1),
            wildcards=dict(item.split("=", 1) for item in wildcards.group(1).split(", ")) if wildcards else {},
            resources=dict(item.split("=", 1) for item in resources.group(1).split(", ") if "=" in item)
            if resources else {},
            provenance=record.group(0) if record else None,
            config=config_json(command.group(1)) if command else {},
        ))
    return jobs


def plan_problems(jobs: list[Job], plan: Plan) -> list[str]:
    """Every way the planned jobs differ from what the smoke states it runs (none: the plan is the statement)."""
    problems = []
    for job in jobs:
        name = f"{job.rule} {job.wildcards}" if job.wildcards else job.rule
        split = job.wildcards.get("split")
        if split is not None and split not in plan.holograms:
            problems.append(f"{name}: runs split {split!r}, which the smoke does not name")
        for config_split, spec in job.config.get("splits", {}).items():
            if config_split not in plan.holograms:
                problems.append(f"{name}: reads split {config_split!r}, which the smoke does not name")
            elif spec.get("n_holograms") != plan.holograms[config_split]:
                problems.append(f"{name}: {config_split} has {spec.get('n_holograms')} holograms, the smoke "
                                f"states {plan.holograms[config_split]}")
        optics = job.config.get("optics")
        if optics and (optics["nx"], optics["ny"]) != plan.frame:
            problems.append(f"{name}: frame {optics['nx']} x {optics['ny']}, the smoke states "
                            f"{plan.frame[0]} x {plan.frame[1]}")
        z_bins = job.config.get("reconstruction", {}).get("z_bins")
        if z_bins is not None and z_bins != plan.z_bins:
            problems.append(f"{name}: {z_bins} planes, the smoke states {plan.z_bins}")
        if int(job.resources.get("gpu", 0)):
            problems.append(f"{name}: asks for a GPU; the smoke pins every stage to the CPU")
    acquired = {job.wildcards["split"] for job in jobs if job.rule == "acquire_split"}
    inferred = {job.wildcards["split"] for job in jobs if job.rule == "infer_chunk"}
    if acquired != set(plan.holograms):
        problems.append(f"acquires {sorted(acquired)}, the smoke states {sorted(plan.holograms)}")
    if inferred != set(plan.evaluated):
        problems.append(f"infers {sorted(inferred)}, the smoke states it evaluates {sorted(plan.evaluated)}")
    return problems


def snakemake_command(workdir: Path, override_file: Path, cores: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(BASE_CONFIG), str(override_file), "--cores", cores, "--printshellcmds", *flags,
            "evaluate"]


def measured(times_dir: Path) -> dict:
    """{provenance record path: (wall seconds, peak RSS MB, exit status, end time)} from the /usr/bin/time -v
    reports."""
    jobs = {}
    for report in times_dir.glob("*.txt"):
        text = report.read_text()
        record = re.search(r"--provenance (\S+\.json)", text)
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        status = re.search(r"Exit status: (\d+)", text)
        if not (record and wall and rss):
            continue
        seconds = 0.0
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
        jobs[record.group(1)] = (seconds, int(rss.group(1)) / 1024, int(status.group(1)) if status else 0,
                                 report.stat().st_mtime)
    return jobs


def print_measurements(jobs: list[Job], runs: dict) -> int:
    """The per-job table; returns how many jobs outgrew their declared runtime or mem_mb."""
    declared = {job.provenance: job for job in jobs if job.provenance}
    print(f"\n{'job':<34} {'wall s':>8} {'runtime':>8} {'peak MB':>8} {'mem_mb':>8}  covered")
    uncovered = 0
    for record in sorted(runs, key=lambda path: runs[path][3]):
        seconds, rss_mb, status, _ = runs[record]
        job = declared.get(record, Job(rule="?", wildcards={}, resources={"runtime": "0", "mem_mb": "0"}))
        runtime, mem_mb = int(job.resources["runtime"]), int(job.resources["mem_mb"])
        covered = seconds <= runtime * 60 and rss_mb <= mem_mb
        uncovered += not covered
        name = f"{job.rule} {', '.join(f'{k}={v}' for k, v in job.wildcards.items())}".strip()
        verdict = ("yes" if covered else "NO") + ("" if status == 0 else f" (exit {status})")
        print(f"{name:<34} {seconds:8.1f} {runtime:7d}m {rss_mb:8.0f} {mem_mb:8d}  {verdict}")
    return uncovered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--holograms", type=int, nargs=3, default=[2, 1, 1], metavar=NAMED_SPLITS)
    parser.add_argument("--particles", type=int, default=500)
    parser.add_argument("--planes", type=int, default=24, help="reconstruction.z_bins")
    parser.add_argument("--nx", type=int, help="optics.nx instead of HOLODEC's 4872 (a reduced run)")
    parser.add_argument("--ny", type=int, help="optics.ny instead of HOLODEC's 3248")
    parser.add_argument("--cores", default="2")
    parser.add_argument("--workdir", type=Path, help="default: a new directory under the system's temp dir")
    parser.add_argument("--dry-run", action="store_true", help="plan and check the jobs, run nothing")
    args = parser.parse_args()

    if not args.dry_run and not os.access(TIME, os.X_OK):
        sys.exit(f"{TIME} is missing: install GNU time (apt-get install time)")
    holopipe = shutil.which("holopipe", path=str(Path(sys.executable).parent)) or shutil.which("holopipe")
    if holopipe is None:
        sys.exit("no `holopipe` command next to this interpreter or on PATH: run `make setup` first")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="holopipe-smoke-"))
    times_dir, bin_dir = workdir / "smoke" / "times", workdir / "smoke" / "bin"
    for directory in (times_dir, bin_dir):
        directory.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "holopipe"
    wrapper.write_text(WRAPPER.format(time=TIME, holopipe=holopipe))
    wrapper.chmod(0o755)
    override_file = workdir / "smoke" / "overrides.yaml"
    override_file.write_text(yaml.safe_dump(overrides(args), sort_keys=False))
    env = {**os.environ, "HOLOPIPE_SMOKE_TIMES": str(times_dir),
           "PATH": os.pathsep.join([str(bin_dir), str(Path(holopipe).parent), os.environ["PATH"]])}

    plan = stated_plan(args)
    print(f"workdir {workdir}\nstated: {plan.describe()}", flush=True)
    dry_run = subprocess.run(snakemake_command(workdir, override_file, args.cores, "--dry-run"),
                             capture_output=True, text=True, env=env, cwd=workdir)
    (workdir / "smoke" / "dry_run.log").write_text(dry_run.stdout + dry_run.stderr)
    if dry_run.returncode != 0:
        print(f"the dry run failed:\n{(dry_run.stdout + dry_run.stderr)[-3000:]}")
        return 1
    planned = parse_jobs(dry_run.stdout + dry_run.stderr)
    counts = Counter(job.rule for job in planned)
    print(f"planned: {len(planned)} jobs ({', '.join(f'{rule} {n}' for rule, n in counts.items())})")
    problems = plan_problems(planned, plan)
    if problems:
        print("the plan runs what the smoke does not state:\n" + "\n".join(f"  {p}" for p in problems))
        return 2
    print("plan: only the stated splits, sizes and planes, all on the CPU")
    if args.dry_run:
        return 0

    command = snakemake_command(workdir, override_file, args.cores)
    print(f"$ {' '.join(command)}", flush=True)
    started = time.monotonic()
    log_path = workdir / "smoke" / "snakemake.log"
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    total = time.monotonic() - started
    log_text = log_path.read_text()
    runs = measured(times_dir)
    uncovered = print_measurements(parse_jobs(log_text), runs)
    print(f"\nworkflow {'finished' if result.returncode == 0 else 'FAILED'} in {total / 60:.1f} min "
          f"({len(runs)} jobs measured); Snakemake's log: {log_path}")
    if result.returncode != 0:
        print(log_text[-3000:])
        return 1
    return 3 if uncovered else 0


if __name__ == "__main__":
    sys.exit(main())
