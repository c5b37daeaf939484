"""Coarse-to-fine depth search (``infer.coarse_stride`` k): its model-work saving and accuracy cost per k.

    python benchmarks/bench_coarse.py default [--strides 1 2 4 8] [--splits valid] [--workdir DIR]
    python benchmarks/bench_coarse.py crop [--strides 1 2 4 8] [--holograms 1] [--particles 33] [--pad 256]

Both run :func:`holopipe.detect.coarse.coarse_to_fine_sweep` on one CPU thread (``torch.set_num_threads(1)``) with
the config's ``infer`` settings (threshold, min_area, batch_planes, coarse_threshold, coarse_margin) and print,
per k: the share of a full sweep's pixels the model saw (``model px``), the model calls, wall seconds per
hologram (propagation included: on a CPU it is most of a sweep whatever k), the F1 (precision, recall) against the
truth, how many of the k = 1 particles the k run finds again (same matching, ``agree``), and the recall of the small
droplets (d < 20 µm), those whose effective depth of focus
(:func:`holopipe.optics.propagation.effective_depth_of_focus`) is shortest; with the share of them whose depth of focus
is shorter than half the coarse spacing (k planes), which a coarse plane may miss.

``default``: the embedded default (config/config.yaml), its standardized split stores under
``WORKDIR/data/standardized/`` and its trained model ``WORKDIR/results/model/model.pt`` (``snakemake --cores 1
results/model/model.pt``; WORKDIR the repository, or a run of the accuracy benchmark); ``valid`` by default, where
``infer.coarse_stride`` is chosen; detections go through the workflow's own particles (``particles_file``: merging
and Tamura refinement on the store) and evaluation matching (``match``, ``detection_metrics``), as
``holopipe particles`` and ``holopipe evaluate`` do.

``crop``: holodec-crop-like data, for which no trained model exists: a simulated 1024 x 1024 crop of the
HOLODEC frame over 14-158 mm (config/holodec.yaml's optics and simulate section: NCAR's gamma diameters
5-200 µm and camera; ``--particles`` droplets, 33 being NCAR's 500 per 4872 x 3248 frame scaled to the crop's
area), 1000 planes (144 µm), padded by ``--pad`` (holodec.yaml's 256 by default) and band-limited. The
segmenter is a physics oracle, logit ``9 (0.3 - |E|)``: probability 0.5 where the reconstructed amplitude
falls below 0.3 (a droplet's dark core near focus) and 0.2 below 0.45 (a droplet some planes off focus), at
every pixel alone. It measures what coarse sampling alone costs for a detector whose confidence falls off
with defocus as a droplet's darkness does (droplets whose dark range is shorter than the coarse spacing and
that the coarse planes see only faintly are lost) and what it saves in model pixels; not what a trained
model's context-dependent logits would do at a window's edge (``default`` measures that). Windows are sized
in holodec.yaml's model stride (32). Particles are
merged (``merge_detections``, focus on the darkest detection), not refined.
"""

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from holopipe.core.config import load_config
from holopipe.core.io import hologram_image_yx, open_holodec, particle_table
from holopipe.data.examples import particles_in_pixels
from holopipe.detect.coarse import coarse_to_fine_sweep
from holopipe.detect.particles import merge_detections, particles_file
from holopipe.detect.sweep import DETECTION_COLUMNS, batch_detections, model_segmenter
from holopipe.evaluation.evaluate import detection_metrics
from holopipe.evaluation.matching import match
from holopipe.ml.models import load_model, model_stride
from holopipe.optics.reconstruction import open_standardized, z_bin_centres
from holopipe.optics.simulate import SimulationSettings, simulate_hologram

REPO = Path(__file__).resolve().parents[1]
CROP = 1024
"""Side (pixels) of the holodec-crop-like frame."""
SMALL_UM = 20.0
"""Droplets below this diameter (µm) are tallied apart: the shortest depths of focus,
the first a coarse search loses."""


class Counting:
    """A segmenter that counts its calls and the pixels it was given."""

    def __init__(self, segment):
        self.segment, self.calls, self.pixels = segment, 0, 0

    def __call__(self, amplitude, phase):
        self.calls += 1
        self.pixels += amplitude.numel()
        return self.segment(amplitude, phase)


