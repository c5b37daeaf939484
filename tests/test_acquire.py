"""Tests for holopipe.data.acquire: file and URL sources, subsets, resumable verified downloads.

Downloads are tested against a real HTTP server on the loopback interface whose routes misbehave on
purpose (404, truncated bodies, ignored Range headers).
"""

import collections
import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import xarray as xr

from holopipe.core.config import load_config
from holopipe.core.io import HolodecFormatError, open_holodec, particle_table
from holopipe.data import acquire
from holopipe.data.acquire import DownloadError, acquire_split
from holopipe.optics.simulate import SimulationSettings, simulate_file

N_HOLOGRAMS = 3
RETRIES = 2
MAX_REQUESTS = 50  # the server answers 503 beyond this, so a runaway retry loop cannot hang a test
CONFIG = {
    "splits": {"train": {"source": "simulate", "n_holograms": N_HOLOGRAMS, "seed": 1}},
    "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 64, "ny": 48,
               "z_min": 0.001, "z_max": 0.003},
    "simulate": {"particles": [2, 4], "pad": 0},
    "acquire": {"retries": RETRIES, "backoff": 0, "timeout": 5},
}
Z_LIMITS = (CONFIG["optics"]["z_min"], CONFIG["optics"]["z_max"])


def config_with(**split) -> dict:
    """The test config with one split, `train`, described by `split`."""
    return load_config({**CONFIG, "splits": {"train": split}})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A contract file of 3 holograms (64x48) with 2-4 particles each."""
    path = tmp_path_factory.mktemp("source") / "holograms.nc"
    return simulate_file(path, n_holograms=N_HOLOGRAMS, seed=5,
                         settings=SimulationSettings.from_config(load_config(CONFIG)), progress=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Route:
    """One served file: `ranges` honours Range headers; the first `truncate` responses stop halfway."""

    def __init__(self, body: bytes, *, ranges=True, truncate=0):
        self.body, self.ranges, self.truncate = body, ranges, truncate
        self.range_headers = []


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        site = self.server.site
        site.hits[self.path] += 1
        if sum(site.hits.values()) > MAX_REQUESTS:
            self.send_error(503)
            return
        route = site.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        route.range_headers.append(self.headers.get("Range"))
        body, start = route.body, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if route.ranges and match:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        remaining = body[start:]
        self.send_header("Content-Length", str(len(remaining)))
        self.end_headers()
        if route.truncate > 0:
            route.truncate -= 1
            remaining = remaining[: len(remaining) // 2]
        self.wfile.write(remaining)
        self.close_connection = True

    def log_message(self, format, *args):
        pass


@pytest.fixture
def server():
    """A loopback HTTP server in a thread; add routes to `server.site.routes`, read `server.site.hits`."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.site = type("Site", (), {})()
    httpd.site.routes, httpd.site.hits = {}, collections.Counter()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def url_config(server, path, body, **split):
    return config_with(source="url", url=f"{server.base}{path}", sha256=sha256(body), **split)


def test_url_download_is_verified_and_equals_the_source(tmp_path, server, source):
    body = source.read_bytes()
    server.site.routes["/train.nc"] = Route(body)
    out = acquire_split(url_config(server, "/train.nc", body), "train", tmp_path / "raw" / "train.nc")
    assert out.read_bytes() == body
    open_holodec(out, z_limits=Z_LIMITS).close()
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.nc"]
    assert server.site.hits["/train.nc"] == 1


def test_wrong_sha256_leaves_no_output_and_no_partial(tmp_path, server, source):
    body = source.read_bytes()
    server.site.routes["/train.nc"] = Route(body)
    config = url_config(server, "/train.nc", body)
    expected = "0" * 64
    config["splits"]["train"]["sha256"] = expected
    with pytest.raises(DownloadError) as info:
        acquire_split(config, "train", tmp_path / "raw" / "train.nc")
    message = str(info.value)
    assert config["splits"]["train"]["url"] in message
    assert expected in message and sha256(body) in message
    assert list((tmp_path / "raw").iterdir()) == []


