"""Regridding: resampled holograms still reconstruct their particles in place, and coordinates follow
the frame through resampling, cropping and padding."""

import numpy as np
import pytest
import xarray as xr

from holopipe.core.config import load_config
from holopipe.core.io import (
    DUST_ATTRS,
    PARTICLE_VARS,
    open_holodec,
    pixel_centres,
    um_to_pixel,
    window_dust_table,
    write_zarr,
)
from holopipe.data.regrid import regrid_file
from holopipe.optics.propagation import reconstruct
from holopipe.optics.simulate import (
    Camera,
    Optics,
    ParticleSet,
    SimulationSettings,
    camera_image,
    opaque_disks_field,
    simulate_file,
)

WAVELENGTH, PITCH = 3.55e-7, 2.96e-6
Z_MIN, Z_MAX = 2e-3, 12e-3


def make_config(pixel_pitch=None, method="antialias", frame="pad", tile=16) -> dict:
    return load_config({
        "splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 0}},
        "optics": {"wavelength": WAVELENGTH, "dx": PITCH, "dy": PITCH, "nx": 128, "ny": 96,
                   "z_min": Z_MIN, "z_max": Z_MAX},
        "regrid": {"pixel_pitch": pixel_pitch, "method": method, "frame": frame},
        "examples": {"tile_size": tile},
    })


def write_store(path, images, particles: dict, pitch=PITCH, pitch_y=None):
    """A contract zarr store: images (H, xsize, ysize), particles as µm columns with 1-based hid; pixels
    ``pitch`` wide along x and ``pitch_y`` (default ``pitch``) along y."""
    n, nx, ny = images.shape
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), images),
         **{name: ("particle", np.asarray(particles[name], np.float32)) for name in PARTICLE_VARS}},
        attrs={"Nx": nx, "Ny": ny, "dx": pitch, "dy": pitch_y or pitch, "lambda": WAVELENGTH, "zMin": Z_MIN,
               "zMax": Z_MAX},
    )
    return write_zarr(ds, path)


def particles_um(x, y, z=5000.0, d=40.0, hid=1) -> dict:
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    return {"hid": np.full(x.size, hid), "x": x, "y": y, "z": np.full(x.size, z), "d": np.full(x.size, d)}


def dark_spot(image_xy: np.ndarray, z: float, pitch: float):
    """Centre (µm, x then y) and equivalent diameter (m) of the dark region reconstructed at z."""
    amplitude = reconstruct(image_xy.T, z, wavelength=WAVELENGTH, dx=pitch, dy=pitch, pad=64).amplitude
    rows, cols = np.nonzero(amplitude < 0.5)
    ny, nx = amplitude.shape
    centre = (pixel_centres(nx, pitch)[cols].mean() * 1e6, pixel_centres(ny, pitch)[rows].mean() * 1e6)
    return centre, 2 * np.sqrt(rows.size * pitch**2 / np.pi)


@pytest.mark.parametrize("method", ["antialias", "bin"])
def test_halving_the_resolution_keeps_a_particle_in_place_and_size(tmp_path, method):
    x, y, z, d = 40e-6, -55e-6, 5e-3, 40e-6
    optics = Optics(WAVELENGTH, PITCH, PITCH, nx=128, ny=96, z_min=Z_MIN, z_max=Z_MAX)
    field = opaque_disks_field(ParticleSet(*(np.array([v]) for v in (x, y, z, d))), optics, pad=64)
    image = camera_image(field, np.random.default_rng(0), optics, Camera(noise=False, beam_waist=None)).T
    source = write_store(tmp_path / "in.zarr", image[None], particles_um(x * 1e6, y * 1e6, z * 1e6, d * 1e6))

    out = open_holodec(regrid_file(source, tmp_path / "out.zarr", make_config(2 * PITCH, method)))

    new_pitch = 2 * PITCH
    assert (out.attrs["Nx"], out.attrs["Ny"], out.attrs["dx"], out.attrs["dy"]) == (64, 48, new_pitch, new_pitch)
    assert out["image"].dtype == np.float32
    assert float(out["image"].mean()) == pytest.approx(float(image.mean()), rel=2e-3)
    (cx, cy), size = dark_spot(out["image"][0].values, z, new_pitch)
    (cx0, cy0), size0 = dark_spot(image, z, PITCH)
    new_x, new_y = float(out["x"][0]), float(out["y"][0])
    for centre, centre0, truth in ((cx, cx0, new_x), (cy, cy0, new_y)):
        assert centre == pytest.approx(centre0, abs=new_pitch * 1e6)
        assert centre == pytest.approx(truth, abs=new_pitch * 1e6)
    assert size == pytest.approx(size0, abs=1.5 * new_pitch)
    assert size == pytest.approx(d, abs=1.5 * new_pitch)