def physics_oracle(amplitude, phase):
    """Logits from the reconstructed amplitude alone: 0.5 at |E| 0.3, 0.2 at 0.45 (module docstring)."""
    return 9.0 * (0.3 - amplitude)


def search(image_yx: np.ndarray, planes_m: np.ndarray, segment, *, attrs: dict, config: dict, stride: int,
           coarse_stride: int, hid: int) -> tuple[pd.DataFrame, float]:
    """Detections (:data:`DETECTION_COLUMNS`) of one contrast hologram (ny, nx), gathered as ``infer_chunk``
    gathers them, and its wall seconds."""
    infer, reconstruction = config["infer"], config["reconstruction"]
    found = []

    def consume(first, rows_cols, values, probability):
        for slot, table in batch_detections(rows_cols, values, shape=image_yx.shape, min_area=int(infer["min_area"]),
                                            dx=attrs["dx"], dy=attrs["dy"]):
            found.append(table.assign(hid=hid, plane=first + slot, z=planes_m[first + slot] * 1e6))

    with ThreadPoolExecutor(1) as pool:
        timing = coarse_to_fine_sweep(
            np.ascontiguousarray(image_yx, np.float32), planes_m, segment, wavelength=attrs["lambda"],
            dx=attrs["dx"], dy=attrs["dy"], pad=int(reconstruction["pad"]),
            band_limit=bool(reconstruction["band_limit"]), batch_planes=int(infer["batch_planes"]),
            threshold=float(infer["threshold"]), device=torch.device("cpu"), pool=pool, consume=consume,
            coarse_stride=coarse_stride, coarse_threshold=float(infer["coarse_threshold"]),
            coarse_margin=int(infer["coarse_margin"]), stride=stride)
    columns = list(DETECTION_COLUMNS)
    table = (pd.concat(found, ignore_index=True)[columns] if found
             else pd.DataFrame({column: pd.Series(dtype=float) for column in columns}))
    return table, timing.seconds


class Tally:
    """One k's figures over several stores: pooled counts, model pixels and calls, seconds per hologram."""

    def __init__(self, k: int, segment):
        self.k, self.segment = k, Counting(segment)
        self.counts = {"n_true": 0, "n_predicted": 0, "tp": 0, "agree": 0, "n_small": 0, "tp_small": 0,
                       "small_short": 0}
        self.full_pixels, self.seconds = 0, []

    def add(self, truth: pd.DataFrame, predicted: pd.DataFrame, reference: pd.DataFrame, config: dict) -> None:
        """Pool one store's particles against its truth; ``agree``: particles of ``reference`` (k = 1) found again."""
        tol_xy, tol_z = float(config["evaluate"]["tolerance_xy"]), float(config["evaluate"]["tolerance_z"])
        depth_bins = np.linspace(config["optics"]["z_min"], config["optics"]["z_max"],
                                 config["evaluate"]["depth_bins"] + 1)
        metrics = detection_metrics(truth, predicted, match(truth, predicted, tol_xy, tol_z),
                                    config["evaluate"]["diameter_bins"], depth_bins)
        for key in ("n_true", "n_predicted", "tp"):
            self.counts[key] += metrics[key]
        self.counts["agree"] += len(match(reference, predicted, tol_xy, tol_z))
        small = truth[truth["d"] < SMALL_UM]
        self.counts["n_small"] += len(small)
        self.counts["tp_small"] += len(match(small, predicted, tol_xy, tol_z))

    def add_depths(self, depth_of_focus_m: np.ndarray, diameter_um: np.ndarray, plane_spacing_m: float) -> None:
        """Count the small droplets whose effective depth of focus is shorter than half this k's coarse spacing."""
        short = depth_of_focus_m < self.k * plane_spacing_m / 2
        self.counts["small_short"] += int(np.count_nonzero(short & (diameter_um < SMALL_UM)))

    def row(self, reference_count: int) -> str:
        n_true, n_predicted, tp = (self.counts[key] for key in ("n_true", "n_predicted", "tp"))
        precision = tp / n_predicted if n_predicted else 1.0
        recall = tp / n_true if n_true else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        n_small = self.counts["n_small"]
        small = (f" {self.counts['tp_small'] / n_small:>6.3f} {100 * self.counts['small_short'] / n_small:>5.0f}%"
                 if n_small else f" {'-':>6} {'-':>6}")
        return (f"{self.k:>3} {100 * self.segment.pixels / self.full_pixels:>8.1f}% {self.segment.calls:>6} "
                f"{np.mean(self.seconds):>7.1f} {f1:>6.3f} {precision:>6.3f} {recall:>6.3f} {n_predicted:>6} "
                f"{self.counts['agree']:>5}/{reference_count}") + small


