"""The labelling page: blind, in the seeded order, every label on disk before the page moves on, resumed after a
restart; and the same in a real headless chromium driven by key presses, with the server killed mid-way."""

import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from holopipe import labels
from holopipe.cli import main
from holopipe.config import load_config
from holopipe.label_app import create_app, crop_png
from holopipe.simulate import Optics, ParticleSet

from test_baseline import contrast_hologram, scene_dict, split_store

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
    client = create_app(candidates_dir, labels_dir, "ana").test_client()
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
        answer = client.post("/api/label", json={"candidate": shown["id"], "label": "unsure", "confidence": 3})
        bodies.append(answer.get_data(as_text=True))
    for body in bodies:
        assert "unet" not in body.lower() and "baseline" not in body.lower()
    assert client.get("/api/state").get_json()["candidate"] is None


def test_every_labeller_gets_the_same_seeded_order_of_all_candidates(candidates_dir, tmp_path):
    order = the_order(candidates_dir)
    assert sorted(order) == sorted(labels.open_candidates(candidates_dir).table["candidate"])
    served = {}
    for labeller in ("ana", "ben"):
        client = create_app(candidates_dir, tmp_path / labeller, labeller).test_client()
        served[labeller] = []
        for _ in range(N_CANDIDATES):
            shown = client.get("/api/state").get_json()["candidate"]["id"]
            served[labeller].append(shown)
            client.post("/api/label", json={"candidate": shown, "label": "particle", "confidence": 5})
    assert served["ana"] == served["ben"] == order
    assert order == the_order(candidates_dir)  # stable: the same candidates give the same order


def test_label_and_undo_rewrite_the_label_file_before_answering(candidates_dir, labels_dir):
    client = create_app(candidates_dir, labels_dir, "ana").test_client()
    order = the_order(candidates_dir)
    candidates_id = labels.open_candidates(candidates_dir).manifest["candidates_id"]
    answer = client.post("/api/label", json={"candidate": order[0], "label": "particle", "confidence": 4})
    assert answer.status_code == 200
    assert answer.get_json()["done"] == 1 and answer.get_json()["candidate"]["id"] == order[1]
    client.post("/api/label", json={"candidate": order[1], "label": "not_particle", "confidence": 2})
    on_disk = pd.read_csv(labels_dir / "ana.csv", dtype={"candidates_id": str})
    assert on_disk[["candidate", "label", "confidence", "labeller"]].values.tolist() == [
        [order[0], "particle", 4, "ana"], [order[1], "not_particle", 2, "ana"]]
    assert set(on_disk["candidates_id"]) == {candidates_id}

    undone = client.post("/api/undo").get_json()
    assert undone["done"] == 1 and undone["candidate"]["id"] == order[1] and order[1] in undone["message"]
    assert pd.read_csv(labels_dir / "ana.csv")["candidate"].tolist() == [order[0]]
    client.post("/api/label", json={"candidate": order[1], "label": "unsure", "confidence": 1})
    assert given_labels(labels_dir, candidates_dir)[["candidate", "label"]].values.tolist() == [
        [order[0], "particle"], [order[1], "unsure"]]


def test_a_label_for_another_candidate_or_with_bad_values_is_not_saved(candidates_dir, labels_dir):
    client = create_app(candidates_dir, labels_dir, "ana").test_client()
    order = the_order(candidates_dir)
    # A repeated key press after the page moved on names the previous candidate: refused, nothing written.
    client.post("/api/label", json={"candidate": order[0], "label": "particle", "confidence": 4})
    again = client.post("/api/label", json={"candidate": order[0], "label": "particle", "confidence": 4})
    assert again.status_code == 409 and again.get_json()["candidate"]["id"] == order[1]
    for bad in ({"label": "maybe", "confidence": 3}, {"label": "particle", "confidence": 6}, {"label": "particle"}):
        answer = client.post("/api/label", json={"candidate": order[1], **bad})
        assert answer.status_code == 400 and answer.get_json()["message"].startswith("not saved")
    assert given_labels(labels_dir, candidates_dir)["candidate"].tolist() == [order[0]]


def test_a_restarted_page_resumes_at_the_first_unlabelled_candidate_of_the_order(candidates_dir, labels_dir):
    order = the_order(candidates_dir)
    client = create_app(candidates_dir, labels_dir, "ana").test_client()
    for candidate in order[:3]:
        client.post("/api/label", json={"candidate": candidate, "label": "particle", "confidence": 5})
    state = create_app(candidates_dir, labels_dir, "ana").test_client().get("/api/state").get_json()
    assert (state["done"], state["total"], state["candidate"]["id"]) == (3, N_CANDIDATES, order[3])
    other = create_app(candidates_dir, labels_dir, "ben").test_client().get("/api/state").get_json()
    assert (other["done"], other["candidate"]["id"]) == (0, order[0])  # labellers are independent


def test_crops_are_gray_pngs_on_a_fixed_scale_and_planes_carry_their_depth(candidates_dir, labels_dir):
    client = create_app(candidates_dir, labels_dir, "ana").test_client()
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
        create_app(candidates_dir, labels_dir, "ana")
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
        create_app(candidates_dir, labels_dir, "ana")
    with pytest.raises(ValueError, match="ana/../x"):
        create_app(candidates_dir, labels_dir, "ana/../x")


# --- the real browser -------------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_S = 20  # the longest any one step of the browser test waits


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(candidates_dir, labels_dir, port: int) -> subprocess.Popen:
    """``holopipe label`` as a user starts it; returns once the page answers."""
    holopipe = Path(sys.executable).with_name("holopipe")
    server = subprocess.Popen([str(holopipe), "label", "--split", "test", "--candidates", str(candidates_dir),
                               "--labels", str(labels_dir), "--labeller", "ana", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"holopipe label exited {server.returncode}: {server.stdout.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=2).close()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise AssertionError(f"holopipe label did not answer on port {port} within {WAIT_S} s")


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
    pytest.importorskip("selenium", reason="needs selenium: pip install -e '.[test]'")


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
        driver.get(f"http://127.0.0.1:{port}/")
        wait_progress(driver, 0)
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
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=WAIT_S)
        press(driver, "4")  # completed while the server is dead: the page says it was not saved
        wait_for(driver, lambda d: "did not answer" in page_text(d, "message"), "the page to say the server is gone")
        wait_progress(driver, 3)

        on_disk = given_labels(labels_dir, candidates_dir)
        assert on_disk[["candidate", "label", "confidence"]].values.tolist() == [
            [candidate, label, confidence] for candidate, (_, _, label, confidence) in zip(order, given)]

        server = start_server(candidates_dir, labels_dir, port)
        driver.refresh()
        wait_progress(driver, 3)
        assert shown_candidate(driver) == order[3]
        for done in range(4, N_CANDIDATES + 1):
            press(driver, "n", "2")
            wait_progress(driver, done)
        wait_for(driver, lambda d: d.find_element("id", "finished").is_displayed(), "the page to say all are done")
        assert given_labels(labels_dir, candidates_dir)["candidate"].tolist() == order
    finally:
        driver.quit()
        server.kill()
        server.wait(timeout=WAIT_S)