def test_404_fails_after_the_configured_retries(tmp_path, server, source):
    config = url_config(server, "/missing.nc", b"")
    with pytest.raises(DownloadError, match=re.escape(f"{server.base}/missing.nc") + ".*404"):
        acquire_split(config, "train", tmp_path / "raw" / "train.nc")
    assert server.site.hits["/missing.nc"] == RETRIES + 1
    assert list((tmp_path / "raw").iterdir()) == []


def test_unreachable_server_names_the_url(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/train.nc"
    config = config_with(source="url", url=url, sha256="0" * 64)
    config["acquire"]["retries"] = 0
    with pytest.raises(DownloadError, match=re.escape(url) + ".*1 attempt"):
        acquire_split(config, "train", tmp_path / "raw" / "train.nc")
    assert list((tmp_path / "raw").iterdir()) == []


@pytest.mark.parametrize("ranges", [True, False], ids=["resumed", "restarted"])
def test_truncated_transfer_is_completed(tmp_path, server, source, ranges, monkeypatch):
    # Small blocks, as a file of many blocks would have: only the block that broke off is lost.
    monkeypatch.setattr(acquire, "CHUNK_BYTES", 4096)
    body = source.read_bytes()
    route = server.site.routes["/train.nc"] = Route(body, ranges=ranges, truncate=1)
    out = acquire_split(url_config(server, "/train.nc", body), "train", tmp_path / "train.nc")
    assert out.read_bytes() == body
    assert len(route.range_headers) == 2 and route.range_headers[0] is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", route.range_headers[1]).group(1))
    assert len(body) // 2 - 4096 < resumed_at <= len(body) // 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.nc"]


def test_always_truncated_transfer_fails_without_output(tmp_path, server, source):
    body = source.read_bytes()
    server.site.routes["/train.nc"] = Route(body, ranges=False, truncate=MAX_REQUESTS)
    out = tmp_path / "train.nc"
    with pytest.raises(DownloadError, match=re.escape(f"{server.base}/train.nc") + ".*3 attempt"):
        acquire_split(url_config(server, "/train.nc", body), "train", out)
    assert not out.exists()
    assert server.site.hits["/train.nc"] == RETRIES + 1


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
@pytest.mark.parametrize("kept", ["part", "all", "too-long"])
def test_existing_partial_file_is_resumed(tmp_path, server, source, ranges, kept):
    body = source.read_bytes()
    route = server.site.routes["/train.nc"] = Route(body, ranges=ranges)
    offset = {"part": 1000, "all": len(body), "too-long": len(body) + 10}[kept]
    (tmp_path / ".train.nc.part").write_bytes((body + b"stale data")[:offset])
    config = url_config(server, "/train.nc", body)
    config["acquire"]["retries"] = 0  # resuming, or restarting a partial file that does not fit, is no failure
    out = acquire_split(config, "train", tmp_path / "train.nc")
    assert out.read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.nc"]
    assert route.range_headers[0] == f"bytes={offset}-"
    if ranges and kept == "part":  # only the missing bytes crossed the wire, in one request
        assert len(route.range_headers) == 1


def test_url_source_with_max_holograms(tmp_path, server, source):
    body = source.read_bytes()
    server.site.routes["/train.nc"] = Route(body)
    out = acquire_split(url_config(server, "/train.nc", body, max_holograms=1), "train", tmp_path / "train.nc")
    with open_holodec(out, z_limits=Z_LIMITS) as ds:
        assert ds.sizes["hologram_number"] == 1
        assert set(particle_table(ds)["hid"]) == {1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.nc"]


def test_s3_without_s3fs_says_what_to_install(tmp_path):
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed")
    except ImportError:
        pass
    config = config_with(source="url", url="s3://bucket/train.nc", sha256="0" * 64)
    with pytest.raises(ImportError, match="s3fs"):
        acquire_split(config, "train", tmp_path / "train.nc")
    assert list(tmp_path.iterdir()) == []


def test_file_source_is_copied(tmp_path, source):
    out = acquire_split(config_with(source="file", path=str(source)), "train", tmp_path / "raw" / "train.nc")
    assert out.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.nc"]


def test_a_recorded_training_file_keeps_its_camera_and_says_so(tmp_path, source, caplog):
    with caplog.at_level("INFO", logger="holopipe"):
        out = acquire_split(config_with(source="file", path=str(source)), "train", tmp_path / "train.nc",
                            ideal_sensor=True)
    assert out.read_bytes() == source.read_bytes()
    assert "its images keep their camera" in caplog.text


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_max_holograms_keeps_the_first_holograms_and_their_particles(tmp_path, source, keep):
    config = config_with(source="file", path=str(source), max_holograms=keep)
    out = acquire_split(config, "train", tmp_path / "train.nc")
    kept = min(keep, N_HOLOGRAMS)
    with open_holodec(source) as full, open_holodec(out, z_limits=Z_LIMITS) as part:
        assert part.sizes["hologram_number"] == kept
        np.testing.assert_array_equal(part["image"].values, full["image"].values[:kept])
        assert part["image"].dtype == np.uint8
        expected = particle_table(full)
        expected = expected[expected["hid"] <= kept].reset_index(drop=True)
        assert 0 < len(expected) < full.sizes["particle"] or kept == N_HOLOGRAMS
        np.testing.assert_array_equal(particle_table(part).to_numpy(), expected.to_numpy())
        for name in ("Nx", "Ny", "dx", "dy", "lambda", "zMin", "zMax"):
            assert part.attrs[name] == full.attrs[name]


def write_real_layout(source, path):
    """`source` rewritten as NCAR's real-data files: extra variables, no zMin/zMax attributes."""
    with xr.open_dataset(source) as ds:
        ds = ds.load()
    n = ds.sizes["particle"]
    ds = ds.assign(
        t=("particle", np.linspace(0, 1, n)),
        x_pixels=("particle", np.arange(n, dtype=np.float32)),
        y_pixels=("particle", np.arange(n, dtype=np.float32) + 0.5),
        image_original=ds["image"] // 2,
    )
    ds.attrs = {key: value for key, value in ds.attrs.items() if key not in ("zMin", "zMax")}
    ds.to_netcdf(path)
    return path


@pytest.mark.parametrize("keep", [None, 2])
def test_real_data_layout_takes_z_limits_from_config(tmp_path, source, keep):
    real = write_real_layout(source, tmp_path / "real.nc")
    split = {"source": "file", "path": str(real)} | ({} if keep is None else {"max_holograms": keep})
    out = acquire_split(config_with(**split), "train", tmp_path / "raw" / "train.nc")
    with xr.open_dataset(real) as original, open_holodec(out, z_limits=Z_LIMITS) as ds:
        assert "zMin" not in ds.encoding and (ds.attrs["zMin"], ds.attrs["zMax"]) == Z_LIMITS
        selected = original.isel(hologram_number=slice(0, keep),
                                 particle=original["hid"].values <= (keep or N_HOLOGRAMS))
        for name in ("t", "x_pixels", "y_pixels", "image_original", "hid", "z"):
            np.testing.assert_array_equal(ds[name].values, selected[name].values)
    with xr.open_dataset(out) as raw:
        assert "zMin" not in raw.attrs and "zMax" not in raw.attrs  # published with the file's own attributes


def test_bad_file_fails_naming_it_and_writes_nothing(tmp_path, source):
    bad = tmp_path / "metres.nc"
    with xr.open_dataset(source) as ds:
        ds.load().assign(z=ds["z"] * 1e-6).to_netcdf(bad)
    out = tmp_path / "raw" / "train.nc"
    with pytest.raises(HolodecFormatError, match=re.escape(str(bad)) + ".*'z' looks like metres"):
        acquire_split(config_with(source="file", path=str(bad), max_holograms=1), "train", out)
    assert list(out.parent.iterdir()) == []


def test_downloaded_bad_file_is_discarded_naming_the_url(tmp_path, server, source):
    bad = tmp_path / "metres.nc"
    with xr.open_dataset(source) as ds:
        ds.load().assign(z=ds["z"] * 1e-6).to_netcdf(bad)
    body = bad.read_bytes()
    server.site.routes["/bad.nc"] = Route(body)
    out = tmp_path / "raw" / "train.nc"
    with pytest.raises(HolodecFormatError, match=re.escape(f"{server.base}/bad.nc") + ".*looks like metres"):
        acquire_split(url_config(server, "/bad.nc", body), "train", out)
    assert list(out.parent.iterdir()) == []


def test_split_simulate_keys_and_the_ideal_sensor(tmp_path):
    """A split's own simulate keys apply to it alone; the ideal sensor writes float32 noise-free images."""
    config = load_config({**CONFIG, "splits": {
        "train": {"source": "simulate", "n_holograms": 2, "seed": 1},
        "far": {"source": "simulate", "n_holograms": 2, "seed": 1, "simulate": {"method": "fraunhofer"}}}})
    assert config["simulate"]["method"] == "angular_spectrum"
    far = open_holodec(acquire_split(config, "far", tmp_path / "far.nc"))
    near = open_holodec(acquire_split(config, "train", tmp_path / "train.nc"))
    ideal = open_holodec(acquire_split(config, "train", tmp_path / "ideal.nc", ideal_sensor=True))
    assert far.attrs["simulation_method"] == "fraunhofer" and near.attrs["simulation_method"] == "angular_spectrum"
    assert near["image"].dtype == np.uint8 and ideal["image"].dtype == np.float32
    assert ideal.attrs["sensor"] == "ideal" and near.attrs["sensor"] == "camera"
    assert np.array_equal(particle_table(ideal).to_numpy(), particle_table(near).to_numpy())
    noise = (near["image"].astype(np.float32) - ideal["image"]).values
    assert 0.3 < noise.std() < 3.0  # the camera's noise and rounding, in gray levels, on the recorded one only


def rewritten(source, path, **attrs):
    """`source` written to `path` with some global attributes replaced."""
    with xr.open_dataset(source) as ds:
        ds.load().assign_attrs(attrs).to_netcdf(path)
    return path


@pytest.mark.parametrize("max_holograms", [None, 1])
def test_a_file_of_another_laser_fails_naming_both_wavelengths_and_the_config_key(tmp_path, source, max_holograms):
    green = rewritten(source, tmp_path / "green.nc", **{"lambda": 5.32e-7})
    out = tmp_path / "raw" / "train.nc"
    split = {"source": "file", "path": str(green)} | ({} if max_holograms is None else {"max_holograms": 1})
    with pytest.raises(HolodecFormatError) as raised:
        acquire_split(config_with(**split), "train", out)
    message = str(raised.value)
    assert message.startswith(f"{green}: attribute 'lambda' = 5.32e-07 m (532 nm)")
    assert "optics.wavelength = 3.55e-07 m (355 nm)" in message
    assert list(out.parent.iterdir()) == []


def test_a_wavelength_within_the_tolerance_is_accepted(tmp_path, source):
    close = rewritten(source, tmp_path / "close.nc", **{"lambda": 3.55e-7 * (1 + acquire.WAVELENGTH_TOLERANCE / 2)})
    out = acquire_split(config_with(source="file", path=str(close)), "train", tmp_path / "train.nc")
    assert out.read_bytes() == close.read_bytes()


def test_a_downloaded_file_of_another_laser_names_the_url_once(tmp_path, server, source):
    body = rewritten(source, tmp_path / "green.nc", **{"lambda": 5.32e-7}).read_bytes()
    server.site.routes["/green.nc"] = Route(body)
    out = tmp_path / "raw" / "train.nc"
    with pytest.raises(HolodecFormatError) as raised:
        acquire_split(url_config(server, "/green.nc", body), "train", out)
    url = f"{server.base}/green.nc"
    assert str(raised.value).startswith(f"{url}: attribute 'lambda'") and str(raised.value).count(url) == 1
    assert list(out.parent.iterdir()) == []


def test_a_file_without_holograms_fails_at_acquire(tmp_path, source):
    empty = tmp_path / "empty.nc"
    with xr.open_dataset(source) as ds:
        ds.load().isel(hologram_number=slice(0, 0), particle=slice(0, 0)).to_netcdf(empty)
    out = tmp_path / "raw" / "train.nc"
    with pytest.raises(HolodecFormatError, match=re.escape(f"{empty}: no holograms")):
        acquire_split(config_with(source="file", path=str(empty)), "train", out)
    assert list(out.parent.iterdir()) == []
