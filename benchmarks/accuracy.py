"""The accuracy benchmark: is the U-Net better than physics, by more than training runs and holograms move it?

    python benchmarks/accuracy.py                 # make accuracy: the embedded default, 3 training runs
    python benchmarks/accuracy.py --runs 5
    python benchmarks/accuracy.py --configfile config/config.yaml config/holodec-crop.yaml \\
        config/accuracy-crop.yaml --runs 2 --out benchmarks/out/accuracy-crop

The config files merge in order as Snakemake merges ``--configfile`` (nested keys, lists replaced). The
default's last one, config/accuracy.yaml, replaces the evaluated splits by 30 holograms each on seeds drawn for
this benchmark and never looked at while designing. Each **training run** k = 1..--runs is the whole workflow
in its own directory (``OUT/run_k``, resumable: Snakemake's) with ``augment.seed``, ``examples.seed``,
``train.seed`` and ``tune.seed`` set to k: a new draw of the example tiles, of the corruptions, of the
initialisation and tile order, and of the tuning study. Splits' seeds stay, so every run sees the same
holograms (checked: their truth must be identical). Run 1 also runs the physics baseline, and the ablation
``physics+particles``: the baseline's detector (threshold, contrast) alone, its per-plane regions merged by
the U-Net's particles stage (``holopipe baseline --detections``, then ``holopipe particles``), which tells
the detector's share of a difference from the particles stage's.

Per split and method: F1, precision and recall with counts pooled over runs and holograms, and 95 % intervals
from a bootstrap that resamples **training runs and holograms** (crossed: every model sees every hologram;
:func:`holopipe.evaluation.evaluate.runs_and_holograms_intervals`). Not a sign-flip test on per-hologram differences:
F1 is a ratio of pooled counts, not a mean of per-hologram F1s (a 25-droplet hologram's F1 is coarse), and a
test over holograms alone, with the runs averaged, takes the few trained models as the only ones there could
be. The paired differences are unet - baseline, unet - physics+particles (the detector) and
physics+particles - baseline (the particles stage); a difference is established only when its interval
excludes zero. Beside them: each run's F1 and its one-training interval over holograms (the interval
``make run`` reports), the spread between runs (sd, range), and recall by true diameter x depth.

Writes ``OUT/accuracy.json`` and ``OUT/accuracy.md`` (the table the README quotes, with the command and the
commit) and prints the table. OUT keeps the code identity and commit its runs were computed with (code.json);
another code may not add to it (a run directory's Snakemake would not rerun for a changed package): start a
fresh --out, or re-evaluate what is there with --evaluate-only (the table then names both commits).

A change after detection (the particles stage, the baseline's grouping, their settings) needs no retraining:
``--post-only`` keeps the runs' models and detections and recomputes, with this code and config, the U-Net's
particles of every run, the baseline and the ablation's particles into ``OUT/post`` (minutes), and evaluates
those; the table names the commit of the runs and the commit of the stages after detection. A change to
standardization that leaves the training split's standardized holograms as they were, bit for bit (checked), leaves
the models as they were too: ``--restandardize`` standardizes every run's evaluated splits again into
``OUT/restandardized``, infers again (the run's model, the CLI's ``holopipe infer``) where a store changed, and
then does what ``--post-only`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from holopipe.core.config import load_config, merged_config
from holopipe.core.io import open_holodec, read_particle_csv
from holopipe.core.provenance import code_identity
from holopipe.detect.baseline import baseline_file, detections_file
from holopipe.detect.particles import particles_file
from holopipe.evaluation.evaluate import bootstrap_intervals, hologram_counts, recall_grid, runs_and_holograms_intervals
from holopipe.evaluation.matching import match, on_window_dust, read_truth

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("config/config.yaml", "config/accuracy.yaml")
RUN_SEEDED = ("augment", "examples", "train", "tune")
"""Sections whose ``seed`` a training run sets: everything random between the data and the model."""
TRAIN = "train"
"""The training split's name, as the Snakefile's TRAIN_SPLIT."""
METHODS = ("unet", "baseline", "physics+particles")
DIFFERENCES = (("unet", "baseline"), ("unet", "physics+particles"), ("physics+particles", "baseline"))


def read_configs(paths) -> dict:
    config = {}
    for path in paths:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file holds a mapping of sections, not {type(loaded).__name__}")
        config = merged_config(config, loaded)
    return config


def run_overrides(run: int) -> dict:
    return {section: {"seed": run} for section in RUN_SEEDED}


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}{' (uncommitted changes)' if dirty else ''}"


def claim(out: Path, identity: dict, *, evaluate_only: bool) -> dict:
    """OUT belongs to the code that computes its runs: recorded on first use with its commit
    (``{"code", "commit"}``), and another code may only evaluate what is there (``evaluate_only``)."""
    path = out / "code.json"
    if not path.exists():
        if evaluate_only:
            raise SystemExit(f"accuracy.py: --evaluate-only, but nothing was computed in {out} yet")
        out.mkdir(parents=True, exist_ok=True)
        record = {"code": identity, "commit": git_commit()}
        path.write_text(json.dumps(record, indent=2) + "\n")
        return record
    record = json.loads(path.read_text())
    if record["code"] != identity and not evaluate_only:
        raise SystemExit(f"accuracy.py: {out} was computed by other code ({record['code']['source_sha256'][:12]} "
                         f"at commit {record['commit']}, now {identity['source_sha256'][:12]}); its runs would not "
                         "be recomputed. Use a fresh --out, or --evaluate-only to evaluate what is there.")
    return record


def run_workflow(workdir: Path, configfiles: list[Path], targets: list[str], cores: str, *,
                 evaluate_only: bool) -> float | None:
    """Snakemake up to ``targets`` in ``workdir``; the wall seconds when it had work to do, else None."""
    missing = [str(workdir / target) for target in targets if not (workdir / target).exists()]
    if not missing:
        return None
    if evaluate_only:
        raise SystemExit(f"accuracy.py: --evaluate-only, but {missing[0]} is missing: nothing is computed in this mode")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--cores", cores, "--configfile", *map(str, configfiles), "--", *targets]
    print(f"[accuracy] {workdir.name}: {shlex.join(command[2:])}", flush=True)
    start = time.perf_counter()
    with open(workdir / "snakemake.log", "a") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"accuracy.py: the workflow failed in {workdir} (exit {done.returncode}); its log: "
                         f"{workdir / 'snakemake.log'}")
    return time.perf_counter() - start


def split_counts(truth: pd.DataFrame, holograms: np.ndarray, dust: pd.DataFrame, csv: Path, evaluate: dict,
                 bins) -> dict:
    """Per-hologram counts, the recall grid and the false particles on the window ``dust``."""
    predicted = read_particle_csv(csv)
    predicted = predicted[predicted["hid"].isin(holograms)]
    pairs = match(truth, predicted, float(evaluate["tolerance_xy"]), float(evaluate["tolerance_z"]))
    counts = hologram_counts(truth, predicted, pairs, int(holograms.max()))[holograms - 1]
    on_dust = on_window_dust(predicted.drop(index=pairs["pred_index"]), dust, float(evaluate["tolerance_xy"]))
    return {"counts": counts, "grid": recall_grid(truth, pairs, *bins), "on_window_dust": on_dust}


def evaluate_split(split: str, runs: list[Path], csvs: dict, config: dict) -> dict:
    """One split's table: ``csvs`` maps each method of :data:`METHODS` to its particles CSV of this split
    (``unet``: one per run)."""
    evaluate = config["evaluate"]
    bins = (evaluate["diameter_bins"],
            np.linspace(float(config["optics"]["z_min"]), float(config["optics"]["z_max"]),
                        int(evaluate["depth_bins"]) + 1))
    store = runs[0] / "data" / "standardized" / f"{split}.zarr"
    split_truth = read_truth(store)
    truth, holograms, dust = split_truth.particles, split_truth.holograms, split_truth.dust
    for other in runs[1:]:
        if not truth.equals(read_truth(other / "data" / "standardized" / f"{split}.zarr").particles):
            raise SystemExit(f"accuracy.py: {split}'s truth differs between {runs[0]} and {other}: the runs did "
                             "not see the same holograms")
    unet = [split_counts(truth, holograms, dust, csv, evaluate, bins) for csv in csvs["unet"]]
    single = {method: split_counts(truth, holograms, dust, csvs[method], evaluate, bins)
              for method in ("baseline", "physics+particles")}
    counts = {"unet": np.stack([u["counts"] for u in unet]),
              **{method: found["counts"][None] for method, found in single.items()}}
    n_resamples, seed = int(evaluate["bootstrap"]), int(evaluate["seed"])
    methods, differences = runs_and_holograms_intervals(counts, n_resamples, seed, DIFFERENCES)
    # The same pooled counts with the runs held fixed: what the run level adds to the interval.
    _, fixed = runs_and_holograms_intervals({m: c.sum(axis=0)[None] for m, c in counts.items()}, n_resamples, seed,
                                            DIFFERENCES)
    for name, difference in differences.items():
        difference["f1_ci95_runs_fixed"] = fixed[name]["f1_ci95"]
    per_run = []
    for index, found in enumerate(unet):
        intervals, difference = bootstrap_intervals({"unet": found["counts"], "baseline": single["baseline"]["counts"]},
                                                    n_resamples, seed)
        tp, fp, fn = found["counts"].sum(axis=0)
        per_run.append({"run": index + 1, "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
                        "f1_ci95": intervals["unet"]["f1_ci95"], "unet_minus_baseline": difference})
    f1s = np.array([r["f1"] for r in per_run])
    grids = {"unet": [sum(u["grid"][0] for u in unet), sum(u["grid"][1] for u in unet)],
             **{method: list(found["grid"]) for method, found in single.items()}}
    return {"n_holograms": int(holograms.size), "n_true": len(truth), "methods": methods, "differences": differences,
            "runs": per_run, "run_spread": {"sd": float(f1s.std(ddof=1)) if f1s.size > 1 else None,
                                            "range": float(np.ptp(f1s))},
            "recall_grid": {method: {"n_true": g[0].tolist(), "tp": g[1].tolist()} for method, g in grids.items()},
            "window_dust_specks": len(dust),
            "on_window_dust_per_10_holograms": {
                "unet": [10 * u["on_window_dust"] / holograms.size for u in unet],
                **{method: 10 * found["on_window_dust"] / holograms.size for method, found in single.items()}},
            "diameter_bins_um": [float(v) * 1e6 for v in bins[0]], "depth_bins_mm": [float(v) * 1e3 for v in bins[1]]}


def ablate(out: Path, runs: list[Path], splits: list[str], config: dict, walls: dict, *, evaluate_only: bool) -> dict:
    """The ablation (the baseline's detector through the particles stage) of run 1's stores, kept in
    ``OUT/ablation`` for these settings; per split the CSVs :func:`evaluate_split` reads."""
    ablation = out / "ablation"
    read = json.dumps({key: config[key] for key in ("splits", "optics", "reconstruction", "baseline", "particles")},
                      sort_keys=True)
    if evaluate_only:
        if not (ablation / "config.json").exists() or (ablation / "config.json").read_text() != read:
            raise SystemExit(f"accuracy.py: --evaluate-only, but {ablation} holds no ablation of these settings")
    elif not (ablation / "config.json").exists() or (ablation / "config.json").read_text() != read:
        for stale in ablation.glob("*.csv"):  # computed with other settings
            stale.unlink()
        ablation.mkdir(parents=True, exist_ok=True)
        (ablation / "config.json").write_text(read)
    start = time.perf_counter()
    for split in splits:
        store = runs[0] / "data" / "standardized" / f"{split}.zarr"
        detections, particles = ablation / f"{split}_detections.csv", ablation / f"{split}_particles.csv"
        if evaluate_only and not particles.exists():
            raise SystemExit(f"accuracy.py: --evaluate-only, but {particles} is missing")
        if not detections.exists() and not particles.exists():
            detections_file(config, store, detections, progress=False)
        if not particles.exists():
            particles_file([detections], particles, config, store_path=store, progress=False)
    if time.perf_counter() - start > 1:
        (ablation / "wall_seconds.json").write_text(json.dumps(time.perf_counter() - start))
    if (ablation / "wall_seconds.json").exists():
        walls["ablation"] = json.loads((ablation / "wall_seconds.json").read_text())
    return {split: {"unet": [run / "results" / "particles" / f"{split}_unet.csv" for run in runs],
                    "baseline": runs[0] / "results" / "particles" / f"{split}_baseline.csv",
                    "physics+particles": ablation / f"{split}_particles.csv"} for split in splits}


def run_inputs(run: Path, split: str, chunks: int) -> tuple[Path, list[Path]]:
    """A run's standardized store of ``split`` and its inference chunks, as its workflow wrote them."""
    return (run / "data" / "standardized" / f"{split}.zarr",
            [run / "results" / "inference" / split / f"chunk_{chunk}.csv" for chunk in range(chunks)])


def holopipe(*args: str) -> None:
    """A stage by the CLI the workflow's rules call, so that a benchmark runs what a job runs."""
    command = [str(Path(sys.executable).parent / "holopipe"), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"accuracy.py: {shlex.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def run_stats_file(run: Path, here: Path, config: dict) -> Path:
    """``here/stats.json``: the run's training statistics with the config's ``standardize`` settings, so that a store
    standardized with it is what the run's model would see under this code and config."""
    settings = {key: value for key, value in config["standardize"].items() if key != "device"}
    stats = json.loads((run / "data" / "standardized" / "stats.json").read_text())
    stats_file = here / "stats.json"
    stats_file.write_text(json.dumps({**stats, "standardize": settings}, indent=2))
    return stats_file


def run_detections(run: Path, store: Path, csvs: list[Path], config_file: Path) -> None:
    """The run's model's detections of ``store`` into ``csvs``, one per z chunk, by the CLI's ``holopipe infer``;
    a chunk already written (atomically, so whole) is kept."""
    for chunk, csv in enumerate(csvs):
        if not csv.exists():
            holopipe("infer", "--model", str(run / "results" / "model" / "model.pt"), "--in", str(store), "--out",
                     str(csv), "--chunk", str(chunk), "--chunks", str(len(csvs)), "--config", str(config_file))


def restandardize(out: Path, runs: list[Path], splits: list[str], config: dict, walls: dict) -> dict:
    """``--restandardize``: every run's evaluated splits standardized again by this code with the config's
    ``standardize`` settings and the run's training statistics (into ``OUT/restandardized/run_k``), and inferred
    again by the run's model where a store changed; ``{run: {split: (store, chunks)}}``. The run's training split
    must standardize exactly as before (its models are then what this code would train): else it stops."""
    base = out / "restandardized"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    start = time.perf_counter()
    config_file = base / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    chunks = int(config["infer"]["chunks"])
    inputs = {}
    for run in runs:
        here = base / run.name
        here.mkdir()
        stats_file = run_stats_file(run, here, config)
        train = run / "data" / "standardized" / f"{TRAIN}.zarr"
        holopipe("standardize", "apply", "--in", str(run / "data" / "augmented" / f"{TRAIN}.zarr"), "--stats",
                 str(stats_file), "--device", "cpu", "--out", str(here / f"{TRAIN}.zarr"))
        if not same_images(here / f"{TRAIN}.zarr", train):
            raise SystemExit(f"accuracy.py: --restandardize: {run.name}'s training split standardizes differently "
                             "now; its model is not this code's: rerun the benchmark into a fresh --out")
        inputs[run] = {}
        for split in splits:
            store, detections = run_inputs(run, split, chunks)
            again = here / f"{split}.zarr"
            holopipe("standardize", "apply", "--in", str(run / "data" / "regridded" / f"{split}.zarr"), "--stats",
                     str(stats_file), "--device", "cpu", "--out", str(again))
            if same_images(again, store):
                inputs[run][split] = store, detections
                continue
            print(f"[accuracy] {run.name}: {split} standardizes differently now: inferred again", flush=True)
            detections = [here / "inference" / split / f"chunk_{chunk}.csv" for chunk in range(chunks)]
            run_detections(run, again, detections, config_file)
            inputs[run][split] = again, detections
    walls["restandardize"] = time.perf_counter() - start
    return inputs


def same_images(a: Path, b: Path) -> bool:
    with open_holodec(a) as left, open_holodec(b) as right:
        return bool(np.array_equal(left["image"].values, right["image"].values))


def recompute_after_detection(out: Path, runs: list[Path], splits: list[str], config: dict, walls: dict,
                              inputs: dict | None = None) -> dict:
    """``--post-only``: a fresh ``OUT/post`` with every run's U-Net particles (from its detections and stores:
    ``inputs`` ``{run: {split: (store, chunks)}}``, by default the run's own), run 1's baseline and the ablation
    (the baseline detector's detections, then the particles stage), all by this code and ``config``; per split
    the CSVs to evaluate."""
    post = out / "post"
    shutil.rmtree(post, ignore_errors=True)
    post.mkdir(parents=True)
    start = time.perf_counter()
    csvs = {}
    chunks = int(config["infer"]["chunks"])
    for split in splits:
        found = [(inputs or {}).get(run, {}).get(split) or run_inputs(run, split, chunks) for run in runs]
        unet = []
        for run, (store, detections) in zip(runs, found):
            missing = [str(path) for path in [*detections, store] if not path.exists()]
            if missing:
                raise SystemExit(f"accuracy.py: --post-only, but {missing[0]} is missing: run the benchmark first")
            unet.append(particles_file(detections, post / run.name / f"{split}_unet.csv", config, store_path=store,
                                       progress=False))
        store = found[0][0]
        detections = detections_file(config, store, post / f"{split}_detections.csv", progress=False)
        csvs[split] = {"unet": unet,
                       "baseline": baseline_file(config, store, post / f"{split}_baseline.csv", progress=False),
                       "physics+particles": particles_file([detections], post / f"{split}_physics+particles.csv",
                                                           config, store_path=store, progress=False)}
    walls["post"] = time.perf_counter() - start
    (post / "code.json").write_text(json.dumps({"code": code_identity(), "commit": git_commit()}, indent=2) + "\n")
    return csvs


def interval(values, signed=False) -> str:
    spec = "+.3f" if signed else ".3f"
    return f"[{values[0]:{spec}}, {values[1]:{spec}}]"


def markdown(result: dict) -> str:
    evaluated = ("" if result["evaluated_commit"] == result["commit"] else
                 f", evaluated at commit {result['evaluated_commit']}")
    if result.get("post_commit"):
        again = ("evaluated splits standardized again (inferred again where changed), particles stage, baseline and "
                 "ablation recomputed" if result.get("restandardized") else
                 "particles stage, baseline and ablation recomputed")
        evaluated += (f"; {again} at commit {result['post_commit']}"
                      f" ({'--restandardize' if result.get('restandardized') else '--post-only'})")
    lines = [f"Accuracy benchmark, runs computed at commit {result['commit']}{evaluated}: `{result['command']}`", "",
             f"{result['runs']} training runs (seeds {', '.join(map(str, range(1, result['runs'] + 1)))} of "
             f"{', '.join(RUN_SEEDED)}); intervals: 95 %, bootstrap over training runs and holograms "
             f"({result['resamples']} resamples); wall time {result['wall_minutes']:.0f} min on {result['machine']}.",
             "", "| split | holograms (droplets) | method | F1 [95 %] | precision | recall | F1 per run | run sd |",
             "|---|---|---|---|---|---|---|---|"]
    for split, s in result["splits"].items():
        for method in METHODS:
            m = s["methods"][method]
            runs = " / ".join(f"{r['f1']:.3f}" for r in s["runs"]) if method == "unet" else "-"
            sd = f"{s['run_spread']['sd']:.3f}" if method == "unet" and s["run_spread"]["sd"] is not None else "-"
            lines.append(f"| {split} | {s['n_holograms']} ({s['n_true']}) | {method} | {m['f1']:.3f} "
                         f"{interval(m['f1_ci95'])} | {m['precision']:.3f} | {m['recall']:.3f} | {runs} | {sd} |")
    lines += ["", "| split | difference (F1) | estimate [95 %] | established | [95 %] runs held fixed | "
                  "one training's interval, per run |", "|---|---|---|---|---|---|"]
    for split, s in result["splits"].items():
        for name, d in s["differences"].items():
            shown = name.replace("_minus_", " - ")
            established = "yes" if d["f1_ci95"][0] > 0 or d["f1_ci95"][1] < 0 else "no"
            single = (" ".join(interval(r["unet_minus_baseline"]["f1_ci95"], True) for r in s["runs"])
                      if name == "unet_minus_baseline" else "-")
            lines.append(f"| {split} | {shown} | {d['f1']:+.3f} {interval(d['f1_ci95'], True)} | {established} | "
                         f"{interval(d['f1_ci95_runs_fixed'], True)} | {single} |")
    dusty = {split: s for split, s in result["splits"].items() if s.get("window_dust_specks")}
    if dusty:
        lines += ["", "False particles on window dust per 10 holograms (unet per run)", "",
                  "| split | specks | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 2) + "|"]
        for split, s in dusty.items():
            found = s["on_window_dust_per_10_holograms"]
            cells = [" / ".join(f"{v:.1f}" for v in found[m]) if m == "unet" else f"{found[m]:.1f}" for m in METHODS]
            lines.append(f"| {split} | {s['window_dust_specks']} | " + " | ".join(cells) + " |")
    for split, s in result["splits"].items():
        depth = s["depth_bins_mm"]
        lines += ["", f"Recall by true diameter (rows, µm) x depth (columns, mm), {split}: unet / baseline / "
                  "physics+particles (droplets)", "",
                  "| d \\ z | " + " | ".join(f"{a:.1f}-{b:.1f}" for a, b in zip(depth[:-1], depth[1:])) + " |",
                  "|---" * len(depth) + "|"]
        edges = s["diameter_bins_um"]
        for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
            cells = []
            for j in range(len(depth) - 1):
                n = s["recall_grid"]["baseline"]["n_true"][i][j]
                if not n:
                    cells.append("-")
                    continue
                shares = []
                for method in METHODS:
                    grid = s["recall_grid"][method]
                    shares.append(f"{grid['tp'][i][j] / grid['n_true'][i][j]:.2f}")
                cells.append(f"{' / '.join(shares)} ({n})")
            lines.append(f"| {low:.0f}-{high:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", nargs="+", type=Path, default=[REPO / p for p in DEFAULT_CONFIGS],
                        help="config files merged in order (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="training runs (seeds 1..RUNS; at least 2)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "accuracy")
    parser.add_argument("--cores", default="all")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="compute nothing: evaluate the runs and ablation already in --out (also when they were "
                             "computed by other code; the table names both commits)")
    parser.add_argument("--post-only", action="store_true",
                        help="keep the runs' models and detections in --out (also when computed by other code) and "
                             "recompute what follows detection with this code and config into OUT/post")
    parser.add_argument("--restandardize", action="store_true",
                        help="as --post-only, after standardizing every run's evaluated splits again with this code "
                             "and config (OUT/restandardized) and inferring again where a store changed; the "
                             "training split must standardize as before")
    args = parser.parse_args(argv)
    if sum([args.post_only, args.evaluate_only, args.restandardize]) > 1:
        parser.error("--post-only, --restandardize and --evaluate-only: choose one")
    if args.runs < 2:
        parser.error("--runs: at least 2 training runs, or the interval leaves the training out")
    configfiles = [path.resolve() for path in args.configfile]
    missing = [str(path) for path in configfiles if not path.is_file()]
    if missing:
        parser.error(f"--configfile: no such file: {', '.join(missing)}")
    out = args.out.resolve()
    computes = not (args.evaluate_only or args.post_only or args.restandardize)
    record = claim(out, code_identity(), evaluate_only=not computes)
    walls = {}
    runs = []
    for run in range(1, args.runs + 1):
        workdir = out / f"run_{run}"
        seeds = workdir / "run.yaml"
        if computes:
            workdir.mkdir(parents=True, exist_ok=True)
            seeds.write_text(yaml.safe_dump(run_overrides(run)))
        config = load_config(merged_config(read_configs(configfiles), run_overrides(run)))
        splits = list(config["infer"]["splits"])
        targets = [f"results/particles/{split}_unet.csv" for split in splits]
        if run == 1:
            targets += [f"results/particles/{split}_baseline.csv" for split in splits]
        seconds = run_workflow(workdir, [*configfiles, seeds], targets, args.cores, evaluate_only=not computes)
        wall_file = workdir / "wall_seconds.json"
        if seconds is not None:
            wall_file.write_text(json.dumps(seconds))
        walls[workdir.name] = json.loads(wall_file.read_text()) if wall_file.exists() else None
        runs.append(workdir)
    config = load_config(merged_config(read_configs(configfiles), run_overrides(1)))
    splits = list(config["infer"]["splits"])
    if args.post_only or args.restandardize:
        inputs = restandardize(out, runs, splits, config, walls) if args.restandardize else None
        csvs, post_commit = recompute_after_detection(out, runs, splits, config, walls, inputs), git_commit()
    else:
        csvs, post_commit = ablate(out, runs, splits, config, walls, evaluate_only=args.evaluate_only), None
    command = shlex.join(["python", "benchmarks/accuracy.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"command": command, "commit": record["commit"], "evaluated_commit": git_commit(),
              "post_commit": post_commit, "restandardized": args.restandardize,
              "code": record["code"], "configfiles": [str(p) for p in configfiles],
              "runs": args.runs, "resamples": int(config["evaluate"]["bootstrap"]),
              "machine": f"{os.cpu_count()} CPU cores", "wall_seconds": walls,
              "wall_minutes": sum(v for v in walls.values() if v) / 60,
              "splits": {split: evaluate_split(split, runs, csvs[split], config) for split in splits}}
    (out / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "accuracy.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
