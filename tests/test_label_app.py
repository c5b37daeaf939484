"""The labelling page: blind, in the seeded order, every label on disk before the page moves on, resumed after a
restart; only for whoever holds the run's token, through the server's own address, changes only from the page
itself (issue 20); and the same in a real headless chromium driven by key presses, with the server killed mid-way."""

import http.client
import io
import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from helpers import contrast_hologram, scene_dict, split_store
from PIL import Image

from holopipe.core.config import load_config
from holopipe.evaluation import labels
from holopipe.evaluation.label_app import Access, create_app, crop_png, is_loopback, page_names
from holopipe.optics.simulate import Optics, ParticleSet
from holopipe.run.cli import main

# A non-square frame with non-square pixels (dx != dy), so the page's aspect and scale bar are tested.
OPTICS = Optics(wavelength=3.55e-7, dx=2.96e-6, dy=3.5e-6, nx=192, ny=128, z_min=2e-3, z_max=10e-3)
# Six droplets (µm, contract coordinates) in two holograms.
TRUE = pd.DataFrame({"hid": [1, 1, 1, 1, 2, 2], "x": [-150.0, 120.0, 0.0, 160.0, -60.0, 90.0],
                     "y": [-100.0, -80.0, 100.0, 120.0, 40.0, -120.0],
                     "z": [3500.0, 5000.0, 7000.0, 8500.0, 4500.0, 6000.0], "d": [30.0, 25.0, 35.0, 28.0, 30.0, 22.0]})
# The U-Net finds droplets 0, 1, 2, 4 and a ghost; the baseline 1, 2, 3, 5 and another ghost: 1 and 2 are found
# by both (within the tolerances), so there are 8 candidates: 3 only the U-Net's, 3 only the baseline's, 2 both.
UNET = pd.concat([TRUE.iloc[[0, 1, 2, 4]],
                  pd.DataFrame({"hid": [2], "x": [-200.0], "y": [-150.0], "z": [9000.0], "d": [15.0]})])
BASELINE = pd.concat([TRUE.iloc[[1, 2, 3, 5]].assign(x=lambda t: t["x"] + 4.0, z=lambda t: t["z"] + 150.0),
                      pd.DataFrame({"hid": [1], "x": [50.0], "y": [0.0], "z": [2500.0], "d": [12.0]})])
N_CANDIDATES = 8
STATE_KEYS = {"labeller", "done", "total", "dx_um", "dy_um", "message", "candidate"}
CANDIDATE_KEYS = {"id", "x_um", "y_um", "z_um", "d_um", "hid", "plane_z_mm", "focus_plane"}
# The server as the tests' browser sees it: bound to 127.0.0.1:8050 with this run's token.
TOKEN, PORT = "run-token-Zq3", 8050
ACCESS = Access(token=TOKEN, port=PORT, names=page_names("127.0.0.1"))
ORIGIN = f"http://127.0.0.1:{PORT}"
FOREIGN = "http://evil.example:8050"  # a cross-site page, or a foreign name rebound to 127.0.0.1 (DNS rebinding)


class Page:
    """A Flask test client as the page runs in a browser: it opened the printed URL (so it holds the token's
    cookie), asks the server by its own address and sends a change as JSON with its own Origin."""

    def __init__(self, candidates_dir, labels_dir, labeller="ana"):
        self.client = create_app(candidates_dir, labels_dir, labeller, access=ACCESS).test_client()
        opened = self.client.get(f"/?token={TOKEN}", base_url=ORIGIN)
        assert opened.status_code == 200, opened.get_data(as_text=True)

    def get(self, path: str):
        return self.client.get(path, base_url=ORIGIN)

    def post(self, path: str, body: dict | None = None):
        return self.client.post(path, base_url=ORIGIN, json={} if body is None else body,
                                headers={"Origin": ORIGIN})