def blob_image(nx, ny, x_um, y_um, sigma_px=3.0, dtype=np.float32) -> np.ndarray:
    """Background 100 plus a smooth Gaussian blob (peak 100) centred at (x_um, y_um)."""
    xs, ys = pixel_centres(nx, PITCH) * 1e6, pixel_centres(ny, PITCH) * 1e6
    sigma_um = sigma_px * PITCH * 1e6
    blob = np.exp(-((xs[:, None] - x_um) ** 2 + (ys[None, :] - y_um) ** 2) / (2 * sigma_um**2))
    return (100 + 100 * blob).astype(dtype)


def centroid_px(image: np.ndarray, background: float = 100.0):
    weights = np.clip(image - background, 0, None)
    ix, iy = np.indices(image.shape)
    return (weights * ix).sum() / weights.sum(), (weights * iy).sum() / weights.sum()


# Sizes before -> after resampling -> after the frame step (tile 16), differences odd and even:
# 143 x 136 at 2 pitch: 71 x 68 (binning leaves one odd pixel along x), crop 64 x 64, pad 80 x 80.
@pytest.mark.parametrize("frame", ["crop", "pad"])
@pytest.mark.parametrize("pixel_pitch, method, shape", [
    (None, "antialias", (71, 68)),
    (2 * PITCH, "antialias", (143, 136)),
    (2 * PITCH, "bin", (143, 136)),
])
def test_image_content_and_particle_coordinates_move_together(tmp_path, frame, pixel_pitch, method, shape):
    x_um, y_um = 23.3, -17.9
    image = blob_image(*shape, x_um, y_um)
    source = write_store(tmp_path / "in.zarr", image[None], particles_um(x_um, y_um))

    out = open_holodec(regrid_file(source, tmp_path / "out.zarr", make_config(pixel_pitch, method, frame)))

    nx, ny, dx = out.attrs["Nx"], out.attrs["Ny"], out.attrs["dx"]
    assert nx % 16 == 0 and ny % 16 == 0
    expected = {"crop": (64, 64), "pad": (80, 80)}[frame]
    assert (nx, ny) == expected
    cx, cy = centroid_px(out["image"][0].values)
    assert um_to_pixel(float(out["x"][0]), nx, dx) == pytest.approx(cx, abs=0.05)
    assert um_to_pixel(float(out["y"][0]), ny, dx) == pytest.approx(cy, abs=0.05)
    # The recorded offset is the whole coordinate change.
    assert float(out["x"][0]) == pytest.approx(x_um - out.attrs["regrid_offset_x_um"], abs=1e-3)
    assert float(out["y"][0]) == pytest.approx(y_um - out.attrs["regrid_offset_y_um"], abs=1e-3)


def test_window_dust_moves_with_the_particles(tmp_path):
    """A file's window dust (attributes in µm, as the particles' x, y) gets the same offset as its particles."""
    image = blob_image(143, 136, 23.3, -17.9)
    source = write_store(tmp_path / "in.zarr", image[None], particles_um(23.3, -17.9))
    ds = open_holodec(source).load()
    ds.attrs.update({name: [23.3, -5.0] if axis == "x" else [-17.9, 8.0] if axis == "y" else [2000.0, 2000.0]
                     if axis == "z" else [30.0, 40.0] for axis, name in DUST_ATTRS.items()})
    dusty = write_zarr(ds, tmp_path / "dusty.zarr")
    out = open_holodec(regrid_file(dusty, tmp_path / "out.zarr", make_config(2 * PITCH, "antialias", "crop")))
    dust = window_dust_table(out)
    assert dust["x"].iloc[0] == pytest.approx(float(out["x"][0]), abs=1e-3)
    assert dust["y"].iloc[0] == pytest.approx(float(out["y"][0]), abs=1e-3)
    assert dust["z"].tolist() == [2000.0, 2000.0] and dust["d"].tolist() == [30.0, 40.0]


