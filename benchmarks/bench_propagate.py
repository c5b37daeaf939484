"""Propagation speed on a full HOLODEC frame against the bare FFT round trip of the same library.

    python benchmarks/bench_propagate.py [--planes 6] [--batch 2]

Prints, per library and device, milliseconds per plane for: the bare round trip fft2 + ifft2 of the
frame (the reference), a reconstruction sweep with ``Propagator`` (hologram FFT once, planes in
batches), and a single ``propagate`` call (forward FFT + transfer function + inverse FFT), with the
ratio reference / candidate (>= 0.8 is the target; > 1 means faster than the bare round trip).
"""

import argparse
import importlib.util
import time

import numpy as np

from holopipe.optics import Propagator, fft2, ifft2, propagate

NY, NX = 3248, 4872
OPTICS = dict(wavelength=3.55e-7, dx=2.96e-6)


def timed(run, synchronize, repeats: int) -> float:
    run()  # warm-up: plans, caches, allocator
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    synchronize()
    return (time.perf_counter() - start) / repeats


def bench(name, field, planes, batch, synchronize, to_z):
    repeats = max(1, len(planes) // batch)
    bare = timed(lambda: ifft2(fft2(field)), synchronize, repeats)
    propagator = Propagator(field, **OPTICS)
    batches = [to_z(planes[i:i + batch]) for i in range(0, len(planes), batch)]
    sweep_start = time.perf_counter()
    for z in batches:
        propagator(z)
    synchronize()
    sweep = (time.perf_counter() - sweep_start) / len(planes)
    single = timed(lambda: propagate(field, float(planes[0]), **OPTICS), synchronize, repeats)
    print(f"{name:<14} bare fft2+ifft2 {bare * 1e3:8.2f} ms | sweep {sweep * 1e3:8.2f} ms/plane "
          f"(ratio {bare / sweep:4.2f}) | single propagate {single * 1e3:8.2f} ms (ratio {bare / single:4.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planes", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    planes = np.linspace(0.014, 0.158, args.planes)
    hologram = np.random.default_rng(0).random((NY, NX)).astype(np.complex64)
    print(f"frame {NX}x{NY} complex64, {args.planes} planes in batches of {args.batch}")
    bench("numpy (CPU)", hologram, planes, args.batch, lambda: None, np.asarray)

    import torch

    bench("torch (CPU)", torch.from_numpy(hologram), planes, args.batch, lambda: None,
          torch.from_numpy)
    if torch.cuda.is_available():
        gpu_batch = max(args.batch, 8)
        gpu_planes = np.linspace(0.014, 0.158, max(args.planes, 64))
        bench(f"torch ({torch.cuda.get_device_name()})", torch.from_numpy(hologram).cuda(),
              gpu_planes, gpu_batch, torch.cuda.synchronize, lambda z: torch.from_numpy(z).cuda())
    if importlib.util.find_spec("cupy") is not None:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            gpu_planes = np.linspace(0.014, 0.158, max(args.planes, 64))
            bench("cupy (GPU)", cupy.asarray(hologram), gpu_planes, max(args.batch, 8),
                  cupy.cuda.Device().synchronize, cupy.asarray)


if __name__ == "__main__":
    main()
