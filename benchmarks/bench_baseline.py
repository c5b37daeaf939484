"""Baseline and depth refinement per plane on a full-size HOLODEC frame, on the CPU (or a GPU).

    python benchmarks/bench_baseline.py [--planes 8 16] [--particles 500] [--device cpu] [--before]
    python benchmarks/bench_baseline.py --compare-default 10

The frame is config/holodec.yaml's as the workflow reconstructs it: 4872 x 3248 regridded to
5120 x 3584 (``regrid.frame: pad``), padded by ``reconstruction.pad`` (256) on each side, band-limited.
The hologram is simulated (holopipe.optics.simulate's angular spectrum through 5 mm slabs, holodec.yaml's
gamma diameters, Poisson and read noise, flat beam) with ``--particles`` droplets over that frame and
divided by its mean (a standardized contrast hologram); simulating it takes about a minute.

For each plane count (evenly spaced planes of the 1000 of 14-158 mm) it prints wall seconds per plane
(and, in brackets, CPU seconds per plane of all threads: a figure that other jobs on the node disturb
less) of: the bare reconstruction (amplitude of one plane, no phase: the floor of both stages),
``find_particles`` (its threshold sample of up to 8 planes included: compare the slope between two
plane counts for the marginal cost), and ``refine_depths`` with every particle searched on every plane (the worst case:
500 particles per plane). ``--before`` also times the modules of ``--before-commit`` (checked out from git
into a temporary package), the code before the baseline and refinement were batched on the device.

``--compare-default N`` instead runs the baseline before and after on the first N holograms of the
embedded default's test split (config/config.yaml, seed 13: its 2 test holograms and more from the same
stream), flat-fielded by the simulated beam, and prints both tables' F1 against the truth and how many
particles are identical.
"""

import argparse
import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from holopipe.core.config import load_config
from holopipe.core.device import array_mover
from holopipe.core.io import file_layout, open_holodec, particle_table, write_zarr
from holopipe.evaluation.matching import match
from holopipe.optics.focus import reconstructed_amplitude
from holopipe.optics.propagation import device_planes_per_batch
from holopipe.optics.reconstruction import hologram_propagator, z_bin_centres
from holopipe.optics.simulate import (
    Camera,
    Optics,
    SimulationSettings,
    beam_profile,
    camera_image,
    opaque_disks_field,
    sample_particles,
    simulate_file,
)

REPO = Path(__file__).resolve().parents[1]
FRAME = (3584, 5120)  # (ny, nx) after regrid.frame: pad
BEFORE_COMMIT = "0ea014f"
"""The last commit with the per-plane numpy baseline and the per-particle refinement loop."""


def full_size_config() -> dict:
    config = load_config(REPO / "config" / "holodec.yaml")
    config["optics"].update(ny=FRAME[0], nx=FRAME[1])
    return config


def simulated_hologram(config: dict, n_particles: int):
    """(contrast hologram (ny, nx) float32, particles table in metres) over the full-size frame."""
    settings = SimulationSettings.from_config(config)
    o = config["optics"]
    optics = Optics(o["wavelength"], o["dx"], o["dy"], o["nx"], o["ny"], o["z_min"], o["z_max"])
    rng = np.random.default_rng(0)
    settings = SimulationSettings(optics=optics, particles=(n_particles, n_particles), diameter=settings.diameter,
                                  camera=Camera(True, 2.0e4, 12.0, 128.0, None), method="angular_spectrum",
                                  slab_thickness=5.0e-3, pad=0, band_limit=True)
    particles = sample_particles(rng, settings)
    field = opaque_disks_field(particles, optics, slab_thickness=settings.slab_thickness, band_limit=True)
    image = camera_image(field, rng, optics, settings.camera).astype(np.float32)
    table = pd.DataFrame({"x": particles.x, "y": particles.y, "d": particles.d, "z": particles.z})
    return image / image.mean(), table


