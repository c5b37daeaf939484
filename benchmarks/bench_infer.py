"""A full-size hologram through what the workflow runs: inference, depth refinement and the baseline, timed.

    python benchmarks/bench_infer.py                          # GPU: config/holodec.yaml, the whole frame, all planes
    python benchmarks/bench_infer.py --threads 2              # CPU: a 1024 x 1024 crop, 4 planes, extrapolated
    python benchmarks/bench_infer.py --frame 2048x1536 --planes 16 --model results/model/model.pt

Everything comes from the config (default ``config/holodec.yaml``): the model's architecture, encoder and
depth (random weights, ``encoder_weights`` forced to null so nothing downloads, written to a temporary
``model.pt``; ``--model`` takes a trained one instead), loaded as ``holopipe infer`` loads it
(:func:`holopipe.detect.infer.load_segmenter`: batch norms folded, channels-last, ``infer.compile``); the hologram
of ``optics`` and ``simulate`` (500 particles; simulated once and cached under ``--cache``, since it costs
minutes on a CPU), regridded and standardized as the workflow does (:func:`holopipe.data.regrid.regrid_dataset`,
:func:`holopipe.data.standardize.contrast_images`); its ``reconstruction`` padding, band limit and plane grid
(:func:`holopipe.optics.reconstruction.z_bin_centres`); ``infer.batch_planes``, ``precision`` and ``threshold``.
The sweep is :func:`holopipe.detect.sweep.sweep_hologram`, as ``holopipe infer`` calls it. ``--frame`` crops the
standardized frame about its centre (the truth particles inside it are kept), for CPU figures.

Prints seconds per hologram (the inference sweep extrapolated to every plane when ``--planes`` is less, saying
so, plus the refinement), planes/s, the shares of propagation, model, post-processing and refinement, and the
peak GPU memory of each stage; then times the baseline (:func:`holopipe.detect.baseline.find_particles`) on the same
device and planes. The refinement (:func:`holopipe.detect.particles.refine_depths` over the whole plane grid, as
``holopipe particles`` runs it) refines the particles clustered from the detections (``--refine-on detections``,
the default with ``--model``) or the simulated particles, each searched about its true depth (the default with
random weights, whose detections are noise, not droplets): the output says which.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from holopipe.core.config import load_config
from holopipe.core.device import array_mover, autocast_dtype, describe_device, resolve_device, use_threads
from holopipe.core.io import IMAGE_DIMS, file_layout, hologram_image_yx, open_holodec
from holopipe.data.regrid import regrid_dataset
from holopipe.data.standardize import WindowPlanes, contrast_images
from holopipe.detect import infer, sweep
from holopipe.detect.baseline import find_particles
from holopipe.detect.particles import cluster_detections, refine_depths
from holopipe.ml.models import MODEL_FORMAT, build_model, model_stride
from holopipe.optics.reconstruction import hologram_propagator, z_bin_centres
from holopipe.optics.simulate import SimulationSettings, simulate_hologram

REPO = Path(__file__).resolve().parents[1]
CPU_FRAME = (1024, 1024)
"""(nx, ny) of the default crop without a GPU: a full-size plane needs about 9 GB of host memory per batch slot."""
CPU_PLANES = 4


def simulated_hologram(config: dict, cache: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image (ny, nx), particles (n, 4): x, y, z, d in m) of the config's simulator, cached in ``cache``
    under a name that hashes the ``optics`` and ``simulate`` sections and the seed."""
    key = hashlib.sha256(json.dumps([config["optics"], config["simulate"], seed], sort_keys=True).encode())
    path = cache / f"hologram-{key.hexdigest()[:16]}.npz"
    if not path.is_file():
        print(f"simulating the hologram (cached in {path}; minutes on a CPU) ...", flush=True)
        image, particles = simulate_hologram(np.random.default_rng(seed), SimulationSettings.from_config(config))
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, image=image, particles=np.column_stack([particles.x, particles.y, particles.z, particles.d]))
        tmp.replace(path)
    with np.load(path) as stored:
        return stored["image"], stored["particles"]