@pytest.fixture(scope="module")
def candidates_dir(tmp_path_factory):
    """The candidates of a two-hologram split, written by labels.write_candidates."""
    root = tmp_path_factory.mktemp("labels")
    particles = [ParticleSet(x=t["x"].to_numpy() * 1e-6, y=t["y"].to_numpy() * 1e-6, z=t["z"].to_numpy() * 1e-6,
                             d=t["d"].to_numpy() * 1e-6) for _, t in TRUE.groupby("hid")]
    store = split_store(root / "test.zarr", [contrast_hologram(p, OPTICS) for p in particles], OPTICS, truth=TRUE)
    UNET.assign(score=0.9).to_csv(root / "unet.csv", index=False)
    BASELINE.assign(score=0.5).to_csv(root / "baseline.csv", index=False)
    return labels.write_candidates(load_config(scene_dict(OPTICS)), "test", store, root / "unet.csv",
                                   root / "baseline.csv", root / "candidates")


@pytest.fixture()
def labels_dir(tmp_path):
    return tmp_path / "labels" / "test"


def the_order(candidates_dir) -> list[str]:
    return labels.label_order(labels.open_candidates(candidates_dir))


def given_labels(labels_dir, candidates_dir, labeller="ana") -> pd.DataFrame:
    return labels.LabelFile(labels_dir / f"{labeller}.csv", labels.open_candidates(candidates_dir)).labels()


def test_the_fixture_has_candidates_of_each_kind(candidates_dir):
    table = labels.open_candidates(candidates_dir).table
    assert len(table) == N_CANDIDATES
    assert sorted(zip(table["unet"], table["baseline"])) == [(0, 1)] * 3 + [(1, 0)] * 3 + [(1, 1)] * 2


def test_the_page_never_sends_which_method_found_a_candidate(candidates_dir, labels_dir):
    client = Page(candidates_dir, labels_dir, "ana")
    table = labels.open_candidates(candidates_dir).table.set_index("candidate")
    bodies = [client.get("/").get_data(as_text=True)]
    for step in range(N_CANDIDATES):
        state = client.get("/api/state").get_json()
        bodies.append(json.dumps(state))
        assert set(state) == STATE_KEYS and set(state["candidate"]) == CANDIDATE_KEYS
        shown = state["candidate"]
        row = table.loc[shown["id"]]
        # What the page shows is the candidate's own x, y, z, d, whichever method found it.
        assert [shown["x_um"], shown["y_um"], shown["z_um"], shown["d_um"]] == pytest.approx(
            [row["x"], row["y"], row["z"], row["d"]])
        answer = client.post("/api/label", {"candidate": shown["id"], "label": "unsure", "confidence": 3})
        bodies.append(answer.get_data(as_text=True))
    for body in bodies:
        assert "unet" not in body.lower() and "baseline" not in body.lower()
    assert client.get("/api/state").get_json()["candidate"] is None


def test_every_labeller_gets_the_same_seeded_order_of_all_candidates(candidates_dir, tmp_path):
    order = the_order(candidates_dir)
    assert sorted(order) == sorted(labels.open_candidates(candidates_dir).table["candidate"])
    served = {}
    for labeller in ("ana", "ben"):
        client = Page(candidates_dir, tmp_path / labeller, labeller)
        served[labeller] = []
        for _ in range(N_CANDIDATES):
            shown = client.get("/api/state").get_json()["candidate"]["id"]
            served[labeller].append(shown)
            client.post("/api/label", {"candidate": shown, "label": "particle", "confidence": 5})
    assert served["ana"] == served["ben"] == order
    assert order == the_order(candidates_dir)  # stable: the same candidates give the same order