def test_crop_moves_pixels_and_coordinates_by_whole_and_half_pixels(tmp_path):
    """A marked pixel's index maps to the same µm before and after an odd (x) and even (y) crop."""
    image = np.full((1, 71, 68), 50, np.uint8)
    i, j = 40, 7
    image[0, i, j] = 200
    x_um, y_um = pixel_centres(71, PITCH)[i] * 1e6, pixel_centres(68, PITCH)[j] * 1e6
    source = write_store(tmp_path / "in.zarr", image, particles_um(x_um, y_um))

    out = open_holodec(regrid_file(source, tmp_path / "out.zarr", make_config(frame="crop")))

    new_i, new_j = np.argwhere(out["image"][0].values == 200)[0]
    assert (new_i, new_j) == (i - 3, j - 2)
    assert um_to_pixel(float(out["x"][0]), 64, PITCH) == pytest.approx(new_i, abs=1e-3)
    assert um_to_pixel(float(out["y"][0]), 64, PITCH) == pytest.approx(new_j, abs=1e-3)
    assert out.attrs["regrid_offset_x_um"] == pytest.approx(-0.5 * PITCH * 1e6)
    assert out.attrs["regrid_offset_y_um"] == 0
    assert out["image"].dtype == np.uint8


def test_particles_outside_a_crop_are_dropped(tmp_path):
    image = np.full((2, 80, 64), 100, np.uint8)
    half_kept_um = 64 * PITCH * 1e6 / 2
    xs = np.array([0.0, half_kept_um - 1, half_kept_um + 3, -half_kept_um - 5, 10.0])
    particles = particles_um(xs, np.zeros(5))
    particles["hid"] = np.array([1, 1, 2, 2, 2])
    source = write_store(tmp_path / "in.zarr", image, particles)

    out = open_holodec(regrid_file(source, tmp_path / "out.zarr", make_config(frame="crop", tile=32)))

    np.testing.assert_allclose(out["x"].values, xs[[0, 1, 4]], atol=1e-4)
    np.testing.assert_array_equal(out["hid"].values, [1, 1, 2])
    assert out.attrs["regrid_dropped_particles"] == 2


@pytest.mark.parametrize("pixel_pitch", [None, PITCH])
def test_identity_keeps_uint8_values_and_particles(tmp_path, pixel_pitch):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (2, 64, 48), dtype=np.uint8)
    particles = particles_um(rng.uniform(-80, 80, 4), rng.uniform(-60, 60, 4))
    source = write_store(tmp_path / "in.zarr", image, particles)

    out = open_holodec(regrid_file(source, tmp_path / "out.zarr", make_config(pixel_pitch, frame="crop")))

    assert out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"].values, image)
    for name in PARTICLE_VARS:
        np.testing.assert_array_equal(out[name].values, np.asarray(particles[name], np.float32))
    assert (out.attrs["Nx"], out.attrs["Ny"], out.attrs["dx"]) == (64, 48, PITCH)
    assert out.attrs["regrid_method"] == "none"
    assert out.attrs["regrid_scale_x"] == 1 and out.attrs["regrid_offset_x_um"] == 0