def standardized_frame(image_yx: np.ndarray, particles_m: np.ndarray, config: dict) -> tuple[xr.Dataset, dict]:
    """The hologram as the workflow hands it to inference: regridded and standardized, one hologram in the
    contract layout (``image`` (1, xsize, ysize) float32 contrast, particles in µm), and its attrs."""
    optics = config["optics"]
    x, y, z, d = (1e6 * particles_m[:, k] for k in range(4))
    raw = xr.Dataset(
        {"image": (IMAGE_DIMS, file_layout(image_yx)[None]), "hid": ("particle", np.ones(x.size, np.float32)),
         **{name: ("particle", values.astype(np.float32)) for name, values in zip("xyzd", (x, y, z, d))}},
        attrs={"Nx": image_yx.shape[1], "Ny": image_yx.shape[0], "dx": optics["dx"], "dy": optics["dy"],
               "lambda": optics["wavelength"], "zMin": optics["z_min"], "zMax": optics["z_max"]})
    regridded = regrid_dataset(open_holodec(raw.chunk({"hologram_number": 1})), config, source="simulated")
    contrast = contrast_images(regridded["image"].data, config["standardize"], "simulated",
                               windows=WindowPlanes.of(regridded.attrs)).compute()
    return regridded.assign(image=(IMAGE_DIMS, contrast)), dict(regridded.attrs)


def centre_crop(ds: xr.Dataset, frame: tuple[int, int] | None) -> xr.Dataset:
    """``ds`` cropped about its centre to ``frame`` (nx, ny) pixels, with the particles inside it (µm from the
    new centre); the whole frame for None or a frame at least as large."""
    nx, ny = ds.sizes["xsize"], ds.sizes["ysize"]
    if frame is None or (frame[0] >= nx and frame[1] >= ny):
        return ds
    width, height = min(frame[0], nx), min(frame[1], ny)
    x0, y0 = (nx - width) // 2, (ny - height) // 2
    dx_um, dy_um = 1e6 * float(ds.attrs["dx"]), 1e6 * float(ds.attrs["dy"])
    # The new frame centre in the old frame's coordinates (µm): pixel i's centre is (i + 0.5 - n/2) pitch.
    x = ds["x"].values - (x0 + width / 2 - nx / 2) * dx_um
    y = ds["y"].values - (y0 + height / 2 - ny / 2) * dy_um
    inside = (np.abs(x) <= width * dx_um / 2) & (np.abs(y) <= height * dy_um / 2)
    cropped = ds.isel(xsize=slice(x0, x0 + width), ysize=slice(y0, y0 + height))
    cropped = cropped.assign(x=("particle", x.astype(np.float32)), y=("particle", y.astype(np.float32)))
    return cropped.isel(particle=np.flatnonzero(inside)).assign_attrs(Nx=width, Ny=height)


def random_model_file(config: dict, path: Path, device: torch.device, first_batch, amp_dtype, threshold: float,
                      fraction: float, contrast_std: float, seed: int) -> str:
    """Write the config's model with random weights (``encoder_weights`` null: nothing downloads) to ``path``
    as a ``model.pt`` (:func:`holopipe.ml.models.load_model`'s format), its output bias calibrated on
    ``first_batch`` (amplitude, phase) by :func:`calibrate_output_bias`; returns its description. ``seed`` seeds
    the weights."""
    torch.manual_seed(seed)
    model_config = {**config["model"], "encoder_weights": None}
    channels = list(config["examples"]["channels"])
    model = build_model(model_config, len(channels)).to(device).eval()
    stride, stats = model_stride(model_config), {"contrast_std": contrast_std}
    shift = calibrate_output_bias(model, sweep.model_segmenter(model, channels, stats, stride, amp_dtype=amp_dtype),
                                  *first_batch, threshold, fraction)
    torch.save({"format": MODEL_FORMAT, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "model": model_config, "in_channels": len(channels), "channel_names": channels, "stride": stride,
                "stats": stats}, path)
    name = model_config["architecture"]
    if name != "plain_unet":  # the one architecture without an encoder
        name += f"/{model_config.get('encoder')}"
    return (f"{name} depth {model_config.get('depth')}, random weights, output bias shifted by {shift:+.2f} so that "
            f"{fraction:g} of the first batch's pixels exceed the threshold")


def calibrate_output_bias(model: torch.nn.Module, segment, amplitude: torch.Tensor, phase: torch.Tensor,
                          threshold: float, fraction: float) -> float:
    """Shift the bias of the model's last one-channel convolution (its output layer) so that ``fraction`` of
    the pixels of ``amplitude``/``phase`` (B, ny, nx) exceed ``threshold``; returns the shift (logits).

    Random weights put about half of all pixels, or none, above any threshold; a trained model marks a few
    droplet shadows. The shift gives the host's post-processing a realistic number of pixels to group
    (speed only: the detections stay noise)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1
             and m.bias is not None]
    if not heads:
        raise ValueError("calibrate_output_bias: the model has no one-channel output convolution with a bias")
    logits = segment(amplitude, phase).flatten()
    sample = logits[::max(1, logits.numel() // 2**22)].float().cpu().numpy()  # ~4 M values: the quantile's
    cut = float(np.quantile(sample, 1 - fraction))
    shift = float(np.log(threshold / (1 - threshold))) - cut
    with torch.no_grad():
        heads[-1].bias += shift
    return shift


def peak_memory(device: torch.device) -> str:
    """The stage's peak GPU memory since the last reset (and resets it); empty on the CPU."""
    if device.type != "cuda":
        return ""
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return f", peak GPU memory {peak:.1f} GiB"