def before_modules(commit: str, directory: Path):
    """The baseline and particles modules of ``commit``, importable beside today's holopipe: the commit's whole
    package, renamed ``holopipe_before``, so that they run with the helpers of their own time (the layout and
    some signatures have changed since, e.g. which axis order a hologram is passed in)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src/holopipe"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    package = directory / "holopipe_before"
    (directory / "src" / "holopipe").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bholopipe(?=[.\s])", "holopipe_before", path.read_text()))
    sys.path.insert(0, str(directory))
    layer = "detect." if (package / "detect").is_dir() else ""
    return (importlib.import_module(f"holopipe_before.{layer}baseline"),
            importlib.import_module(f"holopipe_before.{layer}particles"))


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all the process's threads) of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare_on_default(n_holograms: int, before_commit: str) -> None:
    """Baseline tables before and after on the default config's test-split holograms."""
    config = load_config(REPO / "config" / "config.yaml")
    settings = SimulationSettings.from_config(config)
    work = Path(tempfile.mkdtemp())
    ds = open_holodec(str(simulate_file(work / "test.nc", n_holograms=n_holograms,
                                        seed=config["splits"]["test"]["seed"], settings=settings, progress=False)))
    images = ds["image"].values / file_layout(beam_profile(settings.optics, settings.camera.beam_waist))[None]
    store = write_zarr(ds.assign(image=(ds["image"].dims, (images / images.mean(axis=(1, 2), keepdims=True))
                                        .astype(np.float32))), work / "test.zarr")
    truth = particle_table(ds)
    old_baseline, _ = before_modules(before_commit, work / "before")
    import holopipe.detect.baseline as baseline

    tolerance = config["evaluate"]["tolerance_xy"], config["evaluate"]["tolerance_z"]
    tables = {}
    for name, module in (("before", old_baseline), ("after", baseline)):
        tables[name] = table = pd.read_csv(module.baseline_file(config, store, work / f"{name}.csv", progress=False))
        pairs = match(truth, table, *tolerance)
        rmse = {c: float(np.sqrt(np.mean(pairs[f"error_{c}"] ** 2))) for c in "xyzd"}
        print(f"{name:<7}{len(table)} particles of {len(truth)}, matched {len(pairs)}, "
              f"F1 {2 * len(pairs) / (len(table) + len(truth)):.3f}, RMSE (µm) "
              + ", ".join(f"{c} {v:.1f}" for c, v in rmse.items()))
    same = match(tables["before"], tables["after"], 1e-9, 1e-9)  # within 1e-3 µm
    print(f"identical particles (within 1e-3 µm): {len(same)} of {len(tables['before'])} before, "
          f"{len(tables['after'])} after")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--particles", type=int, default=500)
    parser.add_argument("--device", default="cpu", help="baseline.device / particles.device (cpu: numpy)")
    parser.add_argument("--before", action="store_true", help="also time the code of --before-commit")
    parser.add_argument("--before-commit", default=BEFORE_COMMIT)
    parser.add_argument("--compare-default", type=int, metavar="N",
                        help="compare the tables before and after on N default test-split holograms instead")
    args = parser.parse_args()
    if args.compare_default:
        compare_on_default(args.compare_default, args.before_commit)
        return

    config = full_size_config()
    reconstruction = config["reconstruction"]
    config["baseline"]["device"] = config["particles"]["device"] = args.device
    start = time.perf_counter()
    image_yx, truth = simulated_hologram(config, args.particles)
    print(f"simulated {len(truth)} particles on {FRAME[1]}x{FRAME[0]} (+{reconstruction['pad']} pad) "
          f"in {time.perf_counter() - start:.0f} s")
    attrs = {"lambda": config["optics"]["wavelength"], "dx": config["optics"]["dx"], "dy": config["optics"]["dy"]}
    dx, dy = attrs["dx"], attrs["dy"]
    grid = z_bin_centres(config["optics"]["z_min"], config["optics"]["z_max"], int(reconstruction["z_bins"]))
    mover = array_mover(args.device, "particles.device")
    propagator = hologram_propagator(image_yx, attrs, reconstruction, to_device=mover)
    print(f"{args.device}: {device_planes_per_batch(propagator)} planes per batch (device_planes_per_batch)")
    import holopipe.detect.baseline as baseline
    import holopipe.detect.particles as particles

    stages = {"after": (baseline, particles, propagator)}
    if args.before:
        old_baseline, old_particles = before_modules(args.before_commit, Path(tempfile.mkdtemp()))
        numpy_propagator = hologram_propagator(image_yx, attrs, reconstruction)  # the old code ran on numpy
        stages = {"before": (old_baseline, old_particles, numpy_propagator), **stages}
    print(f"{'code':<7}{'planes':>7}{'reconstruct':>16}{'baseline':>16}{'refine':>16}   "
          "(wall [CPU] seconds per plane)")
    for n_planes in args.planes:
        planes = grid[np.unique(np.linspace(0, grid.size - 1, n_planes).round().astype(int))]
        extent = truth.assign(z_first=planes[0], z_last=planes[-1])
        settings = {**config["particles"], "refine_margin": 0.0}
        for name, (baseline_module, particles_module, sweep) in stages.items():
            bare = timed(lambda: [reconstructed_amplitude(sweep, planes[i:i + 1]) for i in range(planes.size)])
            found = []
            base = timed(lambda: found.append(baseline_module.find_particles(
                sweep, planes, config["baseline"], dx=dx, dy=dy)))
            refine = timed(lambda: particles_module.refine_depths(sweep, planes, extent, settings, dx=dx, dy=dy))
            figures = "".join(f"{wall / planes.size:>9.2f} [{cpu / planes.size:4.2f}]"
                              for wall, cpu in (bare, base, refine))
            print(f"{name:<7}{planes.size:>7}{figures}   ({len(found[0])} baseline particles)")


if __name__ == "__main__":
    main()
