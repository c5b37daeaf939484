"""Choose what follows detection (the particles stage's settings and the baseline's) on a selection file: new
holograms of the test split's kind that no evaluation ever reads, seen through every training run of the accuracy
benchmark.

    python benchmarks/select_settings.py --out benchmarks/out/accuracy                   # prints the choice
    python benchmarks/select_settings.py --out benchmarks/out/accuracy --write config/config.yaml  # and writes it

(``make tune-postprocessing-accuracy`` is the second.)

``valid`` chooses the training's checkpoint. Choosing 19 settings after detection on it too fits them to its few
droplets (the embedded default's 8 holograms, about 220 droplets: the particles stage scored F1 0.984-0.989 there and
0.969 on the benchmark's test). The selection file is ``--holograms`` holograms (default 30) of the merged config's
``test`` split on ``--seed`` (default 70002, drawn for this and never evaluated), simulated and regridded once into
``OUT/select``; each run k of ``OUT/run_k`` standardizes it with its own training statistics (and the config's
``standardize`` settings) and infers it with its own model, by the CLI the workflow's rules call. Then ``holopipe
tune-postprocessing`` searches both methods on it (``--trials`` each), the U-Net's particles stage on the detections
of every run pooled, and writes its choice into ``--write`` when given. Steps whose output exists are not redone
while the config, the holograms asked for and the runs' models are those it was made for (``OUT/select/
identity.json``); else the folder is made again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from accuracy import DEFAULT_CONFIGS, REPO, holopipe, read_configs, run_detections, run_overrides, run_stats_file

from holopipe.core.config import load_config, merged_config
from holopipe.core.files import file_sha256

SPLIT = "select"


def selection_config(config: dict, holograms: int, seed: int) -> dict:
    """The merged config with one split, ``select``: the ``test`` split's kind (source, simulation) on ``seed``
    with ``holograms`` holograms; every evaluated split's seed must differ from it."""
    taken = {split: spec.get("seed") for split, spec in config["splits"].items()}
    clash = [split for split, split_seed in taken.items() if split_seed == seed]
    if clash:
        raise SystemExit(f"select_settings.py: --seed {seed} is the seed of split(s) {clash}: choose a fresh one")
    split = {**config["splits"]["test"], "seed": seed, "n_holograms": holograms}
    return load_config({**config, "splits": {SPLIT: split}, "infer": {**config["infer"], "splits": [SPLIT]}})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", nargs="+", type=Path, default=[REPO / p for p in DEFAULT_CONFIGS],
                        help="config files merged in order, as the accuracy benchmark's (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "accuracy",
                        help="the accuracy benchmark's folder, with its runs run_1, run_2, ...")
    parser.add_argument("--holograms", type=int, default=30)
    parser.add_argument("--seed", type=int, default=70002)
    parser.add_argument("--trials", type=int, default=40, help="trials per method")
    parser.add_argument("--write", type=Path, help="config file to write the choice into")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    runs = sorted((path for path in out.glob("run_*") if (path / "results" / "model" / "model.pt").is_file()),
                  key=lambda path: int(path.name.removeprefix("run_")))
    if len(runs) < 2:
        parser.error(f"--out {out}: needs at least 2 trained runs (run_k/results/model/model.pt); run "
                     "benchmarks/accuracy.py first")
    config = selection_config(load_config(merged_config(read_configs(args.configfile), run_overrides(1))),
                              args.holograms, args.seed)
    base = out / SPLIT
    identity = {"config": config, "models": {run.name: file_sha256(run / "results" / "model" / "model.pt")
                                             for run in runs}}
    identity_file = base / "identity.json"
    if base.exists() and (not identity_file.exists() or json.loads(identity_file.read_text()) != identity):
        print(f"[select] {base} was made for other holograms, config or models: made again", flush=True)
        shutil.rmtree(base)
    base.mkdir(exist_ok=True)
    identity_file.write_text(json.dumps(identity, indent=2))
    config_file = base / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    raw, regridded = base / f"{SPLIT}.nc", base / f"{SPLIT}_regridded.zarr"
    if not raw.exists():
        holopipe("acquire", "--split", SPLIT, "--config", str(config_file), "--out", str(raw))
    if not regridded.exists():
        holopipe("regrid", "--in", str(raw), "--out", str(regridded), "--config", str(config_file))
    chunks = int(config["infer"]["chunks"])
    detections = []
    for run in runs:
        here = base / run.name
        here.mkdir(exist_ok=True)
        stats_file = run_stats_file(run, here, config)
        store = here / f"{SPLIT}.zarr"
        if not store.exists():
            holopipe("standardize", "apply", "--in", str(regridded), "--stats", str(stats_file), "--device", "cpu",
                     "--out", str(store))
        csvs = [here / f"chunk_{chunk}.csv" for chunk in range(chunks)]
        run_detections(run, store, csvs, config_file)
        detections += ["--detections", *map(str, csvs)]
    print(f"[select] {args.holograms} holograms (seed {args.seed}) through {len(runs)} runs: searching", flush=True)
    search = [str(Path(sys.executable).parent / "holopipe"), "tune-postprocessing", "--config", str(config_file),
              "--store", str(base / runs[0].name / f"{SPLIT}.zarr"), *detections, "--trials", str(args.trials),
              *(["--write", str(args.write)] if args.write else [])]
    return subprocess.run(search).returncode  # its choice and F1 before and after, printed as it finishes


if __name__ == "__main__":
    raise SystemExit(main())
