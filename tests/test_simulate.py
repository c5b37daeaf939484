"""Synthetic holograms: geometry conventions, optics models against each other, camera, files."""

import dataclasses

import numpy as np
import pytest
import xarray as xr

from holopipe.core.io import open_holodec, pixel_centres, um_to_pixel
from holopipe.optics.propagation import reconstruct
from holopipe.optics.simulate import (
    Artifacts,
    Camera,
    DiameterModel,
    Optics,
    ParticleSet,
    SimulationSettings,
    camera_image,
    fraunhofer_field,
    opaque_disks_field,
    sample_outside,
    sample_particles,
    simulate_file,
    simulate_hologram,
    window_dust,
)

OPTICS = Optics(wavelength=3.55e-7, dx=2.96e-6, dy=2.96e-6, nx=256, ny=192, z_min=2e-3, z_max=12e-3)
NOISE_FREE_FLAT = Camera(noise=False, beam_waist=None)


def one_particle(x, y, z, d) -> ParticleSet:
    return ParticleSet(*(np.array([v], float) for v in (x, y, z, d)))


def test_single_particle_reconstructs_as_a_dark_disk_of_its_size_at_its_position(tmp_path):
    """Pins the contract's axis and origin conventions end to end through a file."""
    x, y, z, d = 100e-6, -60e-6, 5e-3, 40e-6
    field = opaque_disks_field(one_particle(x, y, z, d), OPTICS, pad=64)
    image = camera_image(field, np.random.default_rng(0), OPTICS, NOISE_FREE_FLAT)
    ds = xr.Dataset({"image": (("hologram_number", "xsize", "ysize"), image.T[None])})
    contract_image = ds["image"][0].values  # (xsize, ysize), as in every HOLODEC file

    amplitude = reconstruct(contract_image.T, z, wavelength=OPTICS.wavelength, dx=OPTICS.dx,
                            dy=OPTICS.dy, pad=64).amplitude
    dark = amplitude < 0.5
    rows, cols = np.nonzero(dark)
    assert um_to_pixel(x * 1e6, OPTICS.nx, OPTICS.dx) == pytest.approx(cols.mean(), abs=0.5)
    assert um_to_pixel(y * 1e6, OPTICS.ny, OPTICS.dy) == pytest.approx(rows.mean(), abs=0.5)
    equivalent_diameter = 2 * np.sqrt(dark.sum() * OPTICS.dx * OPTICS.dy / np.pi)
    assert equivalent_diameter == pytest.approx(d, abs=1.5 * OPTICS.dx)
    # Out of focus the disk is gone: focus is where the amplitude minimum is deepest.
    defocused = reconstruct(contract_image.T, z + 2e-3, wavelength=OPTICS.wavelength, dx=OPTICS.dx,
                            pad=64).amplitude
    assert defocused.min() > amplitude.min() + 0.3


def relative_difference(field, reference) -> float:
    """|field - reference| relative to the particle's signal |reference - 1| (L2 over the frame)."""
    return float(np.linalg.norm(field - reference) / np.linalg.norm(reference - 1))


# Far field: Fresnel number D²/λz << 1 and, for a whole-frame comparison, planes far enough that the
# paraxial phase error k r⁴/8z³ of the closed form stays small at the frame edge (0.03 rad at 20 mm).
@pytest.mark.parametrize(("d", "z", "agrees"), [(10e-6, 20e-3, True),   # Fresnel number 0.014
                                                (20e-6, 20e-3, True),   # 0.056
                                                (60e-6, 2e-3, False)])  # 5: near field
def test_fraunhofer_agrees_with_angular_spectrum_in_the_far_field_only(d, z, agrees):
    optics = dataclasses.replace(OPTICS, nx=384, ny=384)
    particles = one_particle(20e-6, -10e-6, z, d)
    exact = opaque_disks_field(particles, optics, pad=256)
    difference = relative_difference(fraunhofer_field(particles, optics), exact)
    assert (difference < 0.05) if agrees else (difference > 0.3), difference


