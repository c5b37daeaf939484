"""Inference memory on CPU: peak resident memory of a plane sweep as a function of the frame, the padding and
``infer.batch_planes``, fitted to a formula the Snakemake resources can use.

    python benchmarks/bench_infer_memory.py      # config.yaml and holodec.yaml, 1024x1024 and 2048x1536, B 1 2 4
    python benchmarks/bench_infer_memory.py --frames 512x384 --batches 1 2   # a quick look

Every point is a fresh process (peak RSS, ``ru_maxrss``, counts a process's whole life) that loads torch,
builds the config's model (random weights), and sweeps one random contrast hologram over one batch of planes
with :func:`holopipe.detect.sweep.sweep_hologram`, exactly as ``holopipe infer`` does (propagation, model, sigmoid,
threshold, the worker thread's component analysis). The model's logits are shifted far below the threshold,
so that, as with a trained model, few pixels are detections (random weights would flag half the frame).
Each point runs twice: with the model, and with a segmenter that returns zeros (propagation only). The fit:

    peak RSS = C + a · P + B · (p · P + m · N)

with P the padded pixels ``(ny + 2 pad)(nx + 2 pad)``, N the frame's pixels ``ny · nx``, B the planes per
batch; C (libraries, the model) and a (the hologram's spectrum and transfer function) are paid once, p is the
propagation's and m the model's bytes per pixel per plane (the propagation-only points have their own
constant: they load no model library). Not counted: the probability volume's host copy
(``infer.save_probabilities``: 1 or 2 bytes per frame pixel per plane, for two batches) and the input image.
A config whose model was measured already (config.yaml and holodec.yaml share theirs) is not measured again:
its padding enters through P. ``--model key=value`` measures another model (e.g. ``architecture=linknet``).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {name: REPO / name for name in ("config/holodec.yaml", "config/config.yaml")}
HOLODEC_FRAME = (4872, 3248)


def _resident_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def measure(config_path: str, model: dict, nx: int, ny: int, batch: int, with_model: bool, threads: int) -> dict:
    """One point, in this process: peak RSS (bytes) of a one-batch sweep, resident bytes before it, seconds."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from holopipe.core.config import load_config
    from holopipe.core.device import use_threads
    from holopipe.detect.sweep import batch_detections, model_segmenter, sweep_hologram
    from holopipe.ml.models import build_model, model_stride
    from holopipe.optics.reconstruction import z_bin_centres

    use_threads(threads)
    config = load_config(config_path)
    optics, reconstruction, infer = config["optics"], config["reconstruction"], config["infer"]
    planes = z_bin_centres(optics["z_min"], optics["z_max"], reconstruction["z_bins"])
    planes = planes[np.linspace(0, planes.size - 1, batch).round().astype(int)]
    if with_model:
        model_config = {**config["model"], **model, "encoder_weights": None}
        network = build_model(model_config, len(config["examples"]["channels"])).eval()
        model_segment = model_segmenter(network, config["examples"]["channels"], {"contrast_std": 0.2},
                                        model_stride(model_config))

        def segment(amplitude, phase):
            with torch.inference_mode():  # in place: few detections, no extra memory
                return model_segment(amplitude, phase).sub_(1e3)
    else:
        def segment(amplitude, phase):
            return torch.zeros_like(amplitude)
    image = (1 + 0.05 * np.random.default_rng(0).standard_normal((ny, nx))).astype(np.float32)

    def consume(first, rows_cols, values, probability):
        batch_detections(rows_cols, values, shape=(ny, nx), min_area=infer["min_area"], dx=optics["dx"],
                         dy=optics["dy"])

    before = _resident_bytes()
    start = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        sweep_hologram(image, planes, segment, wavelength=optics["wavelength"], dx=optics["dx"], dy=optics["dy"],
                       pad=reconstruction["pad"], band_limit=reconstruction["band_limit"], batch_planes=batch,
                       threshold=infer["threshold"], device=torch.device("cpu"), pool=pool, consume=consume)
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "before": before,
            "seconds": time.perf_counter() - start, "pad": reconstruction["pad"]}


