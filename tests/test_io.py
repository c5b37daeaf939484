"""Tests for holopipe.core.io: the HOLODEC netCDF contract, its validation and the atomic writer."""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from holopipe.core.files import HologramParts, file_sha256, input_identity, remove_stale_temporaries, write_atomically
from holopipe.core.io import (
    FINITE_MARK,
    IMAGE_DIMS,
    PARTICLE_VARS,
    HolodecFormatError,
    HolodecWriter,
    file_layout,
    hologram_image_yx,
    open_holodec,
    particle_table,
    pixel_centres,
    row_major,
    um_to_pixel,
    validate_holodec,
    write_zarr,
)

N_HOLOGRAMS, NX, NY = 3, 64, 48
DX = DY = 2.96e-6
WAVELENGTH = 3.55e-7
Z_MIN, Z_MAX = 0.014, 0.158
HALF_X_UM, HALF_Y_UM = NX * DX / 2 * 1e6, NY * DY / 2 * 1e6


def make_dataset(n_particles=6, seed=0) -> xr.Dataset:
    """A small contract dataset: 3 holograms of 64x48 pixels and a few particles inside frame and z range."""
    rng = np.random.default_rng(seed)
    particles = {
        "hid": rng.integers(1, N_HOLOGRAMS + 1, n_particles),
        "x": rng.uniform(-HALF_X_UM, HALF_X_UM, n_particles),
        "y": rng.uniform(-HALF_Y_UM, HALF_Y_UM, n_particles),
        "z": rng.uniform(Z_MIN * 1e6, Z_MAX * 1e6, n_particles),
        "d": rng.uniform(10, 60, n_particles),
    }
    return xr.Dataset(
        {
            "image": (("hologram_number", "xsize", "ysize"), rng.integers(0, 256, (N_HOLOGRAMS, NX, NY), np.uint8)),
            **{name: ("particle", values.astype(np.float32)) for name, values in particles.items()},
        },
        attrs={"Nx": NX, "Ny": NY, "dx": DX, "dy": DY, "lambda": WAVELENGTH, "zMin": Z_MIN, "zMax": Z_MAX},
    )


def write(ds: xr.Dataset, path):
    """Write ``ds`` with HolodecWriter, particles in two appends to exercise streaming."""
    with HolodecWriter(
        path,
        n_holograms=ds.sizes["hologram_number"],
        nx=NX,
        ny=NY,
        dx=ds.attrs["dx"],
        dy=ds.attrs["dy"],
        wavelength=ds.attrs["lambda"],
        z_min=ds.attrs.get("zMin"),
        z_max=ds.attrs.get("zMax"),
        attrs={"title": "synthetic test set"},
    ) as writer:
        for index, image_xy in enumerate(ds["image"].values):
            writer.write_image_yx(index, row_major(image_xy))
        half = ds.sizes["particle"] // 2
        for part in (slice(None, half), slice(half, None)):
            writer.append_particles(*(ds[name].values[part] for name in PARTICLE_VARS))
    return path


def test_round_trip(tmp_path):
    expected = make_dataset()
    ds = open_holodec(write(expected, tmp_path / "train.nc"))
    assert ds["image"].chunks[0] == (1,) * N_HOLOGRAMS
    assert dict(ds.sizes) == {"hologram_number": N_HOLOGRAMS, "xsize": NX, "ysize": NY, "particle": 6}
    assert ds["image"].dims == ("hologram_number", "xsize", "ysize")
    assert ds["image"].dtype == np.uint8
    np.testing.assert_array_equal(ds["image"].values, expected["image"].values)
    for name in PARTICLE_VARS:
        assert ds[name].dtype == np.float32
        np.testing.assert_array_equal(ds[name].values, expected[name].values)
    for name in ("x", "y", "z", "d"):
        assert ds[name].attrs["units"] == "um"
    assert "1-based" in ds["hid"].attrs["long_name"]
    assert {key: ds.attrs[key] for key in expected.attrs} == expected.attrs
    assert ds.attrs["title"] == "synthetic test set"
    ds.close()


