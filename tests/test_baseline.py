"""The physics-only baseline: finds simulated particles, per focus metric, streams, runs on torch as on
numpy, resumes after a kill, and stays quiet on nothing."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from helpers import (
    OPTICS,
    PARTICLES,
    PLANES,
    WIDE,
    WIDE_PARTICLES,
    WIDE_PLANES,
    Z_BINS,
    contrast_hologram,
    found_um,
    propagator_of,
    scene_config,
    scene_dict,
    split_store,
    truth_table,
)

import holopipe.detect.baseline
from holopipe.core.config import load_config
from holopipe.core.io import HolodecFormatError, write_zarr
from holopipe.core.provenance import code_identity
from holopipe.detect.baseline import CSV_COLUMNS, auto_threshold, baseline_file, detections_file, find_particles
from holopipe.detect.particles import particles_file
from holopipe.detect.sweep import BATCHES_IN_FLIGHT, DETECTION_COLUMNS
from holopipe.evaluation.matching import match
from holopipe.optics.propagation import (
    MAX_BATCH_ELEMENTS,
    SWEEP_BYTES_PER_PIXEL,
    SWEEP_MEMORY_SHARE,
    Propagator,
    device_planes_per_batch,
    hologram_field,
    planes_in_memory,
)
from holopipe.optics.reconstruction import z_bin_centres
from holopipe.optics.simulate import ParticleSet


def make_config(**baseline):
    return scene_config(baseline=baseline)


@pytest.fixture(scope="module")
def hologram():
    return contrast_hologram(PARTICLES)


@pytest.fixture(scope="module")
def store(tmp_path_factory, hologram):
    """A standardized split: hologram 1 holds the three particles, hologram 2 none (flat)."""
    return split_store(tmp_path_factory.mktemp("baseline") / "test.zarr", [hologram, np.ones_like(hologram)],
                       truth=truth_table(PARTICLES))


def test_auto_threshold_sits_sigmas_below_the_background_mode_despite_dark_outliers():
    rng = np.random.default_rng(0)
    background = rng.normal(1.0, 0.05, 200_000)
    threshold, mode, sigma = auto_threshold(np.concatenate([background, np.full(2_000, 0.1)]), 5.0)
    assert mode == pytest.approx(1.0, abs=0.01)
    assert sigma == pytest.approx(0.05, rel=0.05)
    assert threshold == pytest.approx(mode - 5 * sigma)


def test_baseline_file_finds_the_isolated_particles_and_nothing_in_an_empty_hologram(store, tmp_path):
    out = baseline_file(make_config(), store, tmp_path / "particles" / "test_baseline.csv", progress=False)
    found = pd.read_csv(out)
    assert tuple(found.columns) == CSV_COLUMNS
    assert set(found["hid"]) == {1}, "the flat hologram 2 has no particles"
    config = make_config()["evaluate"]
    pairs = match(truth_table(PARTICLES), found, config["tolerance_xy"], config["tolerance_z"])
    assert len(pairs) == 3 and len(found) == 3
    assert np.all(np.abs(pairs["error_d"]) <= 3 * OPTICS.dx * 1e6)
    assert found["score"].between(0.5, 1.0).all(), "focused opaque droplets reconstruct nearly black"


@pytest.mark.parametrize("metric", ["min_amplitude", "edge_sharpness", "tamura"])
def test_every_focus_metric_places_the_particles_within_tolerance(hologram, metric):
    config = make_config(focus_metric=metric)
    found = find_particles(propagator_of(hologram), PLANES, config["baseline"], dx=OPTICS.dx, dy=OPTICS.dy)
    pairs = match(truth_table(PARTICLES), found.assign(hid=1, **{c: found[c] * 1e6 for c in "xyzd"}),
                  config["evaluate"]["tolerance_xy"], config["evaluate"]["tolerance_z"])
    assert len(pairs) == 3
    assert np.all(np.abs(pairs["error_z"]) <= config["evaluate"]["tolerance_z"] * 1e6)


def test_streaming_over_plane_batches_equals_one_batch(hologram):
    baseline = make_config()["baseline"]
    propagator = propagator_of(hologram)
    whole = find_particles(propagator, PLANES, baseline, dx=OPTICS.dx, dy=OPTICS.dy, batch_planes=Z_BINS)
    streamed = find_particles(propagator, PLANES, baseline, dx=OPTICS.dx, dy=OPTICS.dy, batch_planes=7)
    assert len(whole) == 3
    pd.testing.assert_frame_equal(whole, streamed)


def test_touching_columns_are_cut_into_two_particles_measured_on_their_own_disks():
    """Two 30 µm droplets 45 µm apart at 3.5 and 7.5 mm: their out-of-focus columns touch, so one group. Cut
    where its darkness peaks twice (split_prominence 0.3), each part reports its own droplet, centred on its
    half-contrast disk (the region's centroid was pulled 12-33 µm towards the other's shadow)."""
    scene = ParticleSet(x=np.array([0.0, 45e-6]), y=np.array([0.0, 0.0]), z=np.array([3.5e-3, 7.5e-3]),
                        d=np.array([30e-6, 30e-6]))
    propagator = propagator_of(contrast_hologram(scene))
    planes = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)
    one = find_particles(propagator, planes, make_config()["baseline"], dx=OPTICS.dx, dy=OPTICS.dy)
    assert len(one) == 1, "split_prominence 1 (the default) never cuts"
    two = find_particles(propagator, planes, make_config(split_prominence=0.3)["baseline"], dx=OPTICS.dx,
                         dy=OPTICS.dy).sort_values("z", ignore_index=True)
    assert len(two) == 2
    np.testing.assert_allclose(two["z"], scene.z, atol=planes[1] - planes[0])
    np.testing.assert_allclose(two["x"], scene.x, atol=OPTICS.dx)
    np.testing.assert_allclose(two["d"], scene.d, atol=2 * OPTICS.dx)


def test_a_droplet_just_outside_the_volume_is_not_reported_on_its_last_plane(tmp_path):
    """30 µm droplets 0.5 mm beyond z_max and 0.15 mm inside it: searching 5 planes beyond the volume, only
    the inside one is reported, at its depth; searching the volume only, the outside one sits on the last plane."""
    scene = ParticleSet(x=np.array([-100e-6, 90e-6]), y=np.array([-60e-6, 70e-6]),
                        z=np.array([OPTICS.z_max + 0.5e-3, OPTICS.z_max - 0.15e-3]), d=np.array([30e-6, 30e-6]))
    store = split_store(tmp_path / "edge.zarr", [contrast_hologram(scene)])
    planes = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)
    inside = pd.read_csv(baseline_file(make_config(beyond_planes=5), store, tmp_path / "in.csv", progress=False))
    assert len(inside) == 1 and inside["x"].iloc[0] == pytest.approx(90.0, abs=OPTICS.dx * 1e6)
    assert inside["z"].iloc[0] == pytest.approx(scene.z[1] * 1e6, abs=(planes[1] - planes[0]) * 1e6)
    both = pd.read_csv(baseline_file(make_config(beyond_planes=0), store, tmp_path / "all.csv", progress=False))
    assert len(both) == 2 and both["z"].max() <= planes[-1] * 1e6 + 1e-6


def test_fixed_threshold_and_min_voxels_act(hologram):
    propagator = propagator_of(hologram)
    config = make_config(threshold=0.6)
    fixed = find_particles(propagator, PLANES, config["baseline"], dx=OPTICS.dx, dy=OPTICS.dy)
    pairs = match(truth_table(PARTICLES), fixed.assign(hid=1, **{c: fixed[c] * 1e6 for c in "xyzd"}),
                  config["evaluate"]["tolerance_xy"], config["evaluate"]["tolerance_z"])
    assert len(pairs) == 3
    huge = find_particles(propagator, PLANES, make_config(min_voxels=10**7)["baseline"], dx=OPTICS.dx, dy=OPTICS.dy)
    assert huge.empty and list(huge.columns) == ["x", "y", "z", "d", "score"]


def test_raw_uint8_store_is_refused(tmp_path):
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), np.full((1, 16, 16), 128, np.uint8)),
         **{name: ("particle", np.zeros(0, np.float32)) for name in ("hid", "x", "y", "z", "d")}},
        attrs={"Nx": 16, "Ny": 16, "dx": OPTICS.dx, "dy": OPTICS.dy, "lambda": OPTICS.wavelength,
               "zMin": OPTICS.z_min, "zMax": OPTICS.z_max},
    )
    path = write_zarr(ds, tmp_path / "raw.zarr")
    with pytest.raises(HolodecFormatError, match="raw.zarr.*standardized"):
        baseline_file(make_config(), path, tmp_path / "out.csv", progress=False)
    assert not (tmp_path / "out.csv").exists()


def test_a_non_square_frame_with_unequal_pitches_finds_the_particles_where_they_are(tmp_path):
    hologram = contrast_hologram(WIDE_PARTICLES, WIDE)
    assert hologram.shape == (WIDE.ny, WIDE.nx)
    path = split_store(tmp_path / "wide.zarr", [hologram], WIDE, truth_table(WIDE_PARTICLES))
    config = load_config(scene_dict(WIDE))
    found = pd.read_csv(baseline_file(config, path, tmp_path / "wide.csv", progress=False))
    tolerance = config["evaluate"]["tolerance_xy"], config["evaluate"]["tolerance_z"]
    pairs = match(truth_table(WIDE_PARTICLES), found, *tolerance)
    assert len(pairs) == 2 and len(found) == 2
    assert np.all(np.abs(pairs["error_x"]) <= WIDE.dx * 1e6) and np.all(np.abs(pairs["error_y"]) <= WIDE.dy * 1e6)
    swapped = truth_table(WIDE_PARTICLES).rename(columns={"x": "y", "y": "x"})
    assert match(swapped, found, *tolerance).empty, "x and y swapped must not match"


def test_the_physics_detections_through_the_particles_stage_find_the_particles_where_they_are(tmp_path):
    """The ablation's path: the physics detector's per-plane regions, as inference writes the U-Net's, merged
    by the particles stage (`holopipe baseline --detections`, then `holopipe particles`)."""
    hologram = contrast_hologram(WIDE_PARTICLES, WIDE)
    path = split_store(tmp_path / "wide.zarr", [np.ones_like(hologram), hologram], WIDE, truth_table(WIDE_PARTICLES, 2))
    config = load_config(scene_dict(WIDE))
    detections = pd.read_csv(detections_file(config, path, tmp_path / "physics.csv", progress=False))
    assert tuple(detections.columns) == DETECTION_COLUMNS and set(detections["hid"]) == {2}
    # Each droplet's dark column spans many planes; the smoothed minimum is darkest near its focus.
    assert detections.groupby("plane").size().size > 4
    assert detections["prob_max"].between(0, 1).all() and np.isfinite(detections["logit_mean"]).all()
    found = pd.read_csv(particles_file([tmp_path / "physics.csv"], tmp_path / "ablation.csv", config,
                                       store_path=path, progress=False))
    tolerance = config["evaluate"]["tolerance_xy"], config["evaluate"]["tolerance_z"]
    pairs = match(truth_table(WIDE_PARTICLES, 2), found, *tolerance)
    assert len(pairs) == 2 and len(found) == 2
    assert (np.all(np.abs(pairs["error_x"]) <= 2 * WIDE.dx * 1e6)
            and np.all(np.abs(pairs["error_y"]) <= 2 * WIDE.dy * 1e6))
    swapped = truth_table(WIDE_PARTICLES, 2).rename(columns={"x": "y", "y": "x"})
    assert match(swapped, found, *tolerance).empty, "x and y swapped must not match"


@pytest.mark.parametrize("metric", ["min_amplitude", "edge_sharpness", "tamura"])
def test_baseline_on_torch_tensors_finds_what_it_finds_on_numpy(hologram, metric):
    """The GPU path (torch planes, only dark pixels and candidate windows to the host) on CPU tensors."""
    baseline = make_config(focus_metric=metric)["baseline"]
    on_numpy = find_particles(propagator_of(hologram), PLANES, baseline, dx=OPTICS.dx, dy=OPTICS.dy)
    on_torch = find_particles(propagator_of(torch.from_numpy(hologram)), PLANES, baseline, dx=OPTICS.dx,
                              dy=OPTICS.dy)
    assert len(on_numpy) == 3
    pd.testing.assert_frame_equal(on_torch, on_numpy, rtol=1e-4)


@pytest.mark.slow
def test_a_killed_baseline_run_resumes_without_redoing_finished_holograms(tmp_path, hologram, monkeypatch):
    n_holograms = 4
    # The droplets moved 5 pixels along x from one hologram to the next: every hologram's table differs.
    path = split_store(tmp_path / "split.zarr", [np.roll(hologram, 5 * k, axis=1) for k in range(n_holograms)])
    config = scene_dict()
    out = tmp_path / "killed.csv"
    parts = out.with_name(out.name + ".parts")
    command = [str(Path(sys.executable).with_name("holopipe")), "baseline", "--in", str(path), "--out", str(out),
               "--config-json", json.dumps(config)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not list(parts.glob("hologram_*.csv")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no hologram finished in time"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(parts.glob("hologram_*.csv")))
    assert not out.exists() and 1 <= finished < n_holograms

    calls = []
    original = holopipe.detect.baseline.find_particles
    monkeypatch.setattr(holopipe.detect.baseline, "find_particles",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = pd.read_csv(baseline_file(load_config(config), path, out, progress=False))
    assert len(calls) == n_holograms - finished, "the rerun computes only the unfinished holograms"
    assert not parts.exists(), "the parts are removed once the CSV is written"
    monkeypatch.undo()
    uninterrupted = pd.read_csv(baseline_file(load_config(config), path, tmp_path / "whole.csv", progress=False))
    assert set(uninterrupted["hid"]) == set(range(1, n_holograms + 1))
    pd.testing.assert_frame_equal(resumed, uninterrupted)


def test_a_rerun_after_a_code_change_recomputes_the_holograms_of_the_old_code(tmp_path, hologram, monkeypatch):
    """A `git pull` between a kill and the rerun (another source digest, same version): no hologram of the
    old code is kept, so the CSV never mixes the two."""
    path = split_store(tmp_path / "split.zarr", [hologram, np.roll(hologram, 5, axis=1)])
    config, out, calls = make_config(), tmp_path / "b.csv", []
    original = holopipe.detect.baseline.find_particles

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(holopipe.detect.baseline, "find_particles", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        baseline_file(config, path, out, progress=False)
    assert (tmp_path / "b.csv.parts" / "hologram_000001.csv").is_file()
    calls.clear()
    pulled = {**code_identity(), "source_sha256": "pulled"}
    monkeypatch.setattr(holopipe.detect.baseline, "code_identity", lambda: pulled)
    monkeypatch.setattr(holopipe.detect.baseline, "find_particles",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    baseline_file(config, path, out, progress=False)
    assert len(calls) == 2, "hologram 1 of the old code is computed again"


# find_particles on the WIDE scene as it was before the labelling moved to a worker thread and the batches were
# sized for the device (x, y, z, d in µm, score; commit 5457341): the same particles, the same planes. x, y
# moved by under a pixel when they became the centroid of the half-contrast pixels (truth: x -170, 150 µm;
# y 100, -45 µm).
WIDE_BEFORE = {
    "min_amplitude": {"x": [152.095814, -169.388387], "y": [-45.1674419, 100.045161], "z": [7666.66667, 3933.33333],
                      "d": [34.1587045, 29.0033397], "score": [0.954785835, 0.906210542]},
    "edge_sharpness": {"x": [149.48, -169.388387], "y": [-45.0, 100.045161], "z": [7400.0, 3933.33333],
                       "d": [34.3567276, 29.0033397], "score": [0.940664209, 0.906210542]},
    "tamura": {"x": [149.48, -169.388387], "y": [-45.0, 100.045161], "z": [7400.0, 3933.33333],
               "d": [34.3567276, 29.0033397], "score": [0.940664209, 0.906210542]},
}


@pytest.fixture(scope="module")
def wide_propagator():
    return propagator_of(contrast_hologram(WIDE_PARTICLES, WIDE), WIDE)


@pytest.mark.parametrize("metric", ["min_amplitude", "edge_sharpness", "tamura"])
def test_the_pipelined_baseline_finds_what_the_sequential_one_found(wide_propagator, metric):
    baseline = load_config(scene_dict(WIDE, baseline={"focus_metric": metric}))["baseline"]
    for batch_planes in (None, 1, 7):
        found = find_particles(wide_propagator, WIDE_PLANES, baseline, dx=WIDE.dx, dy=WIDE.dy,
                               batch_planes=batch_planes)
        expected = pd.DataFrame(WIDE_BEFORE[metric])
        pd.testing.assert_frame_equal(found_um(found)[expected.columns], expected, check_exact=False, rtol=1e-6)


def test_labelling_runs_in_a_worker_a_bounded_number_of_batches_behind(wide_propagator, monkeypatch):
    baseline = load_config(scene_dict(WIDE))["baseline"]
    labelled_in, outstanding, done = set(), [], []
    label, add = holopipe.detect.baseline.pixel_components, holopipe.detect.baseline._PlaneGrouper.add
    reconstruct = holopipe.detect.baseline.reconstructed_amplitude

    def slow_add(grouper, start, *args):
        time.sleep(0.02)  # a host slower than the device: batches queue up
        add(grouper, start, *args)
        done.append(start)

    def counted_reconstruct(propagator, z):
        outstanding.append(len(started) - len(done))
        started.append(z[0])
        return reconstruct(propagator, z)

    started = []
    monkeypatch.setattr(holopipe.detect.baseline, "pixel_components",
                        lambda *a: labelled_in.add(threading.current_thread().name) or label(*a))
    monkeypatch.setattr(holopipe.detect.baseline._PlaneGrouper, "add", slow_add)
    monkeypatch.setattr(holopipe.detect.baseline, "reconstructed_amplitude", counted_reconstruct)
    monkeypatch.setattr(holopipe.detect.baseline, "_threshold_sample", lambda *a: np.ones(1000))
    found = find_particles(wide_propagator, WIDE_PLANES, {**baseline, "threshold": 0.6}, dx=WIDE.dx, dy=WIDE.dy,
                           batch_planes=4)
    assert len(found) == 2 and len(done) == WIDE_PLANES.size // 4
    assert {name.split("_")[0] for name in labelled_in} == {"holopipe-baseline"}, "labelled off the main thread"
    assert max(outstanding) == BATCHES_IN_FLIGHT, "the device runs ahead of the host, by a bounded number"

    def broken(*args):
        raise RuntimeError("labelling failed")

    monkeypatch.setattr(holopipe.detect.baseline, "pixel_components", broken)
    with pytest.raises(RuntimeError, match="labelling failed"):
        find_particles(wide_propagator, WIDE_PLANES, {**baseline, "threshold": 0.6}, dx=WIDE.dx, dy=WIDE.dy,
                       batch_planes=4)


def full_size_frame():
    """What plane sizing sees of a full-size HOLODEC hologram's propagator: 3584 x 5120, padded by 256."""
    frame = SimpleNamespace(shape=(3584, 5120), pad=(256, 256))
    frame.planes_per_batch = Propagator.planes_per_batch.__get__(frame)
    return frame


