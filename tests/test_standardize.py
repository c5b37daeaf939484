"""Standardization: training-only statistics equal a numpy reference, and applied holograms sit at ~1."""

import json

import numpy as np
import pytest
import xarray as xr

from holopipe import standardize
from holopipe.config import load_config
from holopipe.io import PARTICLE_VARS, open_holodec, write_zarr
from holopipe.simulate import Camera, Optics, beam_profile, camera_image
from holopipe.standardize import LOG_EPS, apply_stats, fit_stats, read_stats, write_stats

PITCH, WAVELENGTH, Z_MIN, Z_MAX = 2.96e-6, 3.55e-7, 2e-3, 12e-3


def make_config(background="median", log_transform=False) -> dict:
    return load_config({
        "splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 0}},
        "optics": {"wavelength": WAVELENGTH, "dx": PITCH, "dy": PITCH, "nx": 64, "ny": 48,
                   "z_min": Z_MIN, "z_max": Z_MAX},
        "standardize": {"background": background, "log_transform": log_transform},
    })


def write_store(path, images):
    """A contract zarr store holding ``images`` (H, xsize, ysize) and two particles."""
    n, nx, ny = images.shape
    particles = {"hid": [1, n], "x": [10.0, -20.0], "y": [5.0, 15.0], "z": [3000.0, 9000.0], "d": [20.0, 35.0]}
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), images),
         **{name: ("particle", np.asarray(particles[name], np.float32)) for name in PARTICLE_VARS}},
        attrs={"Nx": nx, "Ny": ny, "dx": PITCH, "dy": PITCH, "lambda": WAVELENGTH, "zMin": Z_MIN, "zMax": Z_MAX},
    )
    return write_zarr(ds, path)


def camera_images(n, seed, nx=64, ny=48, beam_waist=None, dark_spots=True) -> np.ndarray:
    """n noisy uint8 contract images (xsize, ysize) of an empty field, with a few dark spots if asked."""
    optics = Optics(WAVELENGTH, PITCH, PITCH, nx, ny, Z_MIN, Z_MAX)
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        field = np.ones((ny, nx), np.complex64)
        if dark_spots:  # a shadow at a random place per hologram: the median sees through it
            row, col = rng.integers(0, ny - 4), rng.integers(0, nx - 4)
            field[row:row + 4, col:col + 4] = 0.3
        images.append(camera_image(field, rng, optics, Camera(beam_waist=beam_waist)).T)
    return np.stack(images)


@pytest.mark.parametrize("log_transform", [False, True])
def test_statistics_equal_a_numpy_reference(tmp_path, monkeypatch, log_transform):
    # Strips of 3 rows: the median is assembled from many blocks.
    monkeypatch.setattr(standardize, "MEDIAN_BLOCK_BYTES", 7 * 3 * 48)
    images = camera_images(7, seed=1)
    train = write_store(tmp_path / "train.zarr", images)

    stats = fit_stats(train, make_config("median", log_transform))

    data = images.astype(np.float64)
    median = np.median(data, axis=0)
    assert stats["intensity_mean"] == pytest.approx(data.mean(), rel=1e-12)
    assert stats["intensity_std"] == pytest.approx(data.std(), rel=1e-9)
    np.testing.assert_allclose(stats["background_image"], median, rtol=1e-6)
    contrast = data / median
    if log_transform:
        contrast = 1 + np.log(np.maximum(contrast, LOG_EPS))
    assert stats["contrast_mean"] == pytest.approx(contrast.mean(), rel=1e-6)
    assert stats["contrast_std"] == pytest.approx(contrast.std(), rel=1e-5)
    assert stats["n_holograms"] == 7 and stats["source"] == str(train)
    assert stats["standardize"] == {"background": "median", "log_transform": log_transform}


def test_mean_background_statistics(tmp_path):
    images = camera_images(3, seed=2)
    stats = fit_stats(write_store(tmp_path / "train.zarr", images), make_config("mean"))
    assert "background_image" not in stats
    assert stats["contrast_mean"] == pytest.approx(1.0, rel=1e-6)
    assert stats["contrast_std"] == pytest.approx(images.std() / images.mean(), rel=1e-5)
    json.dumps(stats)


@pytest.mark.parametrize("background", ["mean", "median"])
def test_stats_round_trip_through_files(tmp_path, background):
    stats = fit_stats(write_store(tmp_path / "train.zarr", camera_images(3, seed=3)), make_config(background))
    path = write_stats(stats, tmp_path / "out" / "stats.json")

    loaded, image = read_stats(path)

    expected = {key: value for key, value in stats.items() if key != "background_image"}
    if background == "median":
        assert loaded.pop("background_file") == "stats_background.npy"
        assert image.dtype == np.float32 and image.shape == (64, 48)
        np.testing.assert_array_equal(image, stats["background_image"])
    else:
        assert image is None
    assert loaded == expected
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["stats.json"] + (["stats_background.npy"] if background == "median" else []))


