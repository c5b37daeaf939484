"""Corruptions measured one by one against their physics, and the augment stage end to end."""

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from holopipe.core.config import ConfigError, load_config, schema
from holopipe.core.io import open_holodec, particle_table, write_zarr
from holopipe.data.augment import (
    Blur,
    BrightnessContrast,
    Clutter,
    DeadHotPixels,
    Illumination,
    Quantize,
    ReadNoise,
    ShotNoise,
    augment_file,
    augment_hologram,
    build_corruptions,
    optics_from_attrs,
)
from holopipe.optics.simulate import Optics, SimulationSettings, simulate_file

OPTICS = Optics(wavelength=3.55e-7, dx=2.96e-6, dy=2.96e-6, nx=192, ny=128, z_min=2e-3, z_max=12e-3)
GRAY = 128.0


def flat(shape=(128, 192), value=GRAY) -> np.ndarray:
    return np.full(shape, value, np.float32)


def rng(seed=0) -> np.random.Generator:
    return np.random.default_rng(seed)


def default_items() -> list[dict]:
    return schema()["properties"]["augment"]["properties"]["corruptions"]["default"]


# --- noise -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("as_array", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
def test_shot_noise_variance_in_electrons_equals_the_mean(as_array):
    electrons = 5000.0
    noisy = ShotNoise(electrons=electrons)(as_array(flat((256, 256))), rng())
    in_electrons = np.asarray(noisy, dtype=np.float64) * electrons / GRAY
    assert noisy.dtype == as_array(flat()).dtype
    assert in_electrons.mean() == pytest.approx(electrons, rel=2e-3)
    assert in_electrons.var() == pytest.approx(electrons, rel=0.03)


def test_shot_noise_follows_the_local_intensity():
    image = flat((256, 256))
    image[:, 128:] *= 2  # right half twice as bright: twice the electrons, twice the variance
    noisy = ShotNoise(electrons=20000.0)(image, rng()) * (20000.0 / image.mean())
    assert noisy[:, 128:].var() / noisy[:, :128].var() == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("as_array", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
def test_read_noise_adds_sigma_squared_electrons(as_array):
    sigma, mean_electrons = 30.0, 8000.0
    noisy = ReadNoise(electrons=sigma, mean_electrons=mean_electrons)(as_array(flat((256, 256))), rng(1))
    in_electrons = np.asarray(noisy, dtype=np.float64) * mean_electrons / GRAY
    assert in_electrons.var() == pytest.approx(sigma**2, rel=0.03)


def test_read_noise_uses_the_preceding_shot_noise_scale_or_20000_electrons():
    alone = build_corruptions([{"type": "read_noise", "electrons": 12.0}])
    after = build_corruptions([{"type": "shot_noise", "electrons": 5000.0},
                               {"type": "read_noise", "electrons": 12.0}])
    assert alone.corruptions[0].mean_electrons == 20000.0
    assert after.corruptions[1].mean_electrons == 5000.0
    assert after.corruptions[1].electrons == 12.0


# --- quantize, blur ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8, 12])
def test_quantize_gives_integers_in_range_with_the_8_bit_range_mapped_to_the_new_one(bits):
    image = rng().uniform(-20, 280, (64, 64)).astype(np.float32)
    image[0, :2] = [0.0, 255.0]
    out = Quantize(bits=bits)(image, rng())
    levels = 2**bits - 1
    assert out.dtype == np.float32
    assert np.array_equal(out, np.round(out))
    assert out.min() == 0 and out.max() == levels
    assert out[0, 1] == levels  # gray 255 is full scale at any depth
    inside = (image >= 0) & (image <= 255)
    np.testing.assert_allclose(out[inside], image[inside] * levels / 255, atol=0.5 + 1e-4)


def test_blur_reduces_power_as_a_gaussian_transfer_function():
    sigma = 2.0
    noise = rng().standard_normal((256, 256)).astype(np.float32)
    blurred = Blur(sigma=sigma)(noise, rng())
    window = np.outer(np.hanning(256), np.hanning(256))  # hides the frame edges' leakage
    ratio = np.abs(np.fft.fft2(blurred * window)) ** 2 / np.abs(np.fft.fft2(noise * window)) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(256), np.fft.fftfreq(256), indexing="ij"))
    relative = ratio / np.exp(-(2 * np.pi * sigma * f) ** 2)  # measured over expected, per frequency
    for frequency in (0.02, 0.05, 0.08, 0.12, 0.15):  # cycles per pixel; power drops to 0.97 ... 0.03
        ring = np.abs(f - frequency) < 0.004
        assert np.median(relative[ring]) == pytest.approx(1.0, rel=0.05), frequency


