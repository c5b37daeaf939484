#!/usr/bin/env python3
"""Submit a Snakemake job script to PBS Pro with qsub; print only the PBS job id.

Called by the cluster-generic executor as `pbs-submit.py JOBSCRIPT`, and by the workflow's onstart checks as
`pbs-submit.py --check-account` (exit 1 with the message when no account is set) and `pbs-submit.py
--check-walltime` (the jobs to submit as JSON on stdin; exit 1 naming each one above its queue's limit). The
job's threads, resources (mem_mb, runtime in minutes, gpu) and rule are read from the `# properties = {...}`
line Snakemake writes into the script, so one command line serves every rule. Site settings come from the
job's resources when set (pbs_account, pbs_queue, pbs_gpu_queue, gpu_type), else from $PBS_ACCOUNT,
$PBS_QUEUE, $PBS_GPU_QUEUE, $PBS_GPU_TYPE, else Casper's defaults; each queue's longest walltime from
queues.yaml beside this script ($PBS_QUEUE_LIMITS adds or replaces queues).

A retry (Snakemake's `retries`) is the same job script submitted again within a run: the PBS ids of its
attempts are kept beside it (JOBSCRIPT.attempts). A retry's walltime never passes its queue's limit, and a job
whose last attempt failed in its own code (rather than killed at its walltime or memory limit, or lost with
its node) is not submitted again: the rerun would fail the same way, at twice the walltime.
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


def queue(resources: dict) -> str:
    """The queue a job goes to: the GPU queue when it asks for GPUs."""
    return setting("pbs_gpu_queue" if gpu_count(resources) > 0 else "pbs_queue", resources)


def gpu_count(resources: dict) -> int:
    return int(float(resources.get("gpu", 0) or 0))


def queue_limits() -> dict:
    """{queue: longest walltime in minutes} from queues.yaml, with $PBS_QUEUE_LIMITS's queues over it."""
    import yaml

    limits = {}
    for path in (PROFILE_DIR / "queues.yaml", os.environ.get("PBS_QUEUE_LIMITS")):
        if not path:
            continue
        try:
            queues = yaml.safe_load(Path(path).read_text()) or {}
            limits.update({str(name): round(float(spec["max_walltime_hours"]) * 60) for name, spec in queues.items()})
        except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: expected `QUEUE: {{max_walltime_hours: HOURS}}` entries ({error})")
    return limits


def walltime_limit(queue_name: str, limits: dict) -> int:
    """The longest walltime (minutes) `queue_name` accepts; a queue without a known limit is an error."""
    if queue_name not in limits:
        raise ValueError(f"queue {queue_name!r} has no walltime limit in {PROFILE_DIR / 'queues.yaml'} "
                         f"(known: {', '.join(sorted(limits))}); add `{queue_name}: {{max_walltime_hours: H}}` "
                         "there or to a file named by $PBS_QUEUE_LIMITS")
    return limits[queue_name]


def over_limit(name: str, resources: dict, limits: dict, remedy: str = "") -> str | None:
    """Why job `name` cannot be submitted as it is, or None: its runtime above its queue's walltime limit."""
    queue_name = queue(resources)
    limit = walltime_limit(queue_name, limits)
    runtime = float(resources.get("runtime", 60))
    if runtime <= limit:
        return None
    remedy = remedy or "make the job smaller"
    return (f"{name} asks for {walltime(runtime)} of walltime; queue {queue_name} allows {walltime(limit)} "
            f"(profiles/pbs/queues.yaml). {remedy}, or send it to a queue with a longer limit "
            f"({'PBS_GPU_QUEUE / pbs_gpu_queue' if gpu_count(resources) else 'PBS_QUEUE / pbs_queue'}).")


def walltime_problems(jobs: list[dict], limits: dict) -> list[str]:
    """The onstart check: one line per job ({"name", "resources", "remedy"}) above its queue's limit."""
    problems = (over_limit(job["name"], job.get("resources", {}), limits, job.get("remedy", "")) for job in jobs)
    return [problem for problem in problems if problem]


