#!/usr/bin/env python3
"""Print `running`, `success` or `failed` for one PBS Pro job id (the cluster-generic status command).

Uses `qstat -x -f -F json ID` so finished jobs are found in the server's history: job_state F with
Exit_status 0 is success, any other Exit_status (271 = killed at walltime, negative = never ran) is failed;
every other state (Q, R, H, E, B, ...) is running. A job qstat does not know (history expired) is failed
with a note on stderr. Transient qstat errors are retried; if qstat keeps failing the job is reported
running (a server hiccup must not fail a job that is still computing) and a warning goes to stderr.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

ATTEMPTS = 4
PAUSE_S = 5.0
UNKNOWN_JOB_EXIT = 153


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
            raise ValueError(f"no job_state for {job_id} in qstat output")
        exit_status = re.search(r'"Exit_status"\s*:\s*(-?\d+)', text)
        return state.group(1), None if exit_status is None else int(exit_status.group(1))


def status(job_id: str) -> str:
    error = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(PAUSE_S)
        try:
            result = subprocess.run(["qstat", "-x", "-f", "-F", "json", job_id],
                                    capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            error = str(exc)
            continue
        if result.returncode == UNKNOWN_JOB_EXIT or "Unknown Job Id" in result.stderr:
            print(f"pbs-status.py: qstat does not know job {job_id} (history expired?); "
                  "reporting it failed", file=sys.stderr)
            return "failed"
        if result.returncode != 0:
            error = f"qstat exit {result.returncode}: {result.stderr.strip()}"
            continue
        try:
            state, exit_status = state_of(job_id, result.stdout)
        except ValueError as exc:
            error = str(exc)
            continue
        if state in ("F", "X"):
            if exit_status == 0:
                return "success"
            print(f"pbs-status.py: job {job_id} finished with Exit_status {exit_status}"
                  + (" (killed at its walltime)" if exit_status == 271 else ""), file=sys.stderr)
            return "failed"
        return "running"
    print(f"pbs-status.py: qstat failed {ATTEMPTS} times for job {job_id} ({error}); "
          "assuming it is still running", file=sys.stderr)
    return "running"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: pbs-status.py JOBID", file=sys.stderr)
        sys.exit(2)
    print(status(sys.argv[1]))
