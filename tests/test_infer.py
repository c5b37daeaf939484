"""Inference and particles: an oracle finds simulated particles, sharding is exact, merging, probability volumes."""

import copy
import logging
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import scipy.sparse
import scipy.sparse.csgraph
import torch
import xarray as xr
import yaml
import zarr
from helpers import TINY, snakemake

import holopipe.detect.infer
import holopipe.detect.sweep
from holopipe.core.config import load_config, with_overrides
from holopipe.core.io import open_holodec, particle_table, um_to_pixel, write_zarr
from holopipe.core.provenance import code_identity
from holopipe.data.standardize import write_stats
from holopipe.detect.infer import (
    VolumeWriter,
    chunk_planes,
    infer_chunk,
    infer_memory,
    load_segmenter,
    plane_batch,
    resume_fingerprint,
)
from holopipe.detect.particles import PARTICLE_COLUMNS, components, linked_pairs, merge_detections, particles_file
from holopipe.detect.sweep import (
    BATCHES_IN_FLIGHT,
    DETECTION_COLUMNS,
    batch_detections,
    detections_in_plane,
    largest_activation,
    logit_threshold,
    model_segmenter,
    pixel_components,
    planes_per_run,
    smoothed_amplitude_at,
    sparse_pixels,
    sweep_hologram,
)
from holopipe.ml.dataset import TileDataset, write_synthetic_examples
from holopipe.ml.models import PlainUNet, build_model, fold_batchnorm
from holopipe.ml.train import train_model
from holopipe.optics.focus import smoothed_amplitude
from holopipe.optics.propagation import Propagator, hologram_field
from holopipe.optics.reconstruction import normalize_channels, z_bin_centres
from holopipe.optics.simulate import Camera, Optics, ParticleSet, camera_image, opaque_disks_field

N, DX, WAVELENGTH, Z_MIN, Z_MAX, Z_BINS = 128, 2.96e-6, 3.55e-7, 2e-3, 10e-3, 60
BIN_UM = (Z_MAX - Z_MIN) / Z_BINS * 1e6
PARTICLES = [  # per hologram: x, y, z, d (m); 20–40 µm, z 3–9 mm, well inside the 379 µm frame
    ParticleSet(x=np.array([-90e-6, 60e-6, 20e-6]), y=np.array([-80e-6, -30e-6, 100e-6]),
                z=np.array([3.2e-3, 6.1e-3, 8.7e-3]), d=np.array([22e-6, 30e-6, 38e-6])),
    ParticleSet(x=np.array([80e-6, -70e-6, 0.0]), y=np.array([90e-6, 20e-6, -100e-6]),
                z=np.array([4.4e-3, 7.5e-3, 3.6e-3]), d=np.array([34e-6, 26e-6, 30e-6])),
]


def oracle(amplitude, phase):
    """A perfect-looking segmenter (logits): the dark core of a refocused opaque disk, surer the darker."""
    return torch.where(amplitude < 0.5, 20.0 * (1.0 - amplitude), torch.full_like(amplitude, -20.0))


def soft_oracle(amplitude, phase):
    """A segmenter (logits) with graded probabilities, to see quantisation."""
    return 10.0 * (0.6 - amplitude)


def make_config(**sections):
    config = {
        "splits": {"test": {"source": "simulate", "n_holograms": len(PARTICLES), "seed": 1}},
        "optics": {"wavelength": WAVELENGTH, "dx": DX, "dy": DX, "nx": N, "ny": N, "z_min": Z_MIN, "z_max": Z_MAX},
        "reconstruction": {"z_bins": Z_BINS, "pad": 32},
        "infer": {"device": "cpu"},
        **sections,
    }
    return load_config(config)


def hologram_dataset(particle_sets, n=N):
    """Noise-free, flat-beam holograms standardized as float32 I / mean(I), in the contract's layout."""
    optics = Optics(WAVELENGTH, DX, DX, n, n, Z_MIN, Z_MAX)
    images = []
    for particles in particle_sets:
        field = opaque_disks_field(particles, optics, pad=32)
        image = camera_image(field, np.random.default_rng(0), optics, Camera(noise=False, beam_waist=None))
        image = image.astype(np.float32)
        images.append((image / image.mean()).T)  # (ny, nx) -> contract (xsize, ysize)
    columns = {name: np.concatenate([getattr(p, name) for p in particle_sets]) * 1e6 for name in "xyzd"}
    hid = np.concatenate([np.full(len(p), h + 1) for h, p in enumerate(particle_sets)])
    return xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), np.stack(images)),
         "hid": ("particle", hid.astype(np.float32)),
         **{name: ("particle", values.astype(np.float32)) for name, values in columns.items()}},
        attrs={"Nx": n, "Ny": n, "dx": DX, "dy": DX, "lambda": WAVELENGTH, "zMin": Z_MIN, "zMax": Z_MAX})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_zarr(hologram_dataset(PARTICLES), tmp_path_factory.mktemp("infer") / "test.zarr")


