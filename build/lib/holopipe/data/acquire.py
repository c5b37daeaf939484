"""First stage: put each split's raw holograms at data/raw/{split}.nc, simulated, taken from a file or
downloaded from a URL.

Every output appears atomically (written under a hidden name beside it, then renamed), so an interrupted
job never leaves a file that later stages would take for a complete one. Downloads go to a hidden partial
file ``.{name}.part`` beside the output that survives an interrupted or failed transfer, so the next
attempt (or the next run) resumes it with an HTTP Range request; a file is used only once its SHA-256
matches the configured digest.

Files are published with their own attributes: a real NCAR file that lacks ``zMin``/``zMax`` keeps
lacking them, because every later stage opens raw files with ``open_holodec(..., z_limits=...)`` from
``optics.z_min``/``optics.z_max``, exactly as this stage validates them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

import dask
import numpy as np
from tqdm.auto import tqdm

from holopipe.core import files, io
from holopipe.core.config import ConfigError, split_simulation_config
from holopipe.optics import simulate

__all__ = ["DownloadError", "acquire_split", "check_against_optics"]

log = logging.getLogger("holopipe")

WAVELENGTH_TOLERANCE = 0.01
"""Relative difference between a file's ``lambda`` and ``optics.wavelength`` beyond which acquire refuses the
file as recorded with another laser (532 against 355 nm is 50 %); float32 rounding of the attribute is ~1e-7."""

CHUNK_BYTES = 1 << 20
"""Bytes read and written per step of a download: memory stays at one chunk whatever the file size."""

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


class DownloadError(ValueError):
    """A remote source could not be fetched or failed verification; the message names the URL."""


class _TransferError(Exception):
    """One download attempt failed in a way that another attempt may fix (retried)."""


def acquire_split(config: dict, split: str, out_path, *, ideal_sensor: bool = False) -> Path:
    """Write split `split` of a validated config to `out_path` as HOLODEC netCDF and return the path.

    A simulated split uses ``simulate`` with the split's own ``simulate`` keys merged over it; with
    ``ideal_sensor`` its images are noise-free float32 (for a split that augmentation gives its camera).
    Sources ``file`` and ``url`` are validated against the contract with the z limits of ``optics``,
    and cut to their first ``max_holograms`` holograms (and those holograms' particles) when it is set;
    ``ideal_sensor`` does not apply to them (recorded images have had their camera).
    """
    splits = config["splits"]
    if split not in splits:
        raise ConfigError(f"unknown split {split!r}; configured splits are {', '.join(splits)}")
    spec = splits[split]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    optics = config["optics"]
    if ideal_sensor and spec["source"] != "simulate":
        log.info("split %s is recorded (source %s): its images keep their camera, and augmentation adds another "
                 "on top (an ideal sensor applies to simulated splits only)", split, spec["source"])
    if spec["source"] == "simulate":
        log.info("simulating %d hologram(s) for split %s into %s (%s)", spec["n_holograms"], split, out_path,
                 "an ideal sensor: no camera noise, flat light, float32" if ideal_sensor else "the camera model")
        simulate.simulate_file(
            out_path,
            n_holograms=spec["n_holograms"],
            seed=spec["seed"],
            settings=simulate.SimulationSettings.from_config(split_simulation_config(config, split)),
            ideal_sensor=ideal_sensor,
        )
    elif spec["source"] == "file":
        source = Path(spec["path"])
        log.info("acquiring split %s from %s", split, source)
        _publish_holodec(source, out_path, optics=optics, max_holograms=spec.get("max_holograms"))
    else:
        _acquire_url(spec, out_path, optics=optics, settings=config["acquire"])
    log.info("split %s written to %s", split, out_path)
    return out_path


def _acquire_url(spec: dict, out_path: Path, *, optics: dict, settings: dict) -> None:
    """Download, verify, validate and publish; the partial file goes once it is published or proven bad.

    A transfer that fails after every retry keeps its partial file so the next run resumes it.
    """
    url = spec["url"]
    part = out_path.with_name(f".{out_path.name}.part")
    resumed_from = part.stat().st_size if part.exists() else 0
    log.info("acquiring %s from %s", out_path.name, url)
    _download(url, part, retries=settings["retries"], backoff=settings["backoff"], timeout=settings["timeout"])
    actual = files.file_sha256(part)
    expected = spec["sha256"].lower()
    if actual != expected:
        part.unlink(missing_ok=True)
        hint = (f"; the download resumed an earlier partial file of {resumed_from} bytes, which was deleted, "
                "so a rerun downloads afresh") if resumed_from else ""
        raise DownloadError(f"{url}: SHA-256 mismatch: expected {expected}, got {actual}{hint}")
    log.info("%s: SHA-256 verified (%s)", url, actual)
    try:
        _publish_holodec(part, out_path, optics=optics, max_holograms=spec.get("max_holograms"),
                         label=url, move=True)
    except io.HolodecFormatError as exc:
        part.unlink(missing_ok=True)
        named = str(exc) if str(exc).startswith(f"{url}: ") else f"{url}: {exc}"  # contract errors name the part
        raise io.HolodecFormatError(named) from None
    part.unlink(missing_ok=True)


def _download(url: str, part: Path, *, retries: int, backoff: float, timeout: float) -> None:
    """Bring `part` to the complete content of `url`, resuming what is there; retried with backoff.

    Waits `backoff` seconds before the first retry and doubles the wait after each further failure;
    `timeout` is the longest wait for data within one attempt.
    """
    fetch = _fetch_s3 if url.startswith("s3://") else _fetch_http
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            fetch(url, part, timeout=timeout)
            return
        except _TransferError as exc:
            if attempt == attempts:
                kept = (f"; the partial download ({part.stat().st_size} bytes) is kept at {part} and resumed "
                        "by the next run") if part.exists() else ""
                raise DownloadError(f"{url}: download failed after {attempts} attempt(s): {exc}{kept}") from exc
            delay = backoff * 2 ** (attempt - 1)
            log.warning("%s: attempt %d of %d failed (%s); retrying in %g s", url, attempt, attempts, exc, delay)
            time.sleep(delay)


def _fetch_http(url: str, part: Path, *, timeout: float) -> None:
    """One attempt over http(s): resume `part` with a Range request; restart when the server ignores it
    or the partial file does not fit.

    Raises _TransferError for anything another attempt may fix, including a short body: the bytes that
    did arrive stay in `part` for the next attempt to resume from.
    """
    import requests

    offset = part.stat().st_size if part.exists() else 0
    # identity: byte counts and Range offsets must refer to the file's bytes, not a compressed encoding.
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
            if offset and response.status_code == 416:
                if not _partial_is_complete(response.headers.get("Content-Range", ""), offset):
                    log.info("%s: partial file of %d bytes does not fit the file; restarting", url, offset)
                    part.unlink()
                    _fetch_http(url, part, timeout=timeout)
                return
            if response.status_code >= 400:
                raise _TransferError(f"HTTP {response.status_code} {response.reason}")
            if offset and response.status_code == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range", ""))
                if start != offset:
                    log.info("%s: server resumed at byte %d, not %d; restarting", url, start, offset)
                    part.unlink()
                    _fetch_http(url, part, timeout=timeout)
                    return
                log.info("%s: resuming at byte %d", url, offset)
            else:
                if offset:
                    log.info("%s: server ignored the Range request; restarting from byte 0", url)
                offset, total = 0, None
            length = response.headers.get("Content-Length")
            if total is None and length is not None:
                total = offset + int(length)
            _write_stream(response.iter_content(CHUNK_BYTES), part, offset=offset, total=total)
    except requests.RequestException as exc:
        raise _TransferError(f"{type(exc).__name__}: {exc}") from exc
    _check_complete(part, total)


def _parse_content_range(header: str) -> tuple[int, int | None]:
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None:
        raise _TransferError(f"206 response with an unreadable Content-Range {header!r}")
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _partial_is_complete(header: str, offset: int) -> bool:
    """After HTTP 416 to ``Range: bytes=offset-``: whether the file has exactly `offset` bytes.

    If not, the partial file is stale (longer than the file, or the size is not given).
    """
    match = _UNSATISFIED_RANGE.fullmatch(header.strip())
    return match is not None and int(match.group(1)) == offset


def _write_stream(blocks, part: Path, *, offset: int, total: int | None) -> None:
    """Append (`offset` > 0) or write byte blocks to `part`, with a progress bar; flushed even on error."""
    with open(part, "ab" if offset else "wb") as stream, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[1:-5],
        mininterval=1.0,
    ) as bar:
        for block in blocks:
            stream.write(block)
            bar.update(len(block))


def _check_complete(part: Path, total: int | None) -> None:
    size = part.stat().st_size
    if total is not None and size != total:
        raise _TransferError(f"transfer ended at byte {size} of {total}")


def _fetch_s3(url: str, part: Path, *, timeout: float) -> None:
    """One attempt from s3 through fsspec (needs s3fs), resuming `part` by seeking past what it holds."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, config_kwargs={"connect_timeout": timeout, "read_timeout": timeout})
    except ImportError as exc:
        raise ImportError(f"{url}: s3:// sources need the s3fs package (pip install s3fs): {exc}") from exc
    offset = part.stat().st_size if part.exists() else 0
    try:
        total = int(fs.size(path))
        if offset > total:
            log.info("%s: partial file of %d bytes is longer than the object; restarting", url, offset)
            part.unlink()
            offset = 0
        if offset:
            log.info("%s: resuming at byte %d", url, offset)
        with fs.open(path, "rb", block_size=CHUNK_BYTES) as remote:
            remote.seek(offset)
            _write_stream(iter(lambda: remote.read(CHUNK_BYTES), b""), part, offset=offset, total=total)
    except OSError as exc:
        raise _TransferError(f"{type(exc).__name__}: {exc}") from exc
    _check_complete(part, total)


def _publish_holodec(source: Path, out_path: Path, *, optics: dict, max_holograms=None, label=None,
                     move=False) -> None:
    """Validate a HOLODEC file against the contract and the config's `optics`, then publish it (or its
    first `max_holograms` holograms) at `out_path`.

    Validating first makes a bad file fail here, naming the file, rather than in a later stage. A full
    file is renamed (`move`) or copied byte for byte; a subset is written afresh with the source's
    variables and attributes. Temporary files share the destination's directory so that the final
    rename stays on one file system.
    """
    label = label or str(source)
    z_limits = (optics["z_min"], optics["z_max"])
    tmp = files.temporary_sibling(out_path)
    try:
        with io.open_holodec(source) as ds:
            # Validated with the configured z limits, published with the file's own attributes.
            io.open_holodec(ds, z_limits=z_limits)
            check_against_optics(ds, optics, label)
            n_holograms = ds.sizes["hologram_number"]
            keep = n_holograms if max_holograms is None else min(max_holograms, n_holograms)
            if keep < n_holograms:
                log.info("%s: keeping the first %d of %d holograms", label, keep, n_holograms)
                _write_subset(_first_holograms(ds, keep), tmp, label=label)
        if keep < n_holograms:
            io.open_holodec(tmp, z_limits=z_limits).close()
            os.replace(tmp, out_path)
        elif move:
            os.replace(source, out_path)
        else:
            shutil.copyfile(source, tmp)
            os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def check_against_optics(ds, optics: dict, label: str) -> None:
    """Refuse a file that this config cannot process: one without holograms (every later count would divide
    by zero), or one recorded at another wavelength than ``optics.wavelength`` (beyond
    :data:`WAVELENGTH_TOLERANCE`): the model is trained on holograms of the configured laser, and a fringe's
    spacing, hence its focus, scales with the wavelength. Pixel pitch and frame size may differ from the
    config's: regrid brings them to the model's grid."""
    if ds.sizes["hologram_number"] == 0:
        raise io.HolodecFormatError(f"{label}: no holograms (dimension 'hologram_number' has size 0)")
    recorded, configured = float(ds.attrs["lambda"]), float(optics["wavelength"])
    if abs(recorded - configured) > WAVELENGTH_TOLERANCE * configured:
        raise io.HolodecFormatError(
            f"{label}: attribute 'lambda' = {recorded:g} m ({recorded * 1e9:.4g} nm) differs from the config's "
            f"optics.wavelength = {configured:g} m ({configured * 1e9:.4g} nm) by more than "
            f"{WAVELENGTH_TOLERANCE:.0%}; set optics.wavelength to the file's laser, or use a file of this one")


def _first_holograms(ds, n: int):
    """The first `n` holograms of a contract dataset and only their particles (hid <= n), lazily."""
    hid = np.asarray(ds["hid"].values)
    subset = ds.isel(hologram_number=slice(0, n), particle=np.flatnonzero(hid <= n))
    return subset.assign_attrs(holopipe_subset=f"first {n} of {ds.sizes['hologram_number']} holograms")


def _write_subset(subset, path: Path, *, label: str) -> None:
    """Write a (lazy) subset to netCDF `path`, keeping every variable and attribute of its source.

    Image-like variables keep one hologram per netCDF chunk; the synchronous scheduler writes one dask
    chunk (one hologram) at a time, so memory stays bounded for full-size frames.
    """
    subset = subset.assign_attrs(holopipe_source=label)
    for variable in subset.variables.values():
        for key in ("chunksizes", "contiguous", "original_shape", "preferred_chunks", "chunks"):
            variable.encoding.pop(key, None)
        if variable.dims[:1] == ("hologram_number",) and variable.ndim > 1:
            variable.encoding["chunksizes"] = (1, *variable.shape[1:])
    with dask.config.set(scheduler="synchronous"):
        subset.to_netcdf(path, engine="netcdf4", format="NETCDF4")
