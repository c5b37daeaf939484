"""The README's own-file recipe, measured: a model trained on the embedded default (512 x 512 frames) applied
to user files of another frame (768 x 640), one lit flat and one by a Gaussian beam, with the same droplets.

    python benchmarks/own_files.py                 # after `make run`: reuses its trained model
    python benchmarks/own_files.py --holograms 8 --seed 21

Copies the last run's `data/`, `results/` and `.snakemake/` (so the model is not trained again) into
--workdir, simulates the two files with `holopipe simulate` (the default optics, --nx by --ny pixels), points
two file splits at them through a `mine.yaml` merged over config/config.yaml, runs `snakemake evaluate` and
prints, per method, F1 on the flat and the beamed file and their difference (the issue's target: < 0.05).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def simulate(out: Path, args, beam_waist) -> None:
    """A file of the default optics on another frame; beam_waist None is flat illumination."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["optics"].update(nx=args.nx, ny=args.ny)
    config["simulate"]["camera"]["beam_waist"] = beam_waist
    config_path = out.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(config))
    subprocess.run(["holopipe", "simulate", "--config", str(config_path), "--out", str(out),
                    "--n-holograms", str(args.holograms), "--seed", str(args.seed), "--quiet"], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="run directory (default: a new temporary one)")
    parser.add_argument("--holograms", type=int, default=8)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--nx", type=int, default=768)
    parser.add_argument("--ny", type=int, default=640)
    parser.add_argument("--beam-waist", type=float, default=1.0e-3,
                        help="m; 1 mm leaves the corners of a 768 x 640 frame about a fifth of the centre's light")
    parser.add_argument("--cores", default="all")
    args = parser.parse_args()
    if not (REPO / "results" / "model" / "model.pt").is_file():
        sys.exit("own_files.py: no results/model/model.pt; run `make run` first")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="holopipe-own-files-"))
    for name in ("data", "results", ".snakemake"):
        if not (workdir / name).exists():
            shutil.copytree(REPO / name, workdir / name, symlinks=True)
    files = {"flat": workdir / "user" / "flat.nc", "beam": workdir / "user" / "beam.nc"}
    files["flat"].parent.mkdir(parents=True, exist_ok=True)
    simulate(files["flat"], args, None)
    simulate(files["beam"], args, args.beam_waist)
    mine = {"splits": {split: {"source": "file", "path": str(path)} for split, path in files.items()},
            "infer": {"splits": list(files)}}
    (workdir / "mine.yaml").write_text(yaml.safe_dump(mine))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                    str(workdir), "--cores", args.cores, "evaluate", "--configfile",
                    str(REPO / "config" / "config.yaml"), str(workdir / "mine.yaml")], check=True, env=env)
    metrics = {split: json.loads((workdir / "results" / "evaluation" / name).read_text())
               for split, name in (("flat", "metrics.json"), ("beam", "beam/metrics.json"))}
    print(f"\n{args.holograms} holograms of {args.nx} x {args.ny} pixels per file, seed {args.seed}, "
          f"beam waist {args.beam_waist * 1e3:g} mm; model trained on the embedded default (512 x 512)")
    print(f"{'method':10} {'split':6} {'truth':>5} {'found':>5} {'F1':>6} {'P':>6} {'R':>6}")
    for method in ("unet", "baseline"):
        f1 = {}
        for split in files:
            m = metrics[split][method]
            f1[split] = m["f1"]
            print(f"{method:10} {split:6} {m['n_true']:5d} {m['n_predicted']:5d} {m['f1']:6.3f} "
                  f"{m['precision']:6.3f} {m['recall']:6.3f}")
        print(f"{method:10} |F1 flat - F1 beam| = {abs(f1['flat'] - f1['beam']):.3f}")
    print(f"run directory: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