def test_padding_uses_each_holograms_median_and_keeps_uint8(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(90, 111, (2, 40, 48), dtype=np.uint8)
    image[1] += 20
    image[:, :5, :5] = 0  # a dark corner pulls the mean down, not the median
    source = write_store(tmp_path / "in.zarr", image, particles_um(0.0, 0.0))

    out = open_holodec(regrid_file(source, tmp_path / "out.zarr", make_config(frame="pad")))

    padded = out["image"].values
    assert padded.shape == (2, 48, 48) and padded.dtype == np.uint8
    for k in range(2):
        assert set(np.unique(padded[k, :4])) == {np.rint(np.median(image[k]))}
        np.testing.assert_array_equal(padded[k, 4:44], image[k])


def test_bin_needs_an_integer_pitch_ratio(tmp_path):
    source = write_store(tmp_path / "in.zarr", np.full((1, 64, 64), 100, np.uint8), particles_um(0.0, 0.0))
    with pytest.raises(ValueError, match=r"in\.zarr.*integer pitch ratio"):
        regrid_file(source, tmp_path / "out.zarr", make_config(1.5 * PITCH, method="bin"))
    assert not (tmp_path / "out.zarr").exists()


def test_netcdf_input_regrids_to_a_valid_store(tmp_path):
    optics = Optics(WAVELENGTH, PITCH, PITCH, nx=70, ny=66, z_min=Z_MIN, z_max=Z_MAX)
    source = simulate_file(tmp_path / "raw.nc", n_holograms=2, seed=3,
                           settings=SimulationSettings(optics=optics, pad=8), progress=False)

    out = open_holodec(regrid_file(source, tmp_path / "out.zarr", make_config(2 * PITCH, frame="crop")))

    raw = open_holodec(source)
    assert dict(out["image"].sizes) == {"hologram_number": 2, "xsize": 32, "ysize": 32}
    assert out["image"].chunks[0] == (1, 1)
    assert out.sizes["particle"] + out.attrs["regrid_dropped_particles"] == raw.sizes["particle"]
    assert out.attrs["regrid_source"] == "raw.nc"
    assert (out.attrs["regrid_source_Nx"], out.attrs["regrid_source_dx"]) == (70, PITCH)


# 150 x 120 at pitch (dx, dy) -> target 2 * dx along both axes: 75 x (120 dy / 2 dx) pixels before the frame step.
@pytest.mark.parametrize("frame, pitch_y, data_x, data_y", [
    ("pad", PITCH, [2, 77], [2, 62]),                # 75 x 60 -> 80 x 64
    ("pad", 1.5 * PITCH, [2, 77], [3, 93]),          # dy != dx: 75 x 90 -> 80 x 96
    ("crop", PITCH, [0, 64], [0, 48]),               # nothing padded
])
def test_the_data_area_is_recorded_for_the_stages_after_regrid(tmp_path, frame, pitch_y, data_x, data_y):
    from holopipe.data.regrid import data_area

    images = np.random.default_rng(3).integers(90, 111, (1, 150, 120), dtype=np.uint8)
    images[0, :, -6:] = 255  # a saturated band at the sensor's edge: data, whatever the pad looks like
    source = write_store(tmp_path / "in.zarr", images, particles_um(0.0, 0.0), pitch_y=pitch_y)

    out = open_holodec(regrid_file(source, tmp_path / "out.zarr", make_config(2 * PITCH, frame=frame)))

    assert (out.attrs["regrid_data_x"], out.attrs["regrid_data_y"]) == (data_x, data_y)
    rows, cols = data_area(out.attrs, out.sizes["xsize"], out.sizes["ysize"])
    assert (rows, cols) == (slice(*data_x), slice(*data_y))
    pad = np.ones(out["image"].shape[1:], bool)
    pad[rows, cols] = False
    assert len(np.unique(out["image"].values[0][pad])) <= 1  # the pad is one value; the data area is the rest


def test_a_data_area_that_does_not_fit_the_frame_fails_naming_the_store():
    from holopipe.data.regrid import data_area

    assert data_area({}, 70, 40) == (slice(0, 70), slice(0, 40))  # not regridded: all of it is data
    with pytest.raises(ValueError, match=r"s\.zarr: attribute 'regrid_data_y' = \[4, 48\] is not a part of the "
                                         r"frame's 40 pixels along y"):
        data_area({"regrid_data_x": [0, 70], "regrid_data_y": [4, 48]}, 70, 40, "s.zarr")


# --- regrid.device: numpy on the CPU, CuPy on a GPU (issue 21) -----------------------------------------------

def test_a_gpu_regrid_device_without_a_gpu_fails_naming_the_key(tmp_path, monkeypatch):
    from holopipe.core.device import GPUNotFoundError

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("holopipe.core.device._cupy_gpus", lambda: (None, 0, "CuPy sees no GPU"))
    images = np.full((1, 100, 70), 120, np.uint8)
    write_store(tmp_path / "in.zarr", images, particles_um(0.0, 0.0))
    config = make_config(pixel_pitch=2 * PITCH, method="bin")
    config["regrid"]["device"] = "cuda"
    with pytest.raises(GPUNotFoundError, match=r"regrid\.device is 'cuda'"):
        regrid_file(tmp_path / "in.zarr", tmp_path / "out.zarr", config)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.gpu
@pytest.mark.parametrize(("pixel_pitch", "method", "frame"), [
    (3.3e-6, "antialias", "pad"), (2.5e-6, "antialias", "crop"), (2 * PITCH, "bin", "pad"), (None, "antialias", "pad"),
])
def test_cupy_regrids_as_numpy(pixel_pitch, method, frame):
    pytest.importorskip("cupy")
    import array_api_compat.cupy as cupy_xp

    from holopipe.data.regrid import _regrid_block, plan_axis

    plans = [plan_axis(n, PITCH, pixel_pitch, method=method, frame=frame, tile=16, where=axis)
             for n, axis in ((150, "x"), (110, "y"))]  # non-square
    block = np.random.default_rng(0).integers(0, 255, (2, 150, 110)).astype(np.uint8)
    dtype = np.uint8 if pixel_pitch is None else np.float32
    on_cpu = _regrid_block(block, *plans, dtype)
    on_gpu = _regrid_block(block, *plans, dtype, cupy_xp)
    assert isinstance(on_gpu, np.ndarray) and on_gpu.dtype == on_cpu.dtype and on_gpu.shape == on_cpu.shape
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-5, atol=1e-3)
