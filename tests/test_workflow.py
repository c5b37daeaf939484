"""Snakemake end to end on a tiny config, run in a temporary directory against the repository's Snakefile."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import xarray as xr
import yaml

from holopipe.acquire import acquire_split
from holopipe.config import load_config
from holopipe.evaluate import PLOT_NAMES
from holopipe.io import open_holodec, particle_table
from holopipe.train import load_model

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "splits": {
        "train": {"source": "simulate", "n_holograms": 2, "seed": 1},
        "valid": {"source": "simulate", "n_holograms": 1, "seed": 2},
    },
    "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 64, "ny": 64,
               "z_min": 0.001, "z_max": 0.003},
    "simulate": {"particles": [1, 3], "pad": 0},
    "reconstruction": {"z_bins": 10, "pad": 16},
    "augment": {"variants": 1, "gallery": 1},
    "examples": {"tile_size": 32, "positives_per_hologram": 2, "negatives_per_hologram": 2},
    "model": {"width": 4, "depth": 2},
    "train": {"epochs": 2, "batch_size": 4, "num_workers": 0, "warmup_epochs": 0},
    "tune": {"n_trials": 2, "workers": 2, "epochs": 1},
    "infer": {"splits": ["valid"], "chunks": 2},
}


def snakemake(workdir: Path, *args: str, config: dict = TINY) -> subprocess.CompletedProcess:
    """Run Snakemake in `workdir` with `config`; jobs find the `holopipe` command of this interpreter."""
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(configfile), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_dry_run_lists_one_acquire_job_per_split(tmp_path):
    result = snakemake(tmp_path, "-n", "--cores", "1")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for split in TINY["splits"]:
        assert f"data/raw/{split}.nc" in output
    assert re.search(r"^acquire_split\s+2$", output, re.MULTILINE)
    assert not (tmp_path / "data").exists()


def test_acquire_writes_valid_holodec_files(tmp_path):
    result = snakemake(tmp_path, "--cores", "1", "acquire")
    assert result.returncode == 0, result.stderr
    for split, spec in TINY["splits"].items():
        with open_holodec(tmp_path / "data" / "raw" / f"{split}.nc") as ds:
            assert ds.sizes["hologram_number"] == spec["n_holograms"]
            assert (ds.sizes["xsize"], ds.sizes["ysize"]) == (64, 64)
        assert (tmp_path / "logs" / "acquire" / f"{split}.log").exists()
    again = snakemake(tmp_path, "-n", "--cores", "1", "acquire")
    assert again.returncode == 0, again.stderr
    assert "Nothing to be done" in again.stdout + again.stderr


def test_file_split_is_validated_and_copied(tmp_path):
    source = acquire_split(load_config(TINY), "valid", tmp_path / "campaign" / "real.nc")
    config = {**TINY, "splits": {**TINY["splits"], "train": {"source": "file", "path": str(source)}}}
    result = snakemake(tmp_path, "--cores", "1", "data/raw/train.nc", config=config)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "raw" / "train.nc").read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "data" / "raw").iterdir()] == ["train.nc"]


def test_workflow_needs_a_train_split_and_tiles_that_fit(tmp_path):
    no_train = {**TINY, "splits": {"valid": TINY["splits"]["valid"]}}
    result = snakemake(tmp_path, "-n", "--cores", "1", config=no_train)
    assert result.returncode != 0 and "'train'" in result.stdout + result.stderr
    big_tiles = {**TINY, "examples": {**TINY["examples"], "tile_size": 128}}
    result = snakemake(tmp_path, "-n", "--cores", "1", config=big_tiles)
    assert result.returncode != 0
    assert "examples.tile_size (128) is larger than the regridded frame" in result.stdout + result.stderr


def test_unknown_key_fails_before_any_job(tmp_path):
    config = {**TINY, "optics": {**TINY["optics"], "wavelenght": 3.55e-7}}
    result = snakemake(tmp_path, "--cores", "1", config=config)
    assert result.returncode != 0
    assert "optics.wavelenght: unknown key" in result.stderr
    assert not (tmp_path / "data").exists()


def test_lint_finds_nothing(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    result = snakemake(tmp_path, "--lint", config=config)
    # Snakemake 9 exits 1 when the linter has findings.
    assert result.returncode == 0, result.stdout + result.stderr


def test_data_stages_end_to_end_and_params_rerun_only_what_they_touch(tmp_path):
    result = snakemake(tmp_path, "--cores", "2", "examples")
    assert result.returncode == 0, result.stdout + result.stderr
    data = tmp_path / "data"
    stats = json.loads((data / "standardized" / "stats.json").read_text())
    assert stats["source"] == "data/augmented/train.zarr"  # fitted on the training split only
    assert (tmp_path / "results" / "augment" / "gallery.png").stat().st_size > 0
    for split, spec in TINY["splits"].items():
        examples = xr.open_zarr(data / "examples" / f"{split}.zarr", consolidated=False)
        variants = TINY["augment"]["variants"] if split == "train" else 1
        per_hologram = sum(TINY["examples"][k] for k in ("positives_per_hologram", "negatives_per_hologram"))
        assert examples.sizes["example"] <= spec["n_holograms"] * variants * per_hologram
        assert examples["inputs"].shape[1:] == (2, 32, 32)
        assert int(examples["masks"].sum()) > 0
    changed = {**TINY, "examples": {**TINY["examples"], "negatives_per_hologram": 1}}
    dry = snakemake(tmp_path, "-n", "--cores", "1", "examples", config=changed)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    jobs = re.findall(r"^(\w+)\s+(\d+)$", dry.stdout, re.MULTILINE)
    assert dict(jobs) == {"examples_split": "2", "examples": "1", "total": "3"}


def test_whole_workflow_tunes_trains_infers_and_evaluates(tmp_path):
    result = snakemake(tmp_path, "--cores", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    trials = pd.read_csv(tmp_path / "results" / "tune" / "trials.csv")
    assert (trials["state"].isin(["COMPLETE", "PRUNED"])).sum() == TINY["tune"]["n_trials"]
    best = yaml.safe_load((tmp_path / "results" / "tune" / "best.yaml").read_text())
    assert set(best) == set(load_config(TINY)["tune"]["search_space"])
    model, info = load_model(tmp_path / "results" / "model" / "model.pt")
    assert info["train"]["learning_rate"] == best["train.learning_rate"]  # the tuned value was used
    assert info["channel_names"] == ["amplitude", "phase"]
    metrics = pd.read_csv(tmp_path / "results" / "model" / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    with torch.no_grad():
        assert model(torch.zeros(1, 2, 64, 96)).shape == (1, 1, 64, 96)  # any frame of whole strides
    chunks = [pd.read_csv(tmp_path / "results" / "inference" / "valid" / f"chunk_{i}.csv") for i in range(2)]
    planes = [set(chunk["plane"]) for chunk in chunks]
    assert not planes[0] & planes[1]  # the z chunks split the planes between two jobs
    metrics = json.loads((tmp_path / "results" / "evaluation" / "metrics.json").read_text())
    assert set(metrics) == {"unet", "baseline"}
    truth = len(particle_table(open_holodec(tmp_path / "data" / "standardized" / "valid.zarr")))
    for method in metrics.values():
        assert method["n_true"] == truth and 0.0 <= method["f1"] <= 1.0
    assert all((tmp_path / "results" / "evaluation" / name).stat().st_size > 0 for name in PLOT_NAMES)
    provenance = tmp_path / "results" / "provenance"
    jobs = pd.read_csv(provenance / "jobs.csv")
    assert {"acquire", "regrid", "train", "infer", "particles", "baseline", "evaluate"} <= set(jobs["stage"])
    assert (jobs["cpus_allowed"] >= 1).all()
    configured = jobs["stage"] != "standardize apply"  # the only stage that reads stats, not a config
    assert jobs.loc[configured, "config_sha256"].str.len().eq(64).all()
    files = pd.read_csv(provenance / "files.csv")
    model_row = files[(files["role"] == "output") & (files["path"] == "results/model")]
    assert len(model_row) == 1 and len(model_row["sha256"].iloc[0]) == 64
    assert yaml.safe_load((provenance / "config.yaml").read_text())["optics"] == load_config(TINY)["optics"]
    dag, rules = (provenance / "dag.mmd").read_text(), (provenance / "rulegraph.mmd").read_text()
    assert "flowchart" in dag and "infer_chunk - chunk: 1" in dag and "train" in rules
    if shutil.which("dot"):  # .ci/run installs graphviz
        svg = (provenance / "rulegraph.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "infer_chunk" in svg
    report = (tmp_path / "results" / "report.html").read_text()
    assert report.startswith("<!DOCTYPE html>") or "<html" in report[:2000]
    assert all(name in report for name in ("jobs.csv", "files.csv", "packages.csv", "scatter3d.png"))


def test_url_split_plans_a_download_job(tmp_path):
    url_split = {"source": "url", "url": "https://example.org/holograms.nc", "sha256": "0" * 64}
    config = {**TINY, "splits": {**TINY["splits"], "train": url_split}}
    result = snakemake(tmp_path, "-n", "--cores", "1", "acquire", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data/raw/train.nc" in result.stdout