def test_plane_batches_fill_the_devices_memory_below_the_32_bit_limit():
    frame = full_size_frame()
    pixels = (3584 + 512) * (5120 + 512)
    for free in (40 * 2**30, 80 * 2**30, 141 * 2**30):
        planes = planes_in_memory(frame, free)
        assert planes * pixels * SWEEP_BYTES_PER_PIXEL <= SWEEP_MEMORY_SHARE * free
        assert (planes + 1) * pixels * SWEEP_BYTES_PER_PIXEL > SWEEP_MEMORY_SHARE * free
    assert planes_in_memory(frame, 80 * 2**30) == 38, "an H100: 38 full-size planes a batch, not 1"
    huge = planes_in_memory(frame, 2**50)
    assert huge * pixels <= MAX_BATCH_ELEMENTS < (huge + 1) * pixels
    assert planes_in_memory(frame, 2**20) == 1, "never less than one plane"


def test_on_the_cpu_batches_stay_todays_size(hologram):
    for image in (hologram, torch.from_numpy(hologram)):
        propagator = propagator_of(image)
        assert device_planes_per_batch(propagator) == propagator.planes_per_batch()


@pytest.mark.gpu
def test_on_a_gpu_batches_are_sized_by_its_free_memory():
    libraries = [torch.zeros((3584, 5120), dtype=torch.float32, device="cuda")]
    try:
        import cupy
    except ImportError:
        cupy = None
    if cupy is not None:
        libraries.append(cupy.zeros((3584, 5120), dtype=cupy.float32))
    for image in libraries:
        propagator = Propagator(hologram_field(image, background=1.0), wavelength=OPTICS.wavelength, dx=OPTICS.dx,
                                pad=256, band_limit=True)
        planes = device_planes_per_batch(propagator)
        assert planes > 1 and planes * 4096 * 5632 <= MAX_BATCH_ELEMENTS
        assert planes >= planes_in_memory(propagator, torch.cuda.mem_get_info()[0])
        del propagator


