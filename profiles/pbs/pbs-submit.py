#!/usr/bin/env python3
"""Submit a Snakemake job script to PBS Pro with qsub; print only the PBS job id.

Called by the cluster-generic executor as `pbs-submit.py JOBSCRIPT`, and by the workflow's onstart check as
`pbs-submit.py --check-account` (exit 1 with the message when no account is set). The job's threads, resources (mem_mb,
runtime in minutes, gpu) and rule are read from the `# properties = {...}` line Snakemake writes into the
script, so one command line serves every rule. Site settings come from the job's resources when set
(pbs_account, pbs_queue, pbs_gpu_queue, gpu_type), else from $PBS_ACCOUNT, $PBS_QUEUE, $PBS_GPU_QUEUE,
$PBS_GPU_TYPE, else Casper's defaults.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULTS = {"pbs_queue": "casper", "pbs_gpu_queue": "casper", "gpu_type": "a100"}
ENV = {"pbs_account": "PBS_ACCOUNT", "pbs_queue": "PBS_QUEUE", "pbs_gpu_queue": "PBS_GPU_QUEUE",
       "gpu_type": "PBS_GPU_TYPE"}
LOG_DIR = Path("logs") / "pbs"
PROFILE_DIR = Path(__file__).resolve().parent


def read_properties(jobscript: Path) -> dict:
    """The JSON job properties from the `# properties = ` line of a Snakemake job script."""
    for line in jobscript.read_text().splitlines():
        if line.startswith("# properties = "):
            return json.loads(line[len("# properties = "):])
    raise ValueError(f"{jobscript}: no '# properties = ' line; is this a Snakemake job script?")


def setting(name: str, resources: dict) -> str:
    """A site setting: the job's resource, else its environment variable, else the Casper default."""
    value = resources.get(name) or os.environ.get(ENV[name]) or DEFAULTS.get(name, "")
    return str(value).strip()


def walltime(minutes) -> str:
    """PBS walltime HH:MM:SS from Snakemake's runtime in minutes (at least one minute)."""
    seconds = max(60, round(float(minutes) * 60))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def job_name(properties: dict) -> str:
    """The rule (or group) name, cut to PBS's 236 characters of letters, digits, _ . -."""
    name = properties.get("rule") or properties.get("groupid") or "snakejob"
    return re.sub(r"[^\w.-]", "_", str(name))[:236]


def log_path(properties: dict) -> Path:
    """logs/pbs/<rule>[.<wildcards>].<snakemake jobid>.log under the working directory (stdout+stderr)."""
    wildcards = ".".join(f"{k}={v}" for k, v in (properties.get("wildcards") or {}).items())
    stem = ".".join(part for part in (job_name(properties), wildcards, str(properties.get("jobid", "")))
                    if part)
    safe = re.sub(r"[^\w.=-]", "_", stem)
    return Path.cwd() / LOG_DIR / f"{safe}.log"


def job_variables() -> str:
    """qsub -v list for jobscript.sh: the env.sh it sources, and the directory of the `holopipe` command of
    the submitting environment (env.sh's default). PBS splits -v at commas, so a path holding one is refused."""
    variables = {"HOLOPIPE_PBS_ENV": PROFILE_DIR / "env.sh"}
    holopipe = shutil.which("holopipe")
    if holopipe:
        variables["HOLOPIPE_BIN"] = Path(holopipe).parent
    for name, value in variables.items():
        if "," in str(value):
            raise ValueError(f"{name}={value}: qsub -v cannot pass a path containing a comma")
    return ",".join(f"{name}={value}" for name, value in variables.items())


def account(resources: dict) -> str:
    """The PBS account (-A) of a job; every qsub needs one, and there is no default."""
    name = setting("pbs_account", resources)
    if not name:
        raise ValueError("no PBS account: set the environment variable PBS_ACCOUNT (e.g. "
                         "`export PBS_ACCOUNT=NAML0001`) or the resource pbs_account "
                         "(--set-resources / default-resources pbs_account=...)")
    return name


def qsub_command(properties: dict, jobscript: Path) -> list[str]:
    """The qsub argument list for one job; ngpus and gpu_type only when the job asks for GPUs."""
    resources = properties.get("resources", {})
    gpus = int(float(resources.get("gpu", 0) or 0))
    threads = int(properties.get("threads", 1) or 1)
    mem_mb = int(float(resources.get("mem_mb", 1000)))
    select = f"select=1:ncpus={threads}:mem={mem_mb}MB"
    if gpus > 0:
        select += f":ngpus={gpus}:gpu_type={setting('gpu_type', resources)}"
    queue = setting("pbs_gpu_queue" if gpus > 0 else "pbs_queue", resources)
    return ["qsub", "-A", account(resources), "-q", queue, "-N", job_name(properties), "-l", select,
            "-l", f"walltime={walltime(resources.get('runtime', 60))}", "-j", "oe",
            "-o", str(log_path(properties)), "-v", job_variables(), str(jobscript)]


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check-account"]:  # the workflow's onstart check, before the first submission
        try:
            account({})
        except ValueError as error:
            print(f"profiles/pbs: {error}", file=sys.stderr)
            return 1
        return 0
    if len(argv) < 2:
        print("usage: pbs-submit.py JOBSCRIPT | --check-account", file=sys.stderr)
        return 2
    jobscript = Path(argv[-1]).resolve()
    try:
        command = qsub_command(read_properties(jobscript), jobscript)
    except (OSError, ValueError) as error:
        print(f"pbs-submit.py: {error}", file=sys.stderr)
        return 1
    (Path.cwd() / LOG_DIR).mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        print(f"pbs-submit.py: {' '.join(command)} failed (exit {result.returncode}): "
              f"{result.stderr.strip()}", file=sys.stderr)
        return result.returncode or 1
    print(result.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