@pytest.fixture(scope="module")
def unsharded(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("unsharded") / "all.csv"
    return infer_chunk(make_config(), None, store, out, chunk=0, n_chunks=1, progress=False, segment=oracle)


# ---- end to end with an oracle ----

def test_oracle_detections_merge_into_the_simulated_particles(store, unsharded, tmp_path):
    detections = pd.read_csv(unsharded)
    assert list(detections.columns) == list(DETECTION_COLUMNS)
    # The oracle's logits grow with the darkness of the whole disk: its own confidence is its focus.
    # Refined on the store, on whole planes (no interpolation), so every z is a plane's.
    config = make_config(particles={"focus": "logit", "refine_interpolate": False})
    found = pd.read_csv(particles_file([unsharded], tmp_path / "particles.csv", config, store_path=store,
                                       progress=False))
    assert list(found.columns) == list(PARTICLE_COLUMNS)
    truth = particle_table(open_holodec(store))
    assert len(found) == len(truth)
    pixel_um, planes_um = DX * 1e6, z_bin_centres(Z_MIN, Z_MAX, Z_BINS) * 1e6
    for _, particle in truth.iterrows():
        mine = found[found["hid"] == particle["hid"]]
        match = mine.iloc[np.argmin(np.hypot(mine["x"] - particle["x"], mine["y"] - particle["y"]))]
        assert abs(match["x"] - particle["x"]) <= 1.5 * pixel_um
        assert abs(match["y"] - particle["y"]) <= 1.5 * pixel_um
        assert abs(match["d"] - particle["d"]) <= 2 * pixel_um
        # A 20–40 µm droplet stays in focus over D²/λ = 1–4.5 mm (8–34 bins); the peak is within 2 bins.
        assert abs(match["z"] - particle["z"]) <= 2 * BIN_UM
        assert match["z"] in planes_um and match["prob"] == 1.0
    # The peak, not the first plane that fired: every particle fired on planes well before its focus.
    first = detections.groupby("hid")["z"].min()
    assert all(found.groupby("hid")["z"].min() > first + 5 * BIN_UM)


def test_sharded_inference_equals_unsharded_exactly(store, unsharded, tmp_path):
    # Another batch size as well: a plane's result depends neither on its chunk nor on its batch.
    config = with_overrides(make_config(), {"infer.batch_planes": 7})
    chunks = [infer_chunk(config, None, store, tmp_path / f"{chunk}.csv", chunk=chunk, n_chunks=3,
                          progress=False, segment=oracle) for chunk in range(3)]
    whole = pd.read_csv(unsharded)
    gathered = pd.concat([pd.read_csv(path) for path in chunks[::-1]], ignore_index=True)
    gathered = gathered.sort_values(["hid", "plane"], kind="stable", ignore_index=True)
    pd.testing.assert_frame_equal(gathered, whole)
    assert set(pd.read_csv(chunks[1])["plane"]) <= set(chunk_planes(Z_BINS, 1, 3))
    particles_from_chunks = particles_file(chunks[::-1], tmp_path / "p_chunks.csv", config, store_path=store,
                                           progress=False)
    particles_whole = particles_file([unsharded], tmp_path / "p_whole.csv", config, store_path=store, progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(particles_from_chunks), pd.read_csv(particles_whole))


def test_coarse_to_fine_chunk_finds_the_particles_of_the_full_sweep(store, unsharded, tmp_path, caplog):
    config = with_overrides(make_config(), {"infer.coarse_stride": 4})
    with caplog.at_level(logging.INFO, logger="holopipe"):
        coarse = infer_chunk(config, None, store, tmp_path / "coarse.csv", chunk=0, n_chunks=1, progress=False,
                             segment=oracle)
    assert "coarse-to-fine depth search, every 4-th plane" in caplog.text
    detections, whole = pd.read_csv(coarse), pd.read_csv(unsharded)
    assert 0 < len(detections) <= len(whole)
    # Every plane the fine pass segments is segmented as in the full sweep, inside its windows.
    merged = detections.merge(whole, on=["hid", "plane", "x", "y"], how="left", indicator=True)
    assert (merged["_merge"] == "both").mean() > 0.9
    found, reference = (pd.read_csv(particles_file([path], tmp_path / f"{path.stem}.particles.csv", config,
                                                   store_path=store, progress=False))
                        for path in (Path(coarse), Path(unsharded)))
    assert len(found) == len(reference) == sum(len(p.x) for p in PARTICLES)
    for column, tolerance in (("x", 1e-6), ("y", 1e-6), ("z", 1e-6), ("d", 1e-6)):
        assert np.allclose(found.sort_values(["hid", "x"])[column], reference.sort_values(["hid", "x"])[column],
                           atol=tolerance), column


def test_chunks_are_contiguous_and_cover_every_plane_once():
    chunks = [chunk_planes(10, chunk, 3) for chunk in range(3)]
    assert np.array_equal(np.concatenate(chunks), np.arange(10))
    assert all(np.all(np.diff(chunk) == 1) for chunk in chunks)
    with pytest.raises(ValueError, match="chunk"):
        chunk_planes(10, 3, 3)


def test_nothing_found_still_writes_headers(store, tmp_path):
    out = infer_chunk(make_config(), None, store, tmp_path / "none.csv", chunk=0, n_chunks=4, progress=False,
                      segment=lambda amplitude, phase: torch.zeros_like(amplitude))
    assert list(pd.read_csv(out).columns) == list(DETECTION_COLUMNS) and len(pd.read_csv(out)) == 0
    particles = pd.read_csv(particles_file([out], tmp_path / "p.csv", make_config()))
    assert list(particles.columns) == list(PARTICLE_COLUMNS) and len(particles) == 0


def test_bad_arguments_are_named(store, tmp_path):
    with pytest.raises(ValueError, match="model_path"):
        infer_chunk(make_config(), None, store, tmp_path / "x.csv", chunk=0, n_chunks=1, progress=False)
    with pytest.raises(ValueError, match="chunk"):
        infer_chunk(make_config(), None, store, tmp_path / "x.csv", chunk=2, n_chunks=2, progress=False,
                    segment=oracle)
    assert not (tmp_path / "x.csv").exists()


# ---- a real model ----

def test_trained_model_runs_on_whole_planes(store, tmp_path):
    examples = write_synthetic_examples(tmp_path / "ex.zarr", 8, 32, contrast_std=0.2, seed=1)
    stats = write_stats({"contrast_mean": 1.0, "contrast_std": 0.2}, tmp_path / "stats.json")
    config = make_config(model={"architecture": "plain_unet", "width": 4, "depth": 2},
                         train={"epochs": 1, "batch_size": 4, "num_workers": 0, "device": "cpu"})
    result = train_model(config, examples, examples, tmp_path / "model", stats_path=stats, progress=False)
    config = with_overrides(config, {"infer.batch_planes": 5, "infer.threshold": 0.3})
    out = infer_chunk(config, result.model_path, store, tmp_path / "model.csv", chunk=2, n_chunks=6,
                      progress=False)
    detections = pd.read_csv(out)
    assert list(detections.columns) == list(DETECTION_COLUMNS)
    assert set(detections["plane"]) <= set(chunk_planes(Z_BINS, 2, 6))
    assert detections["prob_max"].between(0.3, 1).all() and (detections["area"] >= 2).all()


def test_segmenter_pads_with_the_background_to_the_stride_and_crops_back():
    torch.manual_seed(0)
    model = PlainUNet(2, width=4, depth=3).eval()  # stride 8; 30 x 45 is no multiple of it
    stats, channels = {"contrast_std": 0.2}, ["amplitude", "phase"]
    amplitude, phase = 1 + 0.2 * torch.randn(2, 30, 45), 0.2 * torch.randn(2, 30, 45)
    logits = model_segmenter(model, channels, stats, 8)(amplitude, phase)
    assert logits.shape == (2, 30, 45)
    inputs = torch.nn.functional.pad(normalize_channels(amplitude, phase, channels, stats), (0, 3, 0, 2))
    with torch.no_grad():
        expected = model(inputs)[:, 0, :30, :45]
    torch.testing.assert_close(logits, expected)


def test_inference_normalises_exactly_as_training(tmp_path):
    store = write_synthetic_examples(tmp_path / "ex.zarr", 2, 16, contrast_std=0.2, seed=3)
    stats = {"contrast_std": 0.25}
    raw = zarr.open_group(store, mode="r")["inputs"][1]  # (C, H, W): amplitude, phase
    inputs, _ = TileDataset(store, channel_scale=stats)[1]
    assert torch.equal(inputs, torch.from_numpy(normalize_channels(raw[0], raw[1], ["amplitude", "phase"], stats)))
    on_torch = normalize_channels(torch.from_numpy(raw[0]), None, ["amplitude"], stats)
    assert on_torch.shape == (1, 16, 16) and torch.equal(on_torch[0], inputs[0])
    assert float(normalize_channels(np.ones((1, 1)), np.zeros((1, 1)), ["amplitude", "phase"], stats).max()) == 0


# ---- detections in a plane ----

def test_sparse_components_match_scipy_label_with_8_connectivity():
    rng = np.random.default_rng(0)
    mask = scipy.ndimage.binary_opening(rng.random((60, 70)) < 0.45) | (rng.random((60, 70)) < 0.05)
    rows, cols = np.nonzero(mask)
    count, labels = pixel_components(rows, cols, mask.shape)
    reference, n_reference = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
    assert count == n_reference
    assert np.array_equal(labels + 1, reference[rows, cols])  # same partition, same raster order of labels


def test_detections_have_weighted_centroids_in_contract_coordinates():
    probability = np.zeros((40, 50), np.float32)
    probability[10:14, 30:33] = 0.9
    probability[12, 31] = 1.0
    probability[30, 5] = 0.8  # one pixel: dropped by min_area
    amplitude = np.ones((40, 50), np.float32)
    amplitude[12, 31] = 0.0  # a dark pixel, averaged over the 5x5 focus box
    logits = np.full(probability.shape, -30.0, np.float32)
    inside = probability > 0
    logits[inside] = np.log(probability[inside] / (1 - probability[inside] + 1e-12))
    table = detections_in_plane(logits, amplitude, threshold=0.5, min_area=2, dx=3e-6, dy=2e-6)
    assert len(table) == 1
    assert table["amplitude_min"].iloc[0] == pytest.approx(24 / 25)
    row, col = scipy.ndimage.center_of_mass(np.where(probability[:20] > 0.5, probability[:20], 0))
    assert um_to_pixel(table["x"].iloc[0], 50, 3e-6) == pytest.approx(col)
    assert um_to_pixel(table["y"].iloc[0], 40, 2e-6) == pytest.approx(row)
    assert table["area"].iloc[0] == 12
    assert table["d"].iloc[0] == pytest.approx(2 * np.sqrt(12 * 6e-12 / np.pi) * 1e6)
    assert table["prob_max"].iloc[0] == pytest.approx(1.0)
    assert table["logit_mean"].iloc[0] == pytest.approx((11 * logits[10, 30] + logits[12, 31]) / 12, rel=1e-5)
    assert table["prob_mean"].iloc[0] == pytest.approx((11 * 0.9 + 1.0) / 12)


# ---- merging detections into particles ----

def detections(hid, planes, x, y, areas, prob_max=1.0, prob_mean=0.9, logit_mean=5.0, amplitude_min=0.2):
    planes = np.asarray(planes)
    areas = np.broadcast_to(areas, planes.shape)
    return pd.DataFrame({"hid": hid, "plane": planes, "x": x + 0.1 * np.arange(planes.size), "y": y,
                         "z": 2000.0 + 100.0 * planes, "d": 2 * np.sqrt(areas * 9 / np.pi), "area": areas,
                         "prob_max": prob_max, "prob_mean": prob_mean, "logit_mean": logit_mean,
                         "amplitude_min": amplitude_min})


def test_merge_separates_in_depth_and_takes_the_peak_plane():
    config = make_config(particles={"distance": 1e-4, "link_depth": 3e-4, "min_planes": 2, "focus": "probability"})
    near = detections(1, [10, 11, 12], 50.0, 50.0, [18, 20, 19])  # z 3.0–3.2 mm
    far = detections(1, [40, 41, 42], 52.0, 50.0, [20, 19, 18])  # same x, y; z 6.0–6.2 mm: 300 µm scaled
    spread = detections(1, np.arange(60, 70), -200.0, 100.0, [5, 9, 14, 20, 26, 31, 35, 33, 24, 12])
    lonely = detections(1, [80], 0.0, -150.0, 30)
    other = detections(2, [10, 11], 50.0, 50.0, 20, prob_max=0.7)  # same place, other hologram; a tie
    table = pd.concat([spread, lonely, far, other, near], ignore_index=True).sample(frac=1, random_state=0)
    particles = merge_detections(table, config)
    assert list(particles.columns) == list(PARTICLE_COLUMNS)
    assert particles[["hid", "z"]].values.tolist() == [[1, 3100.0], [1, 6000.0], [1, 8600.0], [2, 3000.0]]
    peak = particles.iloc[2]  # the spread particle: peak mass at plane 66 (area 35), not plane 60
    focus = spread[spread["plane"] == 66].iloc[0]
    assert (peak["x"], peak["y"], peak["d"]) == (focus["x"], focus["y"], focus["d"])
    assert particles["prob"].tolist() == [1.0, 1.0, 1.0, 0.7]
    kept = merge_detections(table, with_overrides(config, {"particles.min_planes": 1}))
    assert len(kept) == 5 and 0.0 in kept["x"].tolist()  # the one-plane detection


def test_merge_peak_uses_probability_mass_when_prob_max_saturates():
    rows = detections(1, [5, 6, 7], 0.0, 0.0, [10, 10, 10], prob_max=[1.0, 1.0, 1.0],
                      prob_mean=[0.6, 0.95, 0.7])
    assert merge_detections(rows, make_config(particles={"focus": "probability"}))["z"].tolist() == [2600.0]


def test_merge_focus_follows_the_logit_peak_or_the_darkest_amplitude_and_drops_faint_ghosts():
    # A saturated probability over five planes; the logits peak at plane 12, the amplitude is darkest at 13.
    rows = detections(1, [10, 11, 12, 13, 14], 0.0, 0.0, [30, 34, 30, 28, 40], logit_mean=[4, 7, 11, 8, 5],
                      amplitude_min=[0.4, 0.3, 0.2, 0.1, 0.3])
    ghost = detections(1, [60, 61], 300.0, 0.0, [50, 60], amplitude_min=[0.7, 0.6])  # contrast 0.4 at best
    table = pd.concat([rows, ghost], ignore_index=True)
    by_logit = merge_detections(table, make_config(particles={"focus": "logit", "min_contrast": 0.5}))
    assert by_logit["z"].tolist() == [3200.0]  # the ghost is dropped by particles.min_contrast 0.5
    focus = rows[rows["plane"] == 12].iloc[0]
    assert (by_logit["x"].iloc[0], by_logit["d"].iloc[0]) == (focus["x"], focus["d"])
    darkest = merge_detections(table, make_config(particles={"min_contrast": 0.5}))
    assert darkest["z"].tolist() == [3300.0]  # darkest amplitude: the default focus
    kept = merge_detections(table, make_config(particles={"min_contrast": 0.0}))
    assert kept["z"].tolist() == [3300.0, 8100.0]


def test_links_are_overlapping_disks_within_the_depth_gap():
    """Every pair within link_depth in z whose centres are closer than max(distance, (d1 + d2) / 2), and no
    other (a brute-force check on 300 random detections), and their components are single-linkage ones."""
    rng = np.random.default_rng(1)
    x, y, z = rng.uniform(0, 1e-3, (3, 300))
    d = rng.uniform(5e-6, 60e-6, 300)
    pairs = {tuple(p) for p in linked_pairs(x, y, z, d, 2e-5, 1e-4).tolist()}
    i, j = np.triu_indices(300, 1)
    reach = np.maximum(2e-5, 0.5 * (d[i] + d[j]))
    expected = {(a, b) for a, b, keep in zip(i, j, (np.hypot(x[i] - x[j], y[i] - y[j]) <= reach)
                                             & (np.abs(z[i] - z[j]) <= 1e-4)) if keep}
    assert pairs == expected and len(pairs) > 10
    labels = components(np.array(sorted(pairs)), 300)
    graph = scipy.sparse.coo_matrix((np.ones(len(expected)), tuple(np.array(sorted(expected)).T)), shape=(300, 300))
    reference = scipy.sparse.csgraph.connected_components(graph, directed=False)[1]
    crossed = pd.crosstab(labels, reference)
    assert (crossed > 0).sum(axis=1).eq(1).all() and (crossed > 0).sum(axis=0).eq(1).all()


# ---- probability volume ----

@pytest.mark.parametrize("dtype, tolerance", [("uint8", 0.5 / 255), ("float16", 5e-4)])
def test_probability_volume_round_trip(store, tmp_path, dtype, tolerance):
    config = with_overrides(make_config(), {"infer.probability_dtype": dtype, "infer.batch_planes": 3})
    volume_path = tmp_path / "p.zarr"
    infer_chunk(config, None, store, tmp_path / "d.csv", chunk=1, n_chunks=3, probabilities_path=volume_path,
                progress=False, segment=soft_oracle)
    planes = chunk_planes(Z_BINS, 1, 3)
    group = zarr.open_group(volume_path, mode="r")
    stored = group["probability"]
    assert stored.dtype == np.dtype(dtype) and stored.shape == (len(PARTICLES), planes.size, N, N)
    assert stored.chunks == (1, 1, N, N) and stored.compressors  # one plane per chunk, compressed
    assert np.array_equal(group["plane"][:], planes)
    z = z_bin_centres(Z_MIN, Z_MAX, Z_BINS)[planes]
    np.testing.assert_allclose(group["z"][:], z)
    image = open_holodec(store)["image"].values[1].T  # hologram 2, (ny, nx)
    field = hologram_field(torch.from_numpy(image), background=torch.ones(()))
    reference = Propagator(field, wavelength=WAVELENGTH, dx=DX, dy=DX, pad=32, band_limit=True).reconstruct(z)
    expected = torch.sigmoid(soft_oracle(*reference)).numpy()
    # xarray applies the uint8 volume's scale_factor.
    decoded = xr.open_zarr(volume_path, consolidated=False)["probability"].values[1]
    assert np.abs(decoded - expected).max() <= tolerance + 1e-6
    assert expected.max() > 0.9 and expected.min() < 0.01  # the test sees both ends of the scale


# ---- resuming after a kill ----

class FailingOracle:
    """:func:`oracle`, counting its calls (plane batches) and failing from call ``fail_at`` on: a job that dies
    part-way through a split."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, amplitude, phase):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("killed")
        return oracle(amplitude, phase)


def test_a_rerun_sweeps_only_the_holograms_not_finished(store, unsharded, tmp_path):
    config = with_overrides(make_config(), {"infer.batch_planes": 20})  # 3 batches per hologram
    segment, out = FailingOracle(fail_at=5), tmp_path / "d.csv"
    with pytest.raises(RuntimeError, match="killed"):  # during hologram 2
        infer_chunk(config, None, store, out, chunk=0, n_chunks=1, progress=False, segment=segment)
    assert not out.exists() and sorted(p.name for p in (tmp_path / "d.csv.parts").glob("hologram_*")) == [
        "hologram_000001.csv"]
    segment.calls, segment.fail_at = 0, None
    # Another plane batch changes no result, so the finished hologram is kept.
    infer_chunk(with_overrides(config, {"infer.batch_planes": 30}), None, store, out, chunk=0, n_chunks=1,
                progress=False, segment=segment)
    assert segment.calls == 2  # hologram 2's 60 planes only
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(unsharded))
    assert not (tmp_path / "d.csv.parts").exists()


def test_finished_holograms_of_another_config_are_not_reused(store, unsharded, tmp_path):
    segment, out = FailingOracle(fail_at=16), tmp_path / "d.csv"  # 15 batches of 4: hologram 1
    with pytest.raises(RuntimeError):
        infer_chunk(make_config(), None, store, out, chunk=0, n_chunks=1, progress=False, segment=segment)
    segment.calls, segment.fail_at = 0, None
    stricter = with_overrides(make_config(), {"infer.threshold": 0.9})
    infer_chunk(stricter, None, store, out, chunk=0, n_chunks=1, progress=False, segment=segment)
    assert segment.calls == 30  # both holograms again


def test_finished_holograms_of_other_code_are_not_reused(store, unsharded, tmp_path, monkeypatch):
    """A `git pull` between a kill and the rerun (another source digest, same version) sweeps hologram 1 again."""
    segment, out = FailingOracle(fail_at=16), tmp_path / "d.csv"  # 15 batches of 4: hologram 1
    with pytest.raises(RuntimeError):
        infer_chunk(make_config(), None, store, out, chunk=0, n_chunks=1, progress=False, segment=segment)
    assert (tmp_path / "d.csv.parts" / "hologram_000001.csv").is_file()
    segment.calls, segment.fail_at = 0, None
    monkeypatch.setattr(holopipe.detect.infer, "code_identity", lambda: {**code_identity(), "source_sha256": "pulled"})
    infer_chunk(make_config(), None, store, out, chunk=0, n_chunks=1, progress=False, segment=segment)
    assert segment.calls == 30  # both holograms again
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(unsharded))


@pytest.fixture(scope="module")
def six_hologram_store(tmp_path_factory):
    return write_zarr(hologram_dataset(PARTICLES * 3), tmp_path_factory.mktemp("six") / "six.zarr")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A trained (1 epoch) plain U-Net, width 4, and the config it runs with, as a YAML file."""
    directory = tmp_path_factory.mktemp("model")
    examples = write_synthetic_examples(directory / "ex.zarr", 8, 32, contrast_std=0.2, seed=1)
    stats = write_stats({"contrast_mean": 1.0, "contrast_std": 0.2}, directory / "stats.json")
    sections = {"model": {"architecture": "plain_unet", "width": 4, "depth": 2},
                "train": {"epochs": 1, "batch_size": 4, "num_workers": 0, "device": "cpu"},
                "infer": {"device": "cpu", "threshold": 0.3, "batch_planes": 5}}
    config = make_config(**sections)
    result = train_model(config, examples, examples, directory / "model", stats_path=stats, progress=False)
    config_file = directory / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return result.model_path, config, config_file


@pytest.mark.slow
def test_infer_killed_mid_split_resumes_and_gives_the_uninterrupted_result(six_hologram_store, tiny_model,
                                                                           tmp_path):
    model, config, config_file = tiny_model
    out, volume = tmp_path / "killed" / "d.csv", tmp_path / "killed" / "p.zarr"
    command = [str(Path(sys.executable).with_name("holopipe")), "--threads", "1", "infer", "--model", str(model),
               "--in", str(six_hologram_store), "--out", str(out), "--probabilities", str(volume),
               "--config", str(config_file)]
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        parts = tmp_path / "killed" / "d.csv.parts"
        deadline = time.monotonic() + 600  # a loaded machine may take minutes to start torch
        while not any(parts.glob("hologram_*.csv")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        job.send_signal(signal.SIGKILL)
        job.wait()
    finished = sorted(parts.glob("hologram_*.csv"))
    assert 1 <= len(finished) < 6, f"to be killed mid-split, it ended with {job.returncode}: {log.read_text()}"
    assert not out.exists() and not volume.exists()  # nothing half-written in place
    rerun = subprocess.run(command, capture_output=True, text=True, check=True)
    assert f"{6 - len(finished)} of 6 holograms to sweep ({len(finished)} finished before" in rerun.stderr
    assert rerun.stderr.count("planes/s") == 6 - len(finished)  # one timing line per hologram swept

    whole = infer_chunk(config, model, six_hologram_store, tmp_path / "whole" / "d.csv", chunk=0, n_chunks=1,
                        probabilities_path=tmp_path / "whole" / "p.zarr", progress=False)
    detections = pd.read_csv(whole)
    assert detections["hid"].nunique() >= 2  # the test compares real tables
    pd.testing.assert_frame_equal(pd.read_csv(out), detections)
    resumed, uninterrupted = (zarr.open_group(path, mode="r")["probability"][:]
                              for path in (volume, whole.with_name("p.zarr")))
    assert np.array_equal(resumed, uninterrupted) and resumed.max() > 0


# ---- the hot path: no host waits in the plane loop, the same pixels as before ----

# 160 x 96 pixels of 2.96 x 3.6 µm (wider than tall, pixels taller than wide), as in test_axes.
FRAME = Optics(wavelength=WAVELENGTH, dx=2.96e-6, dy=3.6e-6, nx=160, ny=96, z_min=Z_MIN, z_max=Z_MAX)
FRAME_PARTICLES = ParticleSet(x=np.array([-150e-6, 140e-6, 0.0]), y=np.array([-70e-6, -40e-6, 80e-6]),
                              z=np.array([3.5e-3, 6.2e-3, 8.5e-3]), d=np.array([25e-6, 32e-6, 40e-6]))
FRAME_PLANES = z_bin_centres(Z_MIN, Z_MAX, 24)


@pytest.fixture(scope="module")
def frame_image():
    """A noise-free standardized hologram (ny, nx) = (96, 160) with dx != dy."""
    field = opaque_disks_field(FRAME_PARTICLES, FRAME, pad=32)
    image = camera_image(field, np.random.default_rng(0), FRAME, Camera(noise=False, beam_waist=None))
    image = image.astype(np.float32)
    return image / image.mean()


def frame_sweep(image, segment, *, device="cpu", batch_planes=5, consume, planes=FRAME_PLANES, **options):
    with ThreadPoolExecutor(1) as pool:
        return sweep_hologram(image, planes, segment, wavelength=WAVELENGTH, dx=FRAME.dx, dy=FRAME.dy, pad=32,
                              band_limit=True, batch_planes=batch_planes, threshold=0.5, device=torch.device(device),
                              pool=pool, consume=consume, **options)


def handed_over(image, segment, **options):
    """Every batch's (first, rows_cols, values, probability) as :func:`sweep_hologram` hands them over."""
    batches = []
    frame_sweep(image, segment, consume=lambda *batch: batches.append(batch), **options)
    return sorted(batches, key=lambda batch: batch[0])


def former_hand_over(image, segment, batch_planes=5):
    """The pixels as the loop found them before it stopped waiting: torch.nonzero and boolean masks."""
    propagator = Propagator(hologram_field(torch.from_numpy(image), background=1.0), wavelength=WAVELENGTH,
                            dx=FRAME.dx, dy=FRAME.dy, pad=32, band_limit=True)
    batches = []
    for first in range(0, FRAME_PLANES.size, batch_planes):
        amplitude, phase = propagator.reconstruct(FRAME_PLANES[first:first + batch_planes])
        logits = segment(amplitude, phase)
        probability = torch.sigmoid(logits)
        above = probability > 0.5
        values = torch.stack([probability[above], logits[above], smoothed_amplitude(amplitude.float())[above]],
                             dim=1).float()
        batches.append((first, torch.nonzero(above).numpy(), values.numpy()))
    return batches


def test_sparse_pixels_are_torch_nonzero_in_fixed_slots_and_say_when_they_overflow():
    logits = 4 * torch.randn(3, 40, 56, generator=torch.Generator().manual_seed(0)) - 6  # ~7 % above 0.5
    amplitude = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(1))
    smoothed = smoothed_amplitude(amplitude)
    above = torch.sigmoid(logits) > 0.5
    expected_flat = torch.nonzero(above.reshape(-1))[:, 0]
    expected_values = torch.stack([torch.sigmoid(logits)[above], logits[above], smoothed[above]], dim=1)
    n = expected_flat.numel()
    assert 100 < n < 3 * 40 * 56 // 4
    roomy = sparse_pixels(logits, amplitude, 0.5, n + 50)
    assert int(roomy.count) == n and roomy.flat.shape == (n + 50,) and roomy.values.shape == (n + 50, 3)
    assert torch.equal(roomy.flat[:n], expected_flat) and torch.equal(roomy.values[:n], expected_values)
    tight = sparse_pixels(logits, amplitude, 0.5, 30)
    assert int(tight.count) == n > tight.flat.numel() == 30  # the overflow shows in the count
    assert torch.equal(tight.flat, expected_flat[:30]) and torch.equal(tight.values, expected_values[:30])
    cropped = torch.nn.functional.pad(logits, (0, 8, 0, 8))[:, :40, :56]  # as a segmenter crops its padding
    assert torch.equal(sparse_pixels(cropped, amplitude, 0.5, n).flat, expected_flat)


@pytest.mark.parametrize("capacity", [None, 1, 40])
def test_sweep_hands_over_exactly_the_former_pixels_whatever_the_capacity(frame_image, capacity):
    # capacity 1 and 40 overflow (the exact pass in the worker; then the capacity grows), the default does not.
    former = former_hand_over(frame_image, oracle)
    assert sum(len(rows_cols) for _, rows_cols, _ in former) > 40 * len(former)  # overflows do happen
    now = handed_over(frame_image, oracle, capacity=capacity)
    assert [batch[0] for batch in now] == [batch[0] for batch in former]
    for (_, rows_cols, values, probability), (_, former_rows_cols, former_values) in zip(now, former):
        assert rows_cols.dtype == np.int64 and values.dtype == np.float32 and probability is None
        assert np.array_equal(rows_cols, former_rows_cols) and np.array_equal(values, former_values)


def test_sweep_quantizes_the_volume_and_times_its_parts(frame_image):
    batches = []
    timing = frame_sweep(frame_image, soft_oracle, consume=lambda *batch: batches.append(batch),
                         quantize=lambda probability: torch.round(probability * 255).to(torch.uint8))
    volume = np.concatenate([batch[3] for batch in sorted(batches, key=lambda batch: batch[0])])
    propagator = Propagator(hologram_field(torch.from_numpy(frame_image), background=1.0), wavelength=WAVELENGTH,
                            dx=FRAME.dx, dy=FRAME.dy, pad=32, band_limit=True)
    expected = torch.round(torch.sigmoid(soft_oracle(*propagator.reconstruct(FRAME_PLANES))) * 255).to(torch.uint8)
    assert volume.dtype == np.uint8 and np.array_equal(volume, expected.numpy()) and 0 < volume.mean() < 255
    assert timing.planes == FRAME_PLANES.size
    assert min(timing.propagation, timing.model, timing.postprocess) > 0 and timing.seconds > timing.model


def test_at_most_two_batches_wait_for_the_worker_and_its_errors_surface(frame_image):
    assert BATCHES_IN_FLIGHT == 2
    calls, seen = [], []

    def counting_oracle(amplitude, phase):
        calls.append(amplitude.shape[0])
        return oracle(amplitude, phase)

    def slow_consume(first, *rest):
        if first == 0:  # the first batch holds the worker: the loop may run ahead only so far
            deadline = time.monotonic() + 10
            while len(calls) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
            seen.append(len(calls))

    frame_sweep(frame_image, counting_oracle, consume=slow_consume)  # 5 batches of 5 planes
    # Batch 0 with the worker, batch 1 queued, batch 2 computed: its hand-over waits for batch 0.
    assert seen == [3] and len(calls) == 5

    def failing_consume(first, *rest):
        if first == 10:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        frame_sweep(frame_image, oracle, consume=failing_consume)


def test_compiled_segmenter_sees_one_batch_shape_and_gives_the_same_logits():
    torch.manual_seed(0)
    model = PlainUNet(2, width=4, depth=2).eval()
    shapes = []  # of real inputs: the segmenter traces the model's activation sizes on the meta device first
    model.register_forward_pre_hook(lambda module, args: None if args[0].is_meta
                                    else shapes.append(tuple(args[0].shape)))
    stats, channels = {"contrast_std": 0.2}, ["amplitude", "phase"]
    amplitude, phase = 1 + 0.2 * torch.randn(3, 30, 45), 0.2 * torch.randn(3, 30, 45)
    padded = model_segmenter(model, channels, stats, 4, batch_planes=5)(amplitude, phase)
    assert shapes == [(5, 2, 32, 48)] and padded.shape == (3, 30, 45)
    torch.testing.assert_close(padded, model_segmenter(model, channels, stats, 4)(amplitude, phase))


class Plane:
    """Stands in for a zarr array in the writer tests: records writes, can fail or hold them."""

    def __init__(self, fail_at=None, hold=None):
        self.written, self.fail_at, self.hold = {}, fail_at, hold

    def __setitem__(self, key, values):
        if self.hold is not None:
            self.hold.wait(10)
        if key[1] == self.fail_at:
            raise OSError(f"cannot write plane {key[1]}")
        self.written[key] = values.copy()


def test_volume_writer_writes_every_plane_and_raises_a_failed_write():
    planes = np.arange(2 * 5 * 4 * 6, dtype=np.uint8).reshape(2, 5, 4, 6)
    target = Plane()
    with VolumeWriter(target, 3, 4) as writer:
        writer.write(1, 0, planes[1, :3])
        writer.write(1, 3, planes[1, 3:])
        writer.flush()
    assert sorted(target.written) == [(1, plane) for plane in range(5)]
    assert all(np.array_equal(target.written[1, plane], planes[1, plane]) for plane in range(5))
    with VolumeWriter(Plane(fail_at=3), 2, 8) as writer:
        writer.write(0, 0, planes[0])
        with pytest.raises(OSError, match="plane 3"):
            writer.flush()


def test_volume_writer_blocks_rather_than_queue_more_than_its_planes():
    hold = threading.Event()
    target = Plane(hold=hold)
    with VolumeWriter(target, 2, 3) as writer:
        producer = threading.Thread(target=writer.write, args=(0, 0, np.zeros((6, 4, 4), np.uint8)))
        producer.start()
        time.sleep(0.3)
        assert producer.is_alive() and len(writer._pending) == 3 and not target.written  # held, bounded
        hold.set()
        producer.join(10)
        writer.flush()
    assert not producer.is_alive() and len(target.written) == 6


def test_compile_and_writers_change_no_fingerprint(store):
    config = make_config()
    fingerprint = resume_fingerprint(config, None, store, chunk=0, n_chunks=1, probabilities_path=None)
    other = with_overrides(config, {"infer.compile": True, "infer.writers": 5})
    assert resume_fingerprint(other, None, store, chunk=0, n_chunks=1, probabilities_path=None) == fingerprint
    stricter = with_overrides(config, {"infer.threshold": 0.9})
    assert resume_fingerprint(stricter, None, store, chunk=0, n_chunks=1, probabilities_path=None) != fingerprint


@pytest.mark.slow
def test_infer_compile_compiles_the_folded_model_for_one_batch_shape(tiny_model, store, tmp_path, monkeypatch,
                                                                     caplog):
    model_path, config, _ = tiny_model
    compiled, shapes = [], []

    def fake_compile(model, **options):  # what torch.compile is handed; no inductor run here
        compiled.append((model, options))
        model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = with_overrides(config, {"infer.batch_planes": 7})
    with caplog.at_level(logging.INFO, logger="holopipe"):
        with_compile = infer_chunk(with_overrides(config, {"infer.compile": True}), model_path, store,
                                   tmp_path / "compiled.csv", chunk=0, n_chunks=1, progress=False)
    assert len(compiled) == 1 and compiled[0][1] == {"dynamic": False}
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in compiled[0][0].modules())
    assert set(shapes) == {(7, 2, N, N)} and len(shapes) == 2 * 9  # 60 planes: 8 batches of 7, 4 padded to 7
    assert "infer.device: CPU" in caplog.text and "torch.compile for batches of 7 planes" in caplog.text
    plain = infer_chunk(config, model_path, store, tmp_path / "plain.csv", chunk=0, n_chunks=1, progress=False)
    assert len(compiled) == 1  # infer.compile false: not compiled
    expected = pd.read_csv(plain)
    assert len(expected) > 0
    pd.testing.assert_frame_equal(pd.read_csv(with_compile), expected, rtol=1e-4)


