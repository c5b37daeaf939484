"""Data preparation per full-size hologram (config/holodec.yaml): simulate, regrid, standardize, augment, timed
on numpy and, where CuPy sees a GPU, on CuPy (issue 21; targets on a GPU: simulation <= 1 s, regrid +
standardize <= 0.2 s per hologram). With ``standardize.stationary: windows`` (the default) standardizing a
hologram also reconstructs it at the two window planes ("window planes"; taking out a dusty window's objects
costs two more propagations per plane, in the holograms that have them): it counts in the standardize figure.

    python benchmarks/bench_dataprep.py [--config config/holodec.yaml] [--frame 4872x3248] [--repeats 2]

Each stage runs the library function the workflow's job runs per hologram (simulate_hologram, regrid's and
standardize's per-hologram blocks, augment_hologram with one variant) on the same hologram; the first CuPy
call of each stage is a warm-up (kernel compilation) and is not timed. ``--frame`` shrinks the frame for a
quick check; a smaller frame keeps the particle density of the config's.
"""

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from holopipe.core.config import load_config
from holopipe.core.device import array_namespace_for
from holopipe.core.io import file_layout
from holopipe.data.augment import augment_hologram, build_corruptions
from holopipe.data.regrid import _regrid_block, plan_axis
from holopipe.data.standardize import WindowPlanes, _contrast_block, _window_amplitude_block, stationary_mode
from holopipe.optics.simulate import SimulationSettings, simulate_hologram

REPO = Path(__file__).resolve().parents[1]


def stages(config: dict, settings: SimulationSettings):
    """name -> function(xp) running that stage on one hologram, all on the same simulated hologram."""
    optics, regrid, tile = settings.optics, config["regrid"], config["examples"]["tile_size"]
    image, _ = simulate_hologram(np.random.default_rng([1, 0]), settings)
    plans = [plan_axis(n, pitch, regrid["pixel_pitch"], method=regrid["method"], frame=regrid["frame"], tile=tile,
                       where=axis) for n, pitch, axis in ((optics.nx, optics.dx, "x"), (optics.ny, optics.dy, "y"))]
    block = file_layout(image)[None]  # (1, xsize, ysize), as a store's chunk
    regridded = _regrid_block(block, *plans, np.float32)
    area = (slice(plans[0].data[0], plans[0].data[1]), slice(plans[1].data[0], plans[1].data[1]))
    standardize = {key: value for key, value in config["standardize"].items() if key != "device"}
    pipeline = build_corruptions(config["augment"]["corruptions"], optics)
    runs = {
        "simulate": lambda xp: simulate_hologram(np.random.default_rng([1, 0]), settings, xp=xp),
        "regrid": lambda xp: _regrid_block(block, *plans, np.float32, xp),
        "standardize": lambda xp: _contrast_block(regridded, settings=standardize, where="bench", area=area, xp=xp),
        "augment": lambda xp: augment_hologram(image.astype(np.float32), pipeline, seed=0, hologram=0, variants=1,
                                               xp=xp),
    }
    if stationary_mode(standardize) == "windows":
        contrast = _contrast_block(regridded, settings=standardize, where="bench", area=area)
        windows = WindowPlanes((optics.z_min, optics.z_max), optics.wavelength, plans[0].pitch_out,
                               plans[1].pitch_out)
        runs["window planes"] = lambda xp: _window_amplitude_block(contrast, windows, xp)
    return runs


def seconds(run, xp, repeats: int, synchronize) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(xp)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config" / "holodec.yaml"))
    parser.add_argument("--frame", help="NXxNY instead of the config's frame (a quick check)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = load_config(args.config)
    settings = SimulationSettings.from_config(config)
    if args.frame:
        nx, ny = (int(v) for v in args.frame.lower().split("x"))
        scale = nx * ny / (settings.optics.nx * settings.optics.ny)
        low, high = settings.particles
        settings = dataclasses.replace(settings, optics=dataclasses.replace(settings.optics, nx=nx, ny=ny),
                                       particles=(max(1, round(low * scale)), max(1, round(high * scale))))
    o = settings.optics
    print(f"{o.nx}x{o.ny} frame, {settings.particles[0]}-{settings.particles[1]} particles, "
          f"{settings.method}, pad {settings.pad}; best of {args.repeats}")
    runs = stages(config, settings)
    namespaces = [("numpy (CPU)", array_namespace_for("cpu", "bench"), lambda: None)]
    try:
        xp = array_namespace_for("cuda", "bench")
        import cupy

        namespaces.append(("CuPy (GPU)", xp, lambda: cupy.cuda.Device().synchronize()))
    except RuntimeError as exc:
        print(f"no CuPy run: {exc}")
    for label, xp, synchronize in namespaces:
        if label.startswith("CuPy"):
            for run in runs.values():
                run(xp)  # warm-up: CuPy compiles its kernels on first use
        timings = {name: seconds(run, xp, args.repeats, synchronize) for name, run in runs.items()}
        print(f"{label}: " + ", ".join(f"{name} {value:.3f} s" for name, value in timings.items())
              + "; regrid + standardize "
              f"{timings['regrid'] + timings['standardize'] + timings.get('window planes', 0):.3f} s per hologram")


if __name__ == "__main__":
    main()