def test_blur_on_torch_equals_scipy_on_numpy_and_acts_on_the_last_two_axes_only():
    stack = rng().uniform(0, 255, (2, 40, 56)).astype(np.float32)
    blur = Blur(sigma=1.3)
    reference = blur(stack, rng())
    np.testing.assert_allclose(blur(torch.from_numpy(stack), rng()).numpy(), reference, atol=1e-3)
    np.testing.assert_allclose(reference[1], blur(stack[1], rng()), atol=1e-5)


# --- illumination -----------------------------------------------------------------------------------------

def test_illumination_beam_darkens_within_bounds_with_its_peak_inside_the_frame():
    waist = 0.5e-3
    illumination = Illumination(beam_waist=waist, fringe_amplitude=0.0, fringe_period=3e-4, optics=OPTICS)
    diagonal2 = (OPTICS.nx * OPTICS.dx) ** 2 + (OPTICS.ny * OPTICS.dy) ** 2
    lowest = np.exp(-2 * diagonal2 / waist**2)
    one_pixel = np.exp(-2 * (OPTICS.dx**2 + OPTICS.dy**2) / waist**2)  # a centre between pixels
    ratios = []
    for seed in range(20):
        out = illumination(flat(), rng(seed))
        ratios.append(out.mean() / GRAY)
        assert out.max() / GRAY >= one_pixel - 1e-6
        assert out.max() <= GRAY * (1 + 1e-6)
    assert lowest <= min(ratios) and max(ratios) <= 1
    assert np.ptp(ratios) > 0.05  # the centre moves


def test_illumination_fringes_have_the_configured_period_and_amplitude():
    period_px, amplitude = 16.0, 0.2
    illumination = Illumination(beam_waist=None, fringe_amplitude=amplitude,
                                fringe_period=period_px * OPTICS.dx, optics=OPTICS)
    image = flat((128, 128))
    for seed in range(3):
        out = illumination(image, rng(seed))
        assert out.mean() == pytest.approx(GRAY, rel=0.02)
        assert out.std() == pytest.approx(GRAY * amplitude / np.sqrt(2), rel=0.1)
        power = np.abs(np.fft.fft2(out - out.mean())) ** 2
        row, col = np.unravel_index(np.argmax(power), power.shape)
        peak = np.hypot(np.fft.fftfreq(128)[row], np.fft.fftfreq(128)[col])
        assert peak == pytest.approx(1 / period_px, abs=1.5 / 128)


# --- brightness / contrast, dead and hot pixels, clutter ---------------------------------------------------

def test_brightness_and_contrast_stay_within_their_own_bounds():
    brightness, contrast = 0.05, 0.4
    image = rng().uniform(60, 200, (64, 64)).astype(np.float32)
    jitter = BrightnessContrast(brightness=brightness, contrast=contrast)
    means, stds = [], []
    for seed in range(60):
        out = jitter(image, rng(seed))
        means.append(out.mean() / image.mean())
        stds.append(out.std() / image.std())
    assert 1 - brightness - 1e-5 <= min(means) and max(means) <= 1 + brightness + 1e-5
    assert 1 - contrast - 1e-5 <= min(stds) and max(stds) <= 1 + contrast + 1e-5
    assert max(abs(s - 1) for s in stds) > 2 * brightness  # contrast reads contrast, not brightness