# ---- on a GPU (skipped without CUDA) ----

def oracle_network() -> torch.nn.Module:
    """A network computing about :func:`oracle`'s logits, ``-20 (a - 0.5)``, from the normalised amplitude
    ``(a - 1) / 0.2``: a 1x1 convolution, a batch norm to fold (an identity in effect) and a 3x3 box."""
    network = torch.nn.Sequential(torch.nn.Conv2d(2, 1, 1), torch.nn.BatchNorm2d(1),
                                  torch.nn.Conv2d(1, 1, 3, padding=1, bias=False))
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([-4.0, 0.0]).reshape(1, 2, 1, 1))
        network[0].bias.fill_(-10.0)
        network[1].running_mean.fill_(1.0)
        network[1].running_var.fill_(4.0)
        network[1].weight.fill_(2.0)
        network[1].bias.fill_(1.0)
        network[2].weight.fill_(1.0 / 9.0)
    return network.eval()


def frame_detections(image, segment, **options) -> pd.DataFrame:
    """Detections (with their plane) of :func:`frame_sweep`, at least 4 pixels each."""
    tables = []

    def consume(first, rows_cols, values, probability):
        for slot, table in batch_detections(rows_cols, values, shape=(FRAME.ny, FRAME.nx), min_area=4, dx=FRAME.dx,
                                            dy=FRAME.dy):
            tables.append(table.assign(plane=first + slot))

    frame_sweep(image, segment, consume=consume, **options)
    assert tables, "no detections to compare"
    return pd.concat(tables, ignore_index=True)


