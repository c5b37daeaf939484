"""The physics-only baseline: finds simulated particles, per focus metric, streams, runs on torch as on
numpy, resumes after a kill, and stays quiet on nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

import holopipe.baseline
from holopipe.baseline import CSV_COLUMNS, auto_threshold, baseline_file, find_particles
from holopipe.config import load_config
from holopipe.evaluate import match
from holopipe.reconstruction import z_bin_centres
from holopipe.io import HolodecFormatError, write_zarr
from holopipe.optics import Propagator, hologram_field
from holopipe.provenance import code_identity
from holopipe.simulate import Optics, ParticleSet, opaque_disks_field

OPTICS = Optics(wavelength=3.55e-7, dx=2.96e-6, dy=2.96e-6, nx=128, ny=128, z_min=2e-3, z_max=10e-3)
# Three isolated droplets (25-40 µm, 3-9 mm, > 80 µm from the edges and > 170 µm apart), metres.
PARTICLES = ParticleSet(x=np.array([-90e-6, 85e-6, -10e-6]), y=np.array([-85e-6, -60e-6, 95e-6]),
                        z=np.array([3.5e-3, 6.2e-3, 8.5e-3]), d=np.array([25e-6, 32e-6, 40e-6]))
Z_BINS, PAD = 60, 32


def scene_dict(optics: Optics = OPTICS, **sections) -> dict:
    """The (unvalidated) config of these optics and this module's planes, with the given sections."""
    return {
        "splits": {"test": {"source": "simulate", "n_holograms": 2, "seed": 1}},
        "optics": {"wavelength": optics.wavelength, "dx": optics.dx, "dy": optics.dy, "nx": optics.nx,
                   "ny": optics.ny, "z_min": optics.z_min, "z_max": optics.z_max},
        "reconstruction": {"z_bins": Z_BINS, "pad": PAD},
        **sections,
    }


def scene_config(**sections):
    """A validated config of this module's optics and planes, with the given sections (also for
    test_particles, which refines on the same scenes)."""
    return load_config(scene_dict(**sections))


def make_config(**baseline):
    return scene_config(baseline=baseline)


def contrast_hologram(particles: ParticleSet, optics: Optics = OPTICS) -> np.ndarray:
    """Noise-free, flat-beam contrast hologram I / mean(I), float32 (ny, nx)."""
    intensity = np.abs(opaque_disks_field(particles, optics, pad=PAD)) ** 2
    return (intensity / intensity.mean()).astype(np.float32)


def truth_table(particles: ParticleSet, hid: int = 1) -> pd.DataFrame:
    return pd.DataFrame({"hid": hid, "x": particles.x * 1e6, "y": particles.y * 1e6, "z": particles.z * 1e6,
                         "d": particles.d * 1e6})


def propagator_of(image_yx, optics: Optics = OPTICS) -> Propagator:
    """The propagator of a contrast hologram (numpy or torch, (ny, nx))."""
    return Propagator(hologram_field(image_yx, background=1.0), wavelength=optics.wavelength, dx=optics.dx,
                      dy=optics.dy, pad=PAD, band_limit=True)


def split_store(path, images_yx, optics: Optics = OPTICS, truth: pd.DataFrame | None = None):
    """A standardized split store of contrast holograms (h, ny, nx) with these optics."""
    truth = truth if truth is not None else pd.DataFrame({name: np.zeros(0) for name in ("hid", "x", "y", "z", "d")})
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), np.asarray(images_yx).transpose(0, 2, 1)),
         **{name: ("particle", truth[name].to_numpy(np.float32)) for name in ("hid", "x", "y", "z", "d")}},
        attrs={"Nx": optics.nx, "Ny": optics.ny, "dx": optics.dx, "dy": optics.dy, "lambda": optics.wavelength,
               "zMin": optics.z_min, "zMax": optics.z_max},
    )
    return write_zarr(ds, path)


def found_um(found: pd.DataFrame, hid: int = 1) -> pd.DataFrame:
    """find_particles' table (metres) as a CSV's (µm, with hid)."""
    return found.assign(hid=hid, **{c: found[c] * 1e6 for c in "xyzd"})


PLANES = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)


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


# A non-square frame with dx != dy: rows are y (pitch dy), columns x (pitch dx); the droplets sit where
# swapping x and y would put them far from any droplet.
WIDE = replace(OPTICS, nx=176, ny=112, dy=3.6e-6)
WIDE_PARTICLES = ParticleSet(x=np.array([-170e-6, 150e-6]), y=np.array([100e-6, -45e-6]),
                             z=np.array([4.0e-3, 7.5e-3]), d=np.array([30e-6, 36e-6]))


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


@pytest.mark.parametrize("metric", ["min_amplitude", "edge_sharpness", "tamura"])
def test_baseline_on_torch_tensors_finds_what_it_finds_on_numpy(hologram, metric):
    """The GPU path (torch planes, only dark pixels and candidate windows to the host) on CPU tensors."""
    baseline = make_config(focus_metric=metric)["baseline"]
    on_numpy = find_particles(propagator_of(hologram), PLANES, baseline, dx=OPTICS.dx, dy=OPTICS.dy)
    on_torch = find_particles(propagator_of(torch.from_numpy(hologram)), PLANES, baseline, dx=OPTICS.dx,
                              dy=OPTICS.dy)
    assert len(on_numpy) == 3
    pd.testing.assert_frame_equal(on_torch, on_numpy, rtol=1e-4)


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
    original = holopipe.baseline.find_particles
    monkeypatch.setattr(holopipe.baseline, "find_particles", lambda *a, **k: calls.append(1) or original(*a, **k))
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
    original = holopipe.baseline.find_particles

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(holopipe.baseline, "find_particles", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        baseline_file(config, path, out, progress=False)
    assert (tmp_path / "b.csv.parts" / "hologram_000001.csv").is_file()
    calls.clear()
    pulled = {**code_identity(), "source_sha256": "pulled"}
    monkeypatch.setattr(holopipe.baseline, "code_identity", lambda: pulled)
    monkeypatch.setattr(holopipe.baseline, "find_particles", lambda *a, **k: calls.append(1) or original(*a, **k))
    baseline_file(config, path, out, progress=False)
    assert len(calls) == 2, "hologram 1 of the old code is computed again"