def test_label_and_undo_rewrite_the_label_file_before_answering(candidates_dir, labels_dir):
    client = Page(candidates_dir, labels_dir, "ana")
    order = the_order(candidates_dir)
    candidates_id = labels.open_candidates(candidates_dir).manifest["candidates_id"]
    answer = client.post("/api/label", {"candidate": order[0], "label": "particle", "confidence": 4})
    assert answer.status_code == 200
    assert answer.get_json()["done"] == 1 and answer.get_json()["candidate"]["id"] == order[1]
    client.post("/api/label", {"candidate": order[1], "label": "not_particle", "confidence": 2})
    on_disk = pd.read_csv(labels_dir / "ana.csv", dtype={"candidates_id": str})
    assert on_disk[["candidate", "label", "confidence", "labeller"]].values.tolist() == [
        [order[0], "particle", 4, "ana"], [order[1], "not_particle", 2, "ana"]]
    assert set(on_disk["candidates_id"]) == {candidates_id}

    undone = client.post("/api/undo").get_json()
    assert undone["done"] == 1 and undone["candidate"]["id"] == order[1] and order[1] in undone["message"]
    assert pd.read_csv(labels_dir / "ana.csv")["candidate"].tolist() == [order[0]]
    client.post("/api/label", {"candidate": order[1], "label": "unsure", "confidence": 1})
    assert given_labels(labels_dir, candidates_dir)[["candidate", "label"]].values.tolist() == [
        [order[0], "particle"], [order[1], "unsure"]]


def test_a_label_for_another_candidate_or_with_bad_values_is_not_saved(candidates_dir, labels_dir):
    client = Page(candidates_dir, labels_dir, "ana")
    order = the_order(candidates_dir)
    # A repeated key press after the page moved on names the previous candidate: refused, nothing written.
    client.post("/api/label", {"candidate": order[0], "label": "particle", "confidence": 4})
    again = client.post("/api/label", {"candidate": order[0], "label": "particle", "confidence": 4})
    assert again.status_code == 409 and again.get_json()["candidate"]["id"] == order[1]
    for bad, why in (({"label": "maybe", "confidence": 3}, "label 'maybe' is not one of"),
                     ({"label": "particle", "confidence": 6}, "confidence 6 is not an integer 1..5"),
                     ({"label": "particle", "confidence": "4"}, "confidence '4' is not an integer 1..5")):
        answer = client.post("/api/label", {"candidate": order[1], **bad})
        assert answer.status_code == 400 and answer.get_json()["message"].startswith("not saved")
        assert why in answer.get_json()["message"] and answer.get_json()["candidate"]["id"] == order[1]
    assert given_labels(labels_dir, candidates_dir)["candidate"].tolist() == [order[0]]


@pytest.mark.parametrize(("body", "why"), [
    (b"[1, 2]", "the body is an array, not a JSON object"),
    (b'"particle"', "the body is a string, not a JSON object"),
    (b"null", "the body is null, not a JSON object"),
    (b"candidate=c0001&label=particle", "the body is not JSON"),
    (b"", "the body is not JSON"),
    (b'{"label": "\\xff"}'.replace(b"\\xff", b"\xff"), "the body is not JSON"),
    (b'{"label": "particle"}', "missing candidate, confidence"),
    (b'{"label": "particle", "hid": 1}', "missing candidate, confidence; unknown hid"),
    (b'{"candidate": "c0001", "label": "particle", "confidence": 3, "method": "unet"}', "unknown method"),
])
def test_a_bad_label_body_is_a_400_that_says_what_is_wrong(candidates_dir, labels_dir, body, why):
    client = Page(candidates_dir, labels_dir, "ana")
    order = the_order(candidates_dir)
    client.post("/api/label", {"candidate": order[0], "label": "particle", "confidence": 4})
    before = (labels_dir / "ana.csv").read_bytes()
    answer = client.client.post("/api/label", base_url=ORIGIN, data=body, content_type="application/json",
                                headers={"Origin": ORIGIN})
    assert answer.status_code == 400 and answer.mimetype == "application/json"
    assert answer.get_json()["error"].startswith("not saved: ") and why in answer.get_json()["error"]
    assert '{"candidate": ..., "label": ..., "confidence": ...}' in answer.get_json()["error"]
    assert (labels_dir / "ana.csv").read_bytes() == before


