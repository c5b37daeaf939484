"""`snakemake --profile pbs` as users type it: found from the checkout's root, not overridden by the workflow
profile (profiles/default), and a status script that gives up on a job qstat cannot see or that stays Held."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import FAST, PROFILE, REPO, TINY, job_state, pbs_env, submissions

STATUS_SCRIPT = PROFILE / "pbs-status.py"
DEFAULT_PROFILE = REPO / "profiles" / "default"
MORE_THREADS_THAN_HERE = (os.cpu_count() or 1) + 1
"""A job's threads above this machine's cores: the cluster's nodes, not the submit host, bound them."""

# One rule that sets no resources of its own: its PBS job asks for the cluster profile's defaults.
BARE_SNAKEFILE = f"""
rule bare:
    output: "bare.txt"
    threads: {MORE_THREADS_THAN_HERE}
    shell: "echo done > {{output}}"
"""


def load_status_module():
    spec = importlib.util.spec_from_file_location("pbs_status", STATUS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pbs_status = load_status_module()
LIMITS = {"qstat_failing": 30.0, "held": 30.0}


def checkout(tmp_path: Path, snakefile: str | None = None) -> Path:
    """A directory laid out like the checkout (its files linked in, the root-level `pbs` entry point as the
    repository has it), so that runs write their data, results and logs here rather than into the repository."""
    root = tmp_path / "checkout"
    root.mkdir()
    names = ("workflow", "config", "profiles", "envs") + (() if snakefile else ("Snakefile",))
    for name in names:
        (root / name).symlink_to(REPO / name)
    if snakefile:
        (root / "Snakefile").write_text(snakefile)
    (root / "pbs").symlink_to(os.readlink(REPO / "pbs"))
    return root


def snakemake_verbatim(root: Path, env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`snakemake --profile pbs ARGS` run in `root`, the command users type (status checks made fast)."""
    return subprocess.run(["snakemake", "--profile", "pbs", *FAST, *args], capture_output=True, text=True,
                          env=env, cwd=root, timeout=timeout)


def declared_resources(snakemake_log: str) -> dict:
    """{rule: [{resource: value} of each of its jobs]} as Snakemake printed them."""
    declared, rule = {}, None
    for line in snakemake_log.splitlines():
        if match := re.match(r"\s*(?:local)?rule (\w+):$", line):
            rule = match.group(1)
        elif (match := re.match(r"\s*resources: (.*)$", line)) and rule:
            declared.setdefault(rule, []).append(dict(item.split("=", 1) for item in match.group(1).split(", ")))
            rule = None
    return declared


def status(job_id: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(STATUS_SCRIPT), job_id], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def held_job(emulator: Path, cwd: Path) -> str:
    """Submit a job that PBS (the emulator) holds: it stays in state H and never runs."""
    script = cwd / "job.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    env = pbs_env(emulator, PBS_EMULATOR_HOLD_JOBS="1")
    result = subprocess.run(["qsub", "-l", "walltime=00:01:00", str(script)], capture_output=True, text=True,
                            env=env, cwd=cwd, check=True)
    return result.stdout.strip()


def deleted_ids(emulator: Path) -> list[str]:
    log = emulator / "qdel.jsonl"
    return [job_id for line in log.read_text().splitlines() for job_id in json.loads(line)["ids"]]


# Discovery and precedence


def test_the_root_level_pbs_entry_point_is_a_relative_link_to_the_profile():
    # Relative, so that it holds in every clone wherever it lives; Snakemake looks for ./pbs first.
    assert os.readlink(REPO / "pbs") == "profiles/pbs"
    assert (REPO / "pbs").resolve() == PROFILE


def test_the_workflow_profile_sets_nothing_the_cluster_profile_sets_otherwise():
    """Snakemake loads profiles/default on every run and its keys replace the --profile's, so each key it has must
    have the cluster profile's value; local-only settings (cores, default-resources) belong elsewhere."""
    workflow_profile = yaml.safe_load((DEFAULT_PROFILE / "config.yaml").read_text())
    cluster_profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert workflow_profile, "profiles/default/config.yaml is empty"
    for key, value in workflow_profile.items():
        assert cluster_profile.get(key) == value, f"profiles/default sets {key}: {value}, profiles/pbs {key}: " \
                                                  f"{cluster_profile.get(key)}"


@pytest.mark.workflow
@pytest.mark.parametrize("profile", ["pbs", "profiles/pbs"])
def test_dry_run_from_the_checkout_root(tmp_path, profile):
    root = checkout(tmp_path)
    command = ["snakemake", "--profile", profile, "-n", "train"]
    result = subprocess.run(command, capture_output=True, text=True, env=pbs_env(tmp_path / "pbs", account="x"),
                            cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Using profiles {profile} and workflow specific profile profiles/default" in result.stderr
    declared = declared_resources(result.stdout + result.stderr)
    # The cluster profile's default `gpu: 0` reaches every CPU job (the workflow profile's resources replaced it).
    assert declared["acquire_split"] and all(job.get("gpu") == "0" for job in declared["acquire_split"])
    assert all(job.get("gpu") == "1" for job in declared["train"])
    assert not (root / "data").exists() and submissions(tmp_path / "pbs") == []


@pytest.mark.workflow
def test_a_rule_without_resources_is_submitted_with_the_cluster_profiles_defaults(tmp_path):
    root, emulator = checkout(tmp_path, BARE_SNAKEFILE), tmp_path / "pbs"
    result = snakemake_verbatim(root, pbs_env(emulator), timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    (job,) = submissions(emulator)
    # profiles/pbs: mem_mb 4000, runtime 60 (min); threads are not cut to the submit host's cores.
    assert job["resources"]["select"] == f"1:ncpus={MORE_THREADS_THAN_HERE}:mem=4000MB"
    assert job["resources"]["walltime"] == "01:00:00"
    assert (root / "bare.txt").read_text() == "done\n"


@pytest.mark.workflow
def test_train_through_pbs_verbatim_from_the_checkout_root(tmp_path):
    root, emulator = checkout(tmp_path), tmp_path / "pbs"
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(TINY))
    result = snakemake_verbatim(root, pbs_env(emulator), "train", "--configfile", str(configfile),
                                "--resources", "gpu=1", "--set-threads", f"train={MORE_THREADS_THAN_HERE}",
                                timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (root / "results" / "model" / "model.pt").exists()
    jobs = {job["name"]: job for job in submissions(emulator)}
    assert sorted(jobs) == ["data", "train", "tune_worker"]
    assert all(job_state(emulator, job["id"])["Exit_status"] == 0 for job in submissions(emulator))
    # Each rule's own needs, and the cluster profile's default (gpu 0) for every rule that sets none.
    assert jobs["train"]["resources"]["select"] == (f"1:ncpus={MORE_THREADS_THAN_HERE}:mem=16000MB:ngpus=1:"
                                                    "gpu_type=a100")
    declared = declared_resources(result.stderr)
    for rule in ("acquire_split", "regrid_split", "augment", "standardize_fit", "standardize_split",
                 "examples_split"):
        assert declared[rule] and all(job.get("gpu") == "0" for job in declared[rule]), rule
    assert "ngpus" not in jobs["data"]["resources"]["select"]


# The status script's bounds, as a pure function of what qstat said, the streaks kept and the time


def test_a_held_job_is_running_until_the_bound_then_failed():
    answer, message, streaks = pbs_status.next_answer("7.pbs", ("H", None), {}, 1000.0, LIMITS)
    assert (answer, message, streaks) == ("running", "", {"held": 1000.0})
    answer, _, streaks = pbs_status.next_answer("7.pbs", ("H", None), streaks, 1000.0 + 29 * 60, LIMITS)
    assert (answer, streaks) == ("running", {"held": 1000.0})
    answer, message, streaks = pbs_status.next_answer("7.pbs", ("H", None), streaks, 1000.0 + 30 * 60, LIMITS)
    assert (answer, streaks) == ("failed", {})
    assert "7.pbs" in message and "Held for 30.0 min" in message and "PBS_HELD_MAX_MINUTES=30" in message


def test_qstat_failing_is_bounded_by_time_and_an_answer_starts_the_count_again():
    failing = "qstat exit 1: cannot connect to server"
    answer, message, streaks = pbs_status.next_answer("7.pbs", failing, {}, 0.0, LIMITS)
    assert answer == "running" and streaks == {"qstat_failing": 0.0} and "warning" in message
    answer, _, streaks = pbs_status.next_answer("7.pbs", ("R", None), streaks, 20 * 60.0, LIMITS)
    assert (answer, streaks) == ("running", {})
    answer, _, streaks = pbs_status.next_answer("7.pbs", failing, streaks, 21 * 60.0, LIMITS)
    answer, _, streaks = pbs_status.next_answer("7.pbs", failing, streaks, 50 * 60.0, LIMITS)
    assert answer == "running"  # 29 minutes of failures since the last answer, 50 since the first
    answer, message, streaks = pbs_status.next_answer("7.pbs", failing, streaks, 51 * 60.0, LIMITS)
    assert (answer, streaks) == ("failed", {})
    assert "30.0 min" in message and failing in message and "PBS_QSTAT_FAILING_MAX_MINUTES" in message


def test_a_held_job_keeps_its_count_through_qstat_failures():
    streaks = {"held": 0.0}
    _, _, streaks = pbs_status.next_answer("7.pbs", "timed out", streaks, 10 * 60.0, LIMITS)
    answer, _, _ = pbs_status.next_answer("7.pbs", ("H", None), streaks, 30 * 60.0, LIMITS)
    assert answer == "failed"


@pytest.mark.parametrize("state, exit_status, answer", [("F", 0, "success"), ("F", 271, "failed"),
                                                        ("Q", None, "running"), ("R", None, "running")])
def test_other_states_end_every_streak(state, exit_status, answer):
    streaks = {"held": 0.0, "qstat_failing": 0.0}
    assert pbs_status.next_answer("7.pbs", (state, exit_status), streaks, 60.0, LIMITS)[::2] == (answer, {})


# The script against the PBS emulator: the streaks persist between Snakemake's calls


def test_status_fails_a_job_held_beyond_the_bound_and_deletes_it(tmp_path):
    emulator = tmp_path / "pbs"
    env = pbs_env(emulator, PBS_HELD_MAX_MINUTES="0.03")  # 1.8 s
    job_id = held_job(emulator, tmp_path)
    first = status(job_id, env, tmp_path)
    assert (first.stdout, first.stderr) == ("running\n", "")
    assert (tmp_path / ".snakemake" / "pbs-status" / f"{job_id}.json").is_file()
    time.sleep(2)
    second = status(job_id, env, tmp_path)
    assert second.returncode == 0 and second.stdout == "failed\n"
    assert f"job {job_id} has been Held" in second.stderr and f"deleted it with qdel {job_id}" in second.stderr
    assert deleted_ids(emulator) == [job_id] and job_state(emulator, job_id)["job_state"] == "F"
    assert not (tmp_path / ".snakemake" / "pbs-status" / f"{job_id}.json").exists()


def test_status_fails_a_job_once_qstat_has_failed_for_the_bound(tmp_path):
    emulator = tmp_path / "pbs"
    env = pbs_env(emulator, PBS_QSTAT_FAILING_MAX_MINUTES="0.03")
    job_id = held_job(emulator, tmp_path)
    (emulator / "server-down").touch()
    first = status(job_id, env, tmp_path)
    assert first.stdout == "running\n" and "cannot connect to server" in first.stderr
    time.sleep(2)
    second = status(job_id, env, tmp_path)
    assert second.stdout == "failed\n"
    assert "qstat has failed for" in second.stderr and f"on job {job_id}" in second.stderr
    # The server does not answer qdel either: the message says so, and what to do.
    assert "delete it yourself if it still exists" in second.stderr and deleted_ids(emulator) == [job_id]


def test_status_with_no_qstat_at_all_is_bounded_too(tmp_path):
    env = {**pbs_env(tmp_path / "pbs"), "PATH": str(Path(sys.executable).parent),
           "PBS_QSTAT_FAILING_MAX_MINUTES": "0.001"}
    status("1.pbs", env, tmp_path)
    time.sleep(0.2)
    result = status("1.pbs", env, tmp_path)
    assert result.stdout == "failed\n" and "'qstat'" in result.stderr


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_bound_stops_with_the_variable_named(tmp_path, value):
    result = status("1.pbs", pbs_env(tmp_path / "pbs", PBS_HELD_MAX_MINUTES=value), tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert f"PBS_HELD_MAX_MINUTES={value!r}" in result.stderr


# The bounds through Snakemake: the run ends, it does not wait for ever


@pytest.mark.workflow
def test_a_run_whose_jobs_stay_held_ends_with_the_reason(tmp_path):
    root, emulator = checkout(tmp_path, BARE_SNAKEFILE), tmp_path / "pbs"
    env = pbs_env(emulator, PBS_EMULATOR_HOLD_JOBS="1", PBS_HELD_MAX_MINUTES="0.05")
    result = snakemake_verbatim(root, env, timeout=180)
    assert result.returncode != 0
    first, retry = submissions(emulator)  # retries: 1
    assert "has been Held" in result.stderr and deleted_ids(emulator) == [first["id"], retry["id"]]
    assert not (root / "bare.txt").exists()


@pytest.mark.workflow
def test_a_run_whose_qstat_keeps_failing_ends_with_the_reason(tmp_path):
    root, emulator = checkout(tmp_path, BARE_SNAKEFILE), tmp_path / "pbs"
    emulator.mkdir()
    (emulator / "server-down").touch()
    env = pbs_env(emulator, PBS_QSTAT_FAILING_MAX_MINUTES="0.05")
    result = snakemake_verbatim(root, env, timeout=180)
    assert result.returncode != 0
    assert len(submissions(emulator)) == 2 and result.stderr.count("qstat has failed for") == 2
