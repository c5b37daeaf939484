"""The workflow's propagation against a warmed bare FFT of the same padded grid, per array library.

    python benchmarks/bench_propagate.py                          # config/holodec.yaml's frame (full on a GPU)
    python benchmarks/bench_propagate.py --frame 1024x1024 --threads 1 --repeats 3

The frame is what the config's ``regrid`` makes of its ``optics`` camera frame (:func:`holopipe.data.regrid.plan_axis`:
4872 x 3248 -> 5120 x 3584 for ``config/holodec.yaml``), padded by ``reconstruction.pad`` with its band limit;
``--frame`` crops it (CPU figures). The workflow's path is a :class:`holopipe.optics.propagation.Propagator` of a
contrast hologram (one forward FFT) and ``reconstruct`` (transfer function, inverse FFT, amplitude and phase) over the
plane grid in batches of ``infer.batch_planes``; the references are the same library's bare FFTs
(:func:`holopipe.optics.propagation.fft2` / ``ifft2``) of a batch of the padded grid, warmed: the inverse FFT alone
(what a plane costs at the least) and the fft2 + ifft2 round trip; and, on a second line, the inverse FFT of one plane
at a time (no batch-sized output to page in: the stricter floor, since the workflow sweeps plane by plane). Prints
ms/plane per library (numpy, torch CPU, torch CUDA and cupy where present) and the ratios reference / workflow (1
means as fast as the bare FFT). ``--repeats`` times each figure that many times and keeps the best: on a shared
machine other jobs only ever add time.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
from bench_infer import CPU_FRAME, REPO, parse_frame  # this folder is the script's first sys.path entry

from holopipe.core.config import load_config
from holopipe.core.device import cpu_threads, use_threads
from holopipe.data.regrid import plan_axis
from holopipe.optics.propagation import Propagator, fft2, hologram_field, ifft2
from holopipe.optics.reconstruction import z_bin_centres


def regridded_frame(config: dict) -> tuple[int, int, float, float]:
    """(nx, ny, dx, dy) of the frame the config's ``regrid`` makes of its ``optics`` camera frame."""
    optics, regrid = config["optics"], config["regrid"]
    plans = [plan_axis(optics[f"n{axis}"], optics[f"d{axis}"], regrid["pixel_pitch"], method=regrid["method"],
                       frame=regrid["frame"], tile=config["examples"]["tile_size"], where=f"config ({axis} axis)")
             for axis in ("x", "y")]
    return plans[0].n_out, plans[1].n_out, plans[0].pitch_out, plans[1].pitch_out


def best_seconds(run, synchronize, calls: int, repeats: int) -> float:
    """Best over ``repeats`` of the wall time of ``calls`` calls of ``run()``, after one warm-up call (FFT plans,
    caches, the allocator)."""
    run()
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench(name: str, image, planes_m: np.ndarray, batch: int, optics: dict, synchronize, repeats: int) -> None:
    """Print the workflow's ms/plane over ``planes_m`` and the bare FFTs' of a ``batch`` of the padded grid and
    of one plane at a time."""
    propagator = Propagator(hologram_field(image, background=1.0), **optics)
    batches = [planes_m[i:i + batch] for i in range(0, planes_m.size, batch)]

    def sweep() -> None:
        for z in batches:
            propagator.reconstruct(z)

    workflow = best_seconds(sweep, synchronize, 1, repeats) / planes_m.size
    size = len(batches[0])  # the workflow's batch (fewer where fewer planes are timed)
    stack = _batch_of(propagator.spectrum, size)
    calls = max(1, len(batches))
    inverse = best_seconds(lambda: ifft2(stack), synchronize, calls, repeats) / size
    round_trip = best_seconds(lambda: ifft2(fft2(stack)), synchronize, calls, repeats) / size
    one_plane = best_seconds(lambda: ifft2(propagator.spectrum), synchronize, planes_m.size, repeats) / planes_m.size
    py, px = propagator.spectrum.shape[-2:]
    print(f"{name:<28} {px} x {py} padded: workflow {workflow * 1e3:8.2f} ms/plane | bare ifft2 "
          f"{inverse * 1e3:8.2f} ms (ratio {inverse / workflow:4.2f}) | bare fft2+ifft2 {round_trip * 1e3:8.2f} ms "
          f"(ratio {round_trip / workflow:4.2f})\n{'':<28} one plane at a time: bare ifft2 {one_plane * 1e3:8.2f} ms "
          f"(ratio {one_plane / workflow:4.2f})", flush=True)