def test_undo_takes_an_empty_json_object_only(candidates_dir, labels_dir):
    client = Page(candidates_dir, labels_dir, "ana")
    order = the_order(candidates_dir)
    client.post("/api/label", {"candidate": order[0], "label": "particle", "confidence": 4})
    before = (labels_dir / "ana.csv").read_bytes()
    for body, why in ((b"[]", "the body is an array"), (b'{"candidate": "c0001"}', "unknown candidate")):
        answer = client.client.post("/api/undo", base_url=ORIGIN, data=body, content_type="application/json",
                                    headers={"Origin": ORIGIN})
        assert answer.status_code == 400 and answer.get_json()["error"].startswith("nothing undone: ")
        assert why in answer.get_json()["error"]
    assert (labels_dir / "ana.csv").read_bytes() == before
    assert client.post("/api/undo").get_json()["message"] == f"undid {order[0]}"


def test_a_restarted_page_resumes_at_the_first_unlabelled_candidate_of_the_order(candidates_dir, labels_dir):
    order = the_order(candidates_dir)
    client = Page(candidates_dir, labels_dir, "ana")
    for candidate in order[:3]:
        client.post("/api/label", {"candidate": candidate, "label": "particle", "confidence": 5})
    state = Page(candidates_dir, labels_dir, "ana").get("/api/state").get_json()
    assert (state["done"], state["total"], state["candidate"]["id"]) == (3, N_CANDIDATES, order[3])
    other = Page(candidates_dir, labels_dir, "ben").get("/api/state").get_json()
    assert (other["done"], other["candidate"]["id"]) == (0, order[0])  # labellers are independent


def test_crops_are_gray_pngs_on_a_fixed_scale_and_planes_carry_their_depth(candidates_dir, labels_dir):
    client = Page(candidates_dir, labels_dir, "ana")
    candidates = labels.open_candidates(candidates_dir)
    state = client.get("/api/state").get_json()
    shown = state["candidate"]
    amplitude, phase, z_um = candidates.crops(shown["id"])
    assert shown["plane_z_mm"] == pytest.approx(z_um / 1000.0)
    assert shown["focus_plane"] == candidates.manifest["focus_plane"]
    assert (state["dx_um"], state["dy_um"]) == pytest.approx((2.96, 3.5))
    for channel, stack, (low, high) in (("amplitude", amplitude, (0.0, 2.0)), ("phase", phase, (-np.pi, np.pi))):
        answer = client.get(f"/crop/{shown['id']}/{shown['focus_plane']}.png?channel={channel}")
        assert answer.status_code == 200 and answer.mimetype == "image/png"
        image = np.asarray(Image.open(io.BytesIO(answer.data)))
        assert image.shape == stack.shape[1:] == (candidates.manifest["crop_pixels"],) * 2
        expected = np.round(np.clip((stack[shown["focus_plane"]] - low) / (high - low), 0, 1) * 255)
        assert np.abs(image.astype(int) - expected).max() <= 1
    assert client.get(f"/crop/{shown['id']}/{amplitude.shape[0]}.png").status_code == 404
    assert client.get("/crop/c9999/0.png").status_code == 404
    assert client.get(f"/crop/{shown['id']}/0.png?channel=unet").status_code == 404


def test_crop_png_maps_the_background_to_mid_gray_and_clips():
    plane = np.array([[0.0, 1.0, 2.0, 5.0], [-1.0, np.nan, 0.5, 1.5]], dtype=np.float32)
    gray = np.asarray(Image.open(io.BytesIO(crop_png(plane, "amplitude"))))
    assert gray.tolist() == [[0, 128, 255, 255], [0, 0, 64, 191]]


def stale_file(labels_dir, candidates_dir):
    """ana.csv as it was left for other candidates (a rerun changed them)."""
    labels_dir.mkdir(parents=True)
    first = labels.open_candidates(candidates_dir).table["candidate"].iloc[0]
    pd.DataFrame({"candidates_id": ["0123456789abcdef"], "candidate": [first], "label": ["particle"],
                  "confidence": [3], "labeller": ["ana"], "time": ["2026-01-01T00:00:00+00:00"]}).to_csv(
        labels_dir / "ana.csv", index=False)


