"""Depth refinement of ML particles on the reconstruction: finds the focus from a cluster millimetres off."""

import array_api_compat.numpy
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from helpers import (
    OPTICS,
    PAD,
    PARTICLES,
    WIDE,
    WIDE_PARTICLES,
    WIDE_PLANES,
    Z_BINS,
    contrast_hologram,
    propagator_of,
    scene_config,
    scene_dict,
)

import holopipe.detect.particles
from holopipe.core.config import load_config
from holopipe.core.device import GPUNotFoundError
from holopipe.core.io import write_zarr
from holopipe.core.provenance import code_identity
from holopipe.detect.particles import (
    PARTICLE_COLUMNS,
    cluster_detections,
    focus_windows,
    merge_detections,
    merge_duplicates,
    particles_file,
    refine_depths,
    suppress_ghosts,
    without_cut_ghosts,
    without_stationary,
)
from holopipe.optics.focus import gradient_magnitude, smoothed_amplitude
from holopipe.optics.propagation import Propagator, hologram_field
from holopipe.optics.reconstruction import z_bin_centres
from holopipe.optics.simulate import ParticleSet

# One large droplet (45 µm: depth of focus D²/λ ≈ 5.7 mm), where the darkest plane is not sharp.
DROPLET = ParticleSet(x=np.array([12e-6]), y=np.array([-20e-6]), z=np.array([5.1e-3]), d=np.array([45e-6]))
PLANES = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)
BIN = PLANES[1] - PLANES[0]


def make_config(**particles):
    return scene_config(particles=particles)


def ml_cluster(x_um, y_um, planes_um, *, focus_um, d_um=45.0, hid=1) -> pd.DataFrame:
    """Detections as a saturated model leaves them: one per plane at (x, y), darkest at ``focus_um``."""
    z = np.asarray(planes_um, np.float64)
    return pd.DataFrame({
        "hid": hid, "plane": np.arange(z.size), "x": x_um, "y": y_um, "z": z, "d": d_um, "area": 180.0,
        "prob_max": 1.0, "prob_mean": 1.0, "logit_mean": 12.0,
        "amplitude_min": 0.1 + 0.001 * np.abs(z - focus_um) / (BIN * 1e6)})


@pytest.fixture(scope="module")
def hologram():
    return contrast_hologram(DROPLET)


@pytest.fixture(scope="module")
def propagator(hologram):
    return propagator_of(hologram)


@pytest.fixture(scope="module")
def store(tmp_path_factory, hologram):
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), hologram.T[None]),
         **{name: ("particle", (getattr(DROPLET, name) * (1 if name == "hid" else 1e6)).astype(np.float32))
            for name in ("x", "y", "z", "d")}, "hid": ("particle", np.ones(1, np.float32))},
        attrs={"Nx": OPTICS.nx, "Ny": OPTICS.ny, "dx": OPTICS.dx, "dy": OPTICS.dy, "lambda": OPTICS.wavelength,
               "zMin": OPTICS.z_min, "zMax": OPTICS.z_max},
    )
    return write_zarr(ds, tmp_path_factory.mktemp("particles") / "test.zarr")


def truth_um():
    return DROPLET.x[0] * 1e6, DROPLET.y[0] * 1e6, DROPLET.z[0] * 1e6


@pytest.mark.parametrize("metric", ["tamura", "min_amplitude"])
@pytest.mark.parametrize("offset", [1.2e-3, 2.0e-3])
def test_refinement_finds_the_focus_of_a_cluster_millimetres_off(propagator, metric, offset):
    x, y, z = truth_um()
    # The model fired from 0.5 mm before the focus to `offset` + 0.5 mm behind it and the darkest
    # detection is `offset` off (the failure seen on large droplets).
    cluster_planes = PLANES[(PLANES >= DROPLET.z[0] - 0.5e-3) & (PLANES <= DROPLET.z[0] + offset + 0.5e-3)] * 1e6
    detections = ml_cluster(x, y, cluster_planes, focus_um=z + offset * 1e6)
    clusters = cluster_detections(detections, make_config())
    assert len(clusters) == 1 and abs(clusters["z"].iloc[0] - z) >= offset * 1e6 - BIN * 1e6
    settings = make_config(refine=metric)["particles"]
    refined = refine_depths(propagator, PLANES, clusters[["x", "y", "d", "z_first", "z_last"]] * 1e-6, settings,
                            dx=OPTICS.dx, dy=OPTICS.dy).iloc[0]
    if metric == "tamura":
        assert abs(refined["z"] - DROPLET.z[0]) <= BIN
        # Measured on the focus plane: the centre within a pixel, the diameter within two.
        assert abs(refined["x"] - DROPLET.x[0]) <= OPTICS.dx and abs(refined["y"] - DROPLET.y[0]) <= OPTICS.dy
        assert abs(refined["d"] - DROPLET.d[0]) <= 2 * OPTICS.dx
    else:  # the darkest window is a blunter peak for a large droplet, yet nearer than the darkest detection
        assert abs(refined["z"] - DROPLET.z[0]) <= 0.5 * offset