def _batch_of(spectrum, batch: int):
    """A (batch, py, px) stack of copies of ``spectrum``, in its library and device."""
    import array_api_compat

    xp = array_api_compat.array_namespace(spectrum)
    return xp.stack([spectrum] * batch, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config" / "holodec.yaml"))
    parser.add_argument("--frame", type=parse_frame, default="auto",
                        help=f"NXxNY crop of the regridded frame, full, or auto (full with a GPU, else "
                             f"{CPU_FRAME[0]}x{CPU_FRAME[1]})")
    parser.add_argument("--planes", type=int, default=None,
                        help="planes per library, spread over the grid (default: 64 for a GPU library, 4 for a "
                             "CPU one)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch, scipy FFT)")
    parser.add_argument("--repeats", type=int, default=1, help="times each figure is measured; the best is kept")
    args = parser.parse_args()
    if args.threads is not None:
        use_threads(args.threads)
    import torch

    config = load_config(args.config)
    reconstruction, optics = config["reconstruction"], config["optics"]
    gpu = torch.cuda.is_available()
    nx, ny, dx, dy = regridded_frame(config)
    frame = (None if gpu else CPU_FRAME) if args.frame == "auto" else args.frame
    if frame is not None:
        nx, ny = min(frame[0], nx), min(frame[1], ny)
    grid = z_bin_centres(optics["z_min"], optics["z_max"], reconstruction["z_bins"])

    def spread(default: int) -> np.ndarray:
        n_planes = min(args.planes or default, grid.size)
        return grid[np.linspace(0, grid.size - 1, n_planes).round().astype(int)]

    cpu_planes, gpu_planes = spread(4), spread(64)
    batch = int(config["infer"]["batch_planes"])
    settings = dict(wavelength=optics["wavelength"], dx=dx, dy=dy, pad=int(reconstruction["pad"]),
                    band_limit=bool(reconstruction["band_limit"]))
    image = (1 + 0.05 * np.random.default_rng(0).standard_normal((ny, nx))).astype(np.float32)  # contrast I/B
    print(f"{args.config}: frame {nx} x {ny} (dx {dx * 1e6:.2f} µm, dy {dy * 1e6:.2f} µm), pad {settings['pad']}, "
          f"band limit {settings['band_limit']}; {cpu_planes.size} (CPU) / {gpu_planes.size} (GPU) of {grid.size} "
          f"planes in batches of {batch}; "
          f"CPU threads {cpu_threads()} (torch {torch.get_num_threads()}); best of {args.repeats}", flush=True)
    bench("numpy/scipy (CPU)", image, cpu_planes, batch, settings, lambda: None, args.repeats)
    bench("torch (CPU)", torch.from_numpy(image), cpu_planes, batch, settings, lambda: None, args.repeats)
    if gpu:
        bench(f"torch ({torch.cuda.get_device_name()})", torch.from_numpy(image).cuda(), gpu_planes, batch, settings,
              torch.cuda.synchronize, args.repeats)
    if importlib.util.find_spec("cupy") is not None:
        import cupy

        try:
            devices = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError:  # cupy installed, no driver or GPU
            devices = 0
        if devices:
            bench("cupy (GPU)", cupy.asarray(image), gpu_planes, batch, settings, cupy.cuda.Device().synchronize,
                  args.repeats)


if __name__ == "__main__":
    main()