def test_a_stale_label_file_stops_the_server_at_start_with_the_message(candidates_dir, labels_dir, caplog):
    stale_file(labels_dir, candidates_dir)
    with pytest.raises(ValueError, match="ana.csv"):
        create_app(candidates_dir, labels_dir, "ana", access=ACCESS)
    argv = ["label", "--split", "test", "--candidates", str(candidates_dir), "--labels", str(labels_dir),
            "--labeller", "ana", "--port", str(free_port())]
    assert main(argv) == 1
    assert any("ana.csv" in record.getMessage() and record.levelname == "ERROR" for record in caplog.records)


def test_an_unknown_candidate_or_a_bad_labeller_name_stops_the_server_at_start(candidates_dir, labels_dir):
    labels_dir.mkdir(parents=True)
    manifest = labels.open_candidates(candidates_dir).manifest
    pd.DataFrame({"candidates_id": [manifest["candidates_id"]], "candidate": ["c9999"], "label": ["particle"],
                  "confidence": [3], "labeller": ["ana"], "time": ["2026-01-01T00:00:00+00:00"]}).to_csv(
        labels_dir / "ana.csv", index=False)
    with pytest.raises(ValueError, match="c9999"):
        create_app(candidates_dir, labels_dir, "ana", access=ACCESS)
    with pytest.raises(ValueError, match="ana/../x"):
        create_app(candidates_dir, labels_dir, "ana/../x", access=ACCESS)


# --- who gets in (issue 20) -------------------------------------------------------------------------------------

def two_labels_on_disk(candidates_dir, labels_dir) -> tuple[Page, bytes]:
    page = Page(candidates_dir, labels_dir, "ana")
    for candidate in the_order(candidates_dir)[:2]:
        assert page.post("/api/label", {"candidate": candidate, "label": "particle",
                                        "confidence": 4}).status_code == 200
    return page, (labels_dir / "ana.csv").read_bytes()


def test_the_cross_site_form_post_to_undo_is_refused_and_the_label_file_is_unchanged(candidates_dir, labels_dir):
    page, before = two_labels_on_disk(candidates_dir, labels_dir)
    # The attack of the issue: a form on a foreign page posts to /api/undo (foreign Origin and Host); on main this
    # answered 200 and removed a label, and repeated it emptied the file. Here even a browser holding the cookie
    # (as if SameSite were not there) is refused, again and again.
    for client in (create_app(candidates_dir, labels_dir, "ana", access=ACCESS).test_client(), page.client):
        for _ in range(3):
            answer = client.post("/api/undo", base_url=FOREIGN, data={"x": "1"}, headers={"Origin": FOREIGN})
            assert answer.status_code == 403 and "'evil.example:8050' is not this server" in answer.get_json()["error"]
    assert (labels_dir / "ana.csv").read_bytes() == before
    assert page.get("/api/state").get_json()["done"] == 2


@pytest.mark.parametrize(("request_kwargs", "status", "why"), [
    # Each defence alone, the others passed: a browser holding the cookie, at the server's own Host.
    ({"json": {}, "headers": {"Origin": FOREIGN}}, 403, "sent from 'http://evil.example:8050', not from this page"),
    ({"json": {}, "headers": {"Origin": "null"}}, 403, "sent from 'null'"),  # a sandboxed frame, a file:// page
    ({"json": {}, "headers": {"Origin": "http://127.0.0.1:9999"}}, 403, "not from this page"),  # same site, other port
    ({"json": {}, "headers": {"Referer": f"{FOREIGN}/form.html"}}, 403, "not from this page"),
    ({"json": {}}, 403, "neither Origin nor Referer"),
    ({"data": {"x": "1"}, "headers": {"Origin": ORIGIN}}, 415, "not application/x-www-form-urlencoded"),
    ({"data": "{}", "content_type": "text/plain", "headers": {"Origin": ORIGIN}}, 415, "not text/plain"),
])
def test_a_change_not_sent_as_json_by_the_page_itself_is_refused(candidates_dir, labels_dir, request_kwargs,
                                                                  status, why):
    page, before = two_labels_on_disk(candidates_dir, labels_dir)
    answer = page.client.post("/api/undo", base_url=ORIGIN, **request_kwargs)
    assert answer.status_code == status and why in answer.get_json()["error"]
    assert (labels_dir / "ana.csv").read_bytes() == before
    # The page's own Referer, without an Origin, is the page (an older browser): let in.
    answer = page.client.post("/api/undo", base_url=ORIGIN, json={}, headers={"Referer": f"{ORIGIN}/"})
    assert answer.status_code == 200 and answer.get_json()["done"] == 1