@pytest.mark.parametrize("as_array", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
def test_dead_and_hot_pixel_fraction_matches_half_each(as_array):
    fraction, image = 0.01, flat((100, 120), 100.0)
    out = np.asarray(DeadHotPixels(fraction=fraction)(as_array(image), rng()))
    stuck = round(fraction * image.size)
    assert (out == 0).sum() == stuck // 2
    assert (out == 255).sum() == stuck - stuck // 2
    assert ((out == 100) | (out == 0) | (out == 255)).all()


def test_clutter_shadows_the_image_only_when_particles_are_drawn():
    image = flat()
    none = Clutter(count=(0, 0), diameter=(2e-5, 4e-5), z=(1.2e-2, 2e-2), optics=OPTICS)
    assert np.array_equal(none(image, rng()), image)
    some = Clutter(count=(2, 2), diameter=(3e-5, 5e-5), z=(1.2e-2, 2e-2), optics=OPTICS)
    out = some(image, rng())
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() < 0.9 * GRAY  # shadows
    assert out.std() > 0.02 * GRAY  # fringes
    assert out.mean() == pytest.approx(GRAY, rel=0.05)  # opaque droplets block little light


# --- probability, determinism, config -----------------------------------------------------------------------

@pytest.mark.parametrize("probability", [0.0, 0.5, 1.0])
def test_probability_is_the_fraction_of_variants_corrupted(probability):
    blur = Blur(sigma=1.0, probability=probability)
    image = rng().uniform(0, 255, (16, 16)).astype(np.float32)
    applied = [not np.array_equal(blur(image, rng(seed)), image) for seed in range(200)]
    if probability in (0.0, 1.0):
        assert all(a == bool(probability) for a in applied)
    else:
        assert np.mean(applied) == pytest.approx(probability, abs=0.1)


def test_pipeline_is_deterministic_for_a_seed():
    pipeline = build_corruptions(default_items(), OPTICS)
    image = rng().uniform(100, 150, (OPTICS.ny, OPTICS.nx)).astype(np.float32)
    first = pipeline(image, rng(7))
    assert first.shape == image.shape and first.dtype == np.float32
    np.testing.assert_array_equal(first, pipeline(image, rng(7)))
    assert not np.array_equal(first, pipeline(image, rng(8)))


def test_each_corruption_reads_its_own_parameters():
    pipeline = build_corruptions(default_items(), OPTICS)
    for item, corruption in zip(default_items(), pipeline, strict=True):
        for key, value in item.items():
            expected = tuple(value) if isinstance(value, list) else value
            if key != "type":
                assert getattr(corruption, key) == expected, (item["type"], key)
        assert corruption.probability == item.get("probability", 1.0)


@pytest.mark.parametrize(("item", "message"), [
    ({"type": "blur", "brightness": 0.5}, "unknown key"),
    ({"type": "blur"}, "missing key"),
    ({"type": "sharpen", "sigma": 1.0}, "unknown corruption"),
    ({"type": "illumination", "beam_waist": 1e-3, "fringe_amplitude": 2.0, "fringe_period": 1e-4},
     "fringe_amplitude"),
])
def test_bad_items_raise_config_errors_naming_the_item(item, message):
    with pytest.raises(ConfigError, match=message) as error:
        build_corruptions([{"type": "quantize", "bits": 8}, item], OPTICS)
    assert "augment.corruptions.1" in str(error.value)


def test_cheap_corruptions_run_on_torch_tensors():
    image = rng().uniform(50, 200, (2, 32, 48)).astype(np.float32)
    pipeline = build_corruptions([{"type": "blur", "sigma": 0.7}, {"type": "shot_noise", "electrons": 20000.0},
                                  {"type": "read_noise", "electrons": 12.0},
                                  {"type": "brightness_contrast", "brightness": 0.1, "contrast": 0.1},
                                  {"type": "illumination", "beam_waist": 3e-3, "fringe_amplitude": 0.05,
                                   "fringe_period": 3e-4},
                                  {"type": "dead_hot_pixels", "fraction": 0.01}, {"type": "quantize", "bits": 8}],
                                 OPTICS)
    out = pipeline(torch.from_numpy(image), rng())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == image.shape
    assert torch.equal(out, out.round()) and 0 <= out.min() and out.max() <= 255
    assert abs(out.mean().item() - image.mean()) < 0.2 * image.mean()


# --- the stage --------------------------------------------------------------------------------------------

def tiny_config(**augment) -> dict:
    return load_config({
        "splits": {"train": {"source": "simulate", "n_holograms": 3, "seed": 5}},
        "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 96, "ny": 64,
                   "z_min": 2e-3, "z_max": 12e-3},
        "simulate": {"particles": [1, 3], "pad": 16},
        "augment": augment,
    })


@pytest.fixture(scope="module")
def regridded(tmp_path_factory):
    """A tiny regridded training store: 3 simulated 96x64 holograms written to zarr."""
    folder = tmp_path_factory.mktemp("regridded")
    nc = simulate_file(folder / "train.nc", n_holograms=3, seed=5,
                       settings=SimulationSettings.from_config(tiny_config()), progress=False)
    return write_zarr(open_holodec(nc), folder / "train.zarr")


