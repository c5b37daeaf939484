"""NCAR queue limits in the PBS profile: the onstart walltime check, the retry's cap, no retry of code errors."""

import importlib.util
import subprocess
import sys

import pytest
import yaml
from helpers import PROFILE, REPO, TINY, pbs_env, snakemake_command, submissions, walltime_minutes

spec = importlib.util.spec_from_file_location("pbs_submit", PROFILE / "pbs-submit.py")
pbs_submit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pbs_submit)

DERECHO = {"PBS_QUEUE": "main", "PBS_GPU_QUEUE": "main"}


def limits_file(tmp_path, **hours):
    """A $PBS_QUEUE_LIMITS file giving each queue `hours` of walltime at most."""
    path = tmp_path / "queues.yaml"
    path.write_text(yaml.safe_dump({queue: {"max_walltime_hours": value} for queue, value in hours.items()}))
    return str(path)


def test_shipped_limits_are_ncar_queues():
    limits = pbs_submit.queue_limits()
    assert limits["casper"] == 24 * 60 and limits["main"] == 12 * 60


def test_check_names_the_job_its_estimate_the_limit_and_the_setting(monkeypatch):
    monkeypatch.setenv("PBS_GPU_QUEUE", "main")
    jobs = [{"name": "infer_chunk (split=test, chunk=0)", "resources": {"runtime": 1159, "gpu": 1},
             "remedy": "Shorten it with more infer.chunks (now 4)"},
            {"name": "train", "resources": {"runtime": 720, "gpu": 1}, "remedy": "fewer train.epochs"},
            {"name": "evaluate", "resources": {"runtime": 1000}}]  # CPU queue: casper, 24 h
    problems = pbs_submit.walltime_problems(jobs, pbs_submit.queue_limits())
    assert len(problems) == 1  # 12 h exactly is allowed
    assert problems[0].startswith("infer_chunk (split=test, chunk=0) asks for 19:19:00 of walltime; queue main "
                                  "allows 12:00:00")
    assert "more infer.chunks (now 4)" in problems[0] and "PBS_GPU_QUEUE" in problems[0]


def test_limits_are_overridable_and_an_unknown_queue_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PBS_QUEUE_LIMITS", limits_file(tmp_path, main=6, preempt=24))
    limits = pbs_submit.queue_limits()
    assert (limits["main"], limits["preempt"], limits["casper"]) == (360, 1440, 1440)
    monkeypatch.setenv("PBS_QUEUE", "gpudev")
    with pytest.raises(ValueError, match="queue 'gpudev' has no walltime limit in .*queues.yaml"):
        pbs_submit.walltime_problems([{"name": "evaluate", "resources": {"runtime": 10}}], limits)


@pytest.mark.parametrize("exit_status, log, kind", [
    (271, "", "walltime"),                 # SIGTERM from PBS at the walltime
    (-29, "", "walltime"),                 # PBS's own walltime code
    (-27, "", "memory"),
    (265, "", "killed"),
    (-1, "", "lost"),                      # the node failed
    (None, "", "lost"),                    # qstat has no record
    (1, "MemoryError: Unable to allocate 9.3 GiB", "memory"),
    (1, "died with <Signals.SIGKILL: 9>.", "memory"),
    (1, "=>> PBS: job killed: walltime 43230 exceeded limit 43200", "walltime"),
    (1, "ValueError: data/raw/test.nc: no variable 'image'", "code"),
    (2, "", "code"),
])
def test_failure_kind_tells_code_errors_from_kills(exit_status, log, kind):
    assert pbs_submit.failure_kind(exit_status, log)[0] == kind


# attempt 1 outlives its walltime; attempt 2 asks for more than the queue allows (3 minutes here).
SLOW_SNAKEFILE = """
rule slow:
    output: "slow.txt"
    resources:
        runtime=lambda wildcards, attempt: 2 if attempt == 1 else 20,
        nap=lambda wildcards, attempt: 60 if attempt == 1 else 0,
    shell: "sleep {resources.nap}; echo done > {output}"
"""

