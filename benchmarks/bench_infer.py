"""Inference speed on a full-size HOLODEC hologram: seconds per hologram over 1000 planes, planes/s, and the
share of propagation, model and post-processing, with the same code path as ``holopipe infer``
(:func:`holopipe.infer.sweep_hologram` + :func:`holopipe.infer.batch_detections`).

    python benchmarks/bench_infer.py                  # GPU if present: all 1000 planes of config/holodec.yaml
    python benchmarks/bench_infer.py --planes 4       # CPU: 4 planes spread over the depth range, extrapolated

Speed only: the model is the default GPU architecture (smp LinkNet, ResNet-18 encoder) with random weights,
and the hologram a random contrast image (1 + 5 % Gaussian noise; ``--simulate`` simulates one with the
config's 500 particles instead, which costs minutes on a CPU). Needs no workflow, no files.
"""

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from holopipe.config import load_config
from holopipe.reconstruction import z_bin_centres
from holopipe.infer import batch_detections, cudnn_autotune, model_segmenter, sweep_hologram
from holopipe.models import build_model, model_stride
from holopipe.simulate import SimulationSettings, simulate_hologram
from holopipe.device import autocast_dtype, resolve_device

REPO = Path(__file__).resolve().parents[1]


def hologram(config: dict, simulate: bool, seed: int = 0) -> np.ndarray:
    """A standardized contrast hologram (ny, nx), float32 with background ~1."""
    rng = np.random.default_rng(seed)
    optics = config["optics"]
    if simulate:
        image, _ = simulate_hologram(rng, SimulationSettings.from_config(config))
        image = image.astype(np.float32)
        return image / image.mean()
    return (1 + 0.05 * rng.standard_normal((optics["ny"], optics["nx"]))).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config" / "holodec.yaml"))
    parser.add_argument("--architecture", default="linknet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--planes", type=int, default=None,
                        help="planes to run, spread over the range (default: all on a GPU, 8 on a CPU)")
    parser.add_argument("--batch-planes", type=int, default=None,
                        help="default: infer.batch_planes on a GPU, 1 on a CPU")
    parser.add_argument("--simulate", action="store_true", help="simulate the hologram instead of random noise")
    args = parser.parse_args()

    config = load_config(args.config)
    device = resolve_device(args.device)
    reconstruction, infer, optics = config["reconstruction"], config["infer"], config["optics"]
    all_planes = z_bin_centres(optics["z_min"], optics["z_max"], reconstruction["z_bins"])
    n_planes = args.planes or (all_planes.size if device.type == "cuda" else 8)
    planes = all_planes[np.linspace(0, all_planes.size - 1, n_planes).round().astype(int)]
    batch = args.batch_planes or (infer["batch_planes"] if device.type == "cuda" else 1)

    model_config = {"architecture": args.architecture, "encoder": args.encoder, "encoder_weights": None,
                    "depth": args.depth}
    model = build_model(model_config, 2).to(device).eval()
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    amp = autocast_dtype(args.precision, device)
    segment = model_segmenter(model, ["amplitude", "phase"], {"contrast_std": 0.2}, model_stride(model_config),
                              amp_dtype=amp, channels_last=cuda)
    image = hologram(config, args.simulate)
    ny, nx = image.shape
    kind = "simulated (500 particles)" if args.simulate else "random (1 + 5 % noise)"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; model: {args.architecture}/{args.encoder} depth {args.depth} (random weights), "
          f"{'autocast ' + str(amp).removeprefix('torch.') if amp else 'fp32'}; hologram: {kind}, {nx} x {ny}, "
          f"pad {reconstruction['pad']}; {n_planes} of {all_planes.size} planes in batches of {batch}")

    found = []
    settings = dict(wavelength=optics["wavelength"], dx=optics["dx"], dy=optics["dy"], pad=reconstruction["pad"],
                    band_limit=reconstruction["band_limit"], threshold=infer["threshold"], device=device)

    def consume(first, rows_cols, values, probability):
        found.extend(batch_detections(rows_cols, values, shape=(ny, nx), min_area=infer["min_area"],
                                      dx=optics["dx"], dy=optics["dy"]))

    with ThreadPoolExecutor(1) as pool, cudnn_autotune(device):
        # Warm-up (cuDNN autotuning, FFT plans, allocator), not timed.
        sweep_hologram(image, planes[:batch], segment, batch_planes=batch, pool=pool, consume=consume, **settings)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        timing = sweep_hologram(image, planes, segment, batch_planes=batch, pool=pool, consume=consume, **settings)
    per_plane = timing.seconds / timing.planes
    shares = timing.shares()
    print(f"{timing.seconds:.2f} s for {timing.planes} planes: {timing.planes_per_second:.3g} planes/s, "
          f"{per_plane * all_planes.size:.1f} s per hologram of {all_planes.size} planes"
          f"{' (extrapolated)' if timing.planes < all_planes.size else ''}")
    print(f"shares of the wall time: propagation {100 * shares['propagation']:.0f} %, model "
          f"{100 * shares['model']:.0f} %, post-processing {100 * shares['postprocess']:.0f} % "
          "(post-processing overlaps the next batch, so the shares may add up to more than 100 %)")
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"({len(found)} plane(s) with detections, random weights: speed only)")


if __name__ == "__main__":
    main()