@pytest.mark.gpu
def test_baseline_on_a_gpu_finds_what_it_finds_on_numpy(hologram):
    baseline = make_config()["baseline"]
    on_numpy = find_particles(propagator_of(hologram), PLANES, baseline, dx=OPTICS.dx, dy=OPTICS.dy)
    on_cuda = find_particles(propagator_of(torch.from_numpy(hologram).cuda()), PLANES, baseline, dx=OPTICS.dx,
                             dy=OPTICS.dy)
    assert len(on_numpy) == 3
    pd.testing.assert_frame_equal(on_cuda, on_numpy, rtol=1e-4)


def test_contrast_diameter_keeps_a_droplet_the_aperture_images_faint_and_nothing_else():
    """A 7 µm droplet at 9 mm behind the 0.52 x 0.40 mm frame reconstructs to a contrast of 0.6, below a
    min_contrast of 0.7; a 30 µm one at 4 mm is resolved. Scaled for 7 µm droplets, the threshold keeps both and
    finds nothing else."""
    scene = ParticleSet(x=np.array([-170e-6, 60e-6]), y=np.array([100e-6, -30e-6]), z=np.array([4.0e-3, 9.0e-3]),
                        d=np.array([30e-6, 7e-6]))
    propagator = propagator_of(contrast_hologram(scene, WIDE), WIDE)
    fixed = load_config(scene_dict(WIDE, baseline={"min_contrast": 0.7, "threshold": 0.8}))["baseline"]
    tolerance = make_config()["evaluate"]
    for baseline, expected in ((fixed, [30.0]), ({**fixed, "contrast_diameter": 7e-6}, [30.0, 7.0])):
        found = found_um(find_particles(propagator, WIDE_PLANES, baseline, dx=WIDE.dx, dy=WIDE.dy))
        pairs = match(truth_table(scene), found, tolerance["tolerance_xy"], tolerance["tolerance_z"])
        assert len(found) == len(pairs) and sorted(truth_table(scene)["d"][pairs["true_index"]].round()) == sorted(
            expected)
