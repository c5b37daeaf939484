"""The GPU benchmarks still run, and print what they promise, on the embedded default config on a CPU (their
figures come from a GPU machine: benchmarks/device_checks.sh)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from holopipe.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = load_config(REPO / "config" / "config.yaml")


def run_benchmark(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--config",
                             str(REPO / "config" / "config.yaml"), "--threads", "1", *args],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def seconds_of(line_start: str, text: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(line_start))
    return float(re.search(r"([0-9.]+) s", line).group(1))


@pytest.mark.slow
def test_bench_infer_times_inference_refinement_and_the_baseline(tmp_path):
    text = run_benchmark("bench_infer.py", "--planes", "2", "--cache", str(tmp_path))
    assert "device: CPU (1 thread), fp32" in text
    assert f"2 of {CONFIG['reconstruction']['z_bins']} planes in batches of 4" in text  # the config's grid and batches
    for stage in ("inference:", "refinement:", "baseline:"):
        assert seconds_of(stage, text) > 0, stage
    shares = re.search(r"shares: propagation (\d+) %, model (\d+) %, post-processing (\d+) %, refinement (\d+) %",
                       text)
    assert shares and 90 <= sum(map(int, shares.groups())) <= 110, text
    assert list(tmp_path.glob("hologram-*.npz")), "the simulated hologram is cached"


@pytest.mark.slow
def test_bench_propagate_compares_the_workflow_sweep_with_a_bare_fft_of_the_padded_grid():
    text = run_benchmark("bench_propagate.py")
    pad = CONFIG["reconstruction"]["pad"]
    assert "frame 512 x 512" in text and f"pad {pad}" in text
    for library in ("numpy/scipy (CPU)", "torch (CPU)"):
        line = next(line for line in text.splitlines() if line.startswith(library))
        assert f"{512 + 2 * pad} x {512 + 2 * pad} padded" in line
        ratios = [float(value) for value in re.findall(r"ratio ([0-9.]+)", line)]
        assert len(ratios) == 2 and all(ratio > 0 for ratio in ratios), line
