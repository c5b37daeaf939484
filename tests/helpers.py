"""Builders shared by the end-to-end tests: the tiny config and a Snakemake run against the repository's
Snakefile (imported by the test modules; pytest puts tests/ on the path)."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

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
    """Run Snakemake in `workdir` with `config`, written in its own order as a user writes a file (splits
    too); jobs find the `holopipe` command of this interpreter."""
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(configfile), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