def test_margin_reaches_a_focus_outside_the_fired_planes(propagator):
    x, y, z = truth_um()
    # Every detection is 1-2 mm behind the focus: only the margin brings the true plane into the search.
    planes_um = PLANES[(PLANES >= DROPLET.z[0] + 1e-3) & (PLANES <= DROPLET.z[0] + 2e-3)] * 1e6
    clusters = cluster_detections(ml_cluster(x, y, planes_um, focus_um=planes_um[-1]), make_config())
    extent = clusters[["x", "y", "d", "z_first", "z_last"]] * 1e-6
    near = refine_depths(propagator, PLANES, extent, make_config(refine_margin=0.0)["particles"],
                         dx=OPTICS.dx, dy=OPTICS.dy)["z"].iloc[0]
    far = refine_depths(propagator, PLANES, extent, make_config(refine_margin=1.5e-3)["particles"],
                        dx=OPTICS.dx, dy=OPTICS.dy)["z"].iloc[0]
    assert near >= DROPLET.z[0] + 1e-3 - BIN, "without a margin the search stays on the fired planes"
    assert abs(far - DROPLET.z[0]) <= BIN


def test_refinement_does_not_depend_on_the_plane_batch(propagator):
    x, y, z = truth_um()
    detections = pd.concat([
        ml_cluster(x, y, PLANES[20:40] * 1e6, focus_um=PLANES[35] * 1e6),
        ml_cluster(-150.0, 170.0, PLANES[5:12] * 1e6, focus_um=PLANES[5] * 1e6, d_um=20.0)])  # corner
    clusters = cluster_detections(detections, make_config())
    extent = clusters[["x", "y", "d", "z_first", "z_last"]] * 1e-6
    settings = make_config(refine_interpolate=True)["particles"]
    results = [refine_depths(propagator, PLANES, extent, settings, dx=OPTICS.dx, dy=OPTICS.dy, batch_planes=b)
               for b in (None, 1, 7)]
    pd.testing.assert_frame_equal(results[0], results[1])
    pd.testing.assert_frame_equal(results[0], results[2])


def test_refinement_on_torch_arrays_matches_numpy(hologram, propagator):
    """The GPU path (a torch field, windows copied to the host) run on CPU tensors gives the numpy result."""
    x, y, z = truth_um()
    detections = ml_cluster(x, y, PLANES[20:40] * 1e6, focus_um=PLANES[35] * 1e6)
    extent = cluster_detections(detections, make_config())[["x", "y", "d", "z_first", "z_last"]] * 1e-6
    settings = make_config()["particles"]
    on_torch = Propagator(hologram_field(torch.from_numpy(hologram), background=1.0), wavelength=OPTICS.wavelength,
                          dx=OPTICS.dx, dy=OPTICS.dy, pad=PAD, band_limit=True)
    expected = refine_depths(propagator, PLANES, extent, settings, dx=OPTICS.dx, dy=OPTICS.dy)
    found = refine_depths(on_torch, PLANES, extent, settings, dx=OPTICS.dx, dy=OPTICS.dy)
    assert abs(found["z"].iloc[0] - z * 1e-6) <= BIN
    pd.testing.assert_frame_equal(found, expected, rtol=1e-3)
    with pytest.raises(ValueError, match="metric 'variance'"):
        refine_depths(propagator, PLANES, extent, {**settings, "refine": "variance"}, dx=OPTICS.dx, dy=OPTICS.dy)


