"""Open, validate and write HOLODEC netCDF files (NCAR's data contract).

The contract is NCAR's, so real NCAR files load as they are:

- dims ``hologram_number``, ``xsize``, ``ysize``, ``particle``;
- ``image(hologram_number, xsize, ysize)``, uint8 (x is the *first* image axis);
- per particle, float32 along ``particle``: ``hid`` (1-based hologram number), ``x``, ``y`` (µm, origin at
  the image centre), ``z`` (µm from the sensor), ``d`` (µm diameter); real data may add ``t``, ``x_pixels``,
  ``y_pixels``, ``image_original``, which are kept;
- global attributes ``Nx``, ``Ny`` (pixels), ``dx``, ``dy``, ``lambda`` (metres) and ``zMin``, ``zMax``
  (metres; missing on real data).

Pixel-centre convention: pixel index ``i`` along ``xsize`` has its centre at ``x_i = (i + 0.5 - Nx/2) * dx``,
so the frame spans ``[-Nx*dx/2, +Nx*dx/2]``; the same holds for y with ``Ny`` and ``dy``. Use
:func:`pixel_centres` and :func:`um_to_pixel` rather than re-deriving it.

Axis order: every stage computes on row-major ``(ny, nx)`` images (rows are y, columns x), as numpy and the
optics do; only this module knows that the file's image axes are x first. :func:`hologram_image_yx` reads a
hologram row-major, :meth:`HolodecWriter.write_image_yx` writes one, and :func:`row_major` /
:func:`file_layout` turn a block of the file's images (a dask chunk) into row-major and back.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import dask.array as da
import netCDF4
import numpy as np
import pandas as pd
import xarray as xr

from holopipe.core.device import cpu_threads
from holopipe.core.files import temporary_sibling, write_atomically

IMAGE_DIMS = ("hologram_number", "xsize", "ysize")
PARTICLE_VARS = ("hid", "x", "y", "z", "d")
"""The particle table's columns, in files and in memory: hid (1-based hologram number), x, y (µm from the frame's
centre), z (µm from the sensor), d (µm). Every table of particles (truth, both methods' CSVs, candidates) starts
with them; each adds its own columns after (the U-Net's ``prob``, the baseline's ``score``)."""
REQUIRED_ATTRS = ("Nx", "Ny", "dx", "dy", "lambda")
IN_MEMORY = "<in-memory dataset>"
FINITE_MARK = "finite_checked"
"""Attribute of a float ``image`` in a zarr store: 1 when :func:`write_zarr` checked every value finite as it
wrote them, so readers skip re-reading the images (netCDF files and unmarked stores are always checked)."""
SKIPPED_ATTR = "skipped_holograms"
"""Attribute of a standardized store: the 1-based hids of holograms without data (dark, saturated, constant)."""
SKIPPED_REASONS_ATTR = "skipped_reasons"
"""Attribute beside :data:`SKIPPED_ATTR`: why each of those holograms was skipped, in the same order."""
DUST_ATTRS = {"x": "window_dust_x", "y": "window_dust_y", "z": "window_dust_z", "d": "window_dust_d"}
"""Attributes (µm, one value per speck, x and y as the particles') of contamination on a window that every
hologram of the file carries (a simulated split's ``simulate.window_dust``): not particles of the volume."""

_PITCH_RANGE_M = (1e-8, 1e-3)
_WAVELENGTH_RANGE_M = (1e-8, 1e-5)
_Z_LIMIT_MAX_M = 10.0  # a zMin/zMax above 10 m is a value in µm
_FRAME_TOLERANCE_PX = 0.5
_Z_TOLERANCE_UM = 1.0
# A non-empty column whose largest magnitude is below these (µm) holds metres: HOLODEC particles sit
# millimetres from the sensor and are micrometres wide, and not every particle is at the exact centre.
_METRES_BELOW_UM = {"x": 1e-2, "y": 1e-2, "z": 10.0, "d": 1e-2}


class HolodecFormatError(ValueError):
    """Raised when a file breaks the contract; message names the file and the problem."""


def pixel_position(index, n: int, pitch_m: float) -> np.ndarray:
    """Position (metres, origin at the frame centre) of a pixel index along an axis of ``n`` pixels of
    pitch ``pitch_m``; fractional indices (a region's centroid) too."""
    return (np.asarray(index, dtype=np.float64) + 0.5 - n / 2) * pitch_m


def pixel_centres(n: int, pitch_m: float) -> np.ndarray:
    """Centres (metres, origin at the frame centre) of ``n`` pixels of pitch ``pitch_m`` metres."""
    return pixel_position(np.arange(n), n, pitch_m)


def equivalent_diameter(area_pixels, dx: float, dy: float) -> np.ndarray:
    """Diameter (metres) of the disk as large as ``area_pixels`` pixels of dx by dy metres."""
    return 2 * np.sqrt(np.asarray(area_pixels, dtype=np.float64) * dx * dy / np.pi)


def um_to_pixel(coord_um, n: int, pitch_m: float) -> np.ndarray:
    """Continuous pixel index of a coordinate in µm; the inverse of :func:`pixel_centres`."""
    return np.asarray(coord_um, dtype=np.float64) * 1e-6 / pitch_m + n / 2 - 0.5


def row_major(images_xy):
    """Row-major ``(..., ny, nx)`` view of images in the file's x-first ``(..., xsize, ysize)`` layout."""
    return np.swapaxes(images_xy, -1, -2)


def file_layout(images_yx):
    """The file's x-first ``(..., xsize, ysize)`` view of row-major ``(..., ny, nx)`` images."""
    return np.swapaxes(images_yx, -1, -2)


def hologram_image_yx(ds: xr.Dataset, index: int) -> np.ndarray:
    """Hologram ``index`` (0-based) of an opened HOLODEC dataset, a C-contiguous row-major (ny, nx) array.

    Read alone, with dask's synchronous scheduler: the callers' pools already run holograms in parallel.
    """
    image_xy = ds["image"].isel(hologram_number=index).compute(scheduler="synchronous").values
    return np.ascontiguousarray(row_major(image_xy))


@contextlib.contextmanager
def ignoring_snakemake_marker():
    """Silence zarr's warning about ``.snakemake_timestamp``, which Snakemake puts in directory outputs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*snakemake_timestamp")
        yield


def open_holodec(source, *, z_limits=None, chunks=None) -> xr.Dataset:
    """Open a HOLODEC file or zarr store (or take an open dataset) lazily and validate it.

    Intermediate stages store the same variables and attributes in zarr, so one reader and one
    validation serve the raw netCDF files and every later split.

    Images are read one hologram per dask chunk by default, because a full-size file does not fit the
    memory of a small node. ``z_limits=(z_min_m, z_max_m)`` (metres) fills in ``zMin``/``zMax`` where the
    file lacks them (real data); the file's own values win. A file with none of the particle variables
    (no truth) gets an empty particle table. Float images are checked finite unless the store carries
    :data:`FINITE_MARK` (written by :func:`write_zarr` after its own check).
    """
    opened_here = not isinstance(source, xr.Dataset)
    if opened_here:
        name = os.fspath(source)
        chunks = chunks or {"hologram_number": 1}
        if os.path.isdir(name):
            try:
                with ignoring_snakemake_marker():
                    ds = xr.open_zarr(name, chunks=chunks, consolidated=False)
            except (OSError, ValueError, KeyError) as exc:
                raise HolodecFormatError(f"{name}: not a readable zarr store ({exc})") from exc
        elif not os.path.isfile(name):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
        else:
            try:
                ds = xr.open_dataset(name, engine="netcdf4", chunks=chunks)
            except (OSError, ValueError) as exc:
                raise HolodecFormatError(f"{name}: not a readable netCDF file ({exc})") from exc
        if not os.path.isdir(name) and "image" in ds.variables:
            ds["image"].attrs.pop(FINITE_MARK, None)  # only write_zarr's stores carry a trusted mark
    else:
        ds, name = source, source.encoding.get("source", IN_MEMORY)
    if not any(var in ds.variables for var in PARTICLE_VARS) and not ds.sizes.get("particle", 0):
        # A file without a particle table (real data of one's own): no truth, zero particles.
        ds = ds.assign({var: ("particle", np.empty(0, np.float32)) for var in PARTICLE_VARS})
    if z_limits is not None:
        limits = dict(zip(("zMin", "zMax"), map(float, z_limits)))
        ds = ds.assign_attrs({key: value for key, value in limits.items() if key not in ds.attrs})
    try:
        validate_holodec(ds, name)
    except HolodecFormatError:
        if opened_here:
            ds.close()
        raise
    return ds


def write_zarr(ds: xr.Dataset, path, *, chunks: dict | None = None) -> Path:
    """Write ``ds`` to a zarr (v3) store atomically: under a temporary name, renamed when complete.

    Images are chunked one hologram per chunk (``chunks`` overrides per dimension); an exception
    leaves nothing at ``path``. An existing store at ``path`` is replaced. A float ``image`` is checked
    finite chunk by chunk on its way to the store (no second pass): a non-finite one fails, naming
    ``path`` and the hologram; a finite one is marked :data:`FINITE_MARK`, so that readers need not read
    it again (the store appears only after every chunk passed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = {"hologram_number": 1, **(chunks or {})}
    ds = ds.chunk({dim: size for dim, size in chunks.items() if dim in ds.dims})
    for variable in ds.variables.values():
        variable.encoding.pop("chunks", None)
        variable.encoding.pop("preferred_chunks", None)
    if "image" in ds.variables:
        image = ds["image"].copy(deep=False)
        image.attrs = {key: value for key, value in image.attrs.items() if key != FINITE_MARK}
        if image.dtype.kind == "f":  # each chunk is checked on its way to the store
            image = image.copy(data=image.data.map_blocks(_finite_chunk, os.fspath(path), dtype=image.dtype))
            image.attrs[FINITE_MARK] = 1
        ds = ds.assign(image=image)

    def write(tmp: Path) -> None:
        writes = ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, compute=False)
        # Our own pool: leaving it waits for every chunk write in flight, so when one chunk fails no
        # thread recreates files in the temporary store after it has been removed.
        with ThreadPoolExecutor(max_workers=cpu_threads()) as pool:
            dask.compute(writes, scheduler="threads", pool=pool)

    return write_atomically(path, write)


def particle_table(ds: xr.Dataset) -> pd.DataFrame:
    """The particles as a small in-memory table: hid (int), x, y, z, d (µm), one row per particle."""
    table = pd.DataFrame({name: np.asarray(ds[name].values, dtype=np.float64) for name in PARTICLE_VARS})
    table["hid"] = table["hid"].astype(np.int64)
    return table


def window_dust_table(ds: xr.Dataset) -> pd.DataFrame:
    """The file's window dust (:data:`DUST_ATTRS`) as a table of x, y, z, d (µm); empty when it records none."""
    return pd.DataFrame({axis: np.atleast_1d(np.asarray(ds.attrs.get(name, []), dtype=np.float64))
                         for axis, name in DUST_ATTRS.items()})


def skipped_holograms(ds: xr.Dataset) -> dict[int, str]:
    """Holograms (1-based hid -> why) that standardization found without data (:data:`SKIPPED_ATTR`);
    every later stage leaves them out, and evaluation lists them. Empty for a store that records none."""
    hids = np.atleast_1d(np.asarray(ds.attrs.get(SKIPPED_ATTR, []), dtype=np.int64))
    reasons = np.atleast_1d(np.asarray(ds.attrs.get(SKIPPED_REASONS_ATTR, [""] * hids.size), dtype=str))
    return dict(zip(hids.tolist(), reasons.tolist()))


def usable_holograms(ds: xr.Dataset) -> list[int]:
    """The 1-based hids of the holograms that the stages after standardization work on: all but the skipped."""
    skipped = skipped_holograms(ds)
    return [hid for hid in range(1, ds.sizes["hologram_number"] + 1) if hid not in skipped]


def read_particle_csv(path) -> pd.DataFrame:
    """A particle CSV (hid, x, y, z, d in µm, and any further columns) with hid as int64, x..d as float64.

    A table that a later count would silently get wrong is refused, naming the file, the column and its
    first bad rows (as lines of the file, the header being line 1): a missing column,
    a value that is not a finite number, an hid that is not a whole number >= 1, a z or d <= 0.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable particle CSV ({exc})") from exc
    missing = [name for name in PARTICLE_VARS if name not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing particle column(s) {missing}; expected hid, x, y, z, d (µm)")
    values = {name: pd.to_numeric(table[name], errors="coerce").to_numpy(np.float64) for name in PARTICLE_VARS}
    for name, column in values.items():
        _refuse_rows(path, name, table[name], ~np.isfinite(column), "not a finite number")
    _refuse_rows(path, "hid", table["hid"], (values["hid"] < 1) | (values["hid"] != np.round(values["hid"])),
                 "not a hologram number (a whole number >= 1)")
    for name in ("z", "d"):
        _refuse_rows(path, name, table[name], values[name] <= 0, "not positive (µm)")
    return table.assign(hid=values["hid"].astype(np.int64), **{name: values[name] for name in PARTICLE_VARS[1:]})


def _refuse_rows(path: Path, name: str, column: pd.Series, bad: np.ndarray, problem: str) -> None:
    rows = np.flatnonzero(bad)
    if rows.size:
        shown = ", ".join(f"line {row + 2} ({name} = {column.iloc[row]})" for row in rows[:5])
        more = f", and {rows.size - 5} more" if rows.size > 5 else ""
        raise ValueError(f"{path}: column {name!r} is {problem} in {rows.size} row(s): {shown}{more}")


def validate_holodec(ds: xr.Dataset, source: str = IN_MEMORY) -> None:
    """Raise one :class:`HolodecFormatError`, prefixed with ``source``, for the first contract violation.

    Images are checked one chunk at a time, so this is safe on a lazily opened full-size file.
    """
    try:
        _check_presence(ds)
        _check_layout(ds)
        _check_optics(ds.attrs)
        _check_particles(ds)
        _check_image_values(ds["image"])
    except HolodecFormatError as exc:
        raise HolodecFormatError(f"{source}: {exc}") from None


def _check_presence(ds: xr.Dataset) -> None:
    missing_vars = [name for name in ("image", *PARTICLE_VARS) if name not in ds.variables]
    missing_attrs = [name for name in REQUIRED_ATTRS if name not in ds.attrs]
    problems = [
        f"missing {kind}: {', '.join(map(repr, names))}"
        for kind, names in (("variables", missing_vars), ("attributes", missing_attrs))
        if names
    ]
    if problems:
        raise HolodecFormatError("; ".join(problems))


def _check_layout(ds: xr.Dataset) -> None:
    image = ds["image"]
    if image.dims == ("hologram_number", "ysize", "xsize"):
        raise HolodecFormatError(
            f"variable 'image' is transposed: dims {image.dims}, expected {IMAGE_DIMS} (x is the first image axis)"
        )
    if image.dims != IMAGE_DIMS:
        raise HolodecFormatError(f"variable 'image' has dims {image.dims}, expected {IMAGE_DIMS}")
    if image.dtype.kind not in "iuf":
        raise HolodecFormatError(f"variable 'image' has dtype {image.dtype}, expected uint8 (or another real type)")
    for name in PARTICLE_VARS:
        var = ds[name]
        if var.dims != ("particle",):
            raise HolodecFormatError(f"variable {name!r} has dims {var.dims}, expected ('particle',)")
        if var.dtype.kind not in "iuf":
            raise HolodecFormatError(f"variable {name!r} has dtype {var.dtype}, expected float32")
    for attr, dim in (("Nx", "xsize"), ("Ny", "ysize")):
        value = _number(ds.attrs, attr)
        if value != ds.sizes[dim]:
            raise HolodecFormatError(
                f"attribute {attr!r} = {value:g} disagrees with the image size along {dim!r} ({ds.sizes[dim]})"
            )


def _number(attrs, name: str) -> float:
    value = np.asarray(attrs[name])
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise HolodecFormatError(f"attribute {name!r} = {attrs[name]!r} is not a number")
    return float(value.item())


def _check_optics(attrs) -> None:
    for name, (low, high) in (("dx", _PITCH_RANGE_M), ("dy", _PITCH_RANGE_M), ("lambda", _WAVELENGTH_RANGE_M)):
        value = _number(attrs, name)
        if not low < value < high:
            looks = "looks like micrometres (µm)" if low < value * 1e-6 < high else "is out of physical range"
            raise HolodecFormatError(f"attribute {name!r} = {value:g} {looks}; expected metres in ({low:g}, {high:g})")
    for name in ("zMin", "zMax"):
        if name not in attrs:
            continue
        value = _number(attrs, name)
        if not np.isfinite(value):
            raise HolodecFormatError(f"attribute {name!r} = {value} is not finite")
        if value > _Z_LIMIT_MAX_M:
            raise HolodecFormatError(f"attribute {name!r} = {value:g} looks like micrometres (µm), expected metres")
    limits = _z_limits_um(attrs)
    if limits is not None and limits[0] >= limits[1]:
        raise HolodecFormatError(f"zMin ({attrs['zMin']:g}) >= zMax ({attrs['zMax']:g})")


def _z_limits_um(attrs) -> tuple[float, float] | None:
    if "zMin" in attrs and "zMax" in attrs:
        return _number(attrs, "zMin") * 1e6, _number(attrs, "zMax") * 1e6
    return None


def _first(bad: np.ndarray, values: np.ndarray, name: str) -> str:
    return f"first at particle {bad[0]} ({name} = {values[bad[0]]:g})"


def _check_particles(ds: xr.Dataset) -> None:
    if ds.sizes["particle"] == 0:
        return
    p = {name: np.asarray(ds[name].values, dtype=np.float64) for name in PARTICLE_VARS}
    for name, values in p.items():
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise HolodecFormatError(f"variable {name!r} has {bad.size} non-finite value(s), "
                                     f"{_first(bad, values, name)}")
    for name, threshold in _METRES_BELOW_UM.items():
        largest = np.abs(p[name]).max()
        if 0 < largest < threshold:
            raise HolodecFormatError(
                f"variable {name!r} looks like metres (max |{name}| {largest:.3g}), expected micrometres (µm)"
            )
    n_holograms = ds.sizes["hologram_number"]
    hid = p["hid"]
    bad = np.flatnonzero((hid != np.round(hid)) | (hid < 1) | (hid > n_holograms))
    if bad.size:
        raise HolodecFormatError(
            f"variable 'hid' has {bad.size} value(s) that are not hologram numbers 1..{n_holograms}, "
            + _first(bad, hid, "hid")
        )
    for name, n_attr, pitch_attr in (("x", "Nx", "dx"), ("y", "Ny", "dy")):
        n, pitch = _number(ds.attrs, n_attr), _number(ds.attrs, pitch_attr)
        half_um = n * pitch * 1e6 / 2
        bad = np.flatnonzero(np.abs(p[name]) > half_um + _FRAME_TOLERANCE_PX * pitch * 1e6)
        if bad.size:
            raise HolodecFormatError(
                f"{bad.size} particle(s) outside the frame: |{name}| > {half_um:.6g} µm ({n_attr}*{pitch_attr}/2), "
                + _first(bad, p[name], name)
            )
    limits = _z_limits_um(ds.attrs)
    if limits is not None:
        z = p["z"]
        bad = np.flatnonzero((z < limits[0] - _Z_TOLERANCE_UM) | (z > limits[1] + _Z_TOLERANCE_UM))
        if bad.size:
            raise HolodecFormatError(
                f"{bad.size} particle(s) with z outside [zMin, zMax] = [{limits[0]:g}, {limits[1]:g}] µm, "
                + _first(bad, z, "z")
            )
    bad = np.flatnonzero(p["d"] <= 0)
    if bad.size:
        raise HolodecFormatError(f"{bad.size} particle(s) with d <= 0, {_first(bad, p['d'], 'd')}")


def _non_finite(finite_per_hologram: np.ndarray) -> str | None:
    bad = np.flatnonzero(~np.asarray(finite_per_hologram))
    if bad.size:
        return f"variable 'image' has non-finite values in {bad.size} hologram(s), first at hologram index {bad[0]}"
    return None


def _finite_chunk(block: np.ndarray, path: str, block_info=None) -> np.ndarray:
    """``block`` of the images being written to ``path``, once checked finite (else the write fails)."""
    finite = np.isfinite(block).all(axis=tuple(range(1, block.ndim)))
    if not finite.all():
        first = block_info[0]["array-location"][0][0] + int(np.flatnonzero(~finite)[0])
        raise HolodecFormatError(f"{path}: variable 'image' has non-finite values, first at hologram index {first}")
    return block


def _check_image_values(image: xr.DataArray) -> None:
    if image.dtype.kind != "f" or image.attrs.get(FINITE_MARK) == 1:
        return  # integers are finite; a marked store was checked when write_zarr wrote it
    if image.chunks is None:
        image = image.chunk({"hologram_number": 1})
    # The synchronous scheduler reads one chunk at a time; threads would hold several holograms at once.
    problem = _non_finite(da.isfinite(image.data).all(axis=(1, 2)).compute(scheduler="synchronous"))
    if problem:
        raise HolodecFormatError(problem)


class HolodecWriter:
    """Stream holograms into a contract netCDF file; atomic: the file appears only when complete.

    Memory stays one hologram: the image is chunked (1, nx, ny) and written index by index. The data go to
    a hidden temporary file beside ``path`` that is validated and renamed on clean exit, and deleted on
    error or when a hologram was never written, so readers never see a half-written file.
    """

    def __init__(self, path, *, n_holograms, nx, ny, dx, dy, wavelength, z_min=None, z_max=None, attrs=None,
                 image_dtype=np.uint8):
        self.path = Path(path)
        self.image_dtype = np.dtype(image_dtype)
        if self.image_dtype not in (np.dtype(np.uint8), np.dtype(np.float32)):
            raise ValueError(f"{self.path}: image_dtype {self.image_dtype}, expected uint8 (a camera's gray "
                             "levels) or float32 (an ideal sensor's)")
        for name, value in (("n_holograms", n_holograms), ("nx", nx), ("ny", ny)):
            if operator.index(value) < 1:
                raise ValueError(f"{self.path}: {name} must be a positive integer, got {value}")
        if (z_min is None) != (z_max is None):
            raise ValueError(f"{self.path}: give both z_min and z_max (metres) or neither")
        self.n_holograms, self.nx, self.ny = int(n_holograms), int(nx), int(ny)
        self._attrs = {"Nx": self.nx, "Ny": self.ny, "dx": float(dx), "dy": float(dy), "lambda": float(wavelength)}
        if z_min is not None:
            self._attrs.update(zMin=float(z_min), zMax=float(z_max))
        try:
            _check_optics(self._attrs)
        except HolodecFormatError as exc:
            raise HolodecFormatError(f"{self.path}: {exc}") from None
        clashes = sorted(set(attrs or {}) & set(self._attrs))
        if clashes:
            raise ValueError(f"{self.path}: attrs {clashes} clash with the contract attributes")
        self._extra_attrs = dict(attrs or {})
        self._written = np.zeros(self.n_holograms, dtype=bool)
        self._nc = None

    def __enter__(self) -> HolodecWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_sibling(self.path)
        self._nc = netCDF4.Dataset(self._tmp, "w", format="NETCDF4")
        try:
            self._define(self._nc)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _define(self, nc: netCDF4.Dataset) -> None:
        nc.createDimension("hologram_number", self.n_holograms)
        nc.createDimension("xsize", self.nx)
        nc.createDimension("ysize", self.ny)
        nc.createDimension("particle", None)
        image = nc.createVariable("image", self.image_dtype, IMAGE_DIMS, chunksizes=(1, self.nx, self.ny),
                                  fill_value=False)
        image.long_name = "hologram intensity, x along the first image axis"
        hid = nc.createVariable("hid", "f4", ("particle",))
        hid.long_name = "hologram number of the particle (1-based)"
        for name, long_name in (
            ("x", "particle x, origin at the image centre"),
            ("y", "particle y, origin at the image centre"),
            ("z", "particle distance from the sensor"),
            ("d", "particle diameter"),
        ):
            var = nc.createVariable(name, "f4", ("particle",))
            var.units = "um"
            var.long_name = long_name
        nc.setncatts({**self._attrs, **self._extra_attrs})

    def __exit__(self, exc_type, exc, tb):
        try:
            self._open_file().close()
            self._nc = None
            if exc_type is None:
                missing = np.flatnonzero(~self._written)
                if missing.size:
                    raise HolodecFormatError(
                        f"{self.path}: {missing.size} hologram(s) never written, indices {missing.tolist()}"
                    )
                with xr.open_dataset(self._tmp, engine="netcdf4") as ds:
                    validate_holodec(ds, str(self.path))
                os.replace(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)

    def _open_file(self) -> netCDF4.Dataset:
        if self._nc is None:
            raise RuntimeError(f"{self.path}: use HolodecWriter as a context manager (`with HolodecWriter(...)`)")
        return self._nc

    def write_image_yx(self, index: int, image_yx: np.ndarray) -> None:
        """Write hologram ``index`` (0-based; ``hid`` is index + 1), a row-major array of shape (ny, nx) of the
        writer's ``image_dtype``; the file stores it x first."""
        nc = self._open_file()
        index = operator.index(index)
        if not 0 <= index < self.n_holograms:
            raise IndexError(f"{self.path}: hologram index {index} out of range 0..{self.n_holograms - 1}")
        if image_yx.dtype != self.image_dtype:
            raise TypeError(f"{self.path}: image dtype {image_yx.dtype}, expected {self.image_dtype}")
        if image_yx.shape != (self.ny, self.nx):
            raise ValueError(
                f"{self.path}: image shape {image_yx.shape}, expected (ny, nx) = {(self.ny, self.nx)} (row-major)"
            )
        nc["image"][index] = file_layout(image_yx)
        self._written[index] = True

    def append_particles(self, hid, x_um, y_um, z_um, d_um) -> None:
        """Append particles: 1-D arrays of equal length, stored as float32; µm, ``hid`` 1-based."""
        nc = self._open_file()
        columns = {
            name: np.asarray(values, dtype=np.float32)
            for name, values in zip(PARTICLE_VARS, (hid, x_um, y_um, z_um, d_um))
        }
        shapes = {name: values.shape for name, values in columns.items()}
        if len(set(shapes.values())) != 1 or columns["hid"].ndim != 1:
            raise ValueError(f"{self.path}: particle columns must be 1-D arrays of equal length, got shapes {shapes}")
        start = len(nc.dimensions["particle"])
        for name, values in columns.items():
            nc[name][start : start + values.size] = values
