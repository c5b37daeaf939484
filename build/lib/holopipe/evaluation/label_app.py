"""The labelling page (``holopipe label``): one candidate at a time, blind, on localhost.

A person labels each candidate of a split (the union of both methods' particles, written by
:func:`holopipe.evaluation.labels.write_candidates`) as a particle in focus, not a particle, or unsure, with a
confidence from 1 to 5. The page never learns which method found a candidate: the server sends only the candidate's id,
x, y, z, d and its crops. Each label is written to ``labels/<split>/<labeller>.csv`` through
:class:`holopipe.evaluation.labels.LabelFile` (an atomic rewrite) before the answer goes back, so a killed server or a
closed browser loses nothing given, and a restart resumes at the first candidate of the seeded order that this
labeller has not labelled.

Flow on the page: press a label key (``p``, ``n``, ``u``) and a confidence key (``1``-``5``), in either order;
the label is saved as soon as it has both. ``z`` or Backspace undoes the last label, the arrow keys move the
z slider, ``a`` toggles amplitude and phase. The buttons do the same.

JSON API: ``GET /api/state``; ``POST /api/label`` ``{"candidate", "label", "confidence"}``;
``POST /api/undo`` ``{}``; crops as PNG at ``/crop/<candidate>/<plane>.png?channel=amplitude|phase``.

Who gets in (issue 20): on a shared login node everyone can reach 127.0.0.1, so, as Jupyter does, each run draws
a random token and prints it once in the page's URL, ``http://127.0.0.1:PORT/?token=...``. That visit sets an
HttpOnly, SameSite=Strict cookie that the page's requests carry; see :class:`Access` for the checks.
"""

from __future__ import annotations

import functools
import hmac
import io
import ipaddress
import json
import logging
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from flask import Flask, Response, abort, jsonify, request
from PIL import Image

from holopipe.evaluation import labels

__all__ = ["GRAY_RANGES", "Access", "create_app", "crop_png", "is_loopback", "json_object", "page_names", "serve"]

log = logging.getLogger(__name__)

# Fixed gray scales (black, white) per channel, the same for every candidate, so labellers compare crops by eye:
# the standardized field's background amplitude is 1 (mid gray); a droplet in focus is dark.
GRAY_RANGES = {"amplitude": (0.0, 2.0), "phase": (-np.pi, np.pi)}


