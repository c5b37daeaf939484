#!/usr/bin/env python3
"""Print `running`, `success` or `failed` for one PBS Pro job id (the cluster-generic status command).

Uses `qstat -x -f -F json ID` so finished jobs are found in the server's history: job_state F with
Exit_status 0 is success, any other Exit_status (271 = killed at walltime, negative = never ran) is failed;
a job qstat does not know (history expired) is failed. Every other state (Q, R, E, ...) is running, with two
bounds, because Snakemake asks again every 30 s for as long as the answer is `running`:
- qstat failing (server down, timeouts) is `running` only until it has failed for $PBS_QSTAT_FAILING_MAX_MINUTES
  (default 30) without one answer in between: a server hiccup must not fail a job that is still computing, and
  a server that never answers must not hang the run for ever;
- a Held job (H: a system hold after failed starts, or a user's qhold) is `running` only for
  $PBS_HELD_MAX_MINUTES (default 30): held jobs never start by themselves.
Snakemake runs this script afresh for each check, so the start of each streak is kept in a small file per job,
.snakemake/pbs-status/<job id>.json under the working directory, removed once the job is answered. A job given up
on is deleted with qdel, so that it cannot start later beside its resubmission; every failure is explained on
stderr.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

UNKNOWN_JOB_EXIT = 153
QSTAT_TIMEOUT_S = 60
STATE_DIR = Path(".snakemake") / "pbs-status"
LIMITS_MIN = {"qstat_failing": ("PBS_QSTAT_FAILING_MAX_MINUTES", 30.0), "held": ("PBS_HELD_MAX_MINUTES", 30.0)}


class QstatError(Exception):
    """qstat gave no usable answer this time (it may next time)."""


def state_of(job_id: str, text: str) -> tuple[str, int | None]:
    """(job_state, Exit_status or None) of `job_id` in qstat's JSON; regex fallback for PBS's odd JSON."""
    try:
        jobs = json.loads(text).get("Jobs", {})
        job = jobs.get(job_id) or next(iter(jobs.values()))
        exit_status = job.get("Exit_status")
        return str(job["job_state"]), None if exit_status is None else int(exit_status)
    except (ValueError, KeyError, StopIteration, AttributeError, TypeError):
        state = re.search(r'"job_state"\s*:\s*"(\w)"', text)
        if state is None:
            raise QstatError(f"no job_state for {job_id} in qstat output")
        exit_status = re.search(r'"Exit_status"\s*:\s*(-?\d+)', text)
        return state.group(1), None if exit_status is None else int(exit_status.group(1))


def limit_minutes(name: str, environ) -> float:
    """A bound in minutes from its environment variable, else its default; a bad value stops with a message."""
    variable, default = LIMITS_MIN[name]
    text = environ.get(variable, "").strip()
    if not text:
        return default
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0:
        raise ValueError(f"{variable}={text!r}: expected a number of minutes > 0")
    return minutes


def query(job_id: str) -> tuple[str, int | None] | None:
    """The job's (state, Exit_status) from qstat, None if qstat does not know the job. Raises QstatError."""
    try:
        result = subprocess.run(["qstat", "-x", "-f", "-F", "json", job_id],
                                capture_output=True, text=True, timeout=QSTAT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise QstatError(str(error)) from error
    if result.returncode == UNKNOWN_JOB_EXIT or "Unknown Job Id" in result.stderr:
        return None
    if result.returncode != 0:
        raise QstatError(f"qstat exit {result.returncode}: {result.stderr.strip()}")
    return state_of(job_id, result.stdout)


def next_answer(job_id: str, observation: tuple[str, int | None] | str | None, streaks: dict, now: float,
                limits_min: dict) -> tuple[str, str, dict]:
    """(answer, message for stderr or "", streaks to keep) for one check: the pure core of the script.

    `observation` is qstat's (job_state, Exit_status), None for a job qstat does not know, or the error text of a
    qstat that failed; `streaks` maps "qstat_failing" / "held" to the time (epoch s) each streak began."""
    if isinstance(observation, str):
        since = streaks.get("qstat_failing", now)
        minutes = (now - since) / 60
        if minutes >= limits_min["qstat_failing"]:
            return "failed", (f"pbs-status.py: qstat has failed for {minutes:.1f} min on job {job_id} (limit "
                              f"{LIMITS_MIN['qstat_failing'][0]}={limits_min['qstat_failing']:g}); last error: "
                              f"{observation}; reporting it failed"), {}
        warning = (f"pbs-status.py: warning: qstat failed on job {job_id} ({observation}); still reporting it "
                   f"running, for {minutes:.1f} min so far")
        return "running", warning, {**streaks, "qstat_failing": since}
    if observation is None:
        return "failed", f"pbs-status.py: qstat does not know job {job_id} (history expired?); reporting it failed", {}
    state, exit_status = observation
    if state in ("F", "X"):
        if exit_status == 0:
            return "success", "", {}
        return "failed", (f"pbs-status.py: job {job_id} finished with Exit_status {exit_status}"
                          + (" (killed at its walltime)" if exit_status == 271 else "")), {}
    if state == "H":
        since = streaks.get("held", now)
        minutes = (now - since) / 60
        if minutes >= limits_min["held"]:
            return "failed", (f"pbs-status.py: job {job_id} has been Held for {minutes:.1f} min (limit "
                              f"{LIMITS_MIN['held'][0]}={limits_min['held']:g}; `qstat -f {job_id}` shows "
                              "why); reporting it failed"), {}
        return "running", "", {"held": since}
    return "running", "", {}


def state_file(job_id: str) -> Path:
    safe_name = re.sub(r"[^\w.-]", "_", job_id)
    return STATE_DIR / f"{safe_name}.json"


def read_streaks(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_streaks(path: Path, streaks: dict) -> None:
    """Keep the streaks for the next check (atomically), or remove the file when there are none."""
    if not streaks:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(streaks))
    os.replace(temporary, path)


def delete_job(job_id: str) -> str:
    """qdel a job given up on, so that it cannot run later beside its resubmission; what happened, for stderr."""
    try:
        result = subprocess.run(["qdel", job_id], capture_output=True, text=True, timeout=QSTAT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"qdel {job_id} failed ({error}): delete it yourself if it still exists"
    if result.returncode != 0:
        return (f"qdel {job_id} failed (exit {result.returncode}: {result.stderr.strip()}): delete it yourself "
                "if it still exists")
    return f"deleted it with qdel {job_id}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: pbs-status.py JOBID", file=sys.stderr)
        return 2
    job_id = argv[1]
    try:
        limits_min = {name: limit_minutes(name, os.environ) for name in LIMITS_MIN}
    except ValueError as error:
        print(f"pbs-status.py: {error}", file=sys.stderr)
        return 2
    try:
        observation = query(job_id)
    except QstatError as error:
        observation = str(error)
    path = state_file(job_id)
    answer, message, streaks = next_answer(job_id, observation, read_streaks(path), time.time(), limits_min)
    write_streaks(path, streaks)
    job_may_still_exist = isinstance(observation, str) or (observation is not None and observation[0] == "H")
    if answer == "failed" and job_may_still_exist:
        message += f"; {delete_job(job_id)}"
    if message:
        print(message, file=sys.stderr)
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