def test_particles_of_one_slab_are_placed_at_their_own_depth():
    """A thick slab (one shared propagation, local offsets) equals one slab per particle."""
    particles = ParticleSet(np.array([-150e-6, 120e-6]), np.array([80e-6, -90e-6]),
                            np.array([4.2e-3, 4.9e-3]), np.array([30e-6, 20e-6]))
    shared = opaque_disks_field(particles, OPTICS, slab_thickness=5e-3, pad=32)
    separate = opaque_disks_field(particles, OPTICS, slab_thickness=0.1e-3, pad=32)
    assert relative_difference(shared, separate) < 0.02


def test_near_particle_shades_the_one_behind_it():
    """A droplet hidden behind a larger one adds almost nothing to the sensor field."""
    front = one_particle(0.0, 0.0, 3e-3, 200e-6)
    behind = one_particle(0.0, 0.0, 6e-3, 20e-6)
    both = ParticleSet(*(np.concatenate([getattr(front, k), getattr(behind, k)]) for k in "xyzd"))
    field_both = opaque_disks_field(both, OPTICS, pad=64)
    field_front = opaque_disks_field(front, OPTICS, pad=64)
    field_behind = opaque_disks_field(behind, OPTICS, pad=64)
    hidden = np.linalg.norm(field_both - field_front)
    unshaded = np.linalg.norm(field_behind - 1)
    assert hidden < 0.3 * unshaded  # without shading it would be 1.0


def test_camera_noise_free_and_flat_gives_the_gray_level():
    optics = dataclasses.replace(OPTICS, nx=8, ny=8)
    image = camera_image(np.ones((8, 8), np.complex64), np.random.default_rng(0), optics,
                         dataclasses.replace(NOISE_FREE_FLAT, gray_level=100.0))
    assert image.dtype == np.uint8 and np.all(image == 100)


def test_camera_noise_has_shot_plus_read_variance():
    camera = Camera(noise=True, electrons=2000.0, read_noise=30.0, gray_level=100.0, beam_waist=None)
    optics = dataclasses.replace(OPTICS, nx=512, ny=512)
    image = camera_image(np.ones((512, 512), np.complex64), np.random.default_rng(1), optics, camera)
    gain = camera.gray_level / camera.electrons
    expected_std = gain * np.sqrt(camera.electrons + camera.read_noise**2)  # Poisson var = mean
    assert image.mean() == pytest.approx(100.0, abs=0.05)
    # Rounding to integers adds 1/12 gray² of variance.
    assert image.var() == pytest.approx(expected_std**2 + 1 / 12, rel=0.03)


def test_camera_gaussian_beam_and_clipping():
    optics = dataclasses.replace(OPTICS, nx=64, ny=64)
    camera = Camera(noise=False, gray_level=200.0, beam_waist=64 * optics.dx / 2)
    image = camera_image(np.full((64, 64), 1.5, np.complex64), np.random.default_rng(0), optics,
                         camera)
    assert image[32, 32] == 255  # 1.5² x 200 clips
    corner = 200.0 * 2.25 * np.exp(-2 * 2 * pixel_centres(64, optics.dx)[0] ** 2 / camera.beam_waist**2)
    assert image[0, 0] == round(corner)


