"""Standardization: every hologram divided by its own background; the training split only gives a scale."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from holopipe.core.config import load_config
from holopipe.core.io import PARTICLE_VARS, open_holodec, skipped_holograms, write_zarr
from holopipe.data.standardize import (
    BLANK_SHARE,
    LOG_EPS,
    _window,
    apply_stats,
    blank_reason,
    fit_stats,
    read_stats,
    running_median_background,
    smooth_background,
    write_stats,
)
from holopipe.optics.simulate import Camera, Optics, SimulationSettings, beam_profile, camera_image, simulate_file

# Non-square frames with dx != dy: an x/y swap anywhere changes the beam's shape on the frame.
DX, DY, WAVELENGTH, Z_MIN, Z_MAX = 2.96e-6, 2.5e-6, 3.55e-7, 2e-3, 12e-3


def make_config(background="smooth", log_transform=False, **settings) -> dict:
    return load_config({
        "splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 0}},
        "optics": {"wavelength": WAVELENGTH, "dx": DX, "dy": DY, "nx": 96, "ny": 80, "z_min": Z_MIN, "z_max": Z_MAX},
        "standardize": {"background": background, "log_transform": log_transform, **settings},
    })


def write_store(path, images):
    """A contract zarr store holding ``images`` (H, xsize, ysize) and two particles."""
    n, nx, ny = images.shape
    particles = {"hid": [1, n], "x": [10.0, -20.0], "y": [5.0, 15.0], "z": [3000.0, 9000.0], "d": [20.0, 35.0]}
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), images),
         **{name: ("particle", np.asarray(particles[name], np.float32)) for name in PARTICLE_VARS}},
        attrs={"Nx": nx, "Ny": ny, "dx": DX, "dy": DY, "lambda": WAVELENGTH, "zMin": Z_MIN, "zMax": Z_MAX},
    )
    return write_zarr(ds, path)


def camera_images(n, seed, nx=96, ny=80, beam_waist=None, dark_spots=True) -> np.ndarray:
    """n noisy uint8 contract images (xsize, ysize) of an empty field, with a dark spot each if asked."""
    optics = Optics(WAVELENGTH, DX, DY, nx, ny, Z_MIN, Z_MAX)
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        field = np.ones((ny, nx), np.complex64)
        if dark_spots:
            row, col = rng.integers(0, ny - 6), rng.integers(0, nx - 6)
            field[row:row + 6, col:col + 6] = 0.3
        images.append(camera_image(field, rng, optics, Camera(beam_waist=beam_waist)).T)
    return np.stack(images)


def gray_beam(nx, ny, beam_waist) -> np.ndarray:
    """The noise-free background (xsize, ysize) in gray levels: 128 times the Gaussian beam."""
    return 128 * beam_profile(Optics(WAVELENGTH, DX, DY, nx, ny, Z_MIN, Z_MAX), beam_waist).T


def test_smooth_background_follows_a_gaussian_beam_edge_to_edge_and_sees_through_shadows():
    # 768 x 640 pixels, beam waist 1.5 mm: the corners get 18 % of the centre's light (23 gray levels).
    image = camera_images(1, seed=1, nx=768, ny=640, beam_waist=1.5e-3, dark_spots=False)[0].astype(np.float32)
    truth = gray_beam(768, 640, 1.5e-3)
    shadowed = image.copy()
    shadowed[300:340, 200:236] *= 0.2  # a large in-focus droplet's shadow, 40 x 36 pixels

    for picture in (image, shadowed):
        ratio = smooth_background(picture, 128) / truth
        # Within 1 % everywhere, edges and corners included (the shot noise of one pixel there is 1.7 %).
        assert np.abs(ratio - 1).max() < 0.01
    flat = image / smooth_background(image, 128)
    assert flat.mean() == pytest.approx(1.0, abs=2e-3)


def test_smooth_background_is_the_same_on_either_layout_and_on_torch():
    image = camera_images(1, seed=2, nx=200, ny=150, beam_waist=1e-3)[0].astype(np.float32)

    background = smooth_background(image, 32)

    np.testing.assert_allclose(smooth_background(image.T, 32), background.T, rtol=1e-5)
    on_torch = smooth_background(torch.from_numpy(image), 32)
    assert isinstance(on_torch, torch.Tensor) and on_torch.dtype == torch.float32
    np.testing.assert_allclose(on_torch.numpy(), background, rtol=1e-4)


def simulated_pair(tmp_path, n_holograms=2):
    """The same 768 x 640 holograms (same seed, same particles) lit by a Gaussian beam and by a flat one."""
    paths = {}
    for name, waist in (("flat", None), ("beam", 1.5e-3)):
        settings = SimulationSettings(optics=Optics(WAVELENGTH, DX, DY, 768, 640, Z_MIN, Z_MAX), particles=(6, 6),
                                      camera=Camera(beam_waist=waist))
        paths[name] = simulate_file(tmp_path / f"{name}.nc", n_holograms=n_holograms, seed=5, settings=settings,
                                    progress=False)
    return paths


def test_a_beamed_and_a_flat_hologram_standardize_to_the_same_contrast(tmp_path):
    paths = simulated_pair(tmp_path)
    stats_path = write_stats(fit_stats(paths["flat"], make_config()), tmp_path / "stats.json")

    contrast = {name: open_holodec(apply_stats(path, tmp_path / f"{name}.zarr", stats_path))["image"].values
                for name, path in paths.items()}

    difference = contrast["beam"] - contrast["flat"]
    # Tolerances: means within 0.3 %; the difference averaged over 16 x 16 pixels (the noise averaged out,
    # what is left is the background's error) within 2 % everywhere, corners of 18 % light included.
    assert abs(difference.mean()) < 3e-3
    blocks = difference.reshape(2, 48, 16, 40, 16).mean(axis=(2, 4))
    assert np.abs(blocks).max() < 0.02
    # The particles' shadows are kept: the darkest block of each is far below the background in both.
    for name in contrast:
        assert contrast[name].reshape(2, 48, 16, 40, 16).mean(axis=(2, 4)).min() < 0.8


def test_a_frame_unlike_the_training_splits_is_standardized(tmp_path):
    train = write_store(tmp_path / "train.zarr", camera_images(3, seed=3))
    other = write_store(tmp_path / "other.zarr", camera_images(2, seed=4, nx=160, ny=112, beam_waist=6e-4,
                                                                dark_spots=False))
    stats_path = write_stats(fit_stats(train, make_config(block_pixels=48)), tmp_path / "stats.json")

    out = open_holodec(apply_stats(other, tmp_path / "out.zarr", stats_path))

    assert out.sizes["xsize"] == 160 and out.sizes["ysize"] == 112
    image = out["image"].values
    assert image.mean() == pytest.approx(1.0, abs=3e-3)
    assert np.ptp(image.reshape(2, 10, 16, 7, 16).mean(axis=(2, 4))) < 0.03  # the 6e-4 m beam is gone
    assert out.attrs["standardize_background"] == "smooth" and out.attrs["standardize_block_pixels"] == 48


def test_stats_hold_only_the_contrast_scale_of_the_standardized_training_split(tmp_path):
    train = write_store(tmp_path / "train.zarr", camera_images(4, seed=5, beam_waist=8e-4))
    config = make_config(log_transform=True, block_pixels=32)

    path = write_stats(fit_stats(train, config), tmp_path / "out" / "stats.json")
    stats = read_stats(path)

    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.json"]
    numbers = {key for key, value in stats.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert numbers == {"contrast_mean", "contrast_std", "n_holograms"}
    assert stats["standardize"] == {"background": "smooth", "block_pixels": 32, "window": 9, "stationary": "windows",
                                    "stationary_darkness": 0.6, "log_transform": True}
    standardized = open_holodec(apply_stats(train, tmp_path / "train_std.zarr", path))["image"].values
    assert stats["contrast_mean"] == pytest.approx(standardized.astype(np.float64).mean(), rel=1e-6)
    assert stats["contrast_std"] == pytest.approx(standardized.astype(np.float64).std(), rel=1e-5)
    json.dumps(stats)


def bytes_read() -> int:
    with open("/proc/self/io") as io_counters:
        return int(next(line for line in io_counters if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux I/O counters")
@pytest.mark.parametrize("background", ["smooth", "running_median"])
def test_fit_reads_the_training_store_once(tmp_path, background):
    images = np.random.default_rng(6).normal(128, 8, (16, 384, 320)).astype(np.float32)
    train = write_store(tmp_path / "train.zarr", images)
    store_bytes = sum(f.stat().st_size for f in train.rglob("*") if f.is_file())
    config = make_config(background, window=5)
    fit_stats(train, config)  # warm up imports and caches, so that only the reads of the data are counted

    before = bytes_read()
    fit_stats(train, config)
    read = bytes_read() - before

    assert store_bytes > 6e6
    assert 0.9 * store_bytes < read < 1.3 * store_bytes, f"read {read / store_bytes:.2f} times the store"


def test_running_median_removes_a_fixed_sensor_pattern_and_follows_each_holograms_brightness(tmp_path):
    rng = np.random.default_rng(7)
    pattern = rng.uniform(0.8, 1.2, (96, 80)).astype(np.float32)  # pixel gains: finer than any block
    brightness = np.array([1.0, 0.9, 1.1, 1.0, 0.95, 1.05, 1.0], np.float32)
    images = camera_images(7, seed=8) * pattern * brightness[:, None, None]
    train = write_store(tmp_path / "train.zarr", images.astype(np.float32))
    stats_path = write_stats(fit_stats(train, make_config("running_median", window=5)), tmp_path / "stats.json")

    out = open_holodec(apply_stats(train, tmp_path / "out.zarr", stats_path))["image"].values

    assert np.median(out, axis=(1, 2)) == pytest.approx(np.ones(7), abs=0.01)
    # The pattern is gone: what is left is each hologram's shot noise (~1 %) and its dark spot.
    assert np.median(np.abs(out - 1)) < 0.01
    smooth = open_holodec(apply_stats(train, tmp_path / "smooth.zarr", write_stats(
        fit_stats(train, make_config()), tmp_path / "smooth.json")))["image"].values
    assert np.median(np.abs(smooth - 1)) > 0.05, "a smooth background cannot remove a per-pixel pattern"
    stationary = open_holodec(apply_stats(train, tmp_path / "stationary.zarr", write_stats(
        fit_stats(train, make_config(window=5, stationary="everywhere")), tmp_path / "stationary.json")
    ))["image"].values
    assert np.median(np.abs(stationary - 1)) < 0.01, "the pattern stays put: stationary everywhere removes it"


def moving_beam_images(n, seed, dust, particle_hologram, particle) -> np.ndarray:
    """n noisy contract images (xsize, ysize) whose beam centre moves from hologram to hologram (as
    augmentation's does), with the dark disk(s) ``dust`` ((x, y, radius) pixels) in every one and ``particle``
    in hologram ``particle_hologram`` only."""
    rng = np.random.default_rng(seed)
    x, y = np.arange(96)[:, None], np.arange(80)[None, :]
    images = []
    for h in range(n):
        centre = rng.uniform([20, 20], [76, 60])
        beam = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * 60.0**2))
        shadow = np.ones((96, 80))
        for cx, cy, radius in [*dust, *([particle] if h == particle_hologram else [])]:
            shadow[(x - cx) ** 2 + (y - cy) ** 2 <= radius**2] = 0.3
        images.append(rng.poisson(128 * beam * shadow * 50) / 50)
    return np.stack(images).astype(np.float32)


def test_stationary_everywhere_divides_out_dust_under_a_moving_beam_and_keeps_a_particle(tmp_path):
    dust, particle = [(30, 25, 3), (70, 60, 4)], (50, 40, 3)
    images = moving_beam_images(7, seed=31, dust=dust, particle_hologram=3, particle=particle)
    store = write_store(tmp_path / "split.zarr", images)

    def standardized(**settings):
        stats = write_stats(fit_stats(store, make_config(block_pixels=32, window=5, **settings)),
                            tmp_path / "stats.json")
        return open_holodec(apply_stats(store, tmp_path / f"{'_'.join(map(str, settings.values()))}.zarr", stats))

    own, stationary = standardized(stationary="off"), standardized(stationary="everywhere")
    assert stationary.attrs["standardize_stationary"] == "everywhere" and stationary.attrs["standardize_window"] == 5
    assert own.attrs["standardize_stationary"] == "off"
    for cx, cy, _ in dust:  # dark in every hologram by its own background; gone once the stationary is divided
        assert (own["image"].values[:, cx, cy] < 0.5).all()
        assert stationary["image"].values[:, cx, cy] == pytest.approx(np.ones(7), abs=0.1)
    assert stationary["image"].values[3, particle[0], particle[1]] < 0.5
    # The moving beam is each hologram's own background's: the rest of the frame sits at 1 in both.
    assert np.median(np.abs(stationary["image"].values - 1)) < 0.02
    # A running median of the raw holograms cannot follow a beam that moves: it leaves the beam in.
    median = standardized(background="running_median", stationary="everywhere")  # which does it by itself
    assert median.attrs["standardize_stationary"] == "off"
    assert np.median(np.abs(median["image"].values - 1)) > 0.05


def test_stationary_needs_three_holograms_with_data_and_says_so(tmp_path, caplog):
    images = moving_beam_images(2, seed=32, dust=[(30, 25, 3)], particle_hologram=0, particle=(50, 40, 3))
    store = write_store(tmp_path / "two.zarr", images)
    config = make_config(block_pixels=32, stationary="everywhere")
    out = open_holodec(apply_stats(store, tmp_path / "out.zarr", write_stats(fit_stats(store, config),
                                                                             tmp_path / "stats.json")))
    own = open_holodec(apply_stats(store, tmp_path / "own.zarr", write_stats(
        fit_stats(store, make_config(block_pixels=32, stationary="off")), tmp_path / "own.json")))

    np.testing.assert_array_equal(out["image"].values, own["image"].values)
    assert "two.zarr: hologram index 1: 2 hologram(s) with data in its window, too few to tell what is " \
           "stationary" in caplog.text


@pytest.mark.parametrize("recorded, mode", [(None, "off"), (False, "off"), (True, "everywhere")])
def test_stats_fitted_before_stationary_had_modes_standardize_as_they_did(tmp_path, recorded, mode):
    images = moving_beam_images(4, seed=33, dust=[(30, 25, 3)], particle_hologram=0, particle=(50, 40, 3))
    store = write_store(tmp_path / "split.zarr", images)
    stats = fit_stats(store, make_config(block_pixels=32))
    del stats["standardize"]["stationary"], stats["standardize"]["stationary_darkness"]
    if recorded is not None:
        stats["standardize"]["stationary"] = recorded
    out = open_holodec(apply_stats(store, tmp_path / "out.zarr", write_stats(stats, tmp_path / "old.json")))

    assert out.attrs["standardize_stationary"] == mode
    assert ((out["image"].values[:, 30, 25] < 0.5).all()) == (mode == "off")


def test_unquoted_yaml_off_is_off_and_an_unknown_mode_is_refused(tmp_path):
    assert make_config(stationary=False)["standardize"]["stationary"] is False
    with pytest.raises(ValueError, match="stationary"):
        make_config(stationary="dust")
    stats = fit_stats(write_store(tmp_path / "one.zarr", camera_images(1, seed=2)), make_config(stationary="off"))
    stats["standardize"]["stationary"] = "dust"
    with pytest.raises(ValueError, match=r"one.zarr: unknown standardize.stationary 'dust'"):
        apply_stats(tmp_path / "one.zarr", tmp_path / "out.zarr", write_stats(stats, tmp_path / "bad.json"))


WINDOW_FRAME = (128, 96)


def dusty_file(tmp_path, name, dust_count, n_holograms=7, seed=56):
    """A simulated file on a non-square frame (dx != dy) whose droplets move from hologram to hologram, with
    ``dust_count`` specks of 30-50 um on the near window (zMin) at the same place in every hologram (seed 56:
    both well inside the frame)."""
    from holopipe.optics.simulate import Artifacts, DiameterModel

    settings = SimulationSettings(optics=Optics(WAVELENGTH, DX, DY, *WINDOW_FRAME, Z_MIN, Z_MAX), particles=(3, 3),
                                  diameter=DiameterModel("uniform", d_min=2e-5, d_max=4e-5), pad=64,
                                  artifacts=Artifacts(dust_count=dust_count, dust_diameter=(3e-5, 5e-5)))
    return simulate_file(tmp_path / f"{name}.nc", n_holograms=n_holograms, seed=seed, settings=settings,
                         progress=False)


def window_amplitude(images, z_m, x_um, y_um) -> np.ndarray:
    """Each standardized hologram's reconstructed amplitude at depth ``z_m`` at (x, y) µm of the frame's centre."""
    from holopipe.optics.propagation import propagate

    nx, ny = WINDOW_FRAME
    ix, iy = round(x_um * 1e-6 / DX + nx / 2 - 0.5), round(y_um * 1e-6 / DY + ny / 2 - 0.5)
    field = propagate(images.astype(np.complex64), -z_m, wavelength=WAVELENGTH, dx=DY, dy=DX, pad=64,
                      band_limit=True)
    return np.abs(field[:, ix, iy])


def test_stationary_windows_divides_out_window_dust_and_keeps_every_droplet(tmp_path):
    raw = dusty_file(tmp_path, "dusty", dust_count=2)

    def standardized(mode):
        stats = write_stats(fit_stats(raw, make_config(window=5, stationary=mode)), tmp_path / f"{mode}.json")
        return open_holodec(apply_stats(raw, tmp_path / f"{mode}.zarr", stats))

    own, windows = standardized("off"), standardized("windows")
    assert windows.attrs["standardize_stationary"] == "windows"
    assert windows.attrs["standardize_stationary_darkness"] == 0.6 and windows.attrs["standardize_window"] == 5
    for x, y in zip(windows.attrs["window_dust_x"], windows.attrs["window_dust_y"]):
        # dark at the near window in every hologram by its own background; gone there once taken out
        assert (window_amplitude(own["image"].values, Z_MIN, x, y) < 0.4).all()
        assert window_amplitude(windows["image"].values, Z_MIN, x, y) == pytest.approx(np.ones(7), abs=0.25)
    truth = own[["hid", "x", "y", "z"]].to_dataframe()
    for droplet in truth.itertuples():  # each in one hologram: as dark at its depth with the dust taken out
        h = int(droplet.hid) - 1
        before = window_amplitude(own["image"].values[h:h + 1], droplet.z * 1e-6, droplet.x, droplet.y)[0]
        after = window_amplitude(windows["image"].values[h:h + 1], droplet.z * 1e-6, droplet.x, droplet.y)[0]
        assert after == pytest.approx(before, abs=0.2) and (after < 0.5 or before >= 0.4)


def test_stationary_windows_leaves_a_file_without_dust_as_its_own_background_does(tmp_path):
    raw = dusty_file(tmp_path, "clean", dust_count=0)
    out = {mode: open_holodec(apply_stats(raw, tmp_path / f"{mode}.zarr", write_stats(
        fit_stats(raw, make_config(window=5, stationary=mode)), tmp_path / f"{mode}.json")))["image"].values
        for mode in ("off", "windows")}
    np.testing.assert_array_equal(out["windows"], out["off"])


def test_running_median_window_stays_inside_the_split():
    assert [list(_window(h, 7, 5)) for h in (0, 1, 3, 6)] == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [1, 2, 3, 4, 5],
                                                              [2, 3, 4, 5, 6]]
    assert list(_window(1, 3, 9)) == [0, 1, 2]
    stack = np.stack([np.full((4, 3), 100.0), np.full((4, 3), 110.0), np.full((4, 3), 90.0)])
    stack[1, 0, 0] = 0.0  # a dead pixel in the median's hologram: floored, never divided by ~0
    background = running_median_background(stack, 2)
    assert background[1, 1] == pytest.approx(90.0)  # the median 100, scaled to hologram 2's level (90)


def test_mean_background_is_each_holograms_own_mean(tmp_path):
    images = camera_images(3, seed=9, dark_spots=False).astype(np.float32) * np.float32([[[1.0]], [[0.5]], [[2.0]]])
    train = write_store(tmp_path / "train.zarr", images)
    stats_path = write_stats(fit_stats(train, make_config("mean")), tmp_path / "stats.json")

    out = open_holodec(apply_stats(train, tmp_path / "out.zarr", stats_path))["image"].values

    np.testing.assert_allclose(out, images / images.mean(axis=(1, 2), keepdims=True), rtol=1e-5)


def test_log_transform_keeps_dead_pixels_finite(tmp_path):
    images = camera_images(2, seed=10, beam_waist=8e-4)
    images[0, 5, 7] = 0  # a dead pixel
    train = write_store(tmp_path / "train.zarr", images)
    stats_path = write_stats(fit_stats(train, make_config(log_transform=True, block_pixels=32)), tmp_path / "s.json")
    linear_path = write_stats(fit_stats(train, make_config(block_pixels=32)), tmp_path / "linear.json")

    out = open_holodec(apply_stats(train, tmp_path / "out.zarr", stats_path))["image"].values
    linear = open_holodec(apply_stats(train, tmp_path / "linear.zarr", linear_path))["image"].values

    assert np.isfinite(out).all() and out[0, 5, 7] == pytest.approx(1 + np.log(LOG_EPS))
    np.testing.assert_allclose(out, 1 + np.log(np.maximum(linear, LOG_EPS)), rtol=1e-5, atol=1e-6)
    assert np.median(out) == pytest.approx(1.0, abs=0.01)
    assert read_stats(stats_path)["log_transform"] is True


def test_a_hologram_mostly_without_light_fails_naming_the_file_and_a_blank_one_is_skipped(tmp_path, caplog):
    images = camera_images(3, seed=11)
    images[1, 20:80] = 0  # most of the frame dark: its background reaches 0
    with pytest.raises(ValueError, match=r"dark\.zarr: hologram index 1 has no light"):
        fit_stats(write_store(tmp_path / "dark.zarr", images), make_config(block_pixels=16))
    images[1] = 0  # nothing but one value: no data at all, contrast 1 (an empty field), and listed
    blank = write_store(tmp_path / "blank.zarr", images)
    out = open_holodec(apply_stats(blank, tmp_path / "out.zarr", write_stats(fit_stats(blank, make_config()),
                                                                                 tmp_path / "stats.json")))
    assert (out["image"].values[1] == 1).all() and "hologram 2 (index 1) skipped, no data: dark" in caplog.text
    assert skipped_holograms(out) == {2: "dark: 100.0% of its pixels at 0"}


def test_regrids_padding_is_not_data_a_beamed_hologram_stays_flat_up_to_the_pad(tmp_path):
    from holopipe.data.regrid import regrid_file

    raw = write_store(tmp_path / "raw.zarr", camera_images(1, seed=12, nx=200, ny=168, beam_waist=4e-4,
                                                            dark_spots=False))
    config = load_config({**make_config(block_pixels=32), "examples": {"tile_size": 64}})
    padded = regrid_file(raw, tmp_path / "padded.zarr", config)  # 200 x 168 -> 256 x 192, pad at the median
    stats_path = write_stats(fit_stats(raw, config), tmp_path / "stats.json")

    out = open_holodec(apply_stats(padded, tmp_path / "out.zarr", stats_path))["image"].values[0]

    assert out.shape == (256, 192)
    assert (out[:28] == 1).all() and (out[228:] == 1).all() and (out[:, :12] == 1).all() and (out[:, 180:] == 1).all()
    data = out[28:228, 12:180]
    # Flat to the pad's edge: the beam (edges at 45 % of the centre) removed, strips 4 pixels wide along each
    # side averaged (noise ~0.5 %) within 2 %.
    for strip in (data[:4], data[-4:], data[:, :4], data[:, -4:]):
        assert strip.mean(axis=min(strip.shape.index(4), 1)).mean() == pytest.approx(1.0, abs=0.02)
    assert np.abs(data.reshape(25, 8, 21, 8).mean(axis=(1, 3)) - 1).max() < 0.02


def test_stats_of_a_training_split_background_image_are_refused(tmp_path):
    old = tmp_path / "stats.json"
    old.write_text(json.dumps({"contrast_std": 0.2, "background_file": "stats_background.npy"}))
    with pytest.raises(ValueError, match="stats.json.*per hologram.*standardize fit"):
        read_stats(old)


@pytest.mark.slow
def test_the_baseline_finds_the_same_droplets_in_the_beamed_and_the_flat_file(tmp_path):
    from holopipe.data.regrid import regrid_file
    from holopipe.detect.baseline import baseline_file
    from holopipe.evaluation.evaluate import evaluate_files

    config = load_config({
        "splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 0}},
        "optics": {"wavelength": WAVELENGTH, "dx": DX, "dy": DY, "nx": 768, "ny": 640, "z_min": Z_MIN, "z_max": Z_MAX},
        "reconstruction": {"z_bins": 40},
        "examples": {"tile_size": 256},  # regrid pads 640 to 768 with the median: the beam's edge is a step
    })
    paths = simulated_pair(tmp_path)
    stats_path = write_stats(fit_stats(paths["flat"], config), tmp_path / "stats.json")
    f1 = {}
    for name, path in paths.items():
        regridded = regrid_file(path, tmp_path / f"{name}_regridded.zarr", config)
        store = apply_stats(regridded, tmp_path / f"{name}.zarr", stats_path)
        found = baseline_file(config, store, tmp_path / f"{name}.csv", progress=False)
        metrics = evaluate_files(config, {name: store}, {"baseline": {name: found}}, tmp_path / f"{name}.json",
                                 tmp_path / f"plots_{name}")
        f1[name] = json.loads(metrics.read_text())["baseline"]["f1"]
    assert f1["flat"] > 0.7 and abs(f1["beam"] - f1["flat"]) < 0.05, f1


def test_blank_reason_names_dark_saturated_and_constant_frames_and_passes_a_hologram():
    hologram = camera_images(1, seed=20, nx=90, ny=70)[0]
    assert blank_reason(hologram) is None
    assert blank_reason(np.zeros((90, 70), np.uint8)) == "dark: 100.0% of its pixels at 0"
    saturated = np.full((90, 70), 255, np.uint8)
    saturated[:5, :5] = 200  # 25 of 6300 pixels below the maximum: 99.6 % saturated
    assert blank_reason(saturated) == "saturated: 99.6% of its pixels at its maximum 255"
    assert blank_reason(np.full((90, 70), 37.5, np.float32)) == "constant: every pixel 37.5 (zero variance)"
    # At the threshold, not beyond it: still a hologram (a huge shadow), standardized as one.
    mostly_dark = hologram.copy()
    mostly_dark.flat[:int(BLANK_SHARE * mostly_dark.size)] = 0
    assert blank_reason(mostly_dark) is None


@pytest.mark.parametrize("background", ["smooth", "running_median", "mean"])
def test_dark_and_saturated_holograms_are_skipped_listed_and_left_out_of_the_statistics(tmp_path, caplog, background):
    images = camera_images(5, seed=21, nx=96, ny=80)
    good = write_store(tmp_path / "good.zarr", images[[0, 2, 4]])
    images[1] = 0
    images[3] = 255
    images[3, :4, :3] = 90  # a few live pixels: 99.8 % saturated
    bad = write_store(tmp_path / "bad.zarr", images)
    config = make_config(background, window=5, block_pixels=32)

    stats = fit_stats(bad, config)
    out = open_holodec(apply_stats(bad, tmp_path / "out.zarr", write_stats(stats, tmp_path / "stats.json")))

    assert stats["skipped_holograms"] == [2, 4] and stats["n_holograms"] == 3
    if background != "running_median":  # whose windows differ: a skipped neighbour leaves one hologram fewer
        reference = fit_stats(good, config)
        assert stats["contrast_mean"] == pytest.approx(reference["contrast_mean"], rel=1e-6)
        assert stats["contrast_std"] == pytest.approx(reference["contrast_std"], rel=1e-6)
    # No window took a dark or saturated frame for light: every hologram with data sits at ~1.
    assert np.median(out["image"].values[[0, 2, 4]], axis=(1, 2)) == pytest.approx([1, 1, 1], abs=0.02)
    assert skipped_holograms(out) == {2: "dark: 100.0% of its pixels at 0",
                                      4: "saturated: 99.8% of its pixels at its maximum 255"}
    assert (out["image"].values[[1, 3]] == 1).all() and (out["image"].values[[0, 2, 4]] != 1).any(axis=(1, 2)).all()
    assert "bad.zarr: hologram 4 (index 3) skipped, no data: saturated" in caplog.text


def test_a_running_median_window_left_without_enough_holograms_fails_naming_the_file(tmp_path):
    images = camera_images(5, seed=23)
    images[[1, 3]] = 0  # hologram index 2's window of 3 keeps itself alone: its median would be the hologram
    bad = write_store(tmp_path / "bad.zarr", images)
    # Index 2 keeps 1 of its 3, indices 0 and 4 keep 2 of 3: whichever the threads reach first fails.
    with pytest.raises(ValueError, match=r"bad\.zarr: the running-median window of hologram index [024] holds [12] "
                                         r"hologram\(s\) with data of 3; widen standardize.window"):
        fit_stats(bad, make_config("running_median", window=3))


def test_a_split_without_any_hologram_of_data_fails_naming_the_file(tmp_path):
    images = np.zeros((2, 96, 80), np.uint8)
    images[1] = 255
    blank = write_store(tmp_path / "blank.zarr", images)
    with pytest.raises(ValueError, match=r"blank\.zarr: none of its 2 hologram\(s\) holds data \(hologram 1: dark"):
        fit_stats(blank, make_config())
    assert not (tmp_path / "out.zarr").exists()


def test_a_saturated_edge_band_is_data_not_regrids_pad(tmp_path):
    """A sensor's saturated edge rows look as constant as a pad: only regrid's record says which is which."""
    from holopipe.data.regrid import regrid_file

    images = camera_images(1, seed=22, nx=200, ny=168, dark_spots=False)
    images[0, :, 160:] = 255  # the last 8 columns along y saturated
    raw = write_store(tmp_path / "raw.zarr", images)
    config = load_config({**make_config(block_pixels=32), "examples": {"tile_size": 64}})
    padded = regrid_file(raw, tmp_path / "padded.zarr", config)  # 200 x 168 -> 256 x 192: pad 28 | 12 pixels
    assert open_holodec(padded).attrs["regrid_data_x"] == [28, 228]
    assert open_holodec(padded).attrs["regrid_data_y"] == [12, 180]
    stats_path = write_stats(fit_stats(raw, config), tmp_path / "stats.json")

    out = open_holodec(apply_stats(padded, tmp_path / "out.zarr", stats_path))["image"].values[0]

    assert (out[:28] == 1).all() and (out[:, :12] == 1).all() and (out[:, 180:] == 1).all()  # the pad
    band = out[28:228, 172:180]
    assert band.min() > 1.5  # 255 against a background of ~128: bright, as the sensor saw it, not an empty sky
    assert np.abs(out[28:228, 12:172].reshape(25, 8, 20, 8).mean(axis=(1, 3)) - 1).max() < 0.03


def test_a_dark_hologram_in_a_good_file_is_skipped_by_the_baseline_and_listed_by_the_evaluation(tmp_path):
    """Raw file -> regrid -> standardize -> baseline -> evaluate, with hologram 2 of 3 all dark (a closed shutter)."""
    from holopipe.data.regrid import regrid_file
    from holopipe.detect.baseline import baseline_file
    from holopipe.evaluation.evaluate import evaluate_files

    config = load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 3, "seed": 0}},
        "optics": {"wavelength": WAVELENGTH, "dx": DX, "dy": DY, "nx": 320, "ny": 256, "z_min": Z_MIN,
                   "z_max": Z_MAX},
        "reconstruction": {"z_bins": 20},
        "examples": {"tile_size": 128},  # 320 x 256 -> 384 x 256: a pad along x only
    })
    settings = SimulationSettings(optics=Optics(WAVELENGTH, DX, DY, 320, 256, Z_MIN, Z_MAX), particles=(3, 3))
    raw = simulate_file(tmp_path / "raw.nc", n_holograms=3, seed=6, settings=settings, progress=False)
    with xr.open_dataset(raw) as ds:
        ds = ds.load()
    ds["image"][1] = 0
    ds.to_netcdf(tmp_path / "shutter.nc")
    regridded = regrid_file(tmp_path / "shutter.nc", tmp_path / "regridded.zarr", config)
    stats = write_stats(fit_stats(regridded, config), tmp_path / "stats.json")
    store = apply_stats(regridded, tmp_path / "test.zarr", stats)

    found = baseline_file(config, store, tmp_path / "baseline.csv", progress=False)
    metrics = json.loads(evaluate_files(config, {"test": store}, {"baseline": {"test": found}},
                                        tmp_path / "metrics.json", tmp_path / "plots").read_text())["baseline"]

    assert json.loads(stats.read_text())["skipped_holograms"] == [2]
    assert 2 not in set(pd.read_csv(found)["hid"])
    assert metrics["skipped_holograms"] == [{"hid": 2, "reason": "dark: 100.0% of its pixels at 0"}]
    assert metrics["n_true_skipped"] == 3 and metrics["n_true"] == 6 and metrics["n_holograms"] == 2
    assert metrics["recall"] > 0.6  # the two holograms with data are found as usual; the dark one costs nothing


# --- standardize.device: numpy on the CPU, CuPy on a GPU (issue 21) ------------------------------------------

def test_stats_do_not_record_the_device_and_apply_refuses_a_missing_gpu(tmp_path, monkeypatch):
    from holopipe.core.device import GPUNotFoundError

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("holopipe.core.device._cupy_gpus", lambda: (None, 0, "CuPy sees no GPU"))
    store = write_store(tmp_path / "train.zarr", camera_images(2, seed=3))
    stats = fit_stats(store, make_config(device="cpu"))
    assert "device" not in stats["standardize"]
    stats_path = write_stats(stats, tmp_path / "stats.json")
    with pytest.raises(GPUNotFoundError, match=r"standardize\.device is 'cuda'"):
        apply_stats(store, tmp_path / "out.zarr", stats_path, device="cuda")
    assert not (tmp_path / "out.zarr").exists()
    with pytest.raises(GPUNotFoundError, match=r"standardize\.device is 'cuda:0'"):
        fit_stats(store, make_config(device="cuda:0"))


@pytest.mark.gpu
@pytest.mark.parametrize("background", ["smooth", "running_median", "mean"])
@pytest.mark.parametrize("log_transform", [False, True])
def test_cupy_standardizes_as_numpy(background, log_transform):
    pytest.importorskip("cupy")
    import array_api_compat.cupy as cupy_xp

    from holopipe.data.standardize import _contrast_block

    images = camera_images(5, seed=4, nx=150, ny=110, beam_waist=2e-4)  # non-square (xsize, ysize)
    images[1] = 0  # a blank neighbour, left out of the running median's window
    settings = {"background": background, "block_pixels": 32, "window": 5, "log_transform": log_transform}
    area = (slice(2, 148), slice(0, 110))
    blocks = [images[i:i + 1] for i in range(5)]
    on_cpu = _contrast_block(*blocks, settings=settings, where="t", area=area, position=2, hologram=2)
    on_gpu = _contrast_block(*blocks, settings=settings, where="t", area=area, position=2, hologram=2, xp=cupy_xp)
    assert isinstance(on_gpu, np.ndarray) and on_gpu.dtype == np.float32 and on_gpu.shape == (1, 150, 110)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("log_transform", [False, True])
def test_cupy_divides_out_the_stationary_as_numpy(log_transform):
    pytest.importorskip("cupy")
    import array_api_compat.cupy as cupy_xp
    import dask.array as da

    from holopipe.data.standardize import contrast_images

    images = moving_beam_images(6, seed=34, dust=[(30, 25, 3)], particle_hologram=2, particle=(50, 40, 3))
    images[4] = 0  # a blank hologram: contrast 1, left out of its neighbours' medians
    settings = {"background": "smooth", "block_pixels": 32, "window": 5, "stationary": "everywhere",
                "log_transform": log_transform}
    area = (slice(2, 96), slice(0, 80))
    on_cpu = contrast_images(da.from_array(images), settings, area=area).compute()
    on_gpu = contrast_images(da.from_array(images), settings, area=area, xp=cupy_xp).compute()
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)
    assert (on_cpu[4] == 1).all() and abs(on_cpu[0, 30, 25] - 1) < 0.1


@pytest.mark.gpu
def test_cupy_takes_out_window_dust_as_numpy(tmp_path):
    pytest.importorskip("cupy")
    import array_api_compat.cupy as cupy_xp
    import dask.array as da

    from holopipe.data.standardize import WindowPlanes, contrast_images

    ds = open_holodec(dusty_file(tmp_path, "dusty", dust_count=2))
    settings = {"background": "smooth", "block_pixels": 32, "window": 5, "stationary": "windows",
                "stationary_darkness": 0.6, "log_transform": False}
    windows = WindowPlanes.of(ds.attrs)
    images = da.from_array(ds["image"].values.astype(np.float32))
    on_cpu = contrast_images(images, settings, windows=windows).compute()
    on_gpu = contrast_images(images, settings, windows=windows, xp=cupy_xp).compute()
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)