def assert_same_detections(first: pd.DataFrame, second: pd.DataFrame) -> None:
    """Every detection of 10 pixels or more in either table has one in the other on its plane within a pixel."""
    pixel_um = max(FRAME.dx, FRAME.dy) * 1e6
    assert first["plane"].nunique() >= 3
    for one, other in ((first, second), (second, first)):
        for _, detection in one[one["area"] >= 10].iterrows():
            same_plane = other[other["plane"] == detection["plane"]]
            assert len(same_plane), f"plane {detection['plane']}: a detection at {detection['x']:.1f}, " \
                                    f"{detection['y']:.1f} µm has no counterpart"
            assert np.hypot(same_plane["x"] - detection["x"], same_plane["y"] - detection["y"]).min() <= pixel_um


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_finds_the_fp32_detections_within_a_pixel(frame_image, dtype):
    network = fold_batchnorm(oracle_network(), torch.randn(1, 2, 4, 4)).cuda().to(memory_format=torch.channels_last)

    def segmenter(amp_dtype):
        return model_segmenter(network, ["amplitude", "phase"], {"contrast_std": 0.2}, 1, amp_dtype=amp_dtype,
                               channels_last=True)

    reference = frame_detections(frame_image, segmenter(None), device="cuda")
    assert_same_detections(reference, frame_detections(frame_image, segmenter(dtype), device="cuda"))


