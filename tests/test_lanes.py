"""The fast lane (``make test-fast``): what its guard recognises as starting Snakemake, and what it deselects."""

import re
import sys

from helpers import REPO, starts_snakemake


def test_the_guard_recognises_every_way_the_suite_starts_snakemake():
    assert starts_snakemake([sys.executable, "-m", "snakemake", "--cores", "1"])
    assert starts_snakemake(["snakemake", "--profile", "pbs", "-n"])
    assert starts_snakemake([REPO / ".venv" / "bin" / "snakemake", "-n"])
    assert starts_snakemake("snakemake --cores 2 all")
    assert not starts_snakemake([sys.executable, "-m", "holopipe.run.cli", "--config", "snakemake.yaml"])
    assert not starts_snakemake([sys.executable, str(REPO / "benchmarks" / "bench_infer.py")])


def test_the_fast_lane_deselects_slow_and_workflow_tests_and_sets_the_guard():
    recipe = re.search(r"^test-fast:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert "HOLOPIPE_FAST_LANE=1" in recipe and '-m "not slow and not workflow"' in recipe
