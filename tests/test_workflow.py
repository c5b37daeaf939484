"""Snakemake end to end on a tiny config, run in a temporary directory against the repository's Snakefile."""

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import xarray as xr
import yaml
from helpers import REPO, TINY, snakemake

from holopipe.core.config import load_config
from holopipe.core.io import open_holodec, particle_table
from holopipe.data.acquire import acquire_split
from holopipe.evaluation.plots import PLOT_NAMES
from holopipe.ml.models import load_model

pytestmark = pytest.mark.workflow


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
    # A 64-pixel frame cropped to tiles of 128 keeps none (padded, it would be one tile).
    big_tiles = {**TINY, "examples": {**TINY["examples"], "tile_size": 128}, "regrid": {"frame": "crop"}}
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
    assert set(metrics) == {"unet", "baseline", "unet_minus_baseline"}
    truth = len(particle_table(open_holodec(tmp_path / "data" / "standardized" / "valid.zarr")))
    for method in (metrics["unet"], metrics["baseline"]):
        assert method["n_true"] == truth and 0.0 <= method["f1"] <= 1.0
        assert method["f1_ci95"] is None  # one hologram: nothing to resample (tests/test_evaluate.py)
    difference = metrics["unet_minus_baseline"]
    assert difference["f1"] == pytest.approx(metrics["unet"]["f1"] - metrics["baseline"]["f1"])
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


def planned_jobs(output: str) -> dict:
    """{(rule, wildcards): resources} of every job a dry run lists (Snakemake's job blocks)."""
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        resources = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        if rule and resources:
            wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.MULTILINE)
            values = dict(item.split("=", 1) for item in resources.group(1).split(", ") if "=" in item)
            jobs[rule.group(1), wildcards.group(1) if wildcards else ""] = {
                key: int(values[key]) for key in ("mem_mb", "runtime", "gpu") if key in values}
    return jobs


