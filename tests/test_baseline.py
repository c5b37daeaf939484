"""The physics-only baseline: finds simulated particles, per focus metric, streams, and stays quiet on nothing."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from holopipe.baseline import CSV_COLUMNS, auto_threshold, baseline_file, find_particles
from holopipe.config import load_config
from holopipe.evaluate import match
from holopipe.reconstruction import z_bin_centres
from holopipe.io import HolodecFormatError, write_zarr
from holopipe.optics import Propagator, hologram_field
from holopipe.simulate import Optics, ParticleSet, opaque_disks_field

OPTICS = Optics(wavelength=3.55e-7, dx=2.96e-6, dy=2.96e-6, nx=128, ny=128, z_min=2e-3, z_max=10e-3)
# Three isolated droplets (25-40 µm, 3-9 mm, > 80 µm from the edges and > 170 µm apart), metres.
PARTICLES = ParticleSet(x=np.array([-90e-6, 85e-6, -10e-6]), y=np.array([-85e-6, -60e-6, 95e-6]),
                        z=np.array([3.5e-3, 6.2e-3, 8.5e-3]), d=np.array([25e-6, 32e-6, 40e-6]))
Z_BINS, PAD = 60, 32


def scene_config(**sections):
    """A validated config of this module's optics and planes, with the given sections (also for
    test_particles, which refines on the same scenes)."""
    return load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 2, "seed": 1}},
        "optics": {"wavelength": OPTICS.wavelength, "dx": OPTICS.dx, "dy": OPTICS.dy, "nx": OPTICS.nx,
                   "ny": OPTICS.ny, "z_min": OPTICS.z_min, "z_max": OPTICS.z_max},
        "reconstruction": {"z_bins": Z_BINS, "pad": PAD},
        **sections,
    })


def make_config(**baseline):
    return scene_config(baseline=baseline)


def contrast_hologram(particles: ParticleSet) -> np.ndarray:
    """Noise-free, flat-beam contrast hologram I / mean(I), float32 (ny, nx)."""
    intensity = np.abs(opaque_disks_field(particles, OPTICS, pad=PAD)) ** 2
    return (intensity / intensity.mean()).astype(np.float32)


def truth_table(particles: ParticleSet, hid: int = 1) -> pd.DataFrame:
    return pd.DataFrame({"hid": hid, "x": particles.x * 1e6, "y": particles.y * 1e6, "z": particles.z * 1e6,
                         "d": particles.d * 1e6})


def propagator_of(image_yx: np.ndarray) -> Propagator:
    return Propagator(hologram_field(image_yx, background=1.0), wavelength=OPTICS.wavelength, dx=OPTICS.dx,
                      dy=OPTICS.dy, pad=PAD, band_limit=True)


PLANES = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)


@pytest.fixture(scope="module")
def hologram():
    return contrast_hologram(PARTICLES)


@pytest.fixture(scope="module")
def store(tmp_path_factory, hologram):
    """A standardized split: hologram 1 holds the three particles, hologram 2 none (flat)."""
    images = np.stack([hologram.T, np.ones_like(hologram.T)])
    truth = truth_table(PARTICLES)
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), images),
         **{name: ("particle", truth[name].to_numpy(np.float32)) for name in ("hid", "x", "y", "z", "d")}},
        attrs={"Nx": OPTICS.nx, "Ny": OPTICS.ny, "dx": OPTICS.dx, "dy": OPTICS.dy, "lambda": OPTICS.wavelength,
               "zMin": OPTICS.z_min, "zMax": OPTICS.z_max},
    )
    return write_zarr(ds, tmp_path_factory.mktemp("baseline") / "test.zarr")


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