def test_particle_sampling_follows_the_configuration():
    settings = SimulationSettings(optics=OPTICS, particles=(50, 60),
                                  diameter=DiameterModel("gamma", 1e5, 2.0, 2.0, 1e-6, 1e-3))
    rng = np.random.default_rng(3)
    samples = [sample_particles(rng, settings) for _ in range(40)]
    assert all(50 <= len(p) <= 60 for p in samples)
    d = np.concatenate([p.d for p in samples])
    assert d.mean() == pytest.approx(3 / 1e5, rel=0.05)  # gamma(µ + 1, 1/λ) has mean (µ + 1)/λ
    for p in samples:
        assert np.all(np.abs(p.x) <= OPTICS.nx * OPTICS.dx / 2)
        assert np.all(np.abs(p.y) <= OPTICS.ny * OPTICS.dy / 2)
        assert np.all((p.z >= OPTICS.z_min) & (p.z <= OPTICS.z_max))
    uniform = DiameterModel("uniform", d_min=20e-6, d_max=30e-6).sample(rng, 1000)
    assert uniform.min() >= 20e-6 and uniform.max() <= 30e-6
    with pytest.raises(ValueError, match="diameter range"):
        DiameterModel("gamma", 1e5, 1.0, 1.0, 5e-3, 6e-3).sample(rng, 3)


def test_file_round_trip_meets_the_contract_and_is_deterministic(tmp_path):
    settings = SimulationSettings(optics=dataclasses.replace(OPTICS, nx=64, ny=48), pad=8)
    first = simulate_file(tmp_path / "a.nc", n_holograms=3, seed=7, settings=settings, progress=False)
    again = simulate_file(tmp_path / "b.nc", n_holograms=3, seed=7, settings=settings, progress=False)
    other = simulate_file(tmp_path / "c.nc", n_holograms=3, seed=8, settings=settings, progress=False)
    with open_holodec(first) as a, open_holodec(again) as b, open_holodec(other) as c:
        assert a["image"].dims == ("hologram_number", "xsize", "ysize")
        assert a["image"].shape == (3, 64, 48) and a["image"].dtype == np.uint8
        assert (a.attrs["Nx"], a.attrs["Ny"]) == (64, 48)
        assert a.attrs["dx"] == OPTICS.dx and a.attrs["lambda"] == OPTICS.wavelength
        assert (a.attrs["zMin"], a.attrs["zMax"]) == (OPTICS.z_min, OPTICS.z_max)
        assert a["z"].min() >= OPTICS.z_min * 1e6 and a["z"].max() <= OPTICS.z_max * 1e6  # µm
        assert set(np.unique(a["hid"].values)) <= {1.0, 2.0, 3.0}
        xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
        assert not np.array_equal(a["image"].values, c["image"].values)
    # Hologram i depends only on (seed, i): the second file's first hologram is the first file's.
    one = simulate_file(tmp_path / "d.nc", n_holograms=1, seed=7, settings=settings, progress=False)
    with open_holodec(first) as a, open_holodec(one) as d:
        np.testing.assert_array_equal(a["image"][0].values, d["image"][0].values)


def test_unknown_method_is_rejected():
    settings = SimulationSettings(optics=OPTICS, method="ray_tracing")
    with pytest.raises(ValueError, match="ray_tracing"):
        simulate_hologram(np.random.default_rng(0), settings)


def test_fraunhofer_method_writes_a_hologram():
    settings = SimulationSettings(optics=dataclasses.replace(OPTICS, nx=64, ny=64),
                                  particles=(2, 2), method="fraunhofer", camera=NOISE_FREE_FLAT)
    image, particles = simulate_hologram(np.random.default_rng(0), settings)
    assert image.shape == (64, 64) and len(particles) == 2
    assert image.std() > 0


def test_ideal_sensor_keeps_the_particles_and_drops_the_camera():
    """The split that augmentation corrupts gets the camera once: its simulated image has none."""
    optics = dataclasses.replace(OPTICS, nx=96, ny=64, dy=3.6e-6)
    settings = SimulationSettings(optics=optics, particles=(2, 3), pad=16,
                                  camera=Camera(noise=True, gray_level=120.0, beam_waist=1e-4))
    recorded, particles = simulate_hologram(np.random.default_rng([3, 0]), settings)
    ideal, same_particles = simulate_hologram(np.random.default_rng([3, 0]), settings, ideal_sensor=True)
    assert recorded.dtype == np.uint8 and ideal.dtype == np.float32 and ideal.shape == (64, 96)
    assert np.array_equal(particles.x, same_particles.x) and np.array_equal(particles.d, same_particles.d)
    field = opaque_disks_field(particles, optics, slab_thickness=settings.slab_thickness, pad=16)
    assert np.allclose(ideal, np.abs(field) ** 2 * 120.0, rtol=1e-5)
    assert not np.allclose(ideal, np.rint(ideal))  # not quantised
    # The narrow beam darkens the recorded corners; the ideal sensor's light is flat.
    assert recorded[0, 0] < 0.2 * 120 and ideal[0, 0] == pytest.approx(120.0, rel=0.1)