def test_empty_particle_table_is_valid(tmp_path):
    ds = open_holodec(write(make_dataset(n_particles=0), tmp_path / "empty.nc"))
    assert ds.sizes["particle"] == 0
    ds.close()


def _set(name, index, value):
    def mutate(ds):
        values = ds[name].values.copy()
        values[index] = value
        return ds.assign({name: (ds[name].dims, values)})

    return mutate


def _scale(name, factor):
    return lambda ds: ds.assign({name: ds[name] * np.float32(factor)})


def _attrs(**changes):
    return lambda ds: ds.assign_attrs(changes)


def _drop_attrs(*names):
    def mutate(ds):
        ds = ds.copy()
        for name in names:
            del ds.attrs[name]
        return ds

    return mutate


def _float_image_with_nan(ds):
    image = ds["image"].astype(np.float32)
    image[1, 2, 3] = np.nan
    return ds.assign(image=image)


INVALID = {
    "missing_variables": (lambda ds: ds.drop_vars(["x", "z"]), "missing variables: 'x', 'z'"),
    "missing_attributes": (_drop_attrs("dy", "lambda"), "missing attributes: 'dy', 'lambda'"),
    "image_dims": (lambda ds: ds.assign(image=ds["image"].rename(xsize="a", ysize="b")), "dims"),
    "image_transposed": (lambda ds: ds.assign(image=ds["image"].transpose(..., "ysize", "xsize")), "transposed"),
    "particle_not_1d": (lambda ds: ds.assign(x=ds["x"].expand_dims(extra=2, axis=1)), "expected ('particle',)"),
    "nx_mismatch": (_attrs(Nx=NX + 1), "disagrees"),
    "ny_mismatch": (_attrs(Ny=NY - 1), "disagrees"),
    "x_outside_frame": (_set("x", 2, HALF_X_UM + 10), "outside the frame: |x|"),
    "y_outside_frame": (_set("y", 0, -HALF_Y_UM - 10), "outside the frame: |y|"),
    "hid_not_integer": (_set("hid", 1, 1.5), "hid"),
    "hid_zero": (_set("hid", 1, 0), "hid"),
    "hid_too_large": (_set("hid", 1, N_HOLOGRAMS + 1), "hid"),
    "nan_z": (_set("z", 3, np.nan), "non-finite"),
    "inf_d": (_set("d", 0, np.inf), "non-finite"),
    "nan_image": (_float_image_with_nan, "non-finite values in 1 hologram(s), first at hologram index 1"),
    "dx_in_um": (_attrs(dx=2.96), "micrometres"),
    "dy_out_of_range": (_attrs(dy=1e-10), "out of physical range"),
    "lambda_in_um": (_attrs(**{"lambda": 0.355}), "micrometres"),
    "zmin_in_um": (_attrs(zMin=14000.0), "micrometres"),
    "zmin_not_below_zmax": (_attrs(zMin=Z_MAX, zMax=Z_MIN), "zMin"),
    "z_in_metres": (_scale("z", 1e-6), "variable 'z' looks like metres"),
    "x_in_metres": (_scale("x", 1e-6), "variable 'x' looks like metres"),
    "d_in_metres": (_scale("d", 1e-6), "variable 'd' looks like metres"),
    "z_outside_limits": (_set("z", 4, Z_MAX * 1e6 + 50), "z outside [zMin, zMax]"),
    "d_not_positive": (_set("d", 5, 0.0), "d <= 0"),
}


