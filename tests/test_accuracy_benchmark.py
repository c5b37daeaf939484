"""benchmarks/accuracy.py on a tiny config: two training runs of the whole workflow, the baseline and the
ablation, a table whose intervals cover runs and holograms, the same numbers when run again, and an output
folder that another code cannot reuse."""

import json
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, TINY

from holopipe.core.config import load_config
from holopipe.evaluation.matching import read_truth

CONFIG = {**TINY, "splits": {**TINY["splits"], "test": {"source": "simulate", "n_holograms": 3, "seed": 3,
                                                        "simulate": {"window_dust": {"count": 2}}}},
          "tune": {"n_trials": 1, "workers": 1, "epochs": 1}, "infer": {"splits": ["test"], "chunks": 1},
          "evaluate": {"bootstrap": 200}}


def accuracy(out, configfile, *args):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--configfile", str(configfile),
                           "--out", str(out), "--cores", "2", *args], capture_output=True, text=True, timeout=900)


def comparable(path):
    """The result without what may differ between two invocations: wall times and the command line."""
    result = json.loads(path.read_text())
    return {key: value for key, value in result.items() if key not in ("wall_seconds", "wall_minutes", "command")}


@pytest.mark.slow
def test_two_training_runs_give_a_table_whose_intervals_cover_runs_and_holograms(tmp_path):
    configfile = tmp_path / "tiny.yaml"
    configfile.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    out = tmp_path / "accuracy"
    first = accuracy(out, configfile, "--runs", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((out / "accuracy.json").read_text())
    for run in (1, 2):
        seeds = yaml.safe_load((out / f"run_{run}" / "run.yaml").read_text())
        assert seeds == {section: {"seed": run} for section in ("augment", "examples", "train", "tune")}
        assert (out / f"run_{run}" / "results" / "particles" / "test_unet.csv").is_file()
    assert not (out / "run_2" / "results" / "particles" / "test_baseline.csv").exists(), "physics runs once"
    test = result["splits"]["test"]
    assert test["n_holograms"] == 3 and set(test["methods"]) == {"unet", "baseline", "physics+particles"}
    assert set(test["differences"]) == {"unet_minus_baseline", "unet_minus_physics+particles",
                                        "physics+particles_minus_baseline"}
    for method in test["methods"].values():
        low, high = method["f1_ci95"]
        assert low <= method["f1"] <= high
    assert [r["run"] for r in test["runs"]] == [1, 2] and test["run_spread"]["range"] >= 0
    per_run = [r["f1"] for r in test["runs"]]
    assert min(per_run) - 1e-9 <= test["methods"]["unet"]["f1"] <= max(per_run) + 1e-9, "pooled over the runs"
    grid = test["recall_grid"]
    assert sum(map(sum, grid["baseline"]["n_true"])) <= test["n_true"]
    assert sum(map(sum, grid["unet"]["n_true"])) == 2 * sum(map(sum, grid["baseline"]["n_true"])), "pooled runs"
    dust = test["on_window_dust_per_10_holograms"]
    assert test["window_dust_specks"] == 2 and len(dust["unet"]) == 2 and set(dust) == set(test["methods"])
    table = (out / "accuracy.md").read_text()
    assert "python benchmarks/accuracy.py --configfile" in table and "| test | unet - baseline |" in table
    assert "False particles on window dust per 10 holograms" in table and "| test | 2 |" in table
    assert table in first.stdout

    again = accuracy(out, configfile, "--runs", "2")
    assert again.returncode == 0 and "snakemake" not in again.stdout, "a finished benchmark only re-evaluates"
    assert comparable(out / "accuracy.json") == {k: v for k, v in result.items()
                                                 if k not in ("wall_seconds", "wall_minutes", "command")}

    record = json.loads((out / "code.json").read_text())
    assert set(record) == {"code", "commit"} and record["commit"] == result["commit"]
    (out / "code.json").write_text(json.dumps({**record, "code": {**record["code"], "source_sha256": "0" * 64}}))
    refused = accuracy(out, configfile, "--runs", "3")
    assert refused.returncode != 0 and "computed by other code" in refused.stderr and "fresh --out" in refused.stderr
    assert not (out / "run_3").exists(), "other code adds no run"
    evaluated = accuracy(out, configfile, "--runs", "2", "--evaluate-only")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert comparable(out / "accuracy.json")["splits"] == result["splits"]
    missing = accuracy(out, configfile, "--runs", "3", "--evaluate-only")
    assert missing.returncode != 0 and "run_3" in missing.stderr and "nothing is computed" in missing.stderr

    # The stages after detection again, by this (other) code, from the runs' detections: the same particles.
    post = accuracy(out, configfile, "--runs", "2", "--post-only")
    assert post.returncode == 0, post.stderr[-2000:]
    assert "snakemake" not in post.stdout and (out / "post" / "run_2" / "test_unet.csv").is_file()
    assert comparable(out / "accuracy.json")["splits"] == result["splits"]
    assert "recomputed at commit" in (out / "accuracy.md").read_text()
    assert (json.loads((out / "post" / "code.json").read_text())["code"]
            != json.loads((out / "code.json").read_text())["code"])

    # Standardized again by this code and config: the same bits, so the runs' own detections and the same table.
    same = accuracy(out, configfile, "--runs", "2", "--restandardize")
    assert same.returncode == 0, same.stderr[-2000:]
    assert "standardizes differently now" not in same.stdout
    assert comparable(out / "accuracy.json")["splits"] == result["splits"]
    assert "(--restandardize)" in (out / "accuracy.md").read_text()
    # Without taking the window dust out, test's holograms change and are inferred again by each run's model;
    # the training split (no dust) standardizes as before.
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump({**CONFIG, "standardize": {"stationary": "off"}}, sort_keys=False))
    again = accuracy(out, off, "--runs", "2", "--restandardize")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("test standardizes differently now: inferred again") == 2
    assert (out / "restandardized" / "run_2" / "inference" / "test" / "chunk_0.csv").is_file()
    # A change that moves the training split's holograms would need new models: refused.
    retrain = tmp_path / "retrain.yaml"
    retrain.write_text(yaml.safe_dump({**CONFIG, "standardize": {"block_pixels": 16}}, sort_keys=False))
    refused = accuracy(out, retrain, "--runs", "2", "--restandardize")
    assert refused.returncode != 0 and "training split standardizes differently" in refused.stderr

    # What follows detection chosen on a selection file through both runs' models (make
    # tune-postprocessing-accuracy), written into a copy of the config.
    chosen = tmp_path / "chosen.yaml"
    chosen.write_text(configfile.read_text())

    def select_settings(holograms, *args):
        return subprocess.run([sys.executable, str(REPO / "benchmarks" / "select_settings.py"), "--configfile",
                               str(configfile), "--out", str(out), "--holograms", str(holograms), "--trials", "1",
                               *args], capture_output=True, text=True, timeout=900)

    select = select_settings(2, "--write", str(chosen))
    assert select.returncode == 0, select.stdout[-2000:] + select.stderr[-2000:]
    assert "particles: F1 on select" in select.stdout and "baseline: F1 on select" in select.stdout
    assert all((out / "select" / f"run_{run}" / "chunk_0.csv").is_file() for run in (1, 2))
    selection = read_truth(out / "select" / "run_1" / "select.zarr")
    assert selection.n_holograms == 2 and not selection.particles.empty
    assert "# >>> make tune-postprocessing: chosen on select (2 holograms" in chosen.read_text()
    assert load_config(yaml.safe_load(chosen.read_text()))["particles"] == load_config(CONFIG)["particles"], \
        "one trial scores the current settings: nothing else to choose"
    detections = out / "select" / "run_2" / "chunk_0.csv"
    made = detections.stat().st_mtime_ns
    again = select_settings(2)
    assert again.returncode == 0 and "made again" not in again.stdout and detections.stat().st_mtime_ns == made
    other = select_settings(3)
    assert other.returncode == 0 and "made for other holograms, config or models: made again" in other.stdout
    assert read_truth(out / "select" / "run_1" / "select.zarr").n_holograms == 3


def test_the_selection_file_is_of_tests_kind_on_a_seed_no_split_has(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from accuracy import DEFAULT_CONFIGS, read_configs
    from select_settings import selection_config

    config = load_config(read_configs([REPO / path for path in DEFAULT_CONFIGS]))
    chosen = selection_config(config, 30, 70002)
    assert list(chosen["splits"]) == ["select"] and chosen["infer"]["splits"] == ["select"]
    select, test = chosen["splits"]["select"], config["splits"]["test"]
    assert (select["seed"], select["n_holograms"]) == (70002, 30)
    assert {k: v for k, v in select.items() if k not in ("seed", "n_holograms")} == {
        k: v for k, v in test.items() if k not in ("seed", "n_holograms")}
    with pytest.raises(SystemExit, match=r"--seed 61209 is the seed of split\(s\) \['artifacts'\]"):
        selection_config(config, 30, config["splits"]["artifacts"]["seed"])


@pytest.mark.slow
def test_one_training_run_is_refused_before_anything_runs(tmp_path):
    done = accuracy(tmp_path / "out", REPO / "config" / "config.yaml", "--runs", "1")
    assert done.returncode == 2 and "at least 2 training runs" in done.stderr
    assert not (tmp_path / "out").exists()