BROKEN_SNAKEFILE = """
rule broken:
    output: "broken.txt"
    resources: runtime=2
    shell: "echo 'ValueError: a bug' >&2; exit 3"
"""

AT_LIMIT_SNAKEFILE = """
rule long:
    output: "long.txt"
    resources: runtime=3
    shell: "sleep 60; echo done > {output}"
"""


def run_rule(tmp_path, snakefile_text, **env):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(snakefile_text)
    workdir, emulator = tmp_path / "work", tmp_path / "pbs"
    env = pbs_env(emulator, PBS_QUEUE_LIMITS=limits_file(tmp_path, casper=0.05), **env)
    result = subprocess.run(snakemake_command(workdir, snakefile), capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    return result, submissions(emulator), workdir


@pytest.mark.workflow
def test_retry_after_a_walltime_kill_asks_for_at_most_the_queue_limit(tmp_path):
    result, (first, second), workdir = run_rule(tmp_path, SLOW_SNAKEFILE, PBS_EMULATOR_WALLTIME_SCALE="0.05")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (walltime_minutes(first), walltime_minutes(second)) == (2, 3)  # 20 asked, 3 allowed
    assert "attempt 2 after PBS job" in result.stderr and "Exit_status 271: killed by SIGTERM" in result.stderr
    assert (workdir / "slow.txt").read_text() == "done\n"


@pytest.mark.workflow
def test_code_error_is_not_resubmitted(tmp_path):
    result, jobs, _ = run_rule(tmp_path, BROKEN_SNAKEFILE)
    assert result.returncode != 0
    assert len(jobs) == 1  # the profile's retries: 1 was refused, not submitted at twice the walltime
    assert "broken: not submitted again" in result.stderr and "Exit_status 1: an error in the job" in result.stderr


@pytest.mark.workflow
def test_walltime_kill_at_the_queue_limit_is_not_resubmitted(tmp_path):
    result, jobs, _ = run_rule(tmp_path, AT_LIMIT_SNAKEFILE, PBS_EMULATOR_WALLTIME_SCALE="0.05")
    assert result.returncode != 0
    assert len(jobs) == 1 and walltime_minutes(jobs[0]) == 3
    assert "already its queue's limit" in result.stderr


@pytest.mark.workflow
def test_workflow_job_above_its_queue_limit_fails_before_any_submission(tmp_path):
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(TINY))
    workdir, emulator = tmp_path / "work", tmp_path / "pbs"
    env = pbs_env(emulator, PBS_QUEUE_LIMITS=limits_file(tmp_path, casper=0.05))  # 3 minutes
    command = snakemake_command(workdir, REPO / "Snakefile", "train", "--configfile", str(configfile))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    refused = [line for line in result.stderr.splitlines() if line.startswith("profiles/pbs: ")]
    assert any(line.startswith("profiles/pbs: train asks for") and "queue casper allows 00:03:00" in line
               and f"fewer train.epochs (now {TINY['train']['epochs']})" in line for line in refused)
    assert any(line.startswith("profiles/pbs: group data (acquire_split") and "without `groups:`" in line
               for line in refused)
    assert submissions(emulator) == []
    assert not (workdir / "data").exists()


REFUSING_QSUB = """#!/bin/sh
echo "stub qsub: the walltime check passed" >&2
exit 1
"""


@pytest.mark.workflow
@pytest.mark.parametrize("site", [{}, DERECHO], ids=["casper", "derecho"])
def test_full_holodec_config_fits_the_queues(tmp_path, site):
    """config/holodec.yaml passes the onstart check on Casper's and Derecho's limits (a stub qsub refuses the
    first submission, so that nothing runs)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "qsub").write_text(REFUSING_QSUB)
    (stub / "qsub").chmod(0o755)
    env = pbs_env(tmp_path / "pbs", **site)
    env["PATH"] = f"{stub}:{env['PATH']}"
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(tmp_path / "work"), "--profile", str(PROFILE), "--configfile", str(REPO / "config" / "holodec.yaml"),
               "--retries", "0"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert "profiles/pbs:" not in result.stderr
    assert "stub qsub: the walltime check passed" in result.stderr