@pytest.mark.gpu
def test_channels_last_on_cuda_gives_the_cpu_logits(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare fp32 with fp32
    torch.manual_seed(0)
    model = PlainUNet(2, width=4, depth=2).eval()
    on_gpu = copy.deepcopy(model).cuda().to(memory_format=torch.channels_last)
    layouts = []
    on_gpu.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    stats, channels = {"contrast_std": 0.2}, ["amplitude", "phase"]
    amplitude, phase = 1 + 0.2 * torch.randn(3, 30, 45), 0.2 * torch.randn(3, 30, 45)
    expected = model_segmenter(model, channels, stats, 4)(amplitude, phase)
    logits = model_segmenter(on_gpu, channels, stats, 4, channels_last=True)(amplitude.cuda(), phase.cuda())
    assert layouts == [True] and logits.is_cuda
    torch.testing.assert_close(logits.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_device_hand_over_gives_the_cpu_detections_and_overflows_exactly(frame_image):
    from holopipe.detect.infer import _host_copy

    assert _host_copy(torch.ones(3, device="cuda")).is_pinned()
    roomy = handed_over(frame_image, oracle, device="cuda")
    tight = handed_over(frame_image, oracle, device="cuda", capacity=1)  # the exact pass after an overflow
    assert len(roomy) == len(tight) == 5
    for (first, rows_cols, values, _), (tight_first, tight_rows_cols, tight_values, _) in zip(roomy, tight):
        assert first == tight_first and np.array_equal(rows_cols, tight_rows_cols)
        assert np.array_equal(values, tight_values)
    # cuFFT and pocketfft round differently, so pixels at the threshold may differ: compare detections.
    assert_same_detections(frame_detections(frame_image, oracle, device="cuda"), frame_detections(frame_image, oracle))


@pytest.mark.gpu
def test_the_plane_loop_does_not_wait_for_the_gpu(frame_image):
    """torch's sync debug mode flags every synchronising call; the loop's count must not grow with batches
    (the hologram's upload before the loop and the timing read after it are once per hologram)."""

    def main_thread_syncs(n_planes: int) -> list[str]:
        main, where = threading.get_ident(), []

        def show(message, category, filename, lineno, file=None, line=None):
            if threading.get_ident() == main and "synchroniz" in str(message):
                where.append(f"{filename}:{lineno}")

        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                frame_sweep(frame_image, oracle, device="cuda", batch_planes=2, planes=FRAME_PLANES[:n_planes],
                            consume=lambda *batch: None,
                            quantize=lambda probability: torch.round(probability * 255).to(torch.uint8))
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        return where

    main_thread_syncs(4)  # warm-up: FFT plans, caching allocators (device and pinned host)
    few, many = main_thread_syncs(4), main_thread_syncs(16)
    assert len(many) == len(few), f"synchronising calls in the plane loop (2 vs 8 batches): {many}"


@pytest.mark.gpu
def test_infer_on_cuda_in_bf16_says_so_and_finds_what_fp32_finds(tiny_model, store, tmp_path, caplog):
    model_path, config, _ = tiny_model
    on_gpu = with_overrides(config, {"infer.device": "cuda", "infer.precision": "fp32"})
    with caplog.at_level(logging.INFO, logger="holopipe"):
        half = infer_chunk(with_overrides(on_gpu, {"infer.precision": "bf16"}), model_path, store,
                           tmp_path / "bf16.csv", chunk=0, n_chunks=1, progress=False)
    assert "infer.device: cuda:" in caplog.text and "bfloat16 autocast" in caplog.text
    full = pd.read_csv(infer_chunk(on_gpu, model_path, store, tmp_path / "fp32.csv", chunk=0, n_chunks=1,
                                   progress=False))
    half = pd.read_csv(half)
    assert list(half.columns) == list(DETECTION_COLUMNS) and len(full) > 0
    # A one-epoch model is unsure near its threshold: most of its surer half of detections survive bf16.
    confident = full[full["prob_max"] >= full["prob_max"].median()]
    kept = confident.merge(half, on=["hid", "plane"], suffixes=("", "_half"))
    kept = kept[np.hypot(kept["x"] - kept["x_half"], kept["y"] - kept["y_half"]) <= DX * 1e6]
    assert len(kept.drop_duplicates(["hid", "plane", "x", "y"])) >= 0.8 * len(confident)


# ---- a safe plane batch: runs below 2^31 elements, batches within the job's memory ----

HOLODEC_FRAME = (3584, 5120)  # (ny, nx) of a full-size HOLODEC hologram regridded to whole 512 tiles
GIB = 2**30


def stem() -> torch.nn.Module:
    """A ResNet stem (7x7 convolution to 64 channels at stride 2, max-pool at stride 2) and a 1x1 head."""
    return torch.nn.Sequential(torch.nn.Conv2d(2, 64, 7, stride=2, padding=3), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(3, stride=2, padding=1), torch.nn.Conv2d(64, 1, 1),
                               torch.nn.Upsample(scale_factor=4)).eval()


def test_a_full_size_batch_runs_in_pieces_whose_largest_activation_stays_below_2_31():
    # Traced on the meta device: the full-size frame costs no memory here.
    stem_output = 64 * (HOLODEC_FRAME[0] // 2) * (HOLODEC_FRAME[1] // 2)
    assert largest_activation(stem(), (2, *HOLODEC_FRAME)) == stem_output == 293_601_280
    # The channels-last max-pool's int32 index, batch_id x plane stride, overflows at 9 planes (batch_id 8); a
    # whole tensor of 8 planes has passed 2^31 elements already, so runs hold 7 at most.
    assert 7 * stem_output < 2**31 < 8 * stem_output
    assert planes_per_run(stem_output, 8) == 4  # at most 7 per run: 8 planes in two runs of 4, not 7 + 1
    assert planes_per_run(stem_output, 9) == 5 and planes_per_run(stem_output, 64) == 7
    assert all(planes_per_run(stem_output, batch) * stem_output < 2**31 for batch in range(1, 200))
    # config/holodec.yaml's LinkNet: its last decoder block (32 channels at full resolution) is the largest.
    linknet = build_model({"architecture": "linknet", "encoder": "resnet18", "depth": 5}, 2).eval()
    largest = largest_activation(linknet, (2, *HOLODEC_FRAME))
    assert largest == 32 * HOLODEC_FRAME[0] * HOLODEC_FRAME[1]
    assert planes_per_run(largest, 8) == 3  # infer.batch_planes 8: runs of 3, 3 and 2
    with pytest.raises(ValueError, match="not below 2\\^31"):
        planes_per_run(2**31, 1)


def test_the_segmenter_runs_a_batch_that_crosses_the_limit_in_pieces(monkeypatch):
    torch.manual_seed(0)
    model = PlainUNet(2, width=4, depth=2).eval()
    shapes = []
    model.register_forward_pre_hook(lambda module, args: None if args[0].is_meta
                                    else shapes.append(tuple(args[0].shape)))
    stats, channels = {"contrast_std": 0.2}, ["amplitude", "phase"]
    amplitude, phase = 1 + 0.2 * torch.randn(5, 30, 45), 0.2 * torch.randn(5, 30, 45)
    whole = model_segmenter(model, channels, stats, 4)(amplitude, phase)
    assert shapes == [(5, 2, 32, 48)]
    per_plane = largest_activation(model, (2, 32, 48))  # a 30 x 45 frame padded to the stride 4
    real = []  # the same on a real input: every module's inputs and outputs
    hooks = [module.register_forward_hook(lambda module, inputs, output: real.extend(
        tensor.numel() for tensor in (*inputs, output))) for module in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, 2, 32, 48))
    for hook in hooks:
        hook.remove()
    assert per_plane == max(real) >= 4 * 32 * 48  # at least the full-resolution features
    monkeypatch.setattr(holopipe.detect.sweep, "ACTIVATION_ELEMENT_LIMIT", 2 * per_plane + 1)  # 2 planes per run
    shapes.clear()
    pieces = model_segmenter(model, channels, stats, 4)(amplitude, phase)
    assert shapes == [(2, 2, 32, 48), (2, 2, 32, 48), (1, 2, 32, 48)] and pieces.shape == (5, 30, 45)
    torch.testing.assert_close(pieces, whole)
    shapes.clear()  # a fixed batch (torch.compile): every run the same length, the last padded
    fixed = model_segmenter(model, channels, stats, 4, batch_planes=5)(amplitude[:3], phase[:3])
    assert shapes == [(2, 2, 32, 48), (2, 2, 32, 48)]
    torch.testing.assert_close(fixed, whole[:3])
    monkeypatch.setattr(holopipe.detect.sweep, "ACTIVATION_ELEMENT_LIMIT", per_plane)
    with pytest.raises(ValueError, match="too large for this model"):
        model_segmenter(model, channels, stats, 4)(amplitude, phase)


def test_a_batch_holds_no_more_planes_than_the_job_memory(monkeypatch):
    cpu = torch.device("cpu")
    ny, nx = HOLODEC_FRAME
    frame, padded = ny * nx, (ny + 512) * (nx + 512)  # pad 256
    monkeypatch.setattr(holopipe.detect.infer.psutil, "virtual_memory",
                        lambda: type("Memory", (), {"available": 512 * GIB}))
    # The OOM: 8 planes on the CPU against 8380 MB. One plane needs 9.3 GB: a clear error, not a kill.
    with pytest.raises(MemoryError, match="one plane needs about 10865 MB.*--mem-mb 8380.*GPU"):
        plane_batch(8, infer_memory(cpu, frame_pixels=frame, padded_pixels=padded, mem_mb=8380),
                    what="valid: a 5120 x 3584 frame")
    memory = infer_memory(cpu, frame_pixels=frame, padded_pixels=padded, mem_mb=32_000)
    assert memory.per_plane == 30 * padded + 470 * frame and memory.per_plane / GIB == pytest.approx(8.67, abs=0.01)
    assert plane_batch(8, memory, what="") == 3 and "--mem-mb 32000" in memory.source
    assert plane_batch(2, memory, what="") == 2  # fewer asked: as asked
    # What the machine has caps it as well: a job that declared more than is free.
    monkeypatch.setattr(holopipe.detect.infer.psutil, "virtual_memory",
                        lambda: type("Memory", (), {"available": 20 * GIB}))
    machine = infer_memory(cpu, frame_pixels=frame, padded_pixels=padded, mem_mb=64_000)
    assert machine.source == "the machine's available memory" and plane_batch(8, machine, what="") == 2
    # On a GPU: its free memory, a plane's propagation and its largest activations in the autocast dtype.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * GIB, 80 * GIB))
    gpu = infer_memory(torch.device("cuda"), frame_pixels=frame, padded_pixels=padded,
                       activation_elements=32 * frame, element_bytes=2)
    assert gpu.budget == int(0.9 * 40 * GIB) and gpu.per_plane == 30 * padded + 3 * 32 * frame * 2
    assert plane_batch(64, gpu, what="") == 8


def test_infer_sizes_its_batches_to_mem_mb_and_says_so(store, unsharded, tmp_path, caplog):
    batches = []

    def counting_oracle(amplitude, phase):
        batches.append(amplitude.shape[0])
        return oracle(amplitude, phase)

    padded = (N + 2 * 32) ** 2
    two_planes = (holopipe.detect.infer.INFER_LIBRARIES_BYTES + 40 * padded + 2 * (30 * padded + 470 * N * N)) / 2**20
    with caplog.at_level(logging.INFO, logger="holopipe"):
        out = infer_chunk(make_config(), None, store, tmp_path / "d.csv", chunk=0, n_chunks=1, progress=False,
                          segment=counting_oracle, mem_mb=int(two_planes) + 1)
    assert "batches of 2 planes (infer.batch_planes 4; the job's memory (--mem-mb" in caplog.text
    assert set(batches) == {2} and len(batches) == 2 * Z_BINS // 2
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(unsharded))  # the same detections
    with pytest.raises(MemoryError, match="test.zarr: a 128 x 128 frame: one plane needs"):
        infer_chunk(make_config(), None, store, tmp_path / "e.csv", chunk=0, n_chunks=1, progress=False,
                    segment=oracle, mem_mb=1100)


def test_infer_logs_the_model_runs_of_a_model_file(tiny_model, store, tmp_path, caplog):
    model_path, config, _ = tiny_model
    with caplog.at_level(logging.INFO, logger="holopipe"):
        infer_chunk(with_overrides(config, {"infer.batch_planes": 6}), model_path, store, tmp_path / "d.csv",
                    chunk=0, n_chunks=1, progress=False)
    per_plane = largest_activation(holopipe.detect.infer.inference_model(model_path, torch.device("cpu"))[0], (2, N, N))
    assert (f"the model takes 6 at a time (largest activation {per_plane} elements per plane, below 2^31 per run)"
            in caplog.text)


@pytest.mark.workflow
def test_declared_memory_follows_the_device_the_job_will_use(tmp_path):
    # A 2048 x 1536 frame, 8 planes per batch: on the CPU 8 planes of activations; on a GPU the host's share;
    # with auto one CPU plane at least (a node without a GPU runs it there), and the job is told its memory.
    config = {**TINY, "optics": {**TINY["optics"], "nx": 2048, "ny": 1536},
              "examples": {**TINY["examples"], "tile_size": 64}}
    declared = {}
    for device in ("cpu", "auto", "cuda"):
        result = snakemake(tmp_path, "-n", "-p", "--cores", "2", "infer",
                           config={**config, "infer": {**TINY["infer"], "device": device, "batch_planes": 8}})
        assert result.returncode == 0, result.stdout + result.stderr
        memory = re.findall(r"mem_mb=(\d+)", result.stdout.split("rule infer_chunk:", 1)[1])
        declared[device] = int(memory[0])
        assert f"--mem-mb {declared[device]}" in result.stdout
    frame, padded = 2048 * 1536, (2048 + 32) * (1536 + 32)
    one_cpu_plane = (1100 * 2**20 + 40 * padded + 30 * padded + 470 * frame) / 2**20
    assert declared["cuda"] < declared["auto"] < declared["cpu"]
    assert declared["auto"] == pytest.approx(one_cpu_plane, abs=1)
    assert declared["cpu"] == pytest.approx(one_cpu_plane + 7 * (30 * padded + 470 * frame) / 2**20, abs=1)


# ---- thresholding on logits: the sigmoid and the box average at the selected pixels only ----

@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.9, 1e-6, 1 - 1e-6])
def test_logit_threshold_is_the_boundary_of_the_float32_sigmoid(threshold):
    boundary = logit_threshold(threshold, torch.device("cpu"))
    below = np.nextafter(np.float32(boundary), np.float32(-np.inf))
    assert torch.sigmoid(torch.full((64,), boundary))[0] > threshold >= torch.sigmoid(torch.full((64,), below))[0]
    if 0.01 < threshold < 0.99:  # near 0 and 1 the float32 sigmoid's steps are coarse next to 1 - t or t
        assert boundary == pytest.approx(np.log(threshold / (1 - threshold)), rel=1e-5, abs=1e-7)
    assert logit_threshold(0.5, torch.device("cpu")) > 0  # sigmoid rounds to 0.5 up to about 6e-8


