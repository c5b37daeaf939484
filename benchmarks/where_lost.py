"""Where the U-Net's missed droplets of a split were lost: by the detector, by clustering, or after refinement.

    python benchmarks/where_lost.py --store data/standardized/test.zarr --particles results/particles/test_unet.csv \\
        --detections results/inference/test/chunk_*.csv
    python benchmarks/where_lost.py --configfile config/config.yaml config/holodec-crop.yaml --store ... (a crop run)

Each true droplet the evaluation's matching leaves unmatched gets one stage:

- ``no detection``: no detection of its hologram within ``evaluate.tolerance_xy`` of it, at any depth;
- ``clustering``: detections there, but :func:`holopipe.detect.particles.cluster_detections` drops their clusters
  (``min_planes``: too few detections; ``min_contrast``: too faint), or they joined a cluster focused elsewhere;
- ``line of sight``: the particle there (within ``tolerance_xy``, nearest in depth) is matched to another droplet;
- ``depth``: the particle there is no droplet's, and lies off in z by more than ``evaluate.tolerance_z``;
- ``after refinement``: clusters kept, but no particle there (dropped as a faint disk, outside the volume, a ghost
  or a duplicate).

The diagnosis the README's accuracy sections quote; it reads a split's files and chooses nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from accuracy import read_configs

from holopipe.core.config import load_config, with_overrides
from holopipe.core.io import read_particle_csv
from holopipe.detect.particles import cluster_detections, contrast_floor, label_detections, read_detections
from holopipe.evaluation.matching import match, read_truth

REPO = Path(__file__).resolve().parents[1]
STAGES = ("no detection", "clustering", "line of sight", "depth", "after refinement")


def _beside(table: pd.DataFrame, droplet, reach_um: float) -> pd.DataFrame:
    """Rows of ``table`` (µm) in ``droplet``'s hologram within ``reach_um`` of it in x and y."""
    same = table[table["hid"] == droplet.hid]
    return same[(np.abs(same["x"] - droplet.x) <= reach_um) & (np.abs(same["y"] - droplet.y) <= reach_um)]


def where_lost(truth: pd.DataFrame, particles: pd.DataFrame, detections: pd.DataFrame, config: dict) -> pd.DataFrame:
    """One row per droplet of ``truth`` that no particle matches: its hid, x, y, z, d (µm), ``stage`` (one of
    :data:`STAGES`) and ``detail`` (the filter, or the offending particle's depth offset ``dz`` in µm)."""
    tolerance_xy, tolerance_z = (float(config["evaluate"][key]) for key in ("tolerance_xy", "tolerance_z"))
    pairs = match(truth, particles, tolerance_xy, tolerance_z)
    reach = tolerance_xy * 1e6
    taken = set(pairs["pred_index"])
    labelled = label_detections(detections, config)  # the filters below do not change the linking
    kept = cluster_detections(labelled, config)
    loose = cluster_detections(labelled, with_overrides(config, {"particles.min_planes": 1,
                                                                 "particles.min_contrast": 0.0}))
    rows = []
    for droplet in truth.drop(index=list(pairs["true_index"])).itertuples():
        nearby = _beside(particles, droplet, reach)
        if len(nearby):
            nearest = nearby.loc[(nearby["z"] - droplet.z).abs().idxmin()]
            stage = "line of sight" if nearest.name in taken else "depth"
            detail = f"dz {nearest['z'] - droplet.z:+.0f}"
        elif len(_beside(kept, droplet, reach)):
            stage, detail = "after refinement", ""
        elif len(_beside(detections, droplet, reach)):
            stage, detail = "clustering", _clustering_filter(loose, droplet, reach, config)
        else:
            stage, detail = "no detection", ""
        rows.append((droplet.hid, droplet.x, droplet.y, droplet.z, droplet.d, stage, detail))
    return pd.DataFrame(rows, columns=["hid", "x", "y", "z", "d", "stage", "detail"])


def _clustering_filter(loose: pd.DataFrame, droplet, reach: float, config: dict) -> str:
    """Which of ``particles.min_planes`` and ``min_contrast`` (scaled where the cluster is, as clustering does:
    :func:`contrast_floor`) dropped the clusters beside ``droplet``: those that the largest of them (in
    detections) fails, with its count and contrast; or that its detections joined a cluster focused elsewhere."""
    beside = _beside(loose, droplet, reach).sort_values("cluster")
    if not len(beside):
        return "joined a cluster focused elsewhere"
    largest = beside.loc[[beside["detections"].idxmax()]]
    count, contrast = int(largest["detections"].iloc[0]), float(largest["darkest_contrast"].iloc[0])
    floor = contrast_floor(largest, float(config["particles"]["min_contrast"]), config)[0]
    failed = ([f"min_planes ({count})"] if count < int(config["particles"]["min_planes"]) else []) + (
        [f"min_contrast ({contrast:.2f})"] if contrast < floor else [])
    return ", ".join(failed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", nargs="+", type=Path, default=[REPO / "config" / "config.yaml"],
                        help="config files merged in order, as the run's (default: %(default)s)")
    parser.add_argument("--store", type=Path, required=True, help="the split's standardized store (its truth)")
    parser.add_argument("--particles", type=Path, required=True, help="the U-Net's particle CSV of the split")
    parser.add_argument("--detections", type=Path, nargs="+", required=True, help="the split's detection CSVs")
    args = parser.parse_args(argv)
    config = load_config(read_configs(args.configfile))
    lost = where_lost(read_truth(args.store).particles, read_particle_csv(args.particles),
                      read_detections(args.detections), config)
    with pd.option_context("display.max_rows", None, "display.width", 160):
        print(lost.to_string(index=False, float_format=lambda value: f"{value:.1f}"))
    counts = lost["stage"].value_counts().reindex(list(STAGES), fill_value=0)
    print(f"{len(lost)} missed: " + ", ".join(f"{stage} {count}" for stage, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