def parse_frame(text: str) -> tuple[int, int] | str | None:
    """``--frame``: (nx, ny) from NXxNY, None for full, "auto" for auto (full with a GPU, else :data:`CPU_FRAME`)."""
    if text in ("auto", "full"):
        return None if text == "full" else text
    try:
        nx, ny = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frame must be NXxNY (e.g. 1024x1024), full or auto, got {text!r}") \
            from None
    return nx, ny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config" / "holodec.yaml"))
    parser.add_argument("--model", default=None, help="a trained model.pt (default: the config's, random weights)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frame", type=parse_frame, default="auto",
                        help=f"NXxNY crop of the standardized frame, full, or auto (full on a GPU, "
                             f"{CPU_FRAME[0]}x{CPU_FRAME[1]} on a CPU)")
    parser.add_argument("--planes", type=int, default=None,
                        help=f"planes to infer, spread over the range (default: all on a GPU, {CPU_PLANES} on a CPU)")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "out" / "cache",
                        help="folder of the cached simulated hologram")
    parser.add_argument("--seed", type=int, default=0, help="of the simulated hologram and the random weights")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch, scipy FFT)")
    parser.add_argument("--refine-on", choices=["auto", "detections", "truth"], default="auto",
                        help="particles to refine: those clustered from the detections, or the simulated ones "
                             "(default: detections with --model, else truth; truth too where none was detected)")
    parser.add_argument("--positive-fraction", type=float, default=1e-4,
                        help="random weights: the share of pixels made to exceed the threshold (default 1e-4, "
                             "about what 500 droplets marked over their depth of focus cover)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: the config's infer.compile)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline's timing")
    args = parser.parse_args()
    if args.threads is not None:
        use_threads(args.threads)

    config = load_config(args.config)
    infer_settings, reconstruction = config["infer"], config["reconstruction"]
    device = resolve_device(args.device, "--device")
    cuda = device.type == "cuda"
    frame = (None if cuda else CPU_FRAME) if args.frame == "auto" else args.frame
    ds, attrs = standardized_frame(*simulated_hologram(config, args.cache, args.seed), config)
    ds = centre_crop(ds, frame)
    image_yx = hologram_image_yx(ds, 0)
    ny, nx = image_yx.shape
    dx, dy = float(attrs["dx"]), float(attrs["dy"])
    truth = pd.DataFrame({name: 1e-6 * ds[name].values.astype(np.float64) for name in "xyzd"})

    all_planes = z_bin_centres(float(attrs["zMin"]), float(attrs["zMax"]), int(reconstruction["z_bins"]))
    n_planes = min(args.planes or (all_planes.size if cuda else CPU_PLANES), all_planes.size)
    chosen = np.linspace(0, all_planes.size - 1, n_planes).round().astype(int)
    planes = all_planes[chosen]
    batch = int(infer_settings["batch_planes"])
    amp = autocast_dtype(infer_settings["precision"], device)
    threshold = float(infer_settings["threshold"])
    compile_model = bool(infer_settings["compile"]) if args.compile is None else args.compile
    with tempfile.TemporaryDirectory() as tmp:
        model_path, what = args.model, str(args.model)
        if model_path is None:
            first = hologram_propagator(image_yx, attrs, reconstruction,
                                        to_device=lambda a: torch.from_numpy(a).to(device)).reconstruct(planes[:batch])
            model_path = Path(tmp) / "model.pt"
            what = random_model_file(config, model_path, device, first, amp, threshold, args.positive_fraction,
                                     float(image_yx.std()), args.seed)  # contrast_std: this hologram's
            del first
        # As holopipe infer loads it: batch norms folded, channels-last on a GPU, autocast, optionally compiled.
        segment = infer.load_segmenter(model_path, device, infer_settings["precision"], compile=compile_model,
                                       batch_planes=batch)
    print(f"device: {describe_device(device, amp)}\nmodel: {what}{', torch.compile' if compile_model else ''}\n"
          f"hologram: simulated, {len(truth)} particles in {nx} x {ny} (regridded frame {attrs['Nx']} x "
          f"{attrs['Ny']}), pad {reconstruction['pad']}, band limit {reconstruction['band_limit']}; {n_planes} of "
          f"{all_planes.size} planes in batches of {batch}, threshold {threshold}", flush=True)

    found: list[pd.DataFrame] = []

    def consume(first, rows_cols, values, probability):
        for slot, table in sweep.batch_detections(rows_cols, values, shape=(ny, nx),
                                                  min_area=int(infer_settings["min_area"]), dx=dx, dy=dy):
            found.append(table.assign(hid=1, plane=int(chosen[first + slot]), z=planes[first + slot] * 1e6))

    settings = dict(wavelength=float(attrs["lambda"]), dx=dx, dy=dy, pad=int(reconstruction["pad"]),
                    band_limit=bool(reconstruction["band_limit"]), batch_planes=batch,
                    threshold=threshold, device=device)
    with ThreadPoolExecutor(1) as pool, sweep.cudnn_autotune(device):
        # Warm-up (cuDNN autotuning, FFT plans, the allocator), not timed; its detections are dropped.
        sweep.sweep_hologram(image_yx, planes[:batch], segment, pool=pool, consume=lambda *_: None, **settings)
        peak_memory(device)
        timing = sweep.sweep_hologram(image_yx, planes, segment, pool=pool, consume=consume, **settings)
    scale = all_planes.size / timing.planes
    extrapolated = f" (extrapolated from {timing.planes} planes)" if timing.planes < all_planes.size else ""
    sweep_seconds = timing.seconds * scale
    print(f"inference: {timing.seconds:.2f} s for {timing.planes} planes, {timing.planes_per_second:.3g} planes/s; "
          f"{sweep_seconds:.1f} s for all {all_planes.size} planes{extrapolated}{peak_memory(device)}; "
          f"{sum(map(len, found))} detections on {len(found)} plane(s)", flush=True)

    # Refinement, as holopipe particles runs it, over the whole plane grid: of the particles clustered from the
    # detections, or of the simulated ones (random weights detect noise, not droplets).
    detections = pd.concat(found, ignore_index=True) if found else pd.DataFrame()
    clusters = cluster_detections(detections, config) if len(detections) else pd.DataFrame()
    refine_on = args.refine_on if args.refine_on != "auto" else ("detections" if args.model else "truth")
    if refine_on == "detections" and len(clusters):
        refined_what = f"{len(clusters)} particles clustered from the detections"
        to_refine = clusters[["x", "y", "d_max", "z_first", "z_last"]].rename(columns={"d_max": "d"}) * 1e-6
    else:
        refined_what = (f"the {len(truth)} simulated particles, each searched about its true z"
                        + (" (the model found none)" if refine_on == "detections" else ""))
        to_refine = truth[["x", "y", "d"]].assign(z_first=truth["z"], z_last=truth["z"])
    mover = array_mover(args.device, "--device")
    start = time.perf_counter()
    propagator = hologram_propagator(image_yx, attrs, reconstruction, to_device=mover)
    refine_depths(propagator, all_planes, to_refine, config["particles"], dx=dx, dy=dy)
    refine_seconds = time.perf_counter() - start
    del propagator
    print(f"refinement: {refine_seconds:.2f} s for {refined_what}, over the {all_planes.size} planes"
          f"{peak_memory(device)}")

    total = sweep_seconds + refine_seconds
    parts = {"propagation": timing.propagation * scale, "model": timing.model * scale,
             "post-processing": timing.postprocess * scale, "refinement": refine_seconds}
    print(f"seconds per hologram: {total:.1f}{extrapolated} = inference {sweep_seconds:.1f} + refinement "
          f"{refine_seconds:.1f}")
    print("shares: " + ", ".join(f"{name} {100 * seconds / total:.0f} %" for name, seconds in parts.items())
          + " (post-processing overlaps the next batch on the device: the shares may add up to more than 100 %)",
          flush=True)

    if not args.no_baseline:
        start = time.perf_counter()
        propagator = hologram_propagator(image_yx, attrs, reconstruction, to_device=mover)
        baseline = find_particles(propagator, planes, config["baseline"], dx=dx, dy=dy)
        seconds = time.perf_counter() - start
        del propagator
        print(f"baseline: {seconds:.2f} s for {planes.size} planes ({len(baseline)} particles), "
              f"{seconds * scale:.1f} s per hologram{extrapolated}{peak_memory(device)}")


if __name__ == "__main__":
    main()