def test_camera_fringes_have_the_configured_amplitude_and_period():
    optics = dataclasses.replace(OPTICS, nx=256, ny=128, dy=3.6e-6)
    camera = Camera(noise=False, gray_level=100.0, beam_waist=None, fringe_amplitude=0.2, fringe_period=1.0e-4)
    image = camera_image(np.ones((128, 256), np.complex64), np.random.default_rng(2), optics, camera).astype(float)
    assert image.max() == pytest.approx(120, abs=1) and image.min() == pytest.approx(80, abs=1)
    spectrum = np.abs(np.fft.fft2(image - image.mean()))
    peak_row, peak_col = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    fy, fx = np.fft.fftfreq(128, optics.dy)[peak_row], np.fft.fftfreq(256, optics.dx)[peak_col]
    assert 1 / np.hypot(fx, fy) == pytest.approx(1.0e-4, rel=0.25)  # the FFT's bins are 13-22 % apart here
    # Along the fringes' normal the pattern repeats every 100 µm (34 pixels of 2.96 µm in x, 28 of 3.6 in y).
    period_x, period_y = 1.0e-4 / abs(np.cos(np.arctan2(fy, fx))), 1.0e-4 / abs(np.sin(np.arctan2(fy, fx)))
    shift_x, shift_y = period_x / optics.dx, period_y / optics.dy
    if shift_x < 200:
        assert np.corrcoef(image[:, :-int(round(shift_x))].ravel(), image[:, int(round(shift_x)):].ravel())[0, 1] > 0.8
    if shift_y < 100:
        assert np.corrcoef(image[:-int(round(shift_y))].ravel(), image[int(round(shift_y)):].ravel())[0, 1] > 0.8
    # Without fringes nothing is drawn: the noise stream, and so the image, is as before fringes existed.
    plain = Camera(noise=True, beam_waist=None)
    first = camera_image(np.ones((128, 256), np.complex64), np.random.default_rng(4), optics, plain)
    rng = np.random.default_rng(4)
    electrons = rng.poisson(np.full((128, 256), plain.electrons, np.float32)).astype(np.float32)
    electrons += rng.normal(0.0, plain.read_noise, electrons.shape).astype(np.float32)
    assert np.array_equal(first, np.clip(np.rint(electrons * plain.gray_level / plain.electrons), 0, 255))


# --- simulate.device: numpy on the CPU, CuPy on a GPU (issue 21) ---------------------------------------------

def test_a_gpu_simulate_device_without_a_gpu_fails_naming_the_key_before_writing(tmp_path, monkeypatch):
    from holopipe.core.device import GPUNotFoundError

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("holopipe.core.device._cupy_gpus", lambda: (None, 0, "CuPy sees no GPU"))
    settings = SimulationSettings(OPTICS, particles=(1, 2), device="cuda")
    with pytest.raises(GPUNotFoundError, match=r"simulate\.device is 'cuda'.*set simulate\.device: cpu"):
        simulate_file(tmp_path / "gpu.nc", n_holograms=1, seed=0, settings=settings, progress=False)
    assert not list(tmp_path.iterdir())