@pytest.mark.parametrize("background", ["mean", "median"])
def test_valid_is_standardized_with_trains_background_and_never_fitted(tmp_path, background):
    config = make_config(background)
    train = write_store(tmp_path / "train.zarr", camera_images(5, seed=4))
    valid = write_store(tmp_path / "valid.zarr", camera_images(2, seed=5))
    stats_path = write_stats(fit_stats(train, config), tmp_path / "stats.json")
    stats, median = read_stats(stats_path)

    out = open_holodec(apply_stats(valid, tmp_path / "valid_std.zarr", stats_path))

    raw = open_holodec(valid)["image"].values.astype(np.float32)
    b = stats["intensity_mean"] if median is None else median
    np.testing.assert_allclose(out["image"].values, raw / np.float32(b), rtol=1e-6)
    assert out["image"].dtype == np.float32
    for name in PARTICLE_VARS:
        np.testing.assert_array_equal(out[name].values, open_holodec(valid)[name].values)
    assert out.attrs["standardize_stats"] == str(stats_path)
    assert out.attrs["standardize_background"] == background
    assert out.attrs["Nx"] == 64 and out.attrs["zMin"] == Z_MIN
    # Brighter valid holograms change nothing in what is fitted on train.
    write_store(valid, camera_images(2, seed=6) // 2)
    refit = fit_stats(train, config)
    assert {k: v for k, v in refit.items() if k != "background_image"} == {
        k: v for k, v in fit_stats(train, config).items() if k != "background_image"}
    assert refit["intensity_mean"] == stats["intensity_mean"]


def test_an_empty_hologram_standardizes_to_one(tmp_path):
    train = write_store(tmp_path / "train.zarr", camera_images(6, seed=7))
    empty = write_store(tmp_path / "empty.zarr", camera_images(1, seed=8, dark_spots=False))
    stats_path = write_stats(fit_stats(train, make_config("mean")), tmp_path / "stats.json")

    out = open_holodec(apply_stats(empty, tmp_path / "out.zarr", stats_path))

    assert float(out["image"].mean()) == pytest.approx(1.0, abs=0.01)


def test_median_background_removes_a_fixed_beam_profile(tmp_path):
    beam = dict(nx=64, ny=64, beam_waist=1.5e-4)  # corners get ~0.3 of the centre's light
    train = write_store(tmp_path / "train.zarr", camera_images(9, seed=9, **beam))
    held_out = write_store(tmp_path / "held_out.zarr", camera_images(1, seed=10, dark_spots=False, **beam))
    optics = Optics(WAVELENGTH, PITCH, PITCH, 64, 64, Z_MIN, Z_MAX)
    profile = beam_profile(optics, beam["beam_waist"]).T

    results = {}
    for background in ("mean", "median"):
        stats_path = write_stats(fit_stats(train, make_config(background)), tmp_path / f"{background}.json")
        results[background] = open_holodec(apply_stats(held_out, tmp_path / f"{background}.zarr",
                                                        stats_path))["image"][0].values

    # Flat to within noise: shot noise of the dimmest pixels plus the median's own noise, a few %.
    expected_noise = np.sqrt(1 / (20000 * profile.min()) * (1 + 1 / 9 * np.pi / 2))
    flat = results["median"]
    assert flat.mean() == pytest.approx(1.0, abs=0.01)
    assert flat.std() < 3 * expected_noise
    blocks = flat.reshape(8, 8, 8, 8).mean(axis=(1, 3))  # large-scale trend, noise averaged out
    assert np.ptp(blocks) < 0.02
    # The scalar background keeps the beam's shape.
    np.testing.assert_allclose(np.corrcoef(results["mean"].ravel(), profile.ravel())[0, 1], 1, atol=0.01)
    assert np.ptp(results["mean"].reshape(8, 8, 8, 8).mean(axis=(1, 3))) > 0.5


def test_log_transform(tmp_path):
    images = camera_images(4, seed=11)
    images[0, 0, 0] = 0  # a dead pixel: the floor keeps it finite
    train = write_store(tmp_path / "train.zarr", images)
    stats_path = write_stats(fit_stats(train, make_config("median", log_transform=True)), tmp_path / "s.json")
    stats, median = read_stats(stats_path)

    out = open_holodec(apply_stats(train, tmp_path / "out.zarr", stats_path))["image"].values

    expected = 1 + np.log(np.maximum(images.astype(np.float32) / median, LOG_EPS))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert out[0, 0, 0] == pytest.approx(1 + np.log(LOG_EPS))
    assert np.median(out) == pytest.approx(1.0, abs=0.01)
    assert stats["log_transform"] is True


def test_frame_size_mismatch_names_both_files(tmp_path):
    train = write_store(tmp_path / "train.zarr", camera_images(3, seed=12))
    other = write_store(tmp_path / "other.zarr", camera_images(1, seed=13, nx=48))
    stats_path = write_stats(fit_stats(train, make_config("median")), tmp_path / "stats.json")

    with pytest.raises(ValueError, match=r"other\.zarr.*\(48, 48\).*\(64, 48\).*stats\.json"):
        apply_stats(other, tmp_path / "out.zarr", stats_path)
    assert not (tmp_path / "out.zarr").exists()