def test_refinement_on_a_missing_gpu_is_an_error(store, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    x, y, z = truth_um()
    ml_cluster(x, y, PLANES[20:40] * 1e6, focus_um=PLANES[35] * 1e6).to_csv(tmp_path / "chunk.csv", index=False)
    with pytest.raises(GPUNotFoundError, match="particles.device is 'cuda' but .* finds no usable GPU|particles.device "
                       "is 'cuda' but this torch .* is a CPU-only build"):
        particles_file([tmp_path / "chunk.csv"], tmp_path / "p.csv", make_config(device="cuda"), store_path=store,
                       progress=False)
    assert not (tmp_path / "p.csv").exists()


def test_a_cluster_at_the_frame_edge_gets_a_clipped_window_and_a_depth(propagator):
    half_frame_um = 0.5 * OPTICS.nx * OPTICS.dx * 1e6
    corner = ml_cluster(half_frame_um - 1.0, -half_frame_um + 1.0, PLANES[:6] * 1e6, focus_um=PLANES[0] * 1e6)
    clusters = cluster_detections(corner, make_config())
    extent = clusters[["x", "y", "d", "z_first", "z_last"]] * 1e-6
    row0, row1, col0, col1 = focus_windows(extent["x"], extent["y"], extent["d"], (OPTICS.ny, OPTICS.nx),
                                           dx=OPTICS.dx, dy=OPTICS.dy, diameters=2.0)
    assert (row0[0], col1[0]) == (0, OPTICS.nx) and row1[0] > 4 and col0[0] < OPTICS.nx - 4
    for metric in ("tamura", "min_amplitude"):
        refined = refine_depths(propagator, PLANES, extent, make_config(refine=metric)["particles"], dx=OPTICS.dx,
                                dy=OPTICS.dy)
        assert (PLANES[0] <= refined["z"].iloc[0] <= PLANES[-1]
                and np.isfinite(refined[["z", "focus", "x", "y", "d"]].to_numpy()).all())


def test_windows_are_diameters_wide_and_centred_on_the_particle_pixel():
    row0, row1, col0, col1 = focus_windows(np.array([0.0]), np.array([0.0]), np.array([30 * OPTICS.dx]), (64, 64),
                                           dx=OPTICS.dx, dy=OPTICS.dy, diameters=2.0)
    # Pixel 31 and 32 straddle the centre; the window is 2 x 30 pixels + the centre pixel.
    assert (row1 - row0)[0] == (col1 - col0)[0] == 61 and row0[0] in (1, 2)
    tiny = focus_windows(np.array([0.0]), np.array([0.0]), np.array([1e-6]), (64, 64), dx=OPTICS.dx,
                         dy=OPTICS.dy, diameters=2.0)
    assert tiny[1][0] - tiny[0][0] == 9, "never below MIN_WINDOW_PIXELS"


def reference_refinement(propagator, extent: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """z (m) and peak focus of each particle by the plain loop: every particle, every plane of its range,
    the whole plane's metric cut to its window (what the batched refinement must reproduce)."""
    first = np.searchsorted(PLANES, extent["z_first"].to_numpy() - settings["refine_margin"] - 1e-9)
    last = np.searchsorted(PLANES, extent["z_last"].to_numpy() + settings["refine_margin"] + 1e-9, "right") - 1
    first, last = np.clip(first, 0, PLANES.size - 1), np.clip(last, first, PLANES.size - 1)
    windows = focus_windows(extent["x"], extent["y"], extent["d"], propagator.shape, dx=OPTICS.dx, dy=OPTICS.dy,
                            diameters=settings["refine_window"])
    rows = []
    for k in range(len(extent)):
        r0, r1, c0, c1 = (int(bound[k]) for bound in windows)
        scores = []
        for plane in range(first[k], last[k] + 1):
            amplitude = np.asarray(propagator.reconstruct(PLANES[plane:plane + 1]).amplitude, np.float64)[0]
            if settings["refine"] == "tamura":
                gradient = gradient_magnitude(amplitude)[r0:r1, c0:c1]
                scores.append(np.sqrt(gradient.std() / gradient.mean()))
            else:
                scores.append(-smoothed_amplitude(amplitude)[r0:r1, c0:c1].min())
        best = int(np.argmax(scores))
        rows.append((PLANES[first[k] + best], scores[best]))
    return pd.DataFrame(rows, columns=["z", "focus"], index=extent.index)


@pytest.mark.parametrize("metric", ["tamura", "min_amplitude"])
def test_batched_refinement_gives_the_per_particle_references_depths(metric):
    # Four particles of different sizes and ranges (one at the frame's corner) refined at once.
    propagator = propagator_of(contrast_hologram(PARTICLES))
    extent = pd.DataFrame({"x": [*PARTICLES.x, 180e-6], "y": [*PARTICLES.y, -185e-6], "d": [*PARTICLES.d, 12e-6],
                           "z_first": [3e-3, 5e-3, 8e-3, 2e-3], "z_last": [4e-3, 7e-3, 9e-3, 10e-3]})
    settings = make_config(refine=metric, refine_margin=0.0, refine_interpolate=False)["particles"]
    expected = reference_refinement(propagator, extent, settings)
    for batch_planes in (1, 7):
        found = refine_depths(propagator, PLANES, extent, settings, dx=OPTICS.dx, dy=OPTICS.dy,
                              batch_planes=batch_planes)
        np.testing.assert_array_equal(found["z"], expected["z"])
        np.testing.assert_allclose(found["focus"], expected["focus"], rtol=1e-5)
    # The planted droplets' depths (the darkest window is the blunter peak).
    np.testing.assert_allclose(expected["z"][:3], PARTICLES.z, atol=BIN if metric == "tamura" else 3 * BIN)


class ParabolaPropagator:
    """A stand-in Propagator (what the sweeps use of one) whose amplitude is uniform per plane, 0.2 + (z - z0)²
    / mm² at the reconstruction depth z: min_amplitude peaks at z0."""

    shape, pad, xp, spectrum = (32, 32), (0, 0), array_api_compat.numpy, np.zeros(0)

    def __init__(self, z0):
        self.z0 = z0

    def planes_per_batch(self):
        return 16

    def amplitude(self, z):
        level = 0.2 + ((np.asarray(z) - self.z0) / 1e-3) ** 2
        return np.broadcast_to(level[:, None, None], (level.size, 32, 32)).copy()


def test_interpolation_places_the_vertex_between_planes():
    z0 = PLANES[30] + 0.3 * BIN
    extent = pd.DataFrame({"x": [0.0], "y": [0.0], "d": [20e-6], "z_first": [PLANES[25]], "z_last": [PLANES[35]]})
    settings = make_config(refine="min_amplitude")["particles"]
    on_plane = refine_depths(ParabolaPropagator(z0), PLANES, extent, {**settings, "refine_interpolate": False},
                             dx=OPTICS.dx, dy=OPTICS.dy)["z"].iloc[0]
    between = refine_depths(ParabolaPropagator(z0), PLANES, extent, {**settings, "refine_interpolate": True},
                            dx=OPTICS.dx, dy=OPTICS.dy)["z"].iloc[0]
    assert on_plane == PLANES[30]
    assert between == pytest.approx(z0, abs=1e-9)


def test_none_keeps_the_merged_particles_and_needs_no_store(tmp_path):
    x, y, z = truth_um()
    detections = ml_cluster(x, y, PLANES[10:30] * 1e6, focus_um=PLANES[25] * 1e6)
    detections.to_csv(tmp_path / "chunk.csv", index=False)
    config = make_config(refine="none")
    written = pd.read_csv(particles_file([tmp_path / "chunk.csv"], tmp_path / "p.csv", config))
    pd.testing.assert_frame_equal(written, merge_detections(detections, config), check_dtype=False)
    assert written["z"].iloc[0] == pytest.approx(PLANES[25] * 1e6)
    with pytest.raises(ValueError, match="--store"):
        particles_file([tmp_path / "chunk.csv"], tmp_path / "q.csv", make_config())
    assert not (tmp_path / "q.csv").exists()


def test_a_cluster_beside_the_droplet_on_its_faint_rings_leaves_no_particle(store, tmp_path):
    x, y, z = truth_um()
    # The droplet's own column and a ghost cluster 35 µm beside it near the sensor: refined, the ghost finds
    # only the droplet's faint rings in its own disk (contrast 0.17), the droplet is dark (0.75).
    detections = pd.concat([
        ml_cluster(x, y, PLANES[(PLANES > 4.5e-3) & (PLANES < 7e-3)] * 1e6, focus_um=6.5e3),
        ml_cluster(x + 35.0, y, PLANES[:4] * 1e6, focus_um=PLANES[0] * 1e6, d_um=20.0)], ignore_index=True)
    detections.to_csv(tmp_path / "chunk.csv", index=False)
    assert len(cluster_detections(detections, make_config())) == 2
    found = pd.read_csv(particles_file([tmp_path / "chunk.csv"], tmp_path / "p.csv", make_config(),
                                       store_path=store, progress=False))
    assert len(found) == 1
    assert abs(found["z"].iloc[0] - z) <= BIN * 1e6 and abs(found["x"].iloc[0] - x) <= OPTICS.dx * 1e6
    kept = pd.read_csv(particles_file([tmp_path / "chunk.csv"], tmp_path / "q.csv",
                                      make_config(min_disk_contrast=0.0, ghost_depths_of_focus=0.0),
                                      store_path=store, progress=False))
    assert len(kept) == 2, "without the disk's contrast the ring is a particle"


def column(x_um, y_um, planes_m, d_um, darkness) -> pd.DataFrame:
    """Detections of one column on ``planes_m`` with a darkness 1 - amplitude_min profile ``darkness(z_m)``."""
    return pd.DataFrame({"hid": 1, "plane": np.searchsorted(WIDE_PLANES, planes_m - 1e-9), "x": x_um, "y": y_um,
                         "z": planes_m * 1e6, "d": d_um, "area": 50.0, "prob_max": 1.0, "prob_mean": 1.0,
                         "logit_mean": 5.0, "amplitude_min": 1.0 - darkness(planes_m)})


def test_a_small_droplet_beside_a_large_one_is_measured_where_it_is():
    """A 14 µm droplet whose disk is 9 µm from a 60 µm droplet's (non-square frame, dy != dx): refined, it
    keeps its own depth, centre and size, not the larger, darker shadow that shares its window."""
    scene = ParticleSet(x=np.array([0.0, 46e-6]), y=np.array([0.0, 0.0]), z=np.array([6.0e-3, 7.5e-3]),
                        d=np.array([60e-6, 14e-6]))
    propagator = propagator_of(contrast_hologram(scene, WIDE), WIDE)
    dips = lambda focus_m: lambda z: 0.7 - 100 * np.abs(z - focus_m)  # noqa: E731
    detections = pd.concat([column(0.0, 0.0, WIDE_PLANES[(WIDE_PLANES > 3e-3) & (WIDE_PLANES < 9e-3)], 60.0,
                                   dips(6e-3)),
                            column(46.0, 0.0, WIDE_PLANES[(WIDE_PLANES > 6.9e-3) & (WIDE_PLANES < 8.1e-3)], 14.0,
                                   dips(7.5e-3))], ignore_index=True)
    config = load_config(scene_dict(WIDE, particles={"refine_margin": 1e-3}))
    clusters = cluster_detections(detections, config)
    assert len(clusters) == 2, "disks 9 µm apart do not link"
    extent = clusters[["x", "y", "d_max", "z_first", "z_last"]].rename(columns={"d_max": "d"}) * 1e-6
    small = refine_depths(propagator, WIDE_PLANES, extent, config["particles"], dx=WIDE.dx, dy=WIDE.dy).iloc[1]
    assert abs(small["z"] - 7.5e-3) <= WIDE_PLANES[1] - WIDE_PLANES[0]
    assert abs(small["x"] - 46e-6) <= WIDE.dx and abs(small["y"]) <= WIDE.dy
    assert small["d"] < 25e-6, "the disk is the small droplet's, not its neighbour's shadow"


def test_linking_does_not_chain_droplets_into_one_particle():
    """Two 15 µm droplets 30 µm apart over the same depths stay two (single linkage at 50 µm chained them),
    and two droplets on one line of sight, one column whose darkness peaks at 3.5 and at 7.5 mm, are cut
    between the peaks: two particles, each sought between its cut and the column's end."""
    planes = WIDE_PLANES[(WIDE_PLANES > 2.5e-3) & (WIDE_PLANES < 8.5e-3)]
    flat = lambda z: np.full(z.shape, 0.6)  # noqa: E731
    beside = pd.concat([column(0.0, 0.0, planes, 15.0, flat), column(30.0, 0.0, planes, 15.0, flat)],
                       ignore_index=True)
    assert len(merge_detections(beside, scene_config())) == 2
    two_peaks = lambda z: 0.2 + 0.6 * np.maximum(np.exp(-((z - 3.5e-3) / 8e-4) ** 2),  # noqa: E731
                                                 np.exp(-((z - 7.5e-3) / 8e-4) ** 2))
    line = pd.concat([column(0.0, 0.0, planes, 30.0, two_peaks), column(3.0, 1.0, planes, 30.0, two_peaks)],
                     ignore_index=True)
    clusters = cluster_detections(line, scene_config())
    assert len(clusters) == 2 and clusters["line"].nunique() == 1
    assert clusters["z"].round(-2).tolist() == [3500.0, 7500.0]
    cut = clusters["z_high"].iloc[0]
    assert 4500.0 < cut < 6500.0 and clusters["z_low"].iloc[1] == cut
    assert clusters["z_low"].iloc[0] == -np.inf and clusters["z_high"].iloc[1] == np.inf
    assert len(cluster_detections(line, scene_config(particles={"split_prominence": 1.0}))) == 1


def test_a_part_that_peaks_on_its_cut_is_its_neighbours_droplet():
    parts = pd.DataFrame({"line": [0, 0, 2, 3, 3], "focus": [1.0, 2.0, 1.0, 3.0, 1.0],
                          "at_cut": [False, True, True, True, True]})
    assert without_cut_ghosts(parts).index.tolist() == [0, 2, 3]


def test_merge_duplicates_keeps_the_whole_disk_of_coincident_particles():
    """A 53 µm droplet and an 18 µm fragment of it 20 µm off its centre at its depth (the model marked it in
    parts) are one particle, the whole disk; two 30 µm disks 10 µm apart are one, the surer kept; a droplet
    beside them (disks apart), one 1 mm behind (beyond link_depth) and one in another hologram stay."""
    settings = make_config()["particles"]
    particles = pd.DataFrame({"hid": [1, 1, 1, 1, 1, 1, 2], "x": [0.0, 20.0, 300.0, 310.0, 300.0, 60.0, 0.0],
                              "y": 0.0, "z": [5000.0, 5020.0, 5000.0, 5100.0, 6000.0, 5000.0, 5000.0],
                              "d": [53.0, 18.0, 30.0, 30.0, 30.0, 12.0, 30.0],
                              "prob": [0.9, 1.0, 0.8, 1.0, 1.0, 1.0, 0.5], "focus": 1.0})
    merged = merge_duplicates(particles, settings).sort_index()
    assert merged.index.tolist() == [0, 3, 4, 5, 6]


def test_particles_file_refines_on_the_store(store, tmp_path):
    x, y, z = truth_um()
    detections = ml_cluster(x, y, PLANES[(PLANES > 5.6e-3) & (PLANES < 8e-3)] * 1e6, focus_um=7.5e3)
    detections.to_csv(tmp_path / "chunk.csv", index=False)
    found = pd.read_csv(particles_file([tmp_path / "chunk.csv"], tmp_path / "p.csv", make_config(),
                                       store_path=store, progress=False))
    assert list(found.columns) == list(PARTICLE_COLUMNS) and len(found) == 1
    assert abs(found["z"].iloc[0] - z) <= BIN * 1e6
    assert abs(found["x"].iloc[0] - x) <= OPTICS.dx * 1e6 and abs(found["y"].iloc[0] - y) <= OPTICS.dy * 1e6


def test_a_rerun_refines_only_the_holograms_a_killed_run_left(tmp_path, hologram, monkeypatch):
    """Each hologram's refinement is kept as it finishes: a run that dies on hologram 2 leaves hologram 1,
    and the rerun refines hologram 2 only and writes what an uninterrupted run writes."""
    path = write_zarr(xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), np.stack([hologram.T, np.roll(hologram.T, 6, axis=0)])),
         **{name: ("particle", np.zeros(0, np.float32)) for name in ("hid", "x", "y", "z", "d")}},
        attrs={"Nx": OPTICS.nx, "Ny": OPTICS.ny, "dx": OPTICS.dx, "dy": OPTICS.dy, "lambda": OPTICS.wavelength,
               "zMin": OPTICS.z_min, "zMax": OPTICS.z_max}), tmp_path / "two.zarr")
    x, y, z = truth_um()
    shifted = x + 6 * OPTICS.dx * 1e6
    pd.concat([ml_cluster(x, y, PLANES[20:40] * 1e6, focus_um=PLANES[35] * 1e6),
               ml_cluster(shifted, y, PLANES[20:40] * 1e6, focus_um=PLANES[35] * 1e6, hid=2)]).to_csv(
        tmp_path / "chunk.csv", index=False)
    original, calls = holopipe.detect.particles.refine_depths, []

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(holopipe.detect.particles, "refine_depths", dies_on_the_second)
    out = tmp_path / "p.csv"
    with pytest.raises(KeyboardInterrupt):
        particles_file([tmp_path / "chunk.csv"], out, make_config(), store_path=path, progress=False)
    assert not out.exists() and len(list(out.with_name("p.csv.parts").glob("hologram_*.csv"))) == 1
    calls.clear()
    monkeypatch.setattr(holopipe.detect.particles, "refine_depths",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = pd.read_csv(particles_file([tmp_path / "chunk.csv"], out, make_config(), store_path=path,
                                         progress=False))
    assert len(calls) == 1, "hologram 1 is read from its part"
    monkeypatch.undo()
    whole = pd.read_csv(particles_file([tmp_path / "chunk.csv"], tmp_path / "whole.csv", make_config(),
                                       store_path=path, progress=False))
    assert len(whole) == 2 and abs(whole["x"].iloc[1] - whole["x"].iloc[0]) == pytest.approx(6 * OPTICS.dx * 1e6, abs=1)
    pd.testing.assert_frame_equal(resumed, whole)

    # Killed again, then a `git pull` (another source digest): hologram 1 of the old code is refined afresh.
    calls.clear()
    monkeypatch.setattr(holopipe.detect.particles, "refine_depths", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        particles_file([tmp_path / "chunk.csv"], out, make_config(), store_path=path, progress=False)
    calls.clear()
    pulled = {**code_identity(), "source_sha256": "pulled"}
    monkeypatch.setattr(holopipe.detect.particles, "code_identity", lambda: pulled)
    monkeypatch.setattr(holopipe.detect.particles, "refine_depths",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    particles_file([tmp_path / "chunk.csv"], out, make_config(), store_path=path, progress=False)
    assert len(calls) == 2, "both holograms refined by the new code"


def test_ghost_removal_keeps_the_best_ranked_and_drops_dim_spots_near_it_only():
    """A 60 µm droplet in focus (contrast 0.95) with two dim ghosts of its rings: 40 µm off its axis 5 mm
    behind (within 2 depths of focus, 2 x 10.1 mm, and 1.5 diameters) and 100 µm off (beyond 1.5 D);
    and a 20 µm droplet 30 µm from the big one's axis but 25 mm away (beyond the big one's 2 D²/λ, 20 mm)."""
    wavelength = 3.55e-7
    particles = pd.DataFrame({
        "x": [0.0, 40e-6, 100e-6, 30e-6], "y": [0.0, 0.0, 0.0, 0.0], "z": [20e-3, 25e-3, 21e-3, 45e-3],
        "d": [60e-6, 8e-6, 8e-6, 20e-6], "score": [0.95, 0.55, 0.55, 0.9]})
    kept = suppress_ghosts(particles, "score", wavelength, 2.0, 3.0)
    assert kept.index.tolist() == [0, 2, 3]
    assert suppress_ghosts(particles, "score", wavelength, 0.0, 3.0).index.tolist() == [0, 1, 2, 3]
    # Order is by darkness: the ghost listed first is still the one dropped.
    flipped = particles.iloc[::-1]
    assert sorted(suppress_ghosts(flipped, "score", wavelength, 2.0, 3.0).index.tolist()) == [0, 2, 3]
    # A reach of a quarter depth of focus (2.5 mm) keeps the ghost 5 mm behind.
    assert suppress_ghosts(particles, "score", wavelength, 0.25, 3.0).index.tolist() == [0, 1, 2, 3]


def test_ghost_removal_keeps_a_small_droplet_beside_a_large_one():
    """A 12 µm droplet touching a 60 µm one (centres 36 µm apart) survives ghost_diameters 1.2 (< 1 + 2 d/D);
    a 20 µm spot 10 µm off the large one's axis, inside its shadow, does not."""
    particles = pd.DataFrame({"x": [0.0, 36e-6, 10e-6], "y": 0.0, "z": [20e-3, 20.5e-3, 22e-3],
                              "d": [60e-6, 12e-6, 20e-6], "score": [0.95, 0.6, 0.5]})
    assert suppress_ghosts(particles, "score", 3.55e-7, 2.0, 1.2).index.tolist() == [0, 1]
    assert suppress_ghosts(particles, "score", 3.55e-7, 2.0, 1.5).index.tolist() == [0]


# refine_depths on the WIDE scene (176 x 112 pixels, dy != dx) before its batches were sized for the device and
# its windows' indices packed into one upload (commit 5457341), µm; WIDE_EXTENT's last two are a corner droplet
# and a search box holding no droplet, whose x, y, d changed when a disk was measured from the detection's centre
# (and the frame-cut window widened by 10 µm, not 50).
WIDE_EXTENT = pd.DataFrame({"x": [*WIDE_PARTICLES.x, 300e-6, -20e-6], "y": [*WIDE_PARTICLES.y, -190e-6, 10e-6],
                            "d": [*WIDE_PARTICLES.d, 12e-6, 60e-6], "z_first": [3e-3, 6e-3, 2e-3, 5e-3],
                            "z_last": [5e-3, 8e-3, 10e-3, 6e-3]})
WIDE_BEFORE = {
    "tamura": {"z": [3959.81331, 7465.19275, 5388.78152, 7899.27498],
               "focus": [1.17429186, 1.17746323, 0.798959744, 0.954316855],
               "x": [-169.589206, 149.282667, 253.08, 8.40909091],
               "y": [99.9142857, -44.96, -197.307692, 15.0136364],
               "d": [29.236302, 34.9440646, 13.2807879, 34.5536159]},
    "min_amplitude": {"z": [3997.59704, 7600.68185, 9933.33333, 9933.33333],
                      "focus": [-0.193429861, -0.147429767, -0.978375607, -0.933480477],
                      "x": [-169.589206, 151.580645, 245.566154, -41.555461],
                      "y": [99.9142857, -45.9677419, -181.338462, 30.0638298],
                      "d": [29.236302, 35.5216916, 23.0029994, 43.7382821]},
}


@pytest.fixture(scope="module")
def wide_propagator():
    return propagator_of(contrast_hologram(WIDE_PARTICLES, WIDE), WIDE)


@pytest.mark.parametrize("metric", ["tamura", "min_amplitude"])
def test_refinement_on_a_non_square_frame_finds_what_it_found_before(wide_propagator, metric):
    settings = load_config(scene_dict(WIDE, particles={"refine": metric, "refine_interpolate": True}))["particles"]
    expected = pd.DataFrame(WIDE_BEFORE[metric])
    for batch_planes in (None, 1, 7):
        found = refine_depths(wide_propagator, WIDE_PLANES, WIDE_EXTENT, settings, dx=WIDE.dx, dy=WIDE.dy,
                              batch_planes=batch_planes)
        found = found.assign(**{c: found[c] * 1e6 for c in "xyzd"})[expected.columns]
        pd.testing.assert_frame_equal(found, expected, check_exact=False, rtol=1e-6)


@pytest.mark.gpu
def test_refinement_on_a_gpu_matches_numpy(hologram, propagator):
    x, y, z = truth_um()
    detections = ml_cluster(x, y, PLANES[20:40] * 1e6, focus_um=PLANES[35] * 1e6)
    extent = cluster_detections(detections, make_config())[["x", "y", "d", "z_first", "z_last"]] * 1e-6
    settings = make_config()["particles"]
    on_cuda = Propagator(hologram_field(torch.from_numpy(hologram).cuda(), background=1.0),
                         wavelength=OPTICS.wavelength, dx=OPTICS.dx, dy=OPTICS.dy, pad=PAD, band_limit=True)
    expected = refine_depths(propagator, PLANES, extent, settings, dx=OPTICS.dx, dy=OPTICS.dy)
    found = refine_depths(on_cuda, PLANES, extent, settings, dx=OPTICS.dx, dy=OPTICS.dy)
    pd.testing.assert_frame_equal(found, expected, rtol=1e-3)


def test_a_droplet_just_outside_the_volume_is_not_reported_on_its_last_plane(tmp_path):
    """Two 30 µm droplets, one 0.5 mm beyond z_max and one 0.15 mm inside it, both marked on the last planes:
    searching 5 planes beyond the volume, the outside one focuses out there and is dropped, the inside one
    is kept at its depth; searching the volume only, both are reported (the outside one on the last plane)."""
    scene = ParticleSet(x=np.array([-100e-6, 90e-6]), y=np.array([-60e-6, 70e-6]),
                        z=np.array([OPTICS.z_max + 0.5e-3, OPTICS.z_max - 0.15e-3]), d=np.array([30e-6, 30e-6]))
    ds = xr.Dataset({"image": (("hologram_number", "xsize", "ysize"), contrast_hologram(scene).T[None]),
                     **{name: ("particle", np.float32(getattr(scene, name)[1:] * 1e6)) for name in "xyzd"},
                     "hid": ("particle", np.ones(1, np.float32))},
                    attrs={"Nx": OPTICS.nx, "Ny": OPTICS.ny, "dx": OPTICS.dx, "dy": OPTICS.dy,
                           "lambda": OPTICS.wavelength, "zMin": OPTICS.z_min, "zMax": OPTICS.z_max})
    store = write_zarr(ds, tmp_path / "edge.zarr")
    last = PLANES[-8:] * 1e6
    pd.concat([ml_cluster(x * 1e6, y * 1e6, last, focus_um=last[-1], d_um=30.0) for x, y in zip(scene.x, scene.y)],
              ignore_index=True).to_csv(tmp_path / "chunk.csv", index=False)
    found = pd.read_csv(particles_file([tmp_path / "chunk.csv"], tmp_path / "p.csv", make_config(beyond_planes=5),
                                       store_path=store, progress=False))
    assert len(found) == 1 and found["x"].iloc[0] == pytest.approx(90.0, abs=OPTICS.dx * 1e6)
    assert found["z"].iloc[0] == pytest.approx(scene.z[1] * 1e6, abs=BIN * 1e6)
    both = pd.read_csv(particles_file([tmp_path / "chunk.csv"], tmp_path / "q.csv", make_config(beyond_planes=0),
                                      store_path=store, progress=False))
    assert len(both) == 2 and both["z"].max() <= PLANES[-1] * 1e6 + 1e-6


def test_what_stays_at_one_place_across_a_splits_holograms_is_dropped():
    """A 30 µm speck in 4 of 6 holograms (its centre jittering by 3 µm), droplets that happen to share a place
    in 2 holograms, and a speck in 4 of 10 holograms (below half): only the first goes."""
    speck = pd.DataFrame({"hid": [1, 2, 3, 5], "x": [100.0, 102.0, 99.0, 101.0], "y": [50.0, 51.0, 48.0, 50.0],
                          "z": 2000.0, "d": 30.0})
    droplets = pd.DataFrame({"hid": [1, 2, 4, 6], "x": [-80.0, -82.0, 10.0, 300.0], "y": [0.0, 1.0, 5.0, 5.0],
                             "z": [3000.0, 9000.0, 5000.0, 5000.0], "d": 20.0})
    split = pd.concat([speck, droplets], ignore_index=True)
    assert without_stationary(split, 6, 0.5).index.tolist() == [4, 5, 6, 7]
    assert len(without_stationary(split, 10, 0.5)) == 8, "4 of 10 is below half"
    assert len(without_stationary(split, 6, None)) == 8
    assert len(without_stationary(speck.iloc[:2], 2, 0.5)) == 2, "two holograms cannot tell"


def test_a_speck_counts_where_it_was_dropped_so_the_one_kept_inside_the_volume_goes_too():
    """Dust at the volume's edge focuses just outside it in 5 of 6 holograms: those candidates are dropped,
    but they still make the place stationary, so the one that focused inside goes too, with a false
    particle on its column 8 mm deeper; a droplet elsewhere stays."""
    candidates = pd.DataFrame({"hid": [1, 2, 3, 4, 5, 6, 4, 2],
                               "x": [100.0, 101.0, 99.0, 100.0, 102.0, 100.0, 104.0, -50.0],
                               "y": [50.0, 50.0, 51.0, 49.0, 50.0, 50.0, 52.0, 0.0],
                               "z": [13950.0, 13960.0, 13940.0, 13970.0, 13955.0, 14020.0, 22000.0, 20000.0],
                               "d": [40.0, 41.0, 40.0, 39.0, 40.0, 40.0, 20.0, 30.0]})
    inside = candidates[candidates["z"] >= 14000.0]
    assert len(without_stationary(inside, 6, 0.5)) == 3, "the kept ones alone are in 2 holograms"
    assert without_stationary(inside, 6, 0.5, evidence=candidates)["x"].tolist() == [-50.0]


def test_a_faint_far_droplet_is_kept_where_the_aperture_cannot_resolve_it_and_a_faint_near_fragment_is_not():
    """Two columns as dark as a 7 µm droplet in focus at 9 mm behind the 0.52 x 0.40 mm frame (contrast 0.45):
    one at 9 mm, one at 3 mm, where the aperture would resolve a droplet (an out-of-focus fragment). A fixed
    min_contrast of 0.6 drops both; scaled for 7 µm droplets it keeps the far one only."""
    planes = WIDE_PLANES * 1e6
    far = ml_cluster(30.0, -20.0, planes[(planes > 8700) & (planes < 9300)], focus_um=9000.0, d_um=12.0)
    near = ml_cluster(-60.0, 40.0, planes[(planes > 2700) & (planes < 3300)], focus_um=3000.0, d_um=12.0)
    detections = pd.concat([far, near], ignore_index=True).assign(amplitude_min=0.55)
    fixed = scene_dict(WIDE, particles={"min_contrast": 0.6})
    assert cluster_detections(detections, load_config(fixed)).empty
    scaled = load_config({**fixed, "particles": {"min_contrast": 0.6, "contrast_diameter": 7e-6}})
    kept = cluster_detections(detections, scaled)
    assert kept["x"].tolist() == [30.0] and far["z"].min() <= kept["z"].iloc[0] <= far["z"].max()