def test_auto_runs_on_numpy_without_a_gpu_and_refuses_where_a_gpu_was_allocated(monkeypatch):
    import array_api_compat

    from holopipe.core.device import GPUNotFoundError, array_namespace_for

    monkeypatch.setattr("holopipe.core.device._cupy_gpus", lambda: (None, 0, "CuPy sees no GPU"))
    assert array_namespace_for("auto", "simulate.device", environ={}) is array_api_compat.numpy
    with pytest.raises(GPUNotFoundError, match=r"simulate\.device is 'auto' and this job was allocated GPU"):
        array_namespace_for("auto", "simulate.device", environ={"CUDA_VISIBLE_DEVICES": "0"})


def test_simulate_device_is_read_from_the_split_merged_config():
    from holopipe.core.config import load_config, split_simulation_config

    config = load_config({"splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 0,
                                               "simulate": {"device": "cuda:1"}}},
                          "optics": dataclasses.asdict(OPTICS)})
    assert SimulationSettings.from_config(config).device == "cpu"  # the default: nothing changes
    assert SimulationSettings.from_config(split_simulation_config(config, "train")).device == "cuda:1"


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["angular_spectrum", "fraunhofer"])
def test_cupy_simulates_the_numpy_hologram(method):
    """Same particles (drawn on the host), the same noise-free image within float tolerance; the camera's
    noisy image has the same level (its Poisson stream may drift where rounding moves a mean over a threshold)."""
    pytest.importorskip("cupy")
    import array_api_compat.cupy as cupy_xp

    optics = dataclasses.replace(OPTICS, nx=200, ny=136)  # non-square
    settings = SimulationSettings(optics, particles=(6, 9), method=method, pad=32,
                                  camera=Camera(beam_waist=4e-4, fringe_amplitude=0.1))
    for ideal_sensor in (True, False):
        on_cpu, cpu_particles = simulate_hologram(np.random.default_rng([5, 2]), settings, ideal_sensor=ideal_sensor)
        on_gpu, gpu_particles = simulate_hologram(np.random.default_rng([5, 2]), settings, ideal_sensor=ideal_sensor,
                                                  xp=cupy_xp)
        assert isinstance(on_gpu, np.ndarray) and on_gpu.dtype == on_cpu.dtype and on_gpu.shape == (136, 200)
        np.testing.assert_array_equal(gpu_particles.z, cpu_particles.z)
        if ideal_sensor:
            np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-3 * settings.camera.gray_level)
        else:
            assert abs(on_gpu.astype(float).mean() - on_cpu.astype(float).mean()) < 0.5


def shadow_at_focus(particles: ParticleSet, z: float) -> np.ndarray:
    """The dark pixels (amplitude < 0.5) of a noise-free hologram of ``particles`` reconstructed at ``z``."""
    field = opaque_disks_field(particles, OPTICS, pad=64)
    image = camera_image(field, np.random.default_rng(0), OPTICS, NOISE_FREE_FLAT)
    return reconstruct(image, z, wavelength=OPTICS.wavelength, dx=OPTICS.dx, dy=OPTICS.dy, pad=64).amplitude < 0.5


@pytest.mark.parametrize("column", [False, True])
def test_ice_reconstructs_as_its_shape_with_the_area_of_its_equal_area_diameter(column):
    """An ellipse or a column 3 times longer than wide, its long axis at 30° from x: in focus its shadow has
    the area of a disk of d, and its second moments give its elongation and angle (a disk's are round)."""
    z, d, angle = 5e-3, 40e-6, np.pi / 6
    ice = ParticleSet(*(np.array([v], float) for v in (20e-6, -10e-6, z, d)), np.array([3.0]), np.array([angle]),
                      np.array([column]))
    dark = shadow_at_focus(ice, z)
    assert 2 * np.sqrt(dark.sum() * OPTICS.dx * OPTICS.dy / np.pi) == pytest.approx(d, rel=0.1)
    rows, cols = np.nonzero(dark)
    eigenvalues, vectors = np.linalg.eigh(np.cov(np.stack([cols * OPTICS.dx, rows * OPTICS.dy])))
    assert np.sqrt(eigenvalues[1] / eigenvalues[0]) == pytest.approx(3.0, rel=0.15)
    long_axis = vectors[:, 1] * np.sign(vectors[0, 1])
    assert np.arctan2(long_axis[1], long_axis[0]) == pytest.approx(angle, abs=0.05)
    disk = shadow_at_focus(one_particle(20e-6, -10e-6, z, d), z)
    rows, cols = np.nonzero(disk)
    eigenvalues = np.linalg.eigvalsh(np.cov(np.stack([cols * OPTICS.dx, rows * OPTICS.dy])))
    assert np.sqrt(eigenvalues[1] / eigenvalues[0]) == pytest.approx(1.0, abs=0.05)