def test_the_box_average_at_pixels_is_the_whole_plane_one_bit_for_bit():
    amplitude = torch.rand(3, 37, 53, generator=torch.Generator().manual_seed(0))  # non-square, odd sides
    flat = torch.randperm(amplitude.numel(), generator=torch.Generator().manual_seed(1))[:500]
    corners = torch.tensor([0, 52, 36 * 53, 37 * 53 - 1, 2 * 37 * 53 + 53 * 18 + 1])  # edges repeat outward
    flat = torch.cat([flat, corners])
    assert torch.equal(smoothed_amplitude_at(amplitude, flat), smoothed_amplitude(amplitude).reshape(-1)[flat])


def whole_plane_pixels(amplitude: torch.Tensor, logits: torch.Tensor, threshold: float):
    """The former path: the sigmoid and the box average on every pixel, then the probability thresholded;
    (slot, row, column) and (probability, logit, smoothed amplitude) of the pixels above."""
    probability = torch.sigmoid(logits)
    above = probability > threshold
    smoothed = smoothed_amplitude(amplitude.float())
    return torch.nonzero(above).numpy(), torch.stack([probability[above], logits[above], smoothed[above]], 1).numpy()


@pytest.mark.parametrize("threshold", [0.5, 0.3])
@pytest.mark.parametrize("which", ["graded", "trained"])
def test_thresholding_logits_finds_the_former_pixels_and_detections(frame_image, tiny_model, which, threshold):
    segment = soft_oracle if which == "graded" else load_segmenter(tiny_model[0], torch.device("cpu"), "auto")
    seen = []

    def recording(amplitude, phase):  # the sweep's own planes and logits, for the former path to threshold
        logits = segment(amplitude, phase)
        seen.append((amplitude.clone(), logits.clone()))
        return logits

    now = []
    with ThreadPoolExecutor(1) as pool:
        sweep_hologram(frame_image, FRAME_PLANES, recording, wavelength=WAVELENGTH, dx=FRAME.dx, dy=FRAME.dy,
                       pad=32, band_limit=True, batch_planes=5, threshold=threshold, device=torch.device("cpu"),
                       pool=pool, consume=lambda first, rows_cols, values, _: now.append((first, rows_cols, values)))
    now.sort(key=lambda batch: batch[0])
    assert len(now) == len(seen) == 5
    shape = (FRAME.ny, FRAME.nx)
    found = 0
    for (first, rows_cols, values), (amplitude, logits) in zip(now, seen):
        former_rows_cols, former_values = whole_plane_pixels(amplitude, logits, threshold)
        assert np.array_equal(rows_cols, former_rows_cols) and np.array_equal(values, former_values)
        tables = [batch_detections(pixels, pixel_values, shape=shape, min_area=4, dx=FRAME.dx, dy=FRAME.dy)
                  for pixels, pixel_values in ((rows_cols, values), (former_rows_cols, former_values))]
        assert [slot for slot, _ in tables[0]] == [slot for slot, _ in tables[1]]
        for (_, table), (_, former) in zip(*tables):
            pd.testing.assert_frame_equal(table, former, check_exact=True)
            found += len(table)
    assert found >= 3 and sum(len(rows_cols) for _, rows_cols, _ in now) > 200  # real detections compared