def test_no_token_or_a_wrong_one_is_403_everywhere_and_the_printed_url_sets_a_strict_cookie(candidates_dir,
                                                                                             labels_dir):
    _, before = two_labels_on_disk(candidates_dir, labels_dir)
    stranger = create_app(candidates_dir, labels_dir, "ana", access=ACCESS).test_client()
    first = the_order(candidates_dir)[0]
    for path in ("/", "/api/state", f"/crop/{first}/0.png", "/?token=run-token-Zq4", "/?token=",
                 f"/api/state?token={TOKEN}"):  # the token in the URL opens the page only
        answer = stranger.get(path, base_url=ORIGIN)
        assert answer.status_code == 403 and "open the URL with ?token=" in answer.get_data(as_text=True), path
    answer = stranger.post("/api/undo", base_url=ORIGIN, json={}, headers={"Origin": ORIGIN})
    assert answer.status_code == 403 and answer.get_json()["error"].startswith("no token")
    stranger.set_cookie(ACCESS.cookie, "run-token-Zq4", domain="127.0.0.1")
    answer = stranger.post("/api/undo", base_url=ORIGIN, json={}, headers={"Origin": ORIGIN})
    assert answer.status_code == 403 and answer.get_json()["error"].startswith("wrong token")
    assert (labels_dir / "ana.csv").read_bytes() == before

    opened = stranger.get(f"/?token={TOKEN}", base_url=ORIGIN)
    assert opened.status_code == 200 and "<title>holopipe labels</title>" in opened.get_data(as_text=True)
    cookie = opened.headers["Set-Cookie"]
    assert cookie.startswith(f"holopipe-label-{PORT}={TOKEN};") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/" in cookie
    assert stranger.get("/api/state", base_url=ORIGIN).get_json()["done"] == 2


def test_a_host_that_is_not_this_server_is_refused_even_with_the_token(candidates_dir, labels_dir):
    page, _ = two_labels_on_disk(candidates_dir, labels_dir)
    for host in ("evil.example:8050", "localhost:9999", "127.0.0.1", "10.0.0.7:8050"):
        answer = page.client.get("/api/state", base_url=f"http://{host}")
        assert answer.status_code == 403 and f"Host '{host}' is not this server" in answer.get_json()["error"]
        assert "forward the same port number" in answer.get_json()["error"]
    for host in ("localhost:8050", "127.0.0.1:8050", "[::1]:8050", "LOCALHOST:8050"):
        page.client.set_cookie(ACCESS.cookie, TOKEN, domain=host.rsplit(":", 1)[0].strip("[]").lower())
        assert page.client.get("/api/state", base_url=f"http://{host}").status_code == 200, host


def test_the_names_of_a_server_depend_on_the_address_it_is_bound_to():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.0.0.7", "casper-login1")))
    assert page_names("127.0.0.1") == {"localhost", "127.0.0.1", "[::1]"}
    assert page_names("::1") == {"localhost", "127.0.0.1", "[::1]"}
    assert page_names("10.0.0.7") == {"localhost", "127.0.0.1", "[::1]", "10.0.0.7"}
    assert {socket.gethostname().lower(), socket.getfqdn().lower()} <= page_names("0.0.0.0")
    assert ACCESS.hosts == {"localhost:8050", "127.0.0.1:8050", "[::1]:8050"}