def fit(points: list[dict]) -> dict:
    """Least squares of peak = C + a P + B (p P + m N) over the points; the propagation-only points (no m N
    term) have a constant of their own, C - model, since they load no model library."""
    rows = np.array([[1.0, -float(not pt["model"]), pt["P"], pt["B"] * pt["P"], pt["B"] * pt["N"] * pt["model"]]
                     for pt in points])
    peaks = np.array([pt["peak"] for pt in points], dtype=float)
    coefficients, *_ = np.linalg.lstsq(rows, peaks, rcond=None)
    worst = float(np.max(np.abs(rows @ coefficients - peaks) / peaks))
    return {**dict(zip(("C", "model", "a", "p", "m"), coefficients)), "worst_relative_error": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", nargs="+", default=["1024x1024", "2048x1536"], help="NXxNY frames")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4], help="infer.batch_planes values")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each point")
    parser.add_argument("--model", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override the configs' model section (YAML values), e.g. architecture=linknet")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one point, as JSON arguments
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return

    from holopipe.core.config import load_config

    overrides = {key: yaml.safe_load(value) for key, _, value in (pair.partition("=") for pair in args.model)}
    models_seen: dict = {}
    for name in args.configs:
        config = load_config(CONFIGS[name])
        model, pad = {**config["model"], **overrides}, config["reconstruction"]["pad"]
        print(f"\n{name}: model {json.dumps(model, sort_keys=True)}, reconstruction.pad {pad}")
        key = json.dumps(model, sort_keys=True)
        if key in models_seen:
            print(f"  same model as {models_seen[key]}: the fit there holds, with this padding in P")
            continue
        models_seen[key] = name
        points = []
        print(f"  {'frame':>10} {'B':>2} {'what':>11} {'peak MiB':>9} {'before MiB':>10} {'s':>6}")
        for frame in args.frames:
            nx, ny = (int(v) for v in frame.split("x"))
            for batch in args.batches:
                for with_model in (False, True):
                    child = {"config_path": str(CONFIGS[name]), "model": overrides, "nx": nx, "ny": ny,
                             "batch": batch, "with_model": with_model, "threads": args.threads}
                    result = json.loads(subprocess.run(
                        [sys.executable, __file__, "--child", json.dumps(child)], check=True, capture_output=True,
                        text=True).stdout.splitlines()[-1])
                    points.append({**result, "B": batch, "model": with_model, "N": nx * ny,
                                   "P": (nx + 2 * pad) * (ny + 2 * pad)})
                    print(f"  {frame:>10} {batch:>2} {'model' if with_model else 'propagation':>11} "
                          f"{result['peak'] / 2**20:9.0f} {result['before'] / 2**20:10.0f} {result['seconds']:6.1f}",
                          flush=True)
        f = fit(points)
        print(f"  fit: peak RSS = {f['C'] / 2**20:.0f} MiB + {f['a']:.0f} B x P + B x ({f['p']:.0f} B x P + "
              f"{f['m']:.0f} B x N)   (worst point off by {100 * f['worst_relative_error']:.0f} %)")
        nx, ny = HOLODEC_FRAME
        n_full, p_full = nx * ny, (nx + 2 * pad) * (ny + 2 * pad)
        per_padded = f["p"] + f["m"] * n_full / p_full
        print(f"  at {nx}x{ny} with pad {pad} (P = {p_full / 1e6:.1f} Mpx): {per_padded:.0f} bytes per padded pixel "
              f"per plane, {per_padded * p_full / 2**30:.2f} GiB per plane, once "
              f"{(f['C'] + f['a'] * p_full) / 2**30:.2f} GiB; batch_planes 4 -> "
              f"{(f['C'] + f['a'] * p_full + 4 * per_padded * p_full) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
