"""The regridded frame's size has one home (holopipe.core.grid): regridding itself, the config's tile check and the
workflow's cost model agree on it, rounding and regrid.frame included."""

import pytest

from holopipe.core.config import ConfigError, check_tiles_fit, load_config
from holopipe.core.grid import bin_ratio, framed_pixels, regridded_pixels, resampled_pixels, resamples
from holopipe.data.regrid import plan_axis

PITCH = 2.96e-6


def config_with(nx=64, ny=64, dx=PITCH, dy=PITCH, pixel_pitch=None, method="antialias", frame="pad", tile=32):
    return load_config({
        "splits": {"train": {"source": "simulate", "n_holograms": 2, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": dx, "dy": dy, "nx": nx, "ny": ny, "z_min": 0.001, "z_max": 0.003},
        "regrid": {"pixel_pitch": pixel_pitch, "method": method, "frame": frame},
        "examples": {"tile_size": tile},
    })


def tile_problems(config) -> str:
    try:
        check_tiles_fit(config)
    except ConfigError as error:
        return str(error)
    return ""


def test_a_pitch_within_the_tolerance_is_kept():
    assert not resamples(PITCH, None)
    assert not resamples(PITCH, PITCH * (1 + 1e-7))
    assert resamples(PITCH, PITCH * (1 + 1e-5))
    assert resampled_pixels(225, PITCH, PITCH * (1 + 1e-7), "antialias") == 225  # not 224: no resampling at all


def test_antialias_keeps_the_whole_pixels_the_axis_spans_despite_rounding():
    # 225 pixels of 2.96 µm span 111 pixels of 6 µm exactly; 225 / (6 / 2.96) is 110.99999999999999 in floating
    # point, which int() (the config check's old rounding) made 110.
    assert int(225 / (6e-6 / PITCH)) == 110
    assert resampled_pixels(225, PITCH, 6e-6, "antialias") == 111
    assert resampled_pixels(226, PITCH, 6e-6, "antialias") == 111
    assert resampled_pixels(224, PITCH, 6e-6, "antialias") == 110


def test_bin_averages_whole_blocks_of_a_whole_ratio():
    assert bin_ratio(PITCH, 3 * PITCH) == 3
    assert bin_ratio(PITCH, 3 * PITCH * (1 + 1e-8)) == 3
    assert bin_ratio(PITCH, 2.5 * PITCH) is None
    assert bin_ratio(PITCH, 0.5 * PITCH) is None  # a finer pitch cannot be binned to
    assert resampled_pixels(143, PITCH, 2 * PITCH, "bin") == 71
    with pytest.raises(ValueError, match="integer pitch ratio"):
        resampled_pixels(143, PITCH, 2.5 * PITCH, "bin")
    with pytest.raises(ValueError, match="unknown regrid method"):
        resampled_pixels(143, PITCH, 2 * PITCH, "nearest")


def test_crop_keeps_whole_tiles_and_pad_completes_the_last():
    assert framed_pixels(71, "crop", 16) == 64
    assert framed_pixels(71, "pad", 16) == 80
    assert framed_pixels(64, "crop", 16) == framed_pixels(64, "pad", 16) == 64
    assert framed_pixels(15, "crop", 16) == 0
    assert framed_pixels(15, "pad", 16) == 16
    with pytest.raises(ValueError, match="unknown regrid frame"):
        framed_pixels(71, "stretch", 16)


@pytest.mark.parametrize("frame", ["crop", "pad"])
@pytest.mark.parametrize(("n", "pixel_pitch", "method"), [
    (143, None, "antialias"), (143, 2 * PITCH, "bin"), (143, 2 * PITCH, "antialias"), (225, 6e-6, "antialias"),
    (225, 3e-6, "antialias"), (100, 0.7 * PITCH, "antialias"), (97, 3 * PITCH, "bin"),
])
def test_regridding_plans_the_size_the_grid_gives(n, pixel_pitch, method, frame):
    plan = plan_axis(n, PITCH, pixel_pitch, method=method, frame=frame, tile=16, where="x")
    assert plan.n_resampled == resampled_pixels(n, PITCH, pixel_pitch, method)
    assert plan.n_out == regridded_pixels(n, PITCH, pixel_pitch, method=method, frame=frame, tile=16)


def test_the_config_check_accepts_a_frame_that_regridding_tiles():
    # 225 pixels at 6 µm are 111 whole pixels: one tile of 111 once cropped. The old check's int() found 110.
    config = config_with(nx=225, ny=225, pixel_pitch=6e-6, frame="crop", tile=111)
    assert tile_problems(config) == ""
    assert plan_axis(225, PITCH, 6e-6, method="antialias", frame="crop", tile=111, where="x").n_out == 111
    assert "larger than the regridded frame along x (111 pixels" in tile_problems(
        config_with(nx=225, ny=225, pixel_pitch=6e-6, frame="crop", tile=112))


def test_the_config_check_follows_regrid_frame():
    # A 64-pixel frame and tiles of 128: crop keeps no tile (regridding would fail), pad makes one.
    assert "examples.tile_size (128) is larger than the regridded frame along x (64 pixels" in tile_problems(
        config_with(frame="crop", tile=128))
    assert tile_problems(config_with(frame="pad", tile=128)) == ""
    assert plan_axis(64, PITCH, None, method="antialias", frame="pad", tile=128, where="x").n_out == 128
    with pytest.raises(ValueError, match="hold no tile of 128"):
        plan_axis(64, PITCH, None, method="antialias", frame="crop", tile=128, where="x")


def test_the_config_check_reads_each_axis_at_its_own_pitch():
    # 200 x 64 pixels at dx 2.96 µm, dy 5.92 µm, regridded to 5.92 µm: 100 x 64, so tiles of 96 fit only along x.
    problems = tile_problems(config_with(nx=200, ny=64, dy=2 * PITCH, pixel_pitch=2 * PITCH, frame="crop", tile=96))
    assert "along y (64 pixels" in problems and "along x" not in problems


def test_the_config_check_names_a_bin_ratio_that_is_not_whole():
    problems = tile_problems(config_with(pixel_pitch=2.5 * PITCH, method="bin", tile=16))
    assert "must be an integer multiple of optics.dx" in problems and "optics.dy" in problems
    assert tile_problems(config_with(pixel_pitch=2 * PITCH, method="bin", tile=16)) == ""
    assert tile_problems(config_with(pixel_pitch=2.5 * PITCH, method="antialias", tile=16)) == ""  # any ratio