def report(title: str, tallies: list[Tally]) -> None:
    print(f"\n{title}")
    print(f"{'k':>3} {'model px':>9} {'calls':>6} {'s/holo':>7} {'F1':>6} {'prec':>6} {'recall':>6} {'found':>6} "
          f"{'agree':>9} {'<20 µm':>6} {'DoF<k/2':>6}")
    for tally in tallies:
        print(tally.row(tallies[0].counts["n_predicted"]))


def run_default(strides: list[int], splits: list[str], workdir: Path) -> None:
    config = load_config(REPO / "config" / "config.yaml")
    model, info = load_model(workdir / "results" / "model" / "model.pt", "cpu")
    stride = int(info["stride"])
    segment = model_segmenter(model, info["channel_names"], info["stats"], stride)
    stores = [workdir / "data" / "standardized" / f"{split}.zarr" for split in splits]
    tallies, references, n_holograms = [], {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for k in strides:
            tally = Tally(k, segment)
            for store in stores:
                ds = open_standardized(store, config)
                attrs = {key: float(ds.attrs[key]) for key in ("dx", "dy", "lambda", "zMin", "zMax")}
                planes = z_bin_centres(attrs["zMin"], attrs["zMax"], int(config["reconstruction"]["z_bins"]))
                tables = []
                for h in range(ds.sizes["hologram_number"]):
                    image = hologram_image_yx(ds, h)
                    table, seconds = search(image, planes, tally.segment, attrs=attrs, config=config, stride=stride,
                                            coarse_stride=k, hid=h + 1)
                    tables.append(table)
                    tally.seconds.append(seconds)
                    tally.full_pixels += planes.size * image.size
                ds.close()
                chunk = Path(tmp) / f"{store.stem}_k{k}.csv"
                pd.concat(tables, ignore_index=True).to_csv(chunk, index=False)
                predicted = pd.read_csv(particles_file([chunk], Path(tmp) / f"{store.stem}_k{k}_particles.csv",
                                                       config, store_path=store, progress=False))
                with open_holodec(store) as truth_ds:
                    truth = particle_table(truth_ds)
                    in_pixels = particles_in_pixels(truth, truth_ds.attrs, planes.size)
                tally.add(truth, predicted, references.setdefault(store.stem, predicted), config)
                tally.add_depths(in_pixels["depth_of_focus"].to_numpy(), truth["d"].to_numpy(),
                                 (attrs["zMax"] - attrs["zMin"]) / planes.size)
            n_holograms = len(tally.seconds)
            tallies.append(tally)
            print(f"k {k} done at {time.strftime('%H:%M:%S')}", flush=True)
    infer = config["infer"]
    report(f"default: config/config.yaml, {workdir}, {'+'.join(splits)} ({n_holograms} holograms, 512 x 512, "
           f"{config['reconstruction']['z_bins']} planes), the trained U-Net (stride {stride}); threshold "
           f"{infer['threshold']}, coarse_threshold {infer['coarse_threshold']}, coarse_margin "
           f"{infer['coarse_margin']}; particles merged and refined as the workflow does", tallies)


def crop_config(n_particles: int, pad: int | None, z_bins: int | None) -> dict:
    config = load_config(REPO / "config" / "holodec.yaml")
    config["optics"].update(nx=CROP, ny=CROP)
    reconstruction = config["reconstruction"]
    reconstruction.update(pad=reconstruction["pad"] if pad is None else pad,
                          z_bins=reconstruction["z_bins"] if z_bins is None else z_bins)
    config["simulate"]["particles"] = [n_particles, n_particles]
    config["particles"].update(focus="amplitude", refine="none")
    return config


def run_crop(strides: list[int], n_holograms: int, n_particles: int, pad: int | None, z_bins: int | None,
             seed: int) -> None:
    config = crop_config(n_particles, pad, z_bins)
    stride = model_stride(config["model"])  # windows sized for holodec.yaml's model, as a trained one would need
    settings = SimulationSettings.from_config(config)
    optics = settings.optics
    attrs = {"dx": optics.dx, "dy": optics.dy, "lambda": optics.wavelength}
    planes = z_bin_centres(optics.z_min, optics.z_max, int(config["reconstruction"]["z_bins"]))
    rng = np.random.default_rng(seed)
    holograms, truths = [], []
    for h in range(n_holograms):
        image, particles = simulate_hologram(rng, settings)
        image = image.astype(np.float32)
        holograms.append(image / image.mean())  # a standardized contrast hologram: the beam is flat over the crop
        truths.append(pd.DataFrame({"hid": h + 1, **{c: getattr(particles, c) * 1e6 for c in "xyzd"}}))
    truth = pd.concat(truths, ignore_index=True)
    tallies, reference = [], None
    for k in strides:
        tally = Tally(k, physics_oracle)
        tables = []
        for h, image in enumerate(holograms):
            table, seconds = search(image, planes, tally.segment, attrs=attrs, config=config, stride=stride,
                                    coarse_stride=k, hid=h + 1)
            tables.append(table)
            tally.seconds.append(seconds)
            tally.full_pixels += planes.size * image.size
        predicted = merge_detections(pd.concat(tables, ignore_index=True), config)
        reference = predicted if reference is None else reference
        tally.add(truth, predicted, reference, config)
        frame = {"Nx": optics.nx, "Ny": optics.ny, "zMin": optics.z_min, "zMax": optics.z_max, **attrs}
        tally.add_depths(particles_in_pixels(truth, frame, planes.size)["depth_of_focus"].to_numpy(),
                         truth["d"].to_numpy(), (optics.z_max - optics.z_min) / planes.size)
        tallies.append(tally)
        print(f"k {k} done at {time.strftime('%H:%M:%S')}", flush=True)
    infer = config["infer"]
    report(f"crop: {CROP} x {CROP} of HOLODEC (holodec.yaml optics and simulate: gamma 5-200 µm, NCAR camera), "
           f"{n_particles} droplets x {n_holograms} holograms (seed {seed}), {planes.size} planes over 14-158 mm, pad "
           f"{config['reconstruction']['pad']}; physics oracle 9 (0.3 - |E|), windows in strides of {stride}; "
           f"threshold {infer['threshold']}, coarse_threshold {infer['coarse_threshold']}, coarse_margin "
           f"{infer['coarse_margin']}; particles merged, not refined", tallies)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", choices=["default", "crop"])
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="coarse_stride values; the first is the reference of 'agree' (1: the full sweep)")
    parser.add_argument("--splits", nargs="+", default=["valid"],
                        help="default: standardized splits to search (valid: where coarse_stride is chosen)")
    parser.add_argument("--workdir", type=Path, default=REPO,
                        help="default: a workflow directory with data/standardized/ and results/model/model.pt")
    parser.add_argument("--holograms", type=int, default=1, help="crop: holograms to simulate")
    parser.add_argument("--particles", type=int, default=33, help="crop: droplets per hologram")
    parser.add_argument("--pad", type=int, default=None, help="crop: reconstruction pad (holodec.yaml's by default)")
    parser.add_argument("--z-bins", type=int, default=None, help="crop: planes (holodec.yaml's 1000 by default)")
    parser.add_argument("--seed", type=int, default=13, help="crop: simulation seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"python {' '.join(sys.argv)}  (1 torch thread)")
    if args.data == "default":
        run_default(args.strides, args.splits, args.workdir)
    else:
        run_crop(args.strides, args.holograms, args.particles, args.pad, args.z_bins, args.seed)


if __name__ == "__main__":
    main()
