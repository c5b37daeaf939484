"""Inference and particles: an oracle finds simulated particles, sharding is exact, merging, probability volumes."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.cluster.hierarchy
import scipy.ndimage
import torch
import xarray as xr
import yaml
import zarr

from holopipe.config import load_config, with_overrides
from holopipe.dataset import TileDataset, normalize_channels, write_synthetic_examples
from holopipe.reconstruction import z_bin_centres
from holopipe.infer import (DETECTION_COLUMNS, chunk_planes, detections_in_plane, infer_chunk, model_segmenter,
                            pixel_components)
from holopipe.io import open_holodec, particle_table, um_to_pixel, write_zarr
from holopipe.models import PlainUNet
from holopipe.optics import Propagator, hologram_field
from holopipe.particles import PARTICLE_COLUMNS, cluster_labels, merge_detections, particles_file
from holopipe.simulate import Camera, Optics, ParticleSet, camera_image, opaque_disks_field
from holopipe.standardize import write_stats
from holopipe.train import train_model

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


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two torch threads on a shared 2-core machine spin against each other; one is faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    config = make_config(particles={"distance": 1e-4, "z_scale": 0.1, "min_planes": 2, "focus": "probability"})
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


def test_clusters_are_single_linkage_at_the_distance():
    points = np.random.default_rng(1).uniform(0, 1e-3, (300, 3))
    labels = cluster_labels(points, 5e-5)
    reference = scipy.cluster.hierarchy.fcluster(scipy.cluster.hierarchy.linkage(points, "single"), 5e-5,
                                                 criterion="distance")
    pairs = pd.crosstab(labels, reference)
    assert (pairs > 0).sum(axis=1).eq(1).all() and (pairs > 0).sum(axis=0).eq(1).all()  # same partition


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
