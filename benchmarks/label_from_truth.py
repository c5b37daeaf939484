"""Label a simulated split's candidates from its truth, standing in for a person at ``holopipe label``: a
candidate is a particle (confidence 5) iff it matches a true particle within the evaluation tolerances. After
``make run``, then ``snakemake --cores 2 evaluate`` reruns the evaluation with these labels, and the report's
"Hand labels" table should show, per method, the precision and recall the truth gives on the same candidates.

    python benchmarks/label_from_truth.py [--split test] [--labeller truth]
"""

import argparse
from pathlib import Path

from holopipe.core.io import open_holodec, particle_table
from holopipe.evaluation.labels import LabelFile, open_candidates
from holopipe.evaluation.matching import match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="test")
    parser.add_argument("--labeller", default="truth")
    args = parser.parse_args()
    candidates = open_candidates(Path("results/labels") / args.split / "candidates")
    manifest = candidates.manifest
    with open_holodec(Path("data/standardized") / f"{args.split}.zarr") as store:
        truth = particle_table(store)
    pairs = match(truth, candidates.table, manifest["tolerance_xy_um"] * 1e-6, manifest["tolerance_z_um"] * 1e-6)
    particles = set(candidates.table.loc[pairs["pred_index"], "candidate"])
    labels = LabelFile(Path("labels") / args.split / f"{args.labeller}.csv", candidates)
    for candidate in candidates.table["candidate"]:
        labels.add(candidate, "particle" if candidate in particles else "not_particle", 5)
    print(f"{labels.path}: {len(particles)} of {len(candidates.table)} candidates labelled particles")


if __name__ == "__main__":
    main()
