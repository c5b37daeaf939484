"""x and y stay themselves through reconstruct -> detect -> particles -> evaluate, on a non-square frame with
dx != dy: both methods find every droplet at its place, and the same truth with x and y swapped matches none.

An x/y swap anywhere (the contract's (xsize, ysize) image against the optics' (ny, nx), a pitch used for the
other axis, a centroid's row taken for x) moves the found droplets away from the truth and fails this test.
"""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from holopipe.core.config import load_config
from holopipe.core.io import write_zarr
from holopipe.detect.baseline import baseline_file
from holopipe.detect.infer import infer_chunk
from holopipe.detect.particles import particles_file
from holopipe.evaluation.evaluate import evaluate_files
from holopipe.optics.simulate import Optics, ParticleSet, opaque_disks_field

# 160 x 96 pixels of 2.96 x 3.6 µm: a 474 x 346 µm frame, wider than tall, pixels taller than wide.
OPTICS = Optics(wavelength=3.55e-7, dx=2.96e-6, dy=3.6e-6, nx=160, ny=96, z_min=2e-3, z_max=10e-3)
PAD, Z_BINS = 32, 60
# Three droplets > 180 µm apart, none where swapping x and y would land near another one (metres).
PARTICLES = ParticleSet(x=np.array([-150e-6, 140e-6, 0.0]), y=np.array([-70e-6, -40e-6, 80e-6]),
                        z=np.array([3.5e-3, 6.2e-3, 8.5e-3]), d=np.array([25e-6, 32e-6, 40e-6]))


def oracle(amplitude, phase):
    """A segmenter (logits) that marks the dark core of a refocused opaque disk, surer the darker."""
    return torch.where(amplitude < 0.5, 20.0 * (1.0 - amplitude), torch.full_like(amplitude, -20.0))


@pytest.fixture(scope="module")
def config():
    return load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 1, "seed": 1}},
        "optics": dataclasses.asdict(OPTICS),
        "reconstruction": {"z_bins": Z_BINS, "pad": PAD},
        "infer": {"device": "cpu"}, "particles": {"device": "cpu"}, "baseline": {"device": "cpu"},
    })


def truth_store(path, x_m, y_m):
    """A standardized split store (noise-free, flat-beam contrast I / mean I) whose truth table says the
    droplets are at ``x_m``, ``y_m``; the image always holds them where :data:`PARTICLES` puts them."""
    intensity = np.abs(opaque_disks_field(PARTICLES, OPTICS, pad=PAD)) ** 2  # (ny, nx)
    image_xy = (intensity / intensity.mean()).astype(np.float32).T
    truth = {"hid": np.ones(3), "x": x_m * 1e6, "y": y_m * 1e6, "z": PARTICLES.z * 1e6, "d": PARTICLES.d * 1e6}
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), image_xy[None]),
         **{name: ("particle", np.asarray(values, np.float32)) for name, values in truth.items()}},
        attrs={"Nx": OPTICS.nx, "Ny": OPTICS.ny, "dx": OPTICS.dx, "dy": OPTICS.dy, "lambda": OPTICS.wavelength,
               "zMin": OPTICS.z_min, "zMax": OPTICS.z_max})
    return write_zarr(ds, path)


@pytest.fixture(scope="module")
def results(config, tmp_path_factory):
    """Both methods' particle CSVs of the one hologram, and the truth stores as simulated and swapped."""
    tmp = tmp_path_factory.mktemp("axes")
    store = truth_store(tmp / "test.zarr", PARTICLES.x, PARTICLES.y)
    swapped = truth_store(tmp / "swapped.zarr", PARTICLES.y, PARTICLES.x)
    detections = infer_chunk(config, None, store, tmp / "chunk_0.csv", chunk=0, n_chunks=1, progress=False,
                             segment=oracle)
    unet = particles_file([detections], tmp / "unet.csv", config, store_path=store, progress=False)
    baseline = baseline_file(config, store, tmp / "baseline.csv", progress=False)
    return tmp, store, swapped, {"unet": unet, "baseline": baseline}


def evaluated(config, truth_path, predictions, out_dir) -> dict:
    out = evaluate_files(config, {"test": truth_path}, {method: {"test": path} for method, path in predictions.items()},
                         out_dir / "metrics.json", out_dir / "plots")
    return json.loads(out.read_text())


def test_both_methods_find_every_droplet_at_its_x_and_y(config, results):
    tmp, store, _, predictions = results
    metrics = evaluated(config, store, predictions, tmp / "as_simulated")
    for method in predictions:
        assert metrics[method]["n_true"] == 3
        assert metrics[method]["tp"] == 3 and metrics[method]["fp"] == 0, (method, metrics[method])
        found = pd.read_csv(predictions[method]).sort_values("x", ignore_index=True)
        order = np.argsort(PARTICLES.x)
        # Within 1.5 pixels of each axis' own pitch.
        assert np.all(np.abs(found["x"] - PARTICLES.x[order] * 1e6) <= 1.5 * OPTICS.dx * 1e6), (method, found)
        assert np.all(np.abs(found["y"] - PARTICLES.y[order] * 1e6) <= 1.5 * OPTICS.dy * 1e6), (method, found)


def test_the_same_truth_with_x_and_y_swapped_matches_nothing(config, results):
    tmp, _, swapped, predictions = results
    metrics = evaluated(config, swapped, predictions, tmp / "swapped")
    for method in predictions:
        assert metrics[method]["tp"] == 0 and metrics[method]["f1"] == 0.0, (method, metrics[method])