def test_augment_file_writes_variants_with_remapped_particles_and_a_gallery(regridded, tmp_path):
    items = [*default_items()[:1], {"type": "clutter", "count": [1, 1], "diameter": [2e-5, 4e-5],
                                    "z": [1.2e-2, 2e-2]}, *default_items()[2:]]
    config = tiny_config(variants=2, seed=3, gallery=2, corruptions=items)
    out = augment_file(regridded, tmp_path / "augmented" / "train.zarr", config,
                       gallery_path=tmp_path / "gallery.png")

    clean, augmented = open_holodec(regridded), open_holodec(out)
    assert augmented.sizes["hologram_number"] == 6
    assert augmented["image"].dtype == np.float32
    assert augmented["image"].chunks[0] == (1,) * 6
    pipeline = build_corruptions(items, optics_from_attrs(clean.attrs))
    for hologram in range(3):
        expected = augment_hologram(clean["image"][hologram].values.T, pipeline, seed=3, hologram=hologram,
                                    variants=2)
        for variant in range(2):
            written = augmented["image"][hologram * 2 + variant].values.T  # (ny, nx)
            np.testing.assert_array_equal(written, expected[variant])
    assert not np.array_equal(augmented["image"][0].values, augmented["image"][1].values)

    before, after = particle_table(clean), particle_table(augmented)
    assert len(after) == 2 * len(before)
    assert after["hid"].is_monotonic_increasing
    for new_hid, rows in after.groupby("hid"):
        source = before[before["hid"] == (new_hid - 1) // 2 + 1]
        np.testing.assert_array_equal(rows[["x", "y", "z", "d"]].values, source[["x", "y", "z", "d"]].values)

    assert augmented.attrs["augment_variants"] == 2 and augmented.attrs["augment_seed"] == 3
    assert json.loads(augmented.attrs["augment_corruptions"]) == config["augment"]["corruptions"]  # defaults filled
    assert augmented.attrs["dx"] == clean.attrs["dx"] and augmented.attrs["Nx"] == 96

    picture = matplotlib.image.imread(tmp_path / "gallery.png")
    assert picture.ndim == 3 and picture.shape[0] > picture.shape[1] / 2  # two rows of three panels
    assert not list(tmp_path.glob(".*tmp*")) and not list((tmp_path / "augmented").glob(".*tmp*"))


def test_augment_file_with_nothing_applied_copies_every_hologram(regridded, tmp_path):
    items = [dict(item, probability=0.0) for item in default_items()]
    out = augment_file(regridded, tmp_path / "copy.zarr", tiny_config(variants=2, corruptions=items))
    clean, augmented = open_holodec(regridded), open_holodec(out)
    for index in range(6):
        np.testing.assert_array_equal(augmented["image"][index].values,
                                      clean["image"][index // 2].values.astype(np.float32))


# --- augment.device: numpy on the CPU, CuPy on a GPU (issue 21) ----------------------------------------------

def test_a_gpu_augment_device_without_a_gpu_fails_naming_the_key(tmp_path, monkeypatch):
    from holopipe.core.device import GPUNotFoundError

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("holopipe.core.device._cupy_gpus", lambda: (None, 0, "CuPy sees no GPU"))
    config = tiny_config(device="cuda")
    with pytest.raises(GPUNotFoundError, match=r"augment\.device is 'cuda'"):
        augment_file(tmp_path / "missing.zarr", tmp_path / "out.zarr", config)
    assert not (tmp_path / "out.zarr").exists()


def test_shot_noise_draws_the_numpy_poisson_law_on_the_host_for_other_arrays():
    image = rng().uniform(60, 200, (3, 40, 56)).astype(np.float32)
    on_numpy = ShotNoise(electrons=20000.0)(image, rng(5))
    on_torch = ShotNoise(electrons=20000.0)(torch.from_numpy(image), rng(5))
    # The same draws, but for the odd count one electron apart where float rounding of the mean moves a pixel's
    # Poisson mean across an integer of the sampler (one electron is 1/20000 of the mean gray level).
    one_electron = image.mean(axis=(-2, -1), keepdims=True) / 20000.0
    apart = np.abs(on_torch.numpy() - on_numpy) / one_electron
    assert apart.max() < 1.5 and np.mean(apart > 0.5) < 0.01


@pytest.mark.gpu
def test_cupy_corrupts_as_numpy():
    """Every corruption but the noise within float tolerance; with the noise, the same level and spread."""
    pytest.importorskip("cupy")
    import array_api_compat.cupy as cupy_xp

    clean = rng().uniform(100, 150, (OPTICS.ny, OPTICS.nx)).astype(np.float32)  # non-square
    exact = [item for item in default_items() if item["type"] not in ("shot_noise", "read_noise", "quantize")]
    for items, exact_match in ((exact, True), (default_items(), False)):
        pipeline = build_corruptions(items, OPTICS)
        on_cpu = augment_hologram(clean, pipeline, seed=3, hologram=1, variants=2)
        on_gpu = augment_hologram(clean, pipeline, seed=3, hologram=1, variants=2, xp=cupy_xp)
        assert isinstance(on_gpu, np.ndarray) and on_gpu.dtype == np.float32 and on_gpu.shape == on_cpu.shape
        if exact_match:
            np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-3)
        else:
            assert abs(on_gpu.mean() - on_cpu.mean()) < 0.5 and abs(on_gpu.std() - on_cpu.std()) < 0.05 * on_cpu.std()