# PBS Pro's Exit_status of a finished job: the job script's own exit code (0-255), 256 + the signal that
# killed it, or a negative code from PBS itself (JOB_EXEC_*).
EXIT_STATUS_KINDS = {271: ("walltime", "killed by SIGTERM (PBS at the walltime, or qdel)"),
                     -29: ("walltime", "over its walltime (PBS)"),
                     -27: ("memory", "over its memory (PBS)"), -26: ("memory", "over its virtual memory (PBS)"),
                     265: ("killed", "killed by SIGKILL (walltime or memory)"),
                     137: ("memory", "a process killed by SIGKILL (out of memory?)")}
LOG_SIGNS = (("walltime", re.compile(r"PBS: job killed: walltime", re.IGNORECASE)),
             ("memory", re.compile(r"PBS: job killed: [pv]?mem|MemoryError|Signals\.SIGKILL|exit status 137|"
                                   r"oom[-_ ]?kill|Out of memory", re.IGNORECASE)))
"""What a job's logs show when it or one of its processes was killed for its walltime or memory, although the
job script itself exited with an ordinary error code (Snakemake inside the job reports its rule's failure as 1)."""


def failure_kind(exit_status: int | None, log_text: str = "") -> tuple[str, str]:
    """(kind, why) of a failed attempt. Kinds: walltime, memory, killed (either), lost (PBS could not run it
    to the end, or qstat has no record of it): worth a retry with more; code (an ordinary exit code and no
    kill in its logs): an error of the job itself, which a retry repeats."""
    if exit_status is None:
        return "lost", "its Exit_status is unknown (qstat -x has no record of it)"
    if exit_status in EXIT_STATUS_KINDS:
        kind, why = EXIT_STATUS_KINDS[exit_status]
        return kind, f"Exit_status {exit_status}: {why}"
    if exit_status < 0:
        return "lost", f"Exit_status {exit_status}: PBS could not run it to the end (node failure, ...)"
    if exit_status > 256:
        return "killed", f"Exit_status {exit_status}: killed by signal {exit_status - 256}"
    for kind, sign in LOG_SIGNS:
        found = sign.search(log_text)
        if found:
            return kind, f"Exit_status {exit_status}, and its log shows {found.group(0)!r}"
    return "code", f"Exit_status {exit_status}: an error in the job itself, not a walltime or memory kill"


def attempts_file(jobscript: Path) -> Path:
    """The PBS attempts of one job script. Snakemake writes a retry's script to the same path, in a folder of
    its own per run (.snakemake/tmp.*), so this holds only this run's attempts of this job."""
    return jobscript.with_name(jobscript.name + ".attempts")


def previous_attempts(jobscript: Path) -> list[dict]:
    path = attempts_file(jobscript)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def exit_status(job_id: str) -> int | None:
    """A finished job's Exit_status from `qstat -x -f -F json` (the server's history), None if unknown."""
    try:
        result = subprocess.run(["qstat", "-x", "-f", "-F", "json", job_id], capture_output=True, text=True,
                                timeout=60)
        job = json.loads(result.stdout)["Jobs"][job_id]
        return int(job["Exit_status"])
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return None


def attempt_logs(properties: dict) -> str:
    """The PBS log and the rule logs of a job's last attempt (where a kill inside the job shows)."""
    paths = [log_path(properties), *(Path(path) for path in properties.get("log") or [])]
    return "\n".join(path.read_text(errors="replace") for path in paths if path.is_file())