@pytest.mark.gpu
def test_on_cuda_logits_select_the_whole_plane_sigmoid_pixels_and_batches_fit_its_memory(monkeypatch):
    cuda = torch.device("cuda")
    logits = (4 * torch.randn(3, 96, 160, generator=torch.Generator().manual_seed(0)) - 6).to(cuda)
    amplitude = torch.rand(3, 96, 160, generator=torch.Generator().manual_seed(1)).to(cuda)
    for threshold in (0.5, 0.3, 0.9):
        above = torch.sigmoid(logits) > threshold  # CUDA's own sigmoid decides, as the former path did
        pixels = sparse_pixels(logits, amplitude, threshold, int(above.sum()))
        assert torch.equal(pixels.flat, torch.nonzero(above.reshape(-1))[:, 0])
        assert torch.equal(pixels.values[:, 0], torch.sigmoid(logits)[above])
        torch.testing.assert_close(pixels.values[:, 2], smoothed_amplitude(amplitude)[above])
    model = PlainUNet(2, width=4, depth=2).eval().to(cuda)
    phase = torch.zeros_like(amplitude)
    whole = model_segmenter(model, ["amplitude", "phase"], {"contrast_std": 0.2}, 4)(amplitude, phase)
    monkeypatch.setattr(holopipe.detect.sweep, "ACTIVATION_ELEMENT_LIMIT", largest_activation(model, (2, 96, 160)) + 1)
    torch.testing.assert_close(model_segmenter(model, ["amplitude", "phase"], {"contrast_std": 0.2}, 4)(
        amplitude, phase), whole)  # one plane per run
    memory = infer_memory(cuda, frame_pixels=HOLODEC_FRAME[0] * HOLODEC_FRAME[1], padded_pixels=23_068_672,
                          activation_elements=32 * HOLODEC_FRAME[0] * HOLODEC_FRAME[1], element_bytes=2)
    assert 0 < memory.budget <= torch.cuda.mem_get_info(cuda)[0] and plane_batch(64, memory, what="") >= 1
