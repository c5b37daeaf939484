"""The PBS profile (profiles/pbs) driving Snakemake against a local PBS Pro emulator (tests/pbs_emulator)."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import PROFILE, REPO, TINY, job_state, pbs_env, snakemake_command, submissions, walltime_minutes

pytestmark = pytest.mark.workflow

# A rule that outlives its 1-minute walltime on the first attempt and gets 10 minutes on the retry.
SLOW_SNAKEFILE = """
rule slow:
    output: "slow.txt"
    resources:
        runtime=lambda wildcards, attempt: 1 if attempt == 1 else 10,
        nap=lambda wildcards, attempt: 60 if attempt == 1 else 0,
    shell: "sleep {resources.nap}; echo done > {output}"
"""


def test_workflow_runs_through_qsub_grouped_with_gpus_only_for_gpu_rules(tmp_path):
    workdir, emulator = tmp_path / "work", tmp_path / "pbs"
    workdir.mkdir()
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(TINY))
    # Run from the working directory, as users do: jobs start in "$HOME" with a bare environment and must
    # find their way back and to `holopipe` through jobscript.sh and env.sh. One GPU at a time.
    command = snakemake_command(None, REPO / "Snakefile", "train", "--configfile", str(configfile),
                                "--resources", "gpu=1")
    result = subprocess.run(command, capture_output=True, text=True, env=pbs_env(emulator), cwd=workdir,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (workdir / "results" / "model" / "model.pt").exists()
    jobs = submissions(emulator)
    names = [job["name"] for job in jobs]
    # Data preparation of every split is one grouped PBS job; the GPU rules are one job each; the tuning
    # summary (a second's work) runs on the submit node.
    assert sorted(names) == sorted(["data", "tune_worker", "tune_worker", "train"])
    assert all((workdir / "data" / "examples" / f"{split}.zarr").is_dir() for split in TINY["splits"])
    by_rule = {job["name"]: job for job in jobs}
    for job in jobs:
        assert job["account"] == "test"
        assert job["queue"] == "casper"
        assert job["join"] == "oe" and Path(job["output"]).is_absolute()
        assert job["variables"]["HOLOPIPE_PBS_ENV"] == str(PROFILE / "env.sh")
        hours, minutes, seconds = job["resources"]["walltime"].split(":")
        assert len(hours) == len(minutes) == len(seconds) == 2
        chunks, *items = job["resources"]["select"].split(":")  # qsub -l select=1:ncpus=..:mem=..
        select = dict(item.split("=") for item in items)
        assert chunks == "1" and int(select["ncpus"]) >= 1
        assert select["mem"].endswith("MB")
        if job["name"] in ("tune_worker", "train"):
            assert select["ngpus"] == "1" and select["gpu_type"] == "a100"
        else:
            assert "ngpus" not in select and "gpu_type" not in select
        assert job_state(emulator, job["id"])["Exit_status"] == 0
    # train declares threads 2 (num_workers 0 + 1, at least 2) and mem_mb 16000.
    assert by_rule["train"]["resources"]["select"] == "1:ncpus=2:mem=16000MB:ngpus=1:gpu_type=a100"
    # The data group's walltime is what its jobs need: at least its critical path (the longest job of each
    # layer, one rule per layer here), at most all its jobs one after another; each runtime a function of
    # the tiny data, not every rule's fixed default (which added up to 05:11:00).
    runtimes = declared_runtimes(result.stderr)
    layers = ("acquire_split", "regrid_split", "augment", "standardize_fit", "standardize_split", "examples_split")
    critical_path = sum(max(runtimes[rule]) for rule in layers)
    serial = sum(sum(runtimes[rule]) for rule in layers)
    assert critical_path <= walltime_minutes(by_rule["data"]) <= serial < 311
    assert max(runtimes["examples_split"]) < 10 and walltime_minutes(by_rule["train"]) < 30
    # --resources gpu=1: the two tuning workers (one GPU each) never ran at the same time.
    first, second = sorted((job_state(emulator, job["id"]) for job in jobs if job["name"] == "tune_worker"),
                           key=lambda state: state["start"])
    assert first["end"] <= second["start"]


def test_profile_groups_small_cpu_rules_and_limits_gpus():
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    groups = dict(item.split("=") for item in profile["groups"])
    gpu_rules = {"tune_worker", "train", "infer_chunk", "particles_split", "baseline_split"}
    assert not gpu_rules & set(groups)
    assert {"acquire_split", "regrid_split", "standardize_split", "examples_split"} <= set(groups)
    assert any(item.startswith("gpu=") for item in profile["resources"])
    assert (PROFILE / profile["jobscript"]).is_file() and (PROFILE / "env.sh").is_file()


def test_job_killed_at_walltime_is_reported_failed_and_rerun(tmp_path):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(SLOW_SNAKEFILE)
    workdir, emulator = tmp_path / "work", tmp_path / "pbs"
    env = pbs_env(emulator, PBS_EMULATOR_WALLTIME_SCALE="0.2")  # 1 minute of walltime = 12 s
    result = subprocess.run(snakemake_command(workdir, snakefile), capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    first, second = submissions(emulator)
    assert (first["resources"]["walltime"], second["resources"]["walltime"]) == ("00:01:00", "00:10:00")
    assert job_state(emulator, first["id"])["Exit_status"] == 271
    assert job_state(emulator, second["id"])["Exit_status"] == 0
    assert (workdir / "slow.txt").read_text() == "done\n"


def test_missing_account_fails_before_any_submission(tmp_path):
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(TINY))
    workdir, emulator = tmp_path / "work", tmp_path / "pbs"
    command = snakemake_command(workdir, REPO / "Snakefile", "acquire", "--configfile", str(configfile))
    result = subprocess.run(command, capture_output=True, text=True, env=pbs_env(emulator, account=None),
                            timeout=120)
    assert result.returncode != 0
    # One message, the last thing printed (the first a user reads), not one inside every job's error report.
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("profiles/pbs: no PBS account")
    assert "PBS_ACCOUNT" in message and "pbs_account" in message
    assert result.stderr.count("no PBS account") == 1 and "Error in group" not in result.stderr
    assert submissions(emulator) == []
    assert not (workdir / "data").exists()


def test_an_account_per_rule_is_enough(tmp_path):
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(TINY))
    workdir, emulator = tmp_path / "work", tmp_path / "pbs"
    command = snakemake_command(workdir, REPO / "Snakefile", "data/raw/train.nc", "--configfile", str(configfile),
                                "--set-resources", "acquire_split:pbs_account=NAML0001")
    result = subprocess.run(command, capture_output=True, text=True, env=pbs_env(emulator, account=None),
                            timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [job["account"] for job in submissions(emulator)] == ["NAML0001"]


def test_retry_of_a_workflow_job_asks_for_more_walltime_and_memory(tmp_path):
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(TINY))
    workdir, emulator = tmp_path / "work", tmp_path / "pbs"
    # 1 minute of walltime = 0.01 s: every attempt is killed at its walltime.
    env = pbs_env(emulator, PBS_EMULATOR_WALLTIME_SCALE="0.0002")
    command = snakemake_command(workdir, REPO / "Snakefile", "data/raw/train.nc", "--configfile", str(configfile))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    first, second = submissions(emulator)
    assert job_state(emulator, first["id"])["Exit_status"] == 271
    walltimes = [walltime_minutes(job) for job in (first, second)]
    memory = [int(select(job)["mem"].removesuffix("MB")) for job in (first, second)]
    assert walltimes[1] == 2 * walltimes[0] and memory[1] > memory[0]


def declared_runtimes(snakemake_log: str) -> dict:
    """{rule: [runtime of each of its jobs]} as Snakemake printed them (group members included)."""
    runtimes, rule = {}, None
    for line in snakemake_log.splitlines():
        if match := re.match(r"\s*(?:local)?rule (\w+):$", line):
            rule = match.group(1)
        elif (match := re.match(r"\s*resources: .*\bruntime=(\d+)", line)) and rule:
            runtimes.setdefault(rule, []).append(int(match.group(1)))
            rule = None
    return runtimes


def select(job: dict) -> dict:
    return dict(item.split("=") for item in job["resources"]["select"].split(":")[1:])


@pytest.mark.parametrize("section, change, named", [
    ("optics", {"nxx": 64}, "nxx"),             # unknown key
    ("train", {"epochs": "many"}, "train.epochs"),  # wrong type
])
def test_broken_config_fails_before_any_submission(tmp_path, section, change, named):
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump({**TINY, section: {**TINY.get(section, {}), **change}}))
    workdir, emulator = tmp_path / "work", tmp_path / "pbs"
    command = snakemake_command(workdir, REPO / "Snakefile", "train", "--configfile", str(configfile))
    result = subprocess.run(command, capture_output=True, text=True, env=pbs_env(emulator), timeout=120)
    assert result.returncode != 0
    assert named in result.stderr
    assert submissions(emulator) == []


def test_status_of_unknown_job_is_failed_not_a_crash(tmp_path):
    result = subprocess.run([str(PROFILE / "pbs-status.py"), "4242.emulator"], capture_output=True, text=True,
                            env=pbs_env(tmp_path / "pbs"), timeout=30)
    assert result.returncode == 0
    assert result.stdout == "failed\n"
    assert "4242.emulator" in result.stderr


def test_interrupt_deletes_running_jobs_with_qdel(tmp_path):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(SLOW_SNAKEFILE)
    workdir, emulator = tmp_path / "work", tmp_path / "pbs"
    # Snakemake only cancels the jobs not in the middle of a status check: keep checks rare here.
    command = snakemake_command(workdir, snakefile, "--seconds-between-status-checks", "8")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=pbs_env(emulator), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not submissions(emulator) or job_state(emulator, submissions(emulator)[0]["id"])["job_state"] != "R":
            assert time.monotonic() < deadline and process.poll() is None, "the job never started"
            time.sleep(0.5)
        time.sleep(2)  # let Snakemake record the submission before it is interrupted
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    job_id = submissions(emulator)[0]["id"]
    deleted = [json.loads(line) for line in (emulator / "qdel.jsonl").read_text().splitlines()]
    assert any(job_id in call["ids"] for call in deleted)
    assert job_state(emulator, job_id)["Exit_status"] == 271
    assert not (workdir / "slow.txt").exists()