# --- the real server and the real browser -----------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_S = 20  # the longest any one step of the browser test waits


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


PRINTED_URL = re.compile(r"open (http://\S+/\?token=\S+) ")


class Server(NamedTuple):
    process: subprocess.Popen
    url: str  # the URL it printed, with this run's token
    printed: str  # its output up to that line


def start_server(candidates_dir, labels_dir, port: int, *options: str, verbose: bool = False) -> Server:
    """``holopipe label`` as a user starts it; returns once it printed its URL (its socket listens by then)."""
    holopipe = Path(sys.executable).with_name("holopipe")
    process = subprocess.Popen([str(holopipe), *(["--verbose"] if verbose else []), "label", "--split", "test",
                                "--candidates", str(candidates_dir), "--labels", str(labels_dir), "--labeller",
                                "ana", "--port", str(port), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = []
    for line in process.stdout:  # blocks until a line or the end (the test's timeout bounds it)
        printed.append(line)
        if found := PRINTED_URL.search(line):
            return Server(process, found.group(1), "".join(printed))
    process.wait(timeout=WAIT_S)
    raise AssertionError(f"holopipe label exited {process.returncode} without printing a URL: {''.join(printed)}")


def stop(server: Server) -> str:
    """Ctrl-C the server; all it printed."""
    server.process.send_signal(signal.SIGINT)
    rest, _ = server.process.communicate(timeout=WAIT_S)
    return server.printed + rest


def ask(port: int, method: str, path: str, body: str | None = None, **headers: str):
    """One plain HTTP request to 127.0.0.1:port (no browser): (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        connection.request(method, path, body, {name.replace("_", "-"): value for name, value in headers.items()})
        response = connection.getresponse()
        return response.status, response.headers, response.read().decode()
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_real_server_writes_its_token_once_and_lets_only_its_page_in(candidates_dir, labels_dir):
    port = free_port()
    server = start_server(candidates_dir, labels_dir, port, verbose=True)  # debug logging: the most it logs
    try:
        token = re.fullmatch(rf"http://127\.0\.0\.1:{port}/\?token=([\w-]{{43}})", server.url).group(1)
        origin = f"http://127.0.0.1:{port}"
        status, headers, _ = ask(port, "GET", f"/?token={token}")
        assert status == 200 and headers["Set-Cookie"].startswith(f"holopipe-label-{port}={token};")
        as_page = {"Cookie": f"holopipe-label-{port}={token}", "Origin": origin, "Content_Type": "application/json"}
        first = json.loads(ask(port, "GET", "/api/state", Cookie=as_page["Cookie"])[2])["candidate"]["id"]
        label = json.dumps({"candidate": first, "label": "particle", "confidence": 5})
        assert ask(port, "POST", "/api/label", label, **as_page)[0] == 200
        # The attack, on the real server: a cross-site form posting to /api/undo.
        status, _, body = ask(port, "POST", "/api/undo", "x=1", Host="evil.example", Origin="http://evil.example",
                              Content_Type="application/x-www-form-urlencoded")
        assert status == 403 and "is not this server" in body
        assert ask(port, "POST", "/api/label", "[1, 2]", **as_page)[0] == 400
        assert ask(port, "GET", "/api/state")[0] == 403
        assert ask(port, "GET", "/?token=guess")[0] == 403
    finally:
        printed = stop(server)
    assert given_labels(labels_dir, candidates_dir)["candidate"].tolist() == [first]
    assert printed.count(token) == 1, printed  # the printed URL, and no request line with the query
    assert "refused POST /api/undo: Host 'evil.example' is not this server" in printed
    assert "WARNING" not in printed.replace("WARNING refused", "")  # bound to 127.0.0.1: no warning


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_server_bound_beyond_this_machine_warns_and_prints_the_machine_name(candidates_dir, labels_dir):
    port = free_port()
    server = start_server(candidates_dir, labels_dir, port, "--host", "0.0.0.0")
    printed = stop(server)
    assert re.search(r"WARNING listening on 0\.0\.0\.0, beyond this machine: anyone who can reach it", printed)
    assert "ssh -L" in printed and server.url.startswith(f"http://{socket.gethostname()}:{port}/?token=")


def headless_chromium():
    """Debian's chromium through selenium, headless."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,800"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    return driver


def needs_chromium():
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(f"needs Debian's chromium and chromedriver (missing {', '.join(missing)}): "
                    "apt-get install chromium chromium-driver (.ci/run installs them)")


def page_text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def shown_candidate(driver):
    return driver.execute_script("return state && state.candidate ? state.candidate.id : null")


def press(driver, *keys):
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def wait_progress(driver, done: int):
    expected = f"{done} / {N_CANDIDATES} labelled (ana)"
    wait_for(driver, lambda d: page_text(d, "progress") == expected, f"progress {expected!r}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_browser_labels_by_keys_and_a_killed_server_loses_nothing(candidates_dir, labels_dir):
    from selenium.webdriver.common.keys import Keys

    needs_chromium()
    order, port = the_order(candidates_dir), free_port()
    server = start_server(candidates_dir, labels_dir, port)
    driver = headless_chromium()
    try:
        driver.get(server.url)
        wait_progress(driver, 0)
        assert driver.current_url == f"http://127.0.0.1:{port}/"  # the page took the token out of the address bar
        assert shown_candidate(driver) == order[0]
        focus_z = page_text(driver, "planez")
        press(driver, Keys.ARROW_RIGHT)
        wait_for(driver, lambda d: page_text(d, "planez") != focus_z, "the z slider to move one plane up")
        press(driver, Keys.ARROW_LEFT)
        wait_for(driver, lambda d: page_text(d, "planez") == focus_z, "the z slider back at the candidate's plane")

        given = [("p", "4", "particle", 4), ("3", "n", "not_particle", 3), ("u", "1", "unsure", 1)]
        for done, (first, second, _, _) in enumerate(given, start=1):
            press(driver, first, second)  # label then confidence, or confidence then label
            wait_progress(driver, done)
        press(driver, "z")  # undo the third, then give it again with Backspace as the undo key in between
        wait_progress(driver, 2)
        assert shown_candidate(driver) == order[2]
        press(driver, "p", "5")
        wait_progress(driver, 3)
        press(driver, Keys.BACKSPACE)
        wait_progress(driver, 2)
        press(driver, "u", "1")
        wait_progress(driver, 3)
        press(driver, "p")  # a label chosen but no confidence yet: nothing is saved
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=WAIT_S)
        press(driver, "4")  # completed while the server is dead: the page says it was not saved
        wait_for(driver, lambda d: "did not answer" in page_text(d, "message"), "the page to say the server is gone")
        wait_progress(driver, 3)

        on_disk = given_labels(labels_dir, candidates_dir)
        assert on_disk[["candidate", "label", "confidence"]].values.tolist() == [
            [candidate, label, confidence] for candidate, (_, _, label, confidence) in zip(order, given)]

        server = start_server(candidates_dir, labels_dir, port)
        driver.refresh()  # the new run has a new token: the old cookie is refused, with what to do
        wait_for(driver, lambda d: "open the URL with ?token=" in d.find_element("tag name", "body").text,
                 "the page to say to open the new URL")
        driver.get(server.url)
        wait_progress(driver, 3)
        assert shown_candidate(driver) == order[3]
        for done in range(4, N_CANDIDATES + 1):
            press(driver, "n", "2")
            wait_progress(driver, done)
        wait_for(driver, lambda d: d.find_element("id", "finished").is_displayed(), "the page to say all are done")
        assert given_labels(labels_dir, candidates_dir)["candidate"].tolist() == order
    finally:
        driver.quit()
        server.process.kill()
        server.process.wait(timeout=WAIT_S)
