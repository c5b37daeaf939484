"""Full-size smoke run: the workflow on config/holodec.yaml through `evaluate`, with every job measured.

    python benchmarks/smoke_fullsize.py                          # 2/1/1 holograms, 500 particles, 24 planes
    python benchmarks/smoke_fullsize.py --nx 1536 --ny 1024 --planes 4   # a reduced frame, minutes

Overrides config/holodec.yaml with 2 train, 1 valid and 1 test holograms (--holograms), --particles each,
--planes z bins, a one-trial study of one epoch, one training epoch and plain_unet (LinkNet's cost on a
CPU is bench_infer.py's business; this run checks the workflow and its declared resources), and pins
training, inference, refinement and the baseline to the CPU so that the rules declare CPU rates. Each
job's `holopipe` command runs under `/usr/bin/time -v` (a `holopipe` wrapper first on PATH), and the run
prints per job: wall time, peak resident memory, the declared runtime and mem_mb, and whether the
declaration covers the measurement. Peak RSS is the largest single process of the job (GNU time), not
the sum over DataLoader workers.

Exit status: 0 when the run finished and every declaration covers its job, 1 when the workflow failed,
3 when it finished but some job outgrew its declaration. Keeps the run's directory (--workdir) for its logs.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TIME = Path("/usr/bin/time")
WRAPPER = """#!/bin/sh
exec {time} -v -o "$HOLOPIPE_SMOKE_TIMES/$$.txt" {holopipe} "$@"
"""


def overrides(args) -> dict:
    """The config merged over config/holodec.yaml for this run."""
    train, valid, test = args.holograms
    config = {
        "splits": {"train": {"n_holograms": train}, "valid": {"n_holograms": valid},
                   "test": {"n_holograms": test}},
        "simulate": {"particles": [args.particles, args.particles]},
        "reconstruction": {"z_bins": args.planes},
        "model": {"architecture": "plain_unet", "depth": 5, "width": 16},
        "train": {"epochs": 1, "num_workers": 1, "warmup_epochs": 0, "device": "cpu"},
        "tune": {"n_trials": 1, "workers": 1, "epochs": 1, "startup_trials": 1},
        "infer": {"device": "cpu", "chunks": 2, "batch_planes": 1},  # a CPU holds 9.3 GB per full-size plane
        "particles": {"device": "cpu"},
        "baseline": {"device": "cpu"},
    }
    if args.nx or args.ny:
        config["optics"] = {key: value for key, value in (("nx", args.nx), ("ny", args.ny)) if value}
    return config


def declared_resources(snakemake_log: str) -> dict:
    """{provenance record path: (rule, wildcards, mem_mb, runtime minutes)} from Snakemake's job blocks."""
    jobs = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", snakemake_log):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        resources = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        record = re.search(r"results/provenance/jobs/[\w.-]+\.json", block)
        if not (rule and resources and record):
            continue
        values = dict(item.split("=", 1) for item in resources.group(1).split(", ") if "=" in item)
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.MULTILINE)
        jobs[record.group(0)] = (rule.group(1), wildcards.group(1) if wildcards else "",
                                 int(values["mem_mb"]), int(values["runtime"]))
    return jobs


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--holograms", type=int, nargs=3, default=[2, 1, 1], metavar=("TRAIN", "VALID", "TEST"))
    parser.add_argument("--particles", type=int, default=500)
    parser.add_argument("--planes", type=int, default=24, help="reconstruction.z_bins")
    parser.add_argument("--nx", type=int, help="optics.nx instead of HOLODEC's 4872 (a reduced run)")
    parser.add_argument("--ny", type=int, help="optics.ny instead of HOLODEC's 3248")
    parser.add_argument("--cores", default="2")
    parser.add_argument("--workdir", type=Path, help="default: a new directory under the system's temp dir")
    args = parser.parse_args()

    if not os.access(TIME, os.X_OK):
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

    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(REPO / "config" / "holodec.yaml"), str(override_file),
               "--cores", args.cores, "evaluate"]
    env = {**os.environ, "HOLOPIPE_SMOKE_TIMES": str(times_dir),
           "PATH": os.pathsep.join([str(bin_dir), str(Path(holopipe).parent), os.environ["PATH"]])}
    print(f"workdir {workdir}\n$ {' '.join(command)}", flush=True)
    started = time.monotonic()
    log_path = workdir / "smoke" / "snakemake.log"
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    total = time.monotonic() - started
    log_text = log_path.read_text()

    declared, runs = declared_resources(log_text), measured(times_dir)
    print(f"\n{'job':<34} {'wall s':>8} {'runtime':>8} {'peak MB':>8} {'mem_mb':>8}  covered")
    uncovered = 0
    for record in sorted(runs, key=lambda path: runs[path][3]):
        seconds, rss_mb, status, _ = runs[record]
        rule, wildcards, mem_mb, runtime = declared.get(record, ("?", "", 0, 0))
        covered = seconds <= runtime * 60 and rss_mb <= mem_mb
        uncovered += not covered
        name = f"{rule} {wildcards}".strip()
        verdict = ("yes" if covered else "NO") + ("" if status == 0 else f" (exit {status})")
        print(f"{name:<34} {seconds:8.1f} {runtime:7d}m {rss_mb:8.0f} {mem_mb:8d}  {verdict}")
    print(f"\nworkflow {'finished' if result.returncode == 0 else 'FAILED'} in {total / 60:.1f} min "
          f"({len(runs)} jobs measured); Snakemake's log: {log_path}")
    if result.returncode != 0:
        print(log_text[-3000:])
        return 1
    return 3 if uncovered else 0


if __name__ == "__main__":
    sys.exit(main())
