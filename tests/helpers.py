"""Builders shared by the tests (pytest puts tests/ on the path; no test module imports another): the tiny
config and a Snakemake run against the repository's Snakefile; small synthetic scenes (optics, droplets,
their noise-free contrast holograms and split stores) on which the baseline, the particles stage and the
label tools are measured; the PBS emulator's environment and records."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path, PurePath

import numpy as np
import pandas as pd
import xarray as xr
import yaml

from holopipe.core.config import load_config
from holopipe.core.io import write_zarr
from holopipe.optics.propagation import Propagator, hologram_field
from holopipe.optics.reconstruction import z_bin_centres
from holopipe.optics.simulate import Optics, ParticleSet, opaque_disks_field

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


OPTICS = Optics(wavelength=3.55e-7, dx=2.96e-6, dy=2.96e-6, nx=128, ny=128, z_min=2e-3, z_max=10e-3)
# Three isolated droplets (25-40 µm, 3-9 mm, > 80 µm from the edges and > 170 µm apart), metres.
PARTICLES = ParticleSet(x=np.array([-90e-6, 85e-6, -10e-6]), y=np.array([-85e-6, -60e-6, 95e-6]),
                        z=np.array([3.5e-3, 6.2e-3, 8.5e-3]), d=np.array([25e-6, 32e-6, 40e-6]))
Z_BINS, PAD = 60, 32


def scene_dict(optics: Optics = OPTICS, **sections) -> dict:
    """The (unvalidated) config of these optics and planes, with the given sections."""
    return {
        "splits": {"test": {"source": "simulate", "n_holograms": 2, "seed": 1}},
        "optics": {"wavelength": optics.wavelength, "dx": optics.dx, "dy": optics.dy, "nx": optics.nx,
                   "ny": optics.ny, "z_min": optics.z_min, "z_max": optics.z_max},
        "reconstruction": {"z_bins": Z_BINS, "pad": PAD},
        **sections,
    }


def scene_config(**sections):
    """A validated config of these optics and planes, with the given sections."""
    return load_config(scene_dict(**sections))


def contrast_hologram(particles: ParticleSet, optics: Optics = OPTICS) -> np.ndarray:
    """Noise-free, flat-beam contrast hologram I / mean(I), float32 (ny, nx)."""
    intensity = np.abs(opaque_disks_field(particles, optics, pad=PAD)) ** 2
    return (intensity / intensity.mean()).astype(np.float32)


def truth_table(particles: ParticleSet, hid: int = 1) -> pd.DataFrame:
    return pd.DataFrame({"hid": hid, "x": particles.x * 1e6, "y": particles.y * 1e6, "z": particles.z * 1e6,
                         "d": particles.d * 1e6})


def propagator_of(image_yx, optics: Optics = OPTICS) -> Propagator:
    """The propagator of a contrast hologram (numpy or torch, (ny, nx))."""
    return Propagator(hologram_field(image_yx, background=1.0), wavelength=optics.wavelength, dx=optics.dx,
                      dy=optics.dy, pad=PAD, band_limit=True)


def split_store(path, images_yx, optics: Optics = OPTICS, truth: pd.DataFrame | None = None):
    """A standardized split store of contrast holograms (h, ny, nx) with these optics."""
    truth = truth if truth is not None else pd.DataFrame({name: np.zeros(0) for name in ("hid", "x", "y", "z", "d")})
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), np.asarray(images_yx).transpose(0, 2, 1)),
         **{name: ("particle", truth[name].to_numpy(np.float32)) for name in ("hid", "x", "y", "z", "d")}},
        attrs={"Nx": optics.nx, "Ny": optics.ny, "dx": optics.dx, "dy": optics.dy, "lambda": optics.wavelength,
               "zMin": optics.z_min, "zMax": optics.z_max},
    )
    return write_zarr(ds, path)


def found_um(found: pd.DataFrame, hid: int = 1) -> pd.DataFrame:
    """find_particles' table (metres) as a CSV's (µm, with hid)."""
    return found.assign(hid=hid, **{c: found[c] * 1e6 for c in "xyzd"})


PLANES = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)


# A non-square frame with dx != dy: rows are y (pitch dy), columns x (pitch dx); the droplets sit where
# swapping x and y would put them far from any droplet.
WIDE = replace(OPTICS, nx=176, ny=112, dy=3.6e-6)
WIDE_PARTICLES = ParticleSet(x=np.array([-170e-6, 150e-6]), y=np.array([100e-6, -45e-6]),
                             z=np.array([4.0e-3, 7.5e-3]), d=np.array([30e-6, 36e-6]))
WIDE_PLANES = z_bin_centres(WIDE.z_min, WIDE.z_max, Z_BINS)


# The PBS emulator (tests/pbs_emulator): qsub, qstat and qdel that run jobs locally and record them.
PROFILE = REPO / "profiles" / "pbs"
EMULATOR = REPO / "tests" / "pbs_emulator"
FAST = ("--seconds-between-status-checks", "1", "--max-status-checks-per-second", "20", "--latency-wait", "5")


def pbs_env(emulator_dir: Path, account: str | None = "test", **extra: str) -> dict:
    """Environment with the emulator's qsub/qstat/qdel and this interpreter's bin first on PATH."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PBS_")}
    env["PATH"] = os.pathsep.join([str(EMULATOR), str(Path(sys.executable).parent), env["PATH"]])
    env["PBS_EMULATOR_DIR"] = str(emulator_dir)
    if account is not None:
        env["PBS_ACCOUNT"] = account
    return {**env, **extra}


def snakemake_command(workdir: Path | None, snakefile: Path, *args: str) -> list[str]:
    """The Snakemake command line through the PBS profile; without `workdir` it runs where it is started."""
    directory = ["--directory", str(workdir)] if workdir else []
    return [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), *directory,
            "--profile", str(PROFILE), *FAST, *args]


def submissions(emulator_dir: Path) -> list[dict]:
    log = emulator_dir / "submissions.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def job_state(emulator_dir: Path, job_id: str) -> dict:
    return json.loads((emulator_dir / "jobs" / f"{job_id}.json").read_text())


def walltime_minutes(job: dict) -> float:
    hours, minutes, seconds = map(int, job["resources"]["walltime"].split(":"))
    return hours * 60 + minutes + seconds / 60


def starts_snakemake(args) -> bool:
    """Whether a subprocess command line runs Snakemake (``snakemake …`` or ``python -m snakemake …``)."""
    words = [os.fspath(word) for word in args] if isinstance(args, (list, tuple)) else str(args).split()
    return any(PurePath(word).name == "snakemake" for word in words)