def test_fraunhofer_ice_agrees_with_angular_spectrum_in_the_far_field():
    optics = dataclasses.replace(OPTICS, nx=384, ny=384)
    ice = ParticleSet(*(np.array([v], float) for v in (20e-6, -10e-6, 20e-3, 20e-6)), np.array([2.5]),
                      np.array([1.0]), np.array([True]))
    assert relative_difference(fraunhofer_field(ice, optics), opaque_disks_field(ice, optics, pad=256)) < 0.05


ARTIFACTS = dict(particles=(4, 6), camera=NOISE_FREE_FLAT, pad=64)


def test_window_dust_sits_in_every_hologram_of_a_file_and_never_in_its_truth(tmp_path):
    """Four specks on the near window: the same pixels darkened in both holograms (dust alone, no particles),
    recorded in the file's attributes, absent from the particles; another seed puts them elsewhere."""
    dusty = SimulationSettings(OPTICS, **{**ARTIFACTS, "particles": (0, 0)},
                               artifacts=Artifacts(dust_count=4, dust_diameter=(30e-6, 50e-6)))
    ds = open_holodec(simulate_file(tmp_path / "dust.nc", n_holograms=2, seed=5, settings=dusty, progress=False))
    images = ds["image"].values.astype(float)
    assert ds.sizes["particle"] == 0
    np.testing.assert_array_equal(images[0], images[1])
    assert images.min() < 0.8 * np.median(images), "the specks are in the image"
    assert len(ds.attrs["window_dust_x"]) == 4 and np.all(np.asarray(ds.attrs["window_dust_z"]) == OPTICS.z_min * 1e6)
    other = window_dust(6, dusty)
    assert not np.allclose(other.x * 1e6, ds.attrs["window_dust_x"])


def test_particles_outside_the_volume_are_in_the_image_only_and_artifacts_off_change_nothing():
    plain = SimulationSettings(OPTICS, **ARTIFACTS)
    outside = dataclasses.replace(plain, artifacts=Artifacts(outside_count=(3, 3), outside_margin=1e-3))
    image, truth = simulate_hologram(np.random.default_rng([1, 0]), plain)
    with_outside, same_truth = simulate_hologram(np.random.default_rng([1, 0]), outside)
    assert all(np.array_equal(getattr(truth, a), getattr(same_truth, a)) for a in "xyzd")
    assert not np.array_equal(image, with_outside), "their rings cross the frame"
    drawn = sample_outside(np.random.default_rng(3), dataclasses.replace(outside, artifacts=Artifacts(
        outside_count=(500, 500), outside_margin=1e-3)))
    assert np.all((drawn.z < OPTICS.z_min) | (drawn.z > OPTICS.z_max))
    assert np.all((drawn.z > OPTICS.z_min - 1e-3) & (drawn.z < OPTICS.z_max + 1e-3))
    # ice 0, no dust, none outside: the hologram the seed always gave (draws come after, and only when asked)
    again, _ = simulate_hologram(np.random.default_rng([1, 0]), dataclasses.replace(plain, artifacts=Artifacts()))
    np.testing.assert_array_equal(again, image)
