"""A user's file added to a finished run (the README's own-file recipe): only that split's own jobs run.

Random streams derive from what a split is, not where it stands in the merged config, so adding, removing or
reordering splits that training does not read never reruns examples, tuning or training.
"""

import re
from pathlib import Path

import pytest
import yaml
from helpers import TINY, snakemake

from holopipe.core.config import load_config
from holopipe.data.acquire import acquire_split

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

FINISHED = {
    **TINY,
    # A split nothing reads, for the removal below.
    "splits": {**TINY["splits"], "spare": {"source": "simulate", "n_holograms": 1, "seed": 3}},
    "train": {**TINY["train"], "epochs": 1},
    "tune": {"n_trials": 1, "workers": 1, "epochs": 1},
    "infer": {"splits": ["valid"], "chunks": 1},
}

TRAINING_RULES = {"augment", "standardize_fit", "examples_split", "tune_study", "tune_worker", "tune", "train"}
OWN_SPLIT_RULES = {"acquire_split", "regrid_split", "standardize_split", "infer_chunk", "particles_split",
                   "baseline_split", "label_candidates"}
WHOLE_RUN_RULES = {"evaluate", "provenance_summary", "workflow_graphs", "report_html", "all"}
"""Rules of no split: they gather every evaluated split, the config or the report, so a new split reruns them."""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A working directory after a whole run whose config is the directory's config/config.yaml (which the
    Snakefile's `configfile:` reads, as in a checkout), and a user's file: 2 holograms on a 96 × 64 frame."""
    workdir = tmp_path_factory.mktemp("own_file")
    (workdir / "config").mkdir()
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(FINISHED, sort_keys=False))
    result = snakemake(workdir, "--cores", "2", config=FINISHED)
    assert result.returncode == 0, result.stdout + result.stderr
    made = {**FINISHED, "optics": {**FINISHED["optics"], "nx": 96, "ny": 64},
            "splits": {"user": {"source": "simulate", "n_holograms": 2, "seed": 7}}}
    acquire_split(load_config(made), "user", workdir / "campaign" / "mine.nc")
    return workdir


def planned_jobs(output: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run lists."""
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        if rule:
            wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.MULTILINE)
            jobs.add((rule.group(1), wildcards.group(1) if wildcards else ""))
    return jobs


def dry_run(workdir: Path, *args: str, config: dict) -> set[tuple[str, str]]:
    result = snakemake(workdir, *args, "-n", "--cores", "2", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    return planned_jobs(result.stdout)


@pytest.mark.parametrize("listed", ["alone", "after"])
def test_a_users_file_runs_only_its_own_jobs(finished, listed):
    mine = {"splits": {"mine": {"source": "file", "path": str(finished / "campaign" / "mine.nc")}},
            "infer": {"splits": ["mine"]}}
    if listed == "alone":
        # `--configfile mine.yaml`: merged over config/config.yaml, its split comes first in the config.
        jobs = dry_run(finished, config=mine)
    else:
        # `--configfile config/config.yaml mine.yaml`: its split comes last.
        (finished / "mine.yaml").write_text(yaml.safe_dump(mine))
        jobs = dry_run(finished, str(finished / "mine.yaml"), config=FINISHED)
    rules = {rule for rule, _ in jobs}
    assert not rules & TRAINING_RULES, sorted(jobs)
    assert OWN_SPLIT_RULES <= rules, sorted(jobs)
    assert rules <= OWN_SPLIT_RULES | WHOLE_RUN_RULES, sorted(jobs)
    assert all(wildcards.startswith("split=mine") for rule, wildcards in jobs if rule in OWN_SPLIT_RULES)


@pytest.mark.parametrize("splits", [("valid", "spare", "train"), ("train", "valid")], ids=["reordered", "removed"])
def test_reordering_or_removing_splits_training_does_not_read_reruns_no_stage(finished, splits):
    changed = {**FINISHED, "splits": {name: FINISHED["splits"][name] for name in splits}}
    default = finished / "config" / "config.yaml"
    default.write_text(yaml.safe_dump(changed, sort_keys=False))  # else `configfile:` merges the old splits in
    try:
        jobs = dry_run(finished, config=changed)
    finally:
        default.write_text(yaml.safe_dump(FINISHED, sort_keys=False))
    assert {rule for rule, _ in jobs} <= {"provenance_summary", "workflow_graphs", "report_html", "all"}, sorted(jobs)
