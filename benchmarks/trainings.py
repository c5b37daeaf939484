"""F1 of several trainings of one config on one split, with intervals over trainings and holograms.

    python benchmarks/trainings.py --configfile config/config.yaml config/holodec-crop.yaml \\
        --store data/standardized/test.zarr --unet seed0/test_unet.csv seed1/test_unet.csv seed2/test_unet.csv \\
        --baseline results/particles/test_baseline.csv

One particle CSV per training run (its ``results/particles/<split>_unet.csv``), all of the same holograms, and
the baseline's of that split (it has no training). The pooled F1 and the 95 % interval resample training runs
and holograms crossed, as the accuracy benchmark does
(:func:`holopipe.evaluation.evaluate.runs_and_holograms_intervals`), paired against the baseline; each run's
own F1 follows, with the spread between runs. This is the accuracy benchmark's table for a config whose runs
were made by hand (one ``snakemake … evaluate`` per seed), so that a README figure over several trainings has a
command that regenerates it. It chooses nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from accuracy import interval, read_configs, split_counts

from holopipe.core.config import load_config
from holopipe.evaluation.evaluate import runs_and_holograms_intervals
from holopipe.evaluation.matching import read_truth

REPO = Path(__file__).resolve().parent.parent


def trainings_table(truth, unet_csvs: list[Path], baseline_csv: Path, config: dict) -> dict:
    """Pooled scores with intervals over runs and holograms for the U-Net (one CSV per run) and the baseline,
    the paired U-Net − baseline difference, and each run's F1."""
    evaluate = config["evaluate"]
    bins = (evaluate["diameter_bins"], np.linspace(float(config["optics"]["z_min"]), float(config["optics"]["z_max"]),
                                                   int(evaluate["depth_bins"]) + 1))
    found = [split_counts(truth.particles, truth.holograms, truth.dust, csv, evaluate, bins)["counts"]
             for csv in unet_csvs]
    baseline = split_counts(truth.particles, truth.holograms, truth.dust, baseline_csv, evaluate, bins)["counts"]
    methods, differences = runs_and_holograms_intervals({"unet": np.stack(found), "baseline": baseline[None]},
                                                        int(evaluate["bootstrap"]), int(evaluate["seed"]))
    per_run = []
    for csv, counts in zip(unet_csvs, found):
        tp, fp, fn = counts.sum(axis=0)
        per_run.append({"csv": str(csv), "f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0,
                        "tp": int(tp), "fp": int(fp), "fn": int(fn)})
    f1s = np.array([run["f1"] for run in per_run])
    return {"n_holograms": int(truth.holograms.size), "n_true": len(truth.particles), "methods": methods,
            "unet_minus_baseline": differences["unet_minus_baseline"], "runs": per_run,
            "run_sd": float(f1s.std(ddof=1)) if f1s.size > 1 else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", nargs="+", type=Path, default=[REPO / "config" / "config.yaml"],
                        help="config files merged in order, as the runs' (default: %(default)s)")
    parser.add_argument("--store", type=Path, required=True, help="the split's standardized store (its truth)")
    parser.add_argument("--unet", type=Path, nargs="+", required=True, help="the U-Net's particle CSV of each run")
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline's particle CSV of the split")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    for path in (args.store, *args.unet, args.baseline):
        if not path.exists():
            parser.error(f"{path} does not exist")
    config = load_config(read_configs(args.configfile))
    table = trainings_table(read_truth(args.store), args.unet, args.baseline, config)
    print(f"{args.store}: {table['n_holograms']} holograms, {table['n_true']} droplets, {len(args.unet)} training runs")
    for method, scores in table["methods"].items():
        print(f"  {method:8s} F1 {scores['f1']:.3f} {interval(scores['f1_ci95'])}  "
              f"precision {scores['precision']:.3f} recall {scores['recall']:.3f}")
    difference = table["unet_minus_baseline"]
    print(f"  U-Net - baseline {difference['f1']:+.3f} {interval(difference['f1_ci95'], signed=True)} "
          "(paired; runs and holograms)")
    for run in table["runs"]:
        print(f"  run {run['csv']}: F1 {run['f1']:.3f} (found {run['tp']}, false {run['fp']}, missed {run['fn']})")
    if table["run_sd"] is not None:
        print(f"  sd between runs {table['run_sd']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