@pytest.mark.parametrize("mutate, keyword", INVALID.values(), ids=INVALID.keys())
def test_invalid_file_raises(tmp_path, mutate, keyword):
    path = tmp_path / "bad.nc"
    mutate(make_dataset()).to_netcdf(path)
    with pytest.raises(HolodecFormatError) as info:
        open_holodec(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert keyword in message


@pytest.mark.parametrize("dtype", [np.complex64, np.str_, np.bool_])
def test_image_dtype_must_be_real(dtype):
    ds = make_dataset()
    ds = ds.assign(image=ds["image"].astype(dtype))
    with pytest.raises(HolodecFormatError, match=r"^mem\.nc: variable 'image' has dtype"):
        validate_holodec(ds, "mem.nc")


def test_in_memory_dataset_is_named_in_messages():
    with pytest.raises(HolodecFormatError, match="^<in-memory dataset>: missing attributes: 'Nx'"):
        open_holodec(_drop_attrs("Nx")(make_dataset()))


def _real_layout(ds: xr.Dataset) -> xr.Dataset:
    """NCAR's real-data layout: extra per-particle variables and image_original, no zMin/zMax."""
    x_pixels = um_to_pixel(ds["x"].values, NX, DX).astype(np.float32)
    y_pixels = um_to_pixel(ds["y"].values, NY, DY).astype(np.float32)
    extra = {
        "t": ("particle", np.zeros(ds.sizes["particle"], np.float32)),
        "x_pixels": ("particle", x_pixels),
        "y_pixels": ("particle", y_pixels),
        "image_original": ds["image"].copy(),
    }
    return _drop_attrs("zMin", "zMax")(ds.assign(extra))


def test_real_data_layout_loads_and_keeps_extras(tmp_path):
    path = tmp_path / "real.nc"
    _real_layout(make_dataset()).to_netcdf(path)
    with open_holodec(path) as ds:
        assert {"t", "x_pixels", "y_pixels", "image_original"} <= set(ds.variables)
        assert "zMin" not in ds.attrs and "zMax" not in ds.attrs
    with open_holodec(path, z_limits=(Z_MIN, Z_MAX)) as ds:
        assert (ds.attrs["zMin"], ds.attrs["zMax"]) == (Z_MIN, Z_MAX)
    with pytest.raises(HolodecFormatError, match="z outside"):
        open_holodec(path, z_limits=(0.1, 0.12))


def test_file_z_limits_win_over_argument(tmp_path):
    with open_holodec(write(make_dataset(), tmp_path / "a.nc"), z_limits=(0.001, 0.5)) as ds:
        assert (ds.attrs["zMin"], ds.attrs["zMax"]) == (Z_MIN, Z_MAX)


def test_missing_and_non_netcdf_files(tmp_path):
    missing = tmp_path / "nowhere.nc"
    with pytest.raises(FileNotFoundError, match="nowhere.nc"):
        open_holodec(missing)
    garbage = tmp_path / "garbage.nc"
    garbage.write_text("not a netCDF file")
    with pytest.raises(HolodecFormatError, match="garbage.nc: not a readable netCDF file"):
        open_holodec(garbage)


def small_writer(path, n_holograms=3, **kwargs) -> HolodecWriter:
    return HolodecWriter(path, n_holograms=n_holograms, nx=NX, ny=NY, dx=DX, dy=DY, wavelength=WAVELENGTH, **kwargs)


def test_writer_creates_parent_directory(tmp_path):
    path = write(make_dataset(), tmp_path / "sub" / "dir" / "x.nc")
    assert [p.name for p in path.parent.iterdir()] == ["x.nc"]


def test_row_major_images_keep_rows_as_y_through_the_x_first_file(tmp_path):
    """Stages write and read (ny, nx) arrays; the file keeps NCAR's image(hologram_number, xsize, ysize)."""
    image_yx = np.arange(NY * NX, dtype=np.float32).reshape(NY, NX)  # non-square: a swapped axis cannot pass
    row, col = 5, 40  # a mark at y index 5, x index 40
    image_yx[row, col] = -1.0
    with HolodecWriter(tmp_path / "x.nc", n_holograms=1, nx=NX, ny=NY, dx=DX, dy=2 * DY, wavelength=WAVELENGTH,
                       image_dtype=np.float32) as writer:
        writer.write_image_yx(0, image_yx)
    ds = open_holodec(tmp_path / "x.nc")
    assert ds["image"].dims == IMAGE_DIMS == ("hologram_number", "xsize", "ysize")
    assert dict(ds["image"].sizes) == {"hologram_number": 1, "xsize": NX, "ysize": NY}
    assert float(ds["image"].isel(hologram_number=0, xsize=col, ysize=row)) == -1.0
    np.testing.assert_array_equal(ds["image"].values[0], image_yx.T)  # x first in the file, the format unchanged
    read = hologram_image_yx(ds, 0)
    assert read.flags.c_contiguous
    np.testing.assert_array_equal(read, image_yx)
    ds.close()
    blocks_xy = np.stack([image_yx.T, 2 * image_yx.T])  # a dask chunk (hologram, xsize, ysize)
    np.testing.assert_array_equal(row_major(blocks_xy)[1], 2 * image_yx)
    np.testing.assert_array_equal(file_layout(row_major(blocks_xy)), blocks_xy)


def test_writer_leaves_nothing_on_exception(tmp_path):
    ds = make_dataset()
    with pytest.raises(RuntimeError, match="boom"):
        with small_writer(tmp_path / "x.nc") as w:
            w.write_image_yx(0, hologram_image_yx(ds, 0))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_leaves_nothing_when_an_attribute_cannot_be_stored(tmp_path):
    with pytest.raises(TypeError):
        with small_writer(tmp_path / "x.nc", attrs={"bad": {"nested": 1}}):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writer_leaves_nothing_when_a_hologram_is_missing(tmp_path):
    ds = make_dataset()
    with pytest.raises(HolodecFormatError, match=r"x\.nc: 1 hologram\(s\) never written, indices \[1\]"):
        with small_writer(tmp_path / "x.nc") as w:
            for index in (0, 2):
                w.write_image_yx(index, hologram_image_yx(ds, index))
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_arguments(tmp_path):
    image = np.zeros((NY, NX), np.uint8)
    with pytest.raises(HolodecFormatError, match="'dx' = 2.96 looks like micrometres"):
        HolodecWriter(tmp_path / "x.nc", n_holograms=1, nx=NX, ny=NY, dx=2.96, dy=DY, wavelength=WAVELENGTH)
    with pytest.raises(RuntimeError, match="context manager"):
        small_writer(tmp_path / "x.nc", n_holograms=1).write_image_yx(0, image)
    with pytest.raises(ValueError, match="never written"):
        with small_writer(tmp_path / "x.nc", n_holograms=1) as w:
            with pytest.raises(IndexError, match="out of range"):
                w.write_image_yx(1, image)
            with pytest.raises(TypeError, match="expected uint8"):
                w.write_image_yx(0, image.astype(np.float32))
            with pytest.raises(ValueError, match=r"expected \(ny, nx\)"):
                w.write_image_yx(0, image.T)
            with pytest.raises(ValueError, match="equal length"):
                w.append_particles([1], [0], [0], [20000], [])
    assert list(tmp_path.iterdir()) == []


def test_pixel_convention():
    centres = pixel_centres(NX, DX)
    np.testing.assert_allclose(centres, -centres[::-1])
    np.testing.assert_allclose(centres[[0, -1]], [-(NX - 1) / 2 * DX, (NX - 1) / 2 * DX])
    np.testing.assert_allclose(um_to_pixel(centres * 1e6, NX, DX), np.arange(NX), atol=1e-9)
    np.testing.assert_allclose(um_to_pixel([-HALF_X_UM, HALF_X_UM], NX, DX), [-0.5, NX - 0.5])


def test_zarr_store_round_trips_through_write_zarr(tmp_path):
    source = tmp_path / "raw.nc"
    write(make_dataset(), source)
    with open_holodec(source) as ds:
        store = write_zarr(ds, tmp_path / "split.zarr")
        expected = ds.load()
    with open_holodec(store) as reopened:
        assert reopened["image"].chunks[0] == (1,) * reopened.sizes["hologram_number"]
        xr.testing.assert_identical(reopened.load(), expected)
        table = particle_table(reopened)
    assert list(table.columns) == ["hid", "x", "y", "z", "d"]
    assert table["hid"].dtype == np.int64 and len(table) == expected.sizes["particle"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def float_dataset(n_holograms=N_HOLOGRAMS) -> xr.Dataset:
    ds = make_dataset()
    return ds.assign(image=ds["image"].astype(np.float32) / 128)


def test_a_float_store_is_checked_once_as_it_is_written_and_readers_trust_the_mark(tmp_path):
    ds = float_dataset().chunk({"hologram_number": 1})
    computed = []

    def count(block, block_info=None):
        computed.append(block_info[0]["chunk-location"][0])
        return block

    ds["image"] = ds["image"].copy(data=ds["image"].data.map_blocks(count, dtype=np.float32))
    store = write_zarr(ds, tmp_path / "split.zarr")

    assert sorted(computed) == list(range(N_HOLOGRAMS)), "each hologram computed once for writing and checking"
    assert FINITE_MARK not in ds["image"].attrs, "the caller's dataset is left alone"
    image = zarr.open_array(store / "image", mode="r+")
    assert image.attrs[FINITE_MARK] == 1
    # Corrupt the written data behind the mark: a reader that trusts the mark does not read the images.
    image[1, 2, 3] = np.nan
    open_holodec(store).close()
    del image.attrs[FINITE_MARK]
    with pytest.raises(HolodecFormatError) as info:
        open_holodec(store)
    assert str(info.value) == (f"{store}: variable 'image' has non-finite values in 1 hologram(s), "
                               "first at hologram index 1")


def test_write_zarr_refuses_a_non_finite_float_image_and_leaves_nothing(tmp_path):
    ds = float_dataset()
    ds["image"][2, 0, 0] = np.inf
    message = r"bad\.zarr: variable 'image' has non-finite values, first at hologram index 2"
    with pytest.raises(HolodecFormatError, match=message):
        write_zarr(ds, tmp_path / "bad.zarr")
    assert list(tmp_path.iterdir()) == []


def test_a_uint8_store_carries_no_mark_and_a_netcdf_mark_is_not_trusted(tmp_path):
    assert FINITE_MARK not in open_holodec(write_zarr(make_dataset(), tmp_path / "raw.zarr"))["image"].attrs
    ds = float_dataset()
    ds["image"][1, 2, 3] = np.nan
    ds["image"].attrs[FINITE_MARK] = 1
    ds.to_netcdf(tmp_path / "forged.nc")
    with pytest.raises(HolodecFormatError, match="forged.nc: variable 'image' has non-finite values"):
        open_holodec(tmp_path / "forged.nc")


def test_a_file_without_a_particle_table_opens_with_an_empty_one(tmp_path):
    make_dataset().drop_vars(list(PARTICLE_VARS)).to_netcdf(tmp_path / "own.nc")

    with open_holodec(tmp_path / "own.nc") as ds:
        assert ds.sizes["particle"] == 0
        assert particle_table(ds).empty and list(particle_table(ds).columns) == list(PARTICLE_VARS)
        store = write_zarr(ds, tmp_path / "own.zarr")
    with open_holodec(store) as reopened:
        assert reopened.sizes["particle"] == 0 and reopened.sizes["xsize"] == NX


def test_write_zarr_leaves_nothing_when_writing_fails(tmp_path):
    ds = make_dataset().chunk({"hologram_number": 1})

    def fail_on_last_hologram(block, block_info=None):
        if block_info[0]["chunk-location"][0] == N_HOLOGRAMS - 1:
            raise RuntimeError("disk full")
        return block

    ds["image"] = ds["image"].copy(data=ds["image"].data.map_blocks(fail_on_last_hologram, dtype=np.uint8))
    with pytest.raises(RuntimeError, match="disk full"):
        write_zarr(ds, tmp_path / "bad.zarr")
    assert list(tmp_path.iterdir()) == []


def test_write_atomically_replaces_a_directory_and_a_failed_write_leaves_the_old_one(tmp_path):
    out = tmp_path / "store.zarr"

    def make_tree(marker):
        def write(tmp):
            (tmp / "sub").mkdir(parents=True)
            (tmp / "sub" / "data").write_text(marker)
        return write

    write_atomically(out, make_tree("first"))
    write_atomically(out, make_tree("second"))
    assert (out / "sub" / "data").read_text() == "second"

    def failing(tmp):
        make_tree("third")(tmp)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(out, failing)
    assert (out / "sub" / "data").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]  # no temporary left behind


def test_hologram_parts_resume_and_finish(tmp_path):
    out = tmp_path / "table.csv"
    parts = HologramParts(out, {"config": 1, "code": "a"})
    assert parts.done() == set()
    parts.save(2, pd.DataFrame({"hid": [2], "x": [1.5]}))
    parts.save(1, pd.DataFrame({"hid": [1, 1], "x": [0.5, 0.25]}))
    assert not out.exists()
    # A rerun with the same fingerprint (a resumed job) sees both holograms done.
    again = HologramParts(out, {"config": 1, "code": "a"})
    assert again.done() == {1, 2}
    tables = again.load([1, 2])
    assert [list(t["x"]) for t in tables] == [[0.5, 0.25], [1.5]]
    again.finish(lambda tmp: pd.concat(tables).to_csv(tmp, index=False))
    assert list(pd.read_csv(out)["hid"]) == [1, 1, 2]
    assert not again.directory.exists()


def test_hologram_parts_of_another_fingerprint_are_dropped(tmp_path):
    out = tmp_path / "table.csv"
    HologramParts(out, {"config": 1, "code": "a"}).save(1, pd.DataFrame({"hid": [1]}))
    assert HologramParts(out, {"config": 2, "code": "a"}).done() == set()
    HologramParts(out, {"config": 2, "code": "a"}).save(1, pd.DataFrame({"hid": [1]}))
    assert HologramParts(out, {"config": 2, "code": "b"}).done() == set(), "parts of other code are dropped"


def test_hologram_parts_refuse_a_fingerprint_without_the_code(tmp_path):
    with pytest.raises(ValueError, match=r"table\.csv\.parts: the resume fingerprint has no 'code' entry"):
        HologramParts(tmp_path / "table.csv", {"config": 1})
    assert list(tmp_path.iterdir()) == []


KILLED_ZARR_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import dask.array as da, numpy as np, xarray as xr
    from holopipe.core.io import write_zarr

    out, started = sys.argv[1], Path(sys.argv[2])

    def stalls(block):  # every chunk write hangs, the metadata being written: killed mid-write
        if block.size:
            started.touch()
            time.sleep(600)
        return block

    image = da.zeros((3, 40, 24), chunks=(1, 40, 24), dtype=np.uint8).map_blocks(stalls, dtype=np.uint8)
    write_zarr(xr.Dataset({"image": (("hologram_number", "xsize", "ysize"), image)}), out)
""")


def test_a_sigkilled_zarr_write_leaves_a_temporary_that_the_rerun_removes(tmp_path):
    out, started = tmp_path / "split.zarr", tmp_path / "started"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_ZARR_WRITER, str(out), str(started)])
    deadline = time.monotonic() + 120
    while not started.exists():
        assert writer.poll() is None, f"the writer ended ({writer.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "the writer never reached its chunks"
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".split.zarr.tmp-")]
    assert len(left) == 1 and (left[0] / "zarr.json").is_file() and not out.exists(), "killed mid-write"

    image = np.arange(3 * 40 * 24, dtype=np.uint8).reshape(3, 40, 24)  # non-square: x (40) before y (24)
    write_zarr(xr.Dataset({"image": (("hologram_number", "xsize", "ysize"), image)}), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.zarr", "started"], "no temporary left"
    with xr.open_zarr(out, consolidated=False) as written:
        np.testing.assert_array_equal(written["image"].values, image)


def test_only_the_temporaries_of_live_writers_on_this_host_are_kept(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()  # its pid names a dead writer
    host, out = socket.gethostname(), tmp_path / "out.zarr"
    siblings = {
        "live": f".out.zarr.tmp-{host}-{os.getpid()}-7",
        "dead": f".out.zarr.tmp-{host}-{ended.pid}-7",
        "other host": f".out.zarr.tmp-{host}x-{os.getpid()}-7",  # a killed PBS job's, rerun on another node
        "older holopipe": f".out.zarr.tmp-{ended.pid}",
        "report": f".out.zarr.tmp-{host}-{ended.pid}-7.html",
        "another output": f".out.zarr2.tmp-{host}-{ended.pid}-7",
        "parts": "out.zarr.parts",
    }
    for name in siblings.values():
        (tmp_path / name / "c").mkdir(parents=True)
    removed = remove_stale_temporaries(out)
    stale = ("dead", "other host", "older holopipe", "report")
    assert sorted(p.name for p in removed) == sorted(siblings[key] for key in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in siblings.items() if k not in stale)


def test_every_writer_removes_what_a_killed_one_left(tmp_path):
    stale = [tmp_path / f".{name}.tmp-{socket.gethostname()}x-1-1" for name in ("a.nc", "b.csv")]
    for path in stale:
        path.write_text("left by a killed job")
    with small_writer(tmp_path / "a.nc", n_holograms=1) as writer:
        writer.write_image_yx(0, np.zeros((NY, NX), np.uint8))
    write_atomically(tmp_path / "b.csv", lambda tmp: tmp.write_text("hid\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nc", "b.csv"]


def test_input_identity_changes_when_a_file_is_replaced(tmp_path):
    path = tmp_path / "store"
    path.write_text("a")
    before = input_identity(path)
    write_atomically(path, lambda tmp: tmp.write_text("b"))
    assert input_identity(path) != before


# --- Bad input: particle CSVs and the holograms that standardization skipped (issue 20, item 9) ---


def test_a_particle_csv_is_read_with_integer_hid_and_keeps_its_further_columns(tmp_path):
    from holopipe.core.io import read_particle_csv

    path = tmp_path / "found.csv"
    path.write_text("hid,x,y,z,d,prob\n2,-10.5,3,4000,25,0.9\n1,0,-7,150000.5,8,0.6\n")
    table = read_particle_csv(path)
    assert table["hid"].dtype == np.int64 and table["hid"].tolist() == [2, 1]
    assert table["x"].dtype == np.float64 and table["z"].tolist() == [4000.0, 150000.5]
    assert table["prob"].tolist() == [0.9, 0.6]
    path.write_text("hid,x,y,z,d\n")  # a method that found nothing: a header alone
    assert read_particle_csv(path).empty


@pytest.mark.parametrize("text, message", [
    ("hid,x,y,z\n1,0,0,3000\n", r"missing particle column\(s\) \['d'\]"),
    ("", r"not a readable particle CSV"),
    ("hid,x,y,z,d\n1,0,0,3000,25\n1,abc,0,3000,25\n",
     r"column 'x' is not a finite number in 1 row\(s\): line 3 \(x = abc\)"),
    ("hid,x,y,z,d\n0,0,0,3000,25\n",
     r"column 'hid' is not a hologram number \(a whole number >= 1\) in 1 row\(s\): line 2 \(hid = 0\)"),
    ("hid,x,y,z,d\n1,0,0,-3000,25\n", r"column 'z' is not positive \(µm\) in 1 row\(s\): line 2 \(z = -3000\)"),
    ("hid,x,y,z,d\n" + "1,0,0,3000,inf\n" * 7,
     r"column 'd' is not a finite number in 7 row\(s\): line 2 .*line 6 \(d = inf\), and 2 more"),
])
def test_a_bad_particle_csv_names_the_file_the_column_and_the_first_bad_lines(tmp_path, text, message):
    from holopipe.core.io import read_particle_csv

    path = tmp_path / "found.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}"):
        read_particle_csv(path)


def test_skipped_and_usable_holograms_come_from_the_store_attributes():
    from holopipe.core.io import skipped_holograms, usable_holograms

    ds = xr.Dataset({"image": (("hologram_number", "xsize", "ysize"), np.ones((4, 6, 5), np.float32))})
    assert skipped_holograms(ds) == {} and usable_holograms(ds) == [1, 2, 3, 4]
    ds.attrs.update(skipped_holograms=[2, 4], skipped_reasons=["dark: 100.0% of its pixels at 0", "constant"])
    assert skipped_holograms(ds) == {2: "dark: 100.0% of its pixels at 0", 4: "constant"}
    assert usable_holograms(ds) == [1, 3]
    ds.attrs.update(skipped_holograms=3, skipped_reasons="saturated")  # one value, as a netCDF reader gives it
    assert usable_holograms(ds) == [1, 2, 4] and skipped_holograms(ds) == {3: "saturated"}


def test_file_sha256_reads_in_blocks_and_matches_hashlib(tmp_path):
    """Any block size gives the digest of the whole file (Python 3.10 has no hashlib.file_digest)."""
    import hashlib

    data = np.random.default_rng(0).bytes(10_000)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == expected and file_sha256(path, block_bytes=999) == expected