def crop_png(plane_yx: np.ndarray, channel: str) -> bytes:
    """One crop plane (y, x) as an 8-bit gray PNG on the channel's fixed scale (values outside it clip)."""
    low, high = GRAY_RANGES[channel]
    gray = np.clip((np.asarray(plane_yx, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    gray = np.nan_to_num(gray, nan=0.0)
    buffer = io.BytesIO()
    Image.fromarray(np.round(gray * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
ANY_ADDRESS = ("", "0.0.0.0", "::")
SAFE_METHODS = ("GET", "HEAD")  # they only read; every other request is a change and must come from the page
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}


def _url_host(host: str) -> str:
    """``host`` as it appears in a URL and a Host header (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it resolves to an address other machines may reach
        return False


def page_names(host: str) -> frozenset[str]:
    """The names a browser may reach a server bound to ``host`` by: the loopback names, the address itself and,
    for the any-address (0.0.0.0), this machine's names. A Host header naming anything else is a foreign name
    resolved to this machine (DNS rebinding)."""
    names = {*LOOPBACK_NAMES, _url_host(host)}
    if host in ANY_ADDRESS:
        names |= {socket.gethostname(), socket.getfqdn()}
    return frozenset(name.lower() for name in names if name)


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else None


@dataclass(frozen=True)
class Access:
    """Who the page answers: a request through one of this server's own names and port (``Host``: no DNS
    rebinding) that carries this run's token (the ``?token=`` of the printed URL on the page itself, the cookie
    after that). A change (any method but GET and HEAD) must also come from the page: its ``Origin`` (or,
    without one, its ``Referer``) is this server, and its body is ``application/json``, which no cross-site
    form can send."""

    token: str
    port: int
    names: frozenset[str]

    @property
    def hosts(self) -> frozenset[str]:
        """The Host headers of this server."""
        return frozenset(f"{name}:{self.port}" for name in self.names)

    @property
    def cookie(self) -> str:
        """The token's cookie, one per port: browsers share a host's cookies across its ports, and two labellers
        may serve side by side."""
        return f"holopipe-label-{self.port}"

    def refusal(self, request) -> tuple[int, str] | None:
        """Why ``request`` (a Flask request) is refused, as (HTTP status, message); None when it is let in."""
        host = request.headers.get("Host", "").lower()
        if host not in self.hosts:
            return 403, (f"Host {host!r} is not this server: open it as one of {', '.join(sorted(self.hosts))} "
                         "(through ssh -L, forward the same port number)")
        from_url = request.path == "/" and "token" in request.args
        given = request.args["token"] if from_url else request.cookies.get(self.cookie)
        if given is None:
            return 403, "no token: open the URL with ?token= that `holopipe label` printed when it started"
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return 403, ("wrong token (was the server restarted?): open the URL with ?token= that `holopipe label` "
                         "printed when it started")
        if request.method in SAFE_METHODS:
            return None
        sender = request.headers["Origin"] if "Origin" in request.headers else request.headers.get("Referer")
        origin = _origin_of(sender or "")
        if origin != f"http://{host}":
            return 403, (f"a change sent from {sender!r}, not from this page (http://{host}): refused"
                         if sender else "a change with neither Origin nor Referer: refused")
        if request.mimetype != "application/json":
            return 415, f"a change is sent as application/json, not {request.mimetype or 'without a type'}: refused"
        return None


def json_object(body: bytes, fields: tuple[str, ...]) -> dict:
    """``body`` as a JSON object with exactly ``fields``; a ValueError saying what is wrong (a 400, not a 500)."""
    expected = "{" + ", ".join(f'"{field}": ...' for field in fields) + "}"
    try:
        value = json.loads(body)
    except ValueError as error:  # also bytes that are not UTF-8
        raise ValueError(f"the body is not JSON ({error}); send {expected}") from None
    if not isinstance(value, dict):
        raise ValueError(f"the body is {_JSON_TYPES[type(value)]}, not a JSON object {expected}")
    missing = [field for field in fields if field not in value]
    unknown = sorted(set(value) - set(fields))
    problems = [f"missing {', '.join(missing)}"] * bool(missing) + [f"unknown {', '.join(unknown)}"] * bool(unknown)
    if problems:
        raise ValueError(f"the body must be {expected}: {'; '.join(problems)}")
    return value


class _Session:
    """The state one labeller's page works on: the candidates, their order and the label file."""

    def __init__(self, candidates_dir, labels_dir, labeller: str):
        labels.check_labeller(labeller, labels_dir)  # before it becomes a path ("a/../b" would pass as "b")
        self.candidates = labels.open_candidates(Path(candidates_dir))
        self.label_file = labels.LabelFile(Path(labels_dir) / f"{labeller}.csv", self.candidates)
        self.labeller = labeller
        self.order = labels.label_order(self.candidates)
        self.known = set(self.order)
        # The page asks for each of a candidate's planes, in both channels: read its crops from zarr once.
        self.crops = functools.lru_cache(maxsize=8)(self.candidates.crops)
        self.lock = threading.Lock()  # one change of the label file at a time (the server is threaded)

    def labelled(self) -> set[str]:
        return set(self.label_file.labels()["candidate"])

    def current(self, labelled: set[str] | None = None) -> str | None:
        """The first candidate of the order without a current label, None when all are done."""
        labelled = self.labelled() if labelled is None else labelled
        return next((candidate for candidate in self.order if candidate not in labelled), None)

    def state(self, message: str = "") -> dict:
        """What the page shows, and nothing about the methods (no unet/baseline column leaves the server)."""
        manifest, labelled = self.candidates.manifest, self.labelled()
        current = self.current(labelled)
        state = {"labeller": self.labeller, "done": len(labelled), "total": len(self.order),
                 "dx_um": manifest["dx_um"], "dy_um": manifest["dy_um"], "message": message, "candidate": None}
        if current is not None:
            row = self.candidates.table.iloc[self.candidates.row(current)]
            _, _, z_um = self.crops(current)
            state["candidate"] = {"id": current, "x_um": float(row["x"]), "y_um": float(row["y"]),
                                  "z_um": float(row["z"]), "d_um": float(row["d"]), "hid": int(row["hid"]),
                                  "plane_z_mm": [float(z) / 1000.0 for z in z_um],
                                  "focus_plane": int(manifest["focus_plane"])}
        return state


def create_app(candidates_dir, labels_dir, labeller: str, *, access: Access) -> Flask:
    """The Flask app of the page, answering only requests that ``access`` lets in. Opening fails here (ValueError
    naming the file) for a stale or bad label file, an unknown candidate in it or a bad labeller name, so the
    server never starts on them."""
    session = _Session(candidates_dir, labels_dir, labeller)
    app = Flask(__name__)

    @app.before_request
    def admit():
        refused = access.refusal(request)
        if refused is None:
            return None
        status, message = refused
        log.warning("refused %s %s: %s", request.method, request.path, message)  # the path: no query, no token
        if request.path == "/":
            return Response(message + "\n", status, mimetype="text/plain")
        return jsonify(error=message), status

    @app.get("/")
    def page():
        answer = Response(PAGE, mimetype="text/html")
        # From the printed URL on, the token rides in a cookie that scripts cannot read and other sites do not send.
        answer.set_cookie(access.cookie, access.token, httponly=True, samesite="Strict", path="/")
        return answer

    @app.get("/api/state")
    def state():
        with session.lock:
            return jsonify(session.state())

    @app.post("/api/label")
    def label():
        try:
            given = json_object(request.get_data(), ("candidate", "label", "confidence"))
        except ValueError as error:
            return jsonify(error=f"not saved: {error}"), 400
        with session.lock:
            current = session.current()
            if given["candidate"] != current:
                # A repeated key press or a second tab: never label a candidate the page is not showing.
                return jsonify(session.state(f"not saved: {given['candidate']!r} is not the current "
                                             f"candidate ({current!r})")), 409
            try:
                session.label_file.add(current, given["label"], given["confidence"])
            except ValueError as error:
                return jsonify(session.state(f"not saved: {error}")), 400
            return jsonify(session.state(f"saved {current}: {given['label']}, confidence {given['confidence']}"))

    @app.post("/api/undo")
    def undo():
        try:
            json_object(request.get_data(), ())
        except ValueError as error:
            return jsonify(error=f"nothing undone: {error}"), 400
        with session.lock:
            undone = session.label_file.undo()
            return jsonify(session.state(f"undid {undone}" if undone else "nothing to undo"))

    @app.get("/crop/<candidate>/<int:plane>.png")
    def crop(candidate: str, plane: int):
        channel = request.args.get("channel", "amplitude")
        if candidate not in session.known or channel not in GRAY_RANGES:
            abort(404)
        amplitude, phase, _ = session.crops(candidate)
        if not 0 <= plane < amplitude.shape[0]:
            abort(404)
        stack = amplitude if channel == "amplitude" else phase
        return Response(crop_png(stack[plane], channel), mimetype="image/png")

    return app


def serve(candidates_dir, labels_dir, *, labeller: str, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve the page until interrupted; logs its URL with this run's token, the one place the token is written.
    (A port in use: werkzeug says so and exits 1.)"""
    from werkzeug.serving import make_server

    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: a port is 1..65535 (the printed URL and the Host check need it)")
    access = Access(token=secrets.token_urlsafe(32), port=port, names=page_names(host))
    app = create_app(candidates_dir, labels_dir, labeller, access=access)
    server = make_server(host, port, app, threaded=True)
    # No access log: a line per crop image, and the first request's line would hold the token.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if not is_loopback(host):
        log.warning("listening on %s, beyond this machine: anyone who can reach it can try the page, and the token "
                    "travels unencrypted (plain HTTP); prefer the default --host 127.0.0.1 and, from your own "
                    "computer, ssh -L %d:localhost:%d", host, port, port)
    url_host = socket.gethostname() if host in ANY_ADDRESS else _url_host(host)
    log.info("labelling %s as %s: open http://%s:%d/?token=%s (labels go to %s; Ctrl-C stops)", candidates_dir,
             labeller, url_host, port, access.token, Path(labels_dir) / f"{labeller}.csv")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped; every label given is in %s", Path(labels_dir) / f"{labeller}.csv")
    finally:
        server.server_close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>holopipe labels</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; background: #f4f4f4; color: #222; }
 main { display: flex; gap: 2em; align-items: flex-start; }
 #view { position: relative; background: #000; }
 #crop { display: block; image-rendering: pixelated; }
 #bar { position: absolute; left: 12px; bottom: 12px; color: #fff; font-size: 13px; text-shadow: 0 0 3px #000; }
 #bar div { height: 5px; background: #fff; border: 1px solid #000; margin-top: 2px; }
 #panel { min-width: 22em; }
 #progress { font-size: 1.3em; font-weight: 600; }
 button { font-size: 1em; margin: 0.15em; padding: 0.35em 0.7em; border: 1px solid #888; border-radius: 4px;
          background: #fff; cursor: pointer; }
 button.chosen { background: #2a6fdb; color: #fff; border-color: #2a6fdb; }
 button.chosen kbd { color: #222; }
 kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 0.3em; background: #fff; font-size: 0.85em; }
 table td { padding: 0.1em 0.8em 0.1em 0; }
 #zslider { width: 100%; }
 #message { min-height: 1.4em; color: #555; }
 .help { color: #555; font-size: 0.9em; line-height: 1.5; }
</style></head>
<body>
<div id="progress">…</div>
<div id="message"></div>
<main id="work">
 <div id="view"><img id="crop" alt="crop of the reconstructed field">
  <div id="bar"><span id="barlabel"></span><div id="barline"></div></div></div>
 <div id="panel">
  <table>
   <tr><td>x</td><td id="x"></td></tr><tr><td>y</td><td id="y"></td></tr>
   <tr><td>z</td><td id="z"></td></tr><tr><td>d</td><td id="d"></td></tr>
   <tr><td>hologram</td><td id="hid"></td></tr>
  </table>
  <p>plane z = <b id="planez"></b> <span id="focusnote"></span><br>
   <input type="range" id="zslider" min="0" step="1" tabindex="-1"></p>
  <p><button id="channel" tabindex="-1">show phase <kbd>a</kbd></button></p>
  <p>Is this a particle in focus?<br>
   <button data-label="particle" tabindex="-1">particle <kbd>p</kbd></button>
   <button data-label="not_particle" tabindex="-1">not a particle <kbd>n</kbd></button>
   <button data-label="unsure" tabindex="-1">unsure <kbd>u</kbd></button></p>
  <p>Confidence<br>
   <button data-confidence="1" tabindex="-1">1</button><button data-confidence="2" tabindex="-1">2</button>
   <button data-confidence="3" tabindex="-1">3</button><button data-confidence="4" tabindex="-1">4</button>
   <button data-confidence="5" tabindex="-1">5</button></p>
  <p><button id="undo" tabindex="-1">undo <kbd>z</kbd> / <kbd>Backspace</kbd></button></p>
  <p class="help">Give a label and a confidence, in either order: the label is saved when it has both.
   <kbd>&larr;</kbd><kbd>&rarr;</kbd> (or <kbd>&darr;</kbd><kbd>&uarr;</kbd>) move through the planes;
   the candidate's own plane is marked. Every label is on disk before the next candidate shows.</p>
 </div>
</main>
<p id="finished" hidden>All candidates are labelled. Thank you! (<kbd>z</kbd> undoes the last label.)</p>
<script>
"use strict";
const DISPLAY_PX = 440, BAR_UM = [10, 20, 50, 100, 200, 500];
let state = null, plane = 0, channel = "amplitude", pending = {label: null, confidence: null}, busy = false;
const $ = (id) => document.getElementById(id);
// The token is in the cookie now: take it out of the address bar and the history.
history.replaceState(null, "", "/");

function cropUrl(p) {
  return `/crop/${encodeURIComponent(state.candidate.id)}/${p}.png?channel=${channel}`;
}
function preload() {
  state.candidate.plane_z_mm.forEach((_, p) => { new Image().src = cropUrl(p); });
}
function showPlane() {
  const c = state.candidate;
  $("crop").src = cropUrl(plane);
  $("zslider").value = plane;
  $("planez").textContent = c.plane_z_mm[plane].toFixed(3) + " mm";
  $("focusnote").textContent = plane === c.focus_plane ? "(the candidate's plane)"
      : `(${plane > c.focus_plane ? "+" : ""}${plane - c.focus_plane} from its plane)`;
}
function showChoice() {
  document.querySelectorAll("[data-label]").forEach(
      (b) => b.classList.toggle("chosen", b.dataset.label === pending.label));
  document.querySelectorAll("[data-confidence]").forEach(
      (b) => b.classList.toggle("chosen", Number(b.dataset.confidence) === pending.confidence));
}
function show(next) {
  const previous = state && state.candidate ? state.candidate.id : null;
  state = next;
  $("progress").textContent = `${state.done} / ${state.total} labelled (${state.labeller})`;
  $("message").textContent = state.message || "";
  const c = state.candidate;
  $("work").hidden = c === null;
  $("finished").hidden = c !== null;
  if (c === null) return;
  if (c.id !== previous) {
    pending = {label: null, confidence: null};
    plane = c.focus_plane;
    preload();
  }
  // The crop is square in pixels; pixels are dx by dy, so the page keeps the physical aspect (longer side DISPLAY_PX).
  const longer = Math.max(state.dx_um, state.dy_um);
  $("crop").width = Math.round(DISPLAY_PX * state.dx_um / longer);
  $("crop").height = Math.round(DISPLAY_PX * state.dy_um / longer);
  $("zslider").max = c.plane_z_mm.length - 1;
  $("hid").textContent = c.hid;
  $("x").textContent = `${c.x_um.toFixed(1)} µm`;
  $("y").textContent = `${c.y_um.toFixed(1)} µm`;
  $("z").textContent = `${(c.z_um / 1000).toFixed(3)} mm`;
  $("d").textContent = `${c.d_um.toFixed(1)} µm`;
  showPlane(); showChoice(); scaleBar();
}
function scaleBar() {
  const img = $("crop"), cropPixels = img.naturalWidth;
  if (!cropPixels) return;
  const umPerDisplayPx = cropPixels * state.dx_um / img.width;
  const um = BAR_UM.filter((u) => u / umPerDisplayPx <= img.width / 3).pop() || BAR_UM[0];
  $("barline").style.width = `${Math.round(um / umPerDisplayPx)}px`;
  $("barlabel").textContent = `${um} µm`;
}
async function call(method, url, body) {
  if (busy) return;
  busy = true;
  try {
    // A change goes as JSON, which no cross-site form can send; the token goes in the cookie.
    const response = await fetch(url, method === "GET" ? {method} : {
      method, headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const answer = response.headers.get("Content-Type") === "application/json" ? await response.json() : null;
    if (answer === null) {
      $("message").textContent = `the server failed (HTTP ${response.status}): see its log; nothing saved`;
    } else if ("error" in answer) {
      $("message").textContent = answer.error;
    } else {
      show(answer);
    }
  } catch (error) {
    $("message").textContent = `the server did not answer (${error}); every label shown as saved is on disk: `
        + "restart it and open the new URL it prints";
  } finally {
    busy = false;
  }
}
function choose(kind, value) {
  if (!state || !state.candidate) return;
  pending[kind] = value;
  showChoice();
  if (pending.label !== null && pending.confidence !== null) {
    call("POST", "/api/label", {candidate: state.candidate.id, label: pending.label,
                                confidence: pending.confidence});
  }
}
function movePlane(step) {
  if (!state || !state.candidate) return;
  plane = Math.min(Math.max(plane + step, 0), state.candidate.plane_z_mm.length - 1);
  showPlane();
}
function toggleChannel() {
  if (!state || !state.candidate) return;
  channel = channel === "amplitude" ? "phase" : "amplitude";
  $("channel").firstChild.textContent = channel === "amplitude" ? "show phase " : "show amplitude ";
  preload(); showPlane();
}
const KEYS = {p: ["label", "particle"], n: ["label", "not_particle"], u: ["label", "unsure"]};
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (KEYS[key]) choose(...KEYS[key]);
  else if ("12345".includes(key) && key.length === 1) choose("confidence", Number(key));
  else if (key === "z" || key === "Backspace") call("POST", "/api/undo", {});
  else if (key === "ArrowLeft" || key === "ArrowDown") movePlane(-1);
  else if (key === "ArrowRight" || key === "ArrowUp") movePlane(1);
  else if (key === "a") toggleChannel();
  else return;
  event.preventDefault();
});
document.querySelectorAll("[data-label]").forEach((b) => b.onclick = () => choose("label", b.dataset.label));
document.querySelectorAll("[data-confidence]").forEach(
    (b) => b.onclick = () => choose("confidence", Number(b.dataset.confidence)));
$("undo").onclick = () => call("POST", "/api/undo", {});
$("channel").onclick = toggleChannel;
$("zslider").oninput = () => { plane = Number($("zslider").value); showPlane(); };
$("crop").onload = scaleBar;
call("GET", "/api/state");
</script>
</body></html>
"""
