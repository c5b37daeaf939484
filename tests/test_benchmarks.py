"""The GPU benchmarks still run, and print what they promise, on the embedded default config on a CPU (their
figures come from a GPU machine: benchmarks/device_checks.sh); the full-size smoke run plans only what it states,
and the device script fits its time and runs what exists."""

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from holopipe.core.config import load_config

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


def load_smoke_module():
    spec = importlib.util.spec_from_file_location("smoke_fullsize", REPO / "benchmarks" / "smoke_fullsize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_fullsize_plans_only_the_splits_sizes_and_planes_it_names(tmp_path):
    """config/holodec.yaml evaluates fraunhofer and realistic too (10 full-size holograms each): the smoke's dry
    run must plan none of their jobs, and every job must read the stated non-square frame and counts."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "smoke_fullsize.py"), "--dry-run",
                             "--holograms", "3", "1", "2", "--nx", "1536", "--ny", "1024", "--planes", "4",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stated: splits train 3, valid 1, test 2 holograms of 1536 x 1024 pixels, 4 planes; evaluates test" \
        in result.stdout
    dry_run_log = (tmp_path / "smoke" / "dry_run.log").read_text()
    jobs = load_smoke_module().parse_jobs(dry_run_log)
    splits_of = {rule: {job.wildcards["split"] for job in jobs if job.rule == rule}
                 for rule in ("acquire_split", "standardize_split", "infer_chunk", "baseline_split")}
    assert splits_of == {"acquire_split": {"train", "valid", "test"}, "standardize_split": {"train", "valid", "test"},
                         "infer_chunk": {"test"}, "baseline_split": {"test"}}
    assert "--truth test=data/standardized/test.zarr --prediction" in dry_run_log  # evaluate reads test alone
    configs = [job.config for job in jobs if job.config]
    assert all(job.config for job in jobs if job.rule in ("acquire_split", "regrid_split", "infer_chunk", "train"))
    assert {(c["optics"]["nx"], c["optics"]["ny"]) for c in configs} == {(1536, 1024)}
    assert {split: spec["n_holograms"] for c in configs for split, spec in c["splits"].items()} == \
        {"train": 3, "valid": 1, "test": 2}
    assert {c["reconstruction"]["z_bins"] for c in configs if "reconstruction" in c} == {4}
    assert all(int(job.resources.get("gpu", 0)) == 0 for job in jobs)


def test_smoke_plan_check_names_every_job_beyond_the_statement():
    smoke = load_smoke_module()
    plan = smoke.Plan(holograms={"train": 2, "valid": 1, "test": 1}, evaluated=("test",), frame=(1536, 1024),
                      z_bins=4)

    def job(rule, split, holograms=1, frame=(1536, 1024), gpu="0"):
        config = {"splits": {split: {"n_holograms": holograms}}, "optics": {"nx": frame[0], "ny": frame[1]},
                  "reconstruction": {"z_bins": 4}}
        return smoke.Job(rule=rule, wildcards={"split": split}, resources={"gpu": gpu}, config=config)

    stated = [job("acquire_split", "train", 2), job("acquire_split", "valid"), job("acquire_split", "test"),
              job("infer_chunk", "test")]
    assert smoke.plan_problems(stated, plan) == []
    problems = smoke.plan_problems([*stated, job("acquire_split", "realistic", 10, frame=(4872, 3248), gpu="1"),
                                    job("infer_chunk", "fraunhofer")], plan)
    assert any("runs split 'realistic'" in problem for problem in problems)
    assert any("frame 4872 x 3248" in problem for problem in problems)
    assert any("asks for a GPU" in problem for problem in problems)
    assert problems[-1] == "infers ['fraunhofer', 'test'], the smoke states it evaluates ['test']"
    wrong_size = smoke.plan_problems([job("acquire_split", "train", 5), *stated[1:]], plan)
    assert wrong_size == ["acquire_split {'split': 'train'}: train has 5 holograms, the smoke states 2"]


def test_smoke_pins_every_stage_with_a_device_to_the_cpu():
    smoke = load_smoke_module()
    args = SimpleNamespace(holograms=[2, 1, 1], particles=500, planes=24, nx=None, ny=None)
    config = smoke.overrides(args)
    assert {"train", "infer", "baseline", "labels"} <= set(smoke.device_sections())
    assert all(config[section]["device"] == "cpu" for section in smoke.device_sections())
    assert config["infer"]["splits"] == ["test"]
    assert config["optics"] == {"nx": 4872, "ny": 3248}


DEVICE_CHECKS = (REPO / "benchmarks" / "device_checks.sh").read_text()


def test_device_checks_step_limits_fit_the_budget_its_header_states():
    """The device tool's call allows 600 s: the steps' limits (and the wheels' install) must leave room."""
    limits = {name: int(seconds) for name, seconds in re.findall(r"^\s+step ([\w-]+) (\d+) ", DEVICE_CHECKS,
                                                                  re.MULTILINE)}
    install = int(re.search(r"timeout (\d+) \"\$PYTHON\" -m pip install", DEVICE_CHECKS).group(1))
    assert {"gpu-tests", "bench_dataprep", "bench_infer", "batch-limit", "bench_propagate"} <= set(limits)
    budget = dict(re.findall(r"^#\s+([\w -]+?)\s{2,}(\d+) s", DEVICE_CHECKS, re.MULTILINE))
    assert {name: int(budget[name]) for name in limits} == limits, "the header's budget is stale"
    assert install + sum(limits.values()) == int(budget["total"]) <= 540


def test_device_checks_run_scripts_that_exist_on_configs_the_schema_accepts(tmp_path):
    for script in re.findall(r"benchmarks/(\w+\.py)", DEVICE_CHECKS):
        assert (REPO / "benchmarks" / script).is_file(), script
    write_batch_config = re.search(r'^WRITE_BATCH_CONFIG="(.*?)"$', DEVICE_CHECKS, re.MULTILINE | re.DOTALL).group(1)
    subprocess.run([sys.executable, "-c", write_batch_config, str(tmp_path / "batches.yaml")], check=True, cwd=REPO)
    batches, holodec = load_config(tmp_path / "batches.yaml"), load_config(REPO / "config" / "holodec.yaml")
    assert batches["infer"]["batch_planes"] == 18  # far past the 2^31-element limit of full-size planes
    assert {**batches["infer"], "batch_planes": holodec["infer"]["batch_planes"]} == holodec["infer"]


def test_device_checks_gpu_tests_cover_the_cupy_data_preparation_the_sweep_and_the_batch_limit():
    """The gpu-tests step runs `pytest -m gpu tests`: each new GPU path must have a test it collects."""
    assert re.search(r"step gpu-tests \d+ .*-m gpu", DEVICE_CHECKS)
    for module in ("test_simulate", "test_regrid", "test_standardize", "test_augment", "test_optics", "test_infer"):
        assert "@pytest.mark.gpu" in (REPO / "tests" / f"{module}.py").read_text(), module


def test_fetch_device_wheels_names_packages_this_environment_has():
    """fetch_device_wheels.sh pins each wheel to the version installed here: every name must be installed."""
    script = (REPO / "benchmarks" / "fetch_device_wheels.sh").read_text()
    names = re.search(r"^NAMES=\((.*?)^\)", script, re.MULTILINE | re.DOTALL).group(1).split()
    assert "segmentation-models-pytorch" in names
    assert all(importlib.metadata.version(name) for name in names)