def retry_refusal(properties: dict, attempts: list[dict], limit_min: int) -> str | None:
    """Why this job must not be submitted again, or None. `attempts` are its earlier submissions in this run."""
    if not attempts:
        return None
    last = attempts[-1]
    kind, why = failure_kind(exit_status(last["id"]), attempt_logs(properties))
    name = describe(properties)
    if kind == "code":
        return (f"{name}: not submitted again: its attempt {len(attempts)} (PBS job {last['id']}) ended with {why}; "
                f"a retry at more walltime would fail the same way. See {log_path(properties)} and the rule's log.")
    if kind == "walltime" and last["walltime_min"] >= limit_min:
        return (f"{name}: not submitted again: attempt {len(attempts)} (PBS job {last['id']}) ran out of "
                f"{walltime(last['walltime_min'])}, already its queue's limit; split it into smaller jobs "
                "(profiles/pbs/README.md, 'Queue limits', names the setting of each rule).")
    print(f"pbs-submit.py: {name}: attempt {len(attempts) + 1} after PBS job {last['id']} ({why})", file=sys.stderr)
    return None


def describe(properties: dict) -> str:
    """The rule (or group) and wildcards, as a person reads them."""
    wildcards = ", ".join(f"{k}={v}" for k, v in (properties.get("wildcards") or {}).items())
    return job_name(properties) + (f" ({wildcards})" if wildcards else "")


def qsub_command(properties: dict, jobscript: Path, limit_min: int, retry: bool = False) -> list[str]:
    """The qsub argument list for one job; ngpus and gpu_type only when the job asks for GPUs. A first
    attempt above its queue's limit is refused; a retry asks for at most the limit."""
    resources = properties.get("resources", {})
    gpus = gpu_count(resources)
    threads = int(properties.get("threads", 1) or 1)
    mem_mb = int(float(resources.get("mem_mb", 1000)))
    select = f"select=1:ncpus={threads}:mem={mem_mb}MB"
    if gpus > 0:
        select += f":ngpus={gpus}:gpu_type={setting('gpu_type', resources)}"
    runtime = float(resources.get("runtime", 60))
    if not retry:
        problem = over_limit(describe(properties), resources, {queue(resources): limit_min})
        if problem:
            raise ValueError(problem)
    return ["qsub", "-A", account(resources), "-q", queue(resources), "-N", job_name(properties), "-l", select,
            "-l", f"walltime={walltime(min(runtime, limit_min))}", "-j", "oe",
            "-o", str(log_path(properties)), "-v", job_variables(), str(jobscript)]


def check_walltime(stdin) -> int:
    """The workflow's onstart check: every job to submit (JSON list on stdin) within its queue's limit."""
    try:
        problems = walltime_problems(json.load(stdin), queue_limits())
    except ValueError as error:
        problems = [str(error)]
    for problem in problems:
        print(f"profiles/pbs: {problem}", file=sys.stderr)
    return 1 if problems else 0


def submit(jobscript: Path) -> int:
    properties = read_properties(jobscript)
    limit_min = walltime_limit(queue(properties.get("resources", {})), queue_limits())
    attempts = previous_attempts(jobscript)
    refusal = retry_refusal(properties, attempts, limit_min)
    if refusal:
        raise ValueError(refusal)
    command = qsub_command(properties, jobscript, limit_min, retry=bool(attempts))
    (Path.cwd() / LOG_DIR).mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        print(f"pbs-submit.py: {' '.join(command)} failed (exit {result.returncode}): "
              f"{result.stderr.strip()}", file=sys.stderr)
        return result.returncode or 1
    job_id = result.stdout.strip().splitlines()[-1]
    asked = min(float(properties.get("resources", {}).get("runtime", 60)), limit_min)
    with open(attempts_file(jobscript), "a") as record:
        record.write(json.dumps({"id": job_id, "walltime_min": asked}) + "\n")
    print(job_id)
    return 0


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check-account"]:  # the workflow's onstart check, before the first submission
        try:
            account({})
        except ValueError as error:
            print(f"profiles/pbs: {error}", file=sys.stderr)
            return 1
        return 0
    if argv[1:] == ["--check-walltime"]:
        return check_walltime(sys.stdin)
    if len(argv) < 2:
        print("usage: pbs-submit.py JOBSCRIPT | --check-account | --check-walltime < JOBS.json", file=sys.stderr)
        return 2
    try:
        return submit(Path(argv[-1]).resolve())
    except (OSError, ValueError) as error:
        print(f"pbs-submit.py: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