def plan(tmp_path: Path, config: dict, *targets: str) -> dict:
    result = snakemake(tmp_path, "-n", "--cores", "2", *targets, config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    return planned_jobs(result.stdout)


def resized(frame=(2000, 1400), planes=1000, holograms=100, pixel_pitch=None, pad=256):
    """TINY at a size where the data, not the start-up allowances, set the resources (dry runs only)."""
    return {**TINY,
            "splits": {**TINY["splits"], "valid": {"source": "simulate", "n_holograms": holograms, "seed": 2}},
            "optics": {**TINY["optics"], "nx": frame[0], "ny": frame[1], "dy": 3.5e-6},
            "regrid": {"pixel_pitch": pixel_pitch, "method": "antialias", "frame": "crop"},
            "reconstruction": {"z_bins": planes, "pad": pad},
            "examples": {**TINY["examples"], "tile_size": 64}}


def padded_pixels(config: dict) -> int:
    """The padded frame a reconstruction of the valid split propagates, as holopipe.data.regrid plans it."""
    from holopipe.data.regrid import plan_axis

    optics, regrid, pad = config["optics"], config["regrid"], config["reconstruction"]["pad"]
    sizes = [plan_axis(optics[f"n{axis}"], optics[f"d{axis}"], regrid["pixel_pitch"], method=regrid["method"],
                       frame=regrid["frame"], tile=config["examples"]["tile_size"], where=axis).n_out + 2 * pad
             for axis in ("x", "y")]
    return sizes[0] * sizes[1]


def test_resources_follow_the_regridded_padded_frame_the_planes_and_the_holograms(tmp_path):
    configs = {"base": resized(), "frame": resized(frame=(4000, 2800)), "resampled": resized(pixel_pitch=5.92e-6),
               "unpadded": resized(pad=0), "planes": resized(planes=3000), "holograms": resized(holograms=300),
               "tiny": resized(frame=(64, 64), pad=0)}
    jobs = {name: plan(tmp_path, config, "infer", "particles") for name, config in configs.items()}
    infer, particles = ("infer_chunk", "split=valid, chunk=0"), ("particles_split", "split=valid")

    # The refinement's memory is the libraries plus a share proportional to the padded, regridded frame (an
    # x/y swap, the regridding or the padding left out would break the proportion); inference's grows with
    # the padded and the unpadded frame (its batch of planes) but not with the planes, which come in batches.
    def frame_mb(name, job):
        return jobs[name][job]["mem_mb"] - jobs["tiny"][job]["mem_mb"]

    for name in ("frame", "resampled", "unpadded"):
        expected = padded_pixels(configs[name]) / padded_pixels(configs["base"])
        assert frame_mb(name, particles) / frame_mb("base", particles) == pytest.approx(expected, rel=0.02), name
    memory = {name: jobs[name][infer]["mem_mb"] for name in configs}
    assert memory["tiny"] < memory["unpadded"] < memory["base"] < memory["frame"]
    assert memory["resampled"] < memory["base"] == memory["planes"] == memory["holograms"]

    # Walltime grows with holograms × planes × padded pixels, less the fixed start-up allowance.
    def work(name, job):
        return jobs[name][job]["runtime"] - jobs["tiny"][job]["runtime"]

    for name, factor in (("planes", 3), ("holograms", 3)):
        for job in (infer, particles):
            assert work(name, job) / work("base", job) == pytest.approx(factor, rel=0.03), (name, job)
    expected = padded_pixels(configs["frame"]) / padded_pixels(configs["base"])
    assert work("frame", infer) / work("base", infer) == pytest.approx(expected, rel=0.03)
    assert all(jobs["base"][job]["gpu"] == 1 for job in (infer, particles))


def test_examples_only_for_the_training_and_validation_splits(tmp_path):
    config = {**TINY, "splits": {**TINY["splits"], "test": {"source": "simulate", "n_holograms": 1, "seed": 3}},
              "infer": {**TINY["infer"], "splits": ["test"]}}
    jobs = plan(tmp_path, config)
    assert {wildcards for rule, wildcards in jobs if rule == "examples_split"} == {"split=train", "split=valid"}
    assert ("standardize_split", "split=test") in jobs and ("baseline_split", "split=test") in jobs


def test_forcerun_of_a_stage_name(tmp_path):
    result = snakemake(tmp_path, "-n", "--cores", "1", "--forcerun", "examples")
    assert result.returncode != 0
    assert "--forcerun examples_split" in result.stdout + result.stderr
    # Stages without wildcards are their job's rule: forcing one plans it and what follows it.
    jobs = plan(tmp_path, TINY, "--forcerun", "train")
    assert {"train", "infer_chunk", "evaluate"} <= {rule for rule, _ in jobs}


def test_a_file_split_is_sized_from_its_own_header(tmp_path):
    # A user's file of 3 holograms on another frame than optics (1024 × 768 against 64 × 64).
    made = {**TINY, "optics": {**TINY["optics"], "nx": 1024, "ny": 768},
            "splits": {"valid": {"source": "simulate", "n_holograms": 3, "seed": 2}}}
    source = acquire_split(load_config(made), "valid", tmp_path / "campaign" / "real.nc")
    jobs = {}
    for kept in (1, 2, None):
        split = {"source": "file", "path": str(source), **({"max_holograms": kept} if kept else {})}
        config = {**TINY, "splits": {**TINY["splits"], "valid": split}, "reconstruction": {"z_bins": 4000, "pad": 0}}
        jobs[kept] = plan(tmp_path, config, "regrid", "infer")
    # Regridding holds two holograms of 40 B per pixel: 60 MB of the file's frame, nothing of the configured one.
    regrid = {split: jobs[1]["regrid_split", f"split={split}"]["mem_mb"] for split in ("train", "valid")}
    assert regrid["valid"] - regrid["train"] == pytest.approx(2 * 40 * 1024 * 768 / 2**20, abs=2)
    # Inference walltime (less its 5-minute start-up allowance) follows the holograms kept: max_holograms,
    # else all three in the file.
    work = [jobs[kept]["infer_chunk", "split=valid, chunk=0"]["runtime"] - 5 for kept in (1, 2, None)]
    assert work[1] / work[0] == pytest.approx(2, rel=0.2) and work[2] / work[0] == pytest.approx(3, rel=0.2)
