"""Coarse-to-fine depth search: it finds the full sweep's particles on a non-square frame with dx != dy, stride 1
is the full sweep, a droplet between coarse planes is found through the lower coarse threshold, and the model
sees a fraction of the pixels."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from holopipe.core.config import load_config
from holopipe.detect.coarse import (
    FILL_LOGIT,
    WindowSegmenter,
    coarse_planes,
    coarse_to_fine_sweep,
    component_boxes,
    fine_windows,
    merge_boxes,
    place_windows,
    window_side,
)
from holopipe.detect.particles import merge_detections
from holopipe.detect.sweep import DETECTION_COLUMNS, batch_detections, model_segmenter, sweep_hologram
from holopipe.ml.models import PlainUNet
from holopipe.optics.reconstruction import z_bin_centres
from holopipe.optics.simulate import Optics, ParticleSet, opaque_disks_field

# 160 x 96 pixels of 2.96 x 3.6 µm (as tests/test_axes.py): wider than tall, pixels taller than wide.
OPTICS = Optics(wavelength=3.55e-7, dx=2.96e-6, dy=3.6e-6, nx=160, ny=96, z_min=2e-3, z_max=10e-3)
PAD, Z_BINS, THRESHOLD, MIN_AREA = 32, 60, 0.5, 2
PLANES = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)
# Four droplets > 120 µm apart at 3.5-8.5 mm (planes 11-48 of 60).
PARTICLES = ParticleSet(x=np.array([-150e-6, 140e-6, 0.0, 30e-6]), y=np.array([-70e-6, -40e-6, 80e-6, -110e-6]),
                        z=np.array([3.5e-3, 6.2e-3, 8.5e-3, 4.6e-3]), d=np.array([25e-6, 32e-6, 40e-6, 18e-6]))
# One 16 µm droplet focused on plane 16; with coarse stride 8 the coarse planes are 4, 12, 20, ...
BETWEEN = ParticleSet(x=np.array([-60e-6]), y=np.array([30e-6]), z=np.array([PLANES[16]]), d=np.array([16e-6]))


def oracle(amplitude, phase):
    """Logits marking the dark core of a refocused opaque disk, surer the darker (as tests/test_axes.py)."""
    return torch.where(amplitude < 0.5, 20.0 * (1.0 - amplitude), torch.full_like(amplitude, -20.0))


def graded_oracle(amplitude, phase):
    """Probability 0.5 at amplitude 0.3, 0.2 at 0.45: a droplet a few planes from focus is seen, less sure."""
    return 9.0 * (0.3 - amplitude)


class Counting:
    """A segmenter that counts its calls and the pixels it was given."""

    def __init__(self, segment):
        self.segment, self.calls, self.pixels, self.batches = segment, 0, 0, []

    def __call__(self, amplitude, phase):
        self.calls += 1
        self.pixels += amplitude.numel()
        self.batches.append(amplitude.shape[0])
        return self.segment(amplitude, phase)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def contrast_hologram(particles: ParticleSet) -> np.ndarray:
    """Noise-free, flat-beam contrast I / mean I (ny, nx) of opaque droplets."""
    intensity = np.abs(opaque_disks_field(particles, OPTICS, pad=PAD)) ** 2
    return (intensity / intensity.mean()).astype(np.float32)


@pytest.fixture(scope="module")
def hologram():
    return contrast_hologram(PARTICLES)


def sweep(image, segment, *, coarse_stride=None, coarse_threshold=0.2, coarse_margin=8, stride=8, device="cpu",
          batch_planes=4, calls=None, **options):
    """Detections (as infer_chunk gathers them) of one hologram swept fully (coarse_stride None) or coarse to fine."""
    found = []

    def consume(first, rows_cols, values, probability):
        if calls is not None:
            calls.append((first, rows_cols.copy(), values.copy(), probability))
        for slot, table in batch_detections(rows_cols, values, shape=image.shape, min_area=MIN_AREA, dx=OPTICS.dx,
                                            dy=OPTICS.dy):
            found.append(table.assign(hid=1, plane=first + slot, z=PLANES[first + slot] * 1e6))

    arguments = dict(wavelength=OPTICS.wavelength, dx=OPTICS.dx, dy=OPTICS.dy, pad=PAD, band_limit=False,
                     batch_planes=batch_planes, threshold=THRESHOLD, device=torch.device(device), consume=consume)
    with ThreadPoolExecutor(1) as pool:
        if coarse_stride is None:
            timing = sweep_hologram(image, PLANES, segment, pool=pool, **arguments, **options)
        else:
            timing = coarse_to_fine_sweep(image, PLANES, segment, pool=pool, coarse_stride=coarse_stride,
                                          coarse_threshold=coarse_threshold, coarse_margin=coarse_margin,
                                          stride=stride, **arguments, **options)
    assert timing.planes == PLANES.size
    if not found:
        return pd.DataFrame(columns=list(DETECTION_COLUMNS))
    return pd.concat(found, ignore_index=True).sort_values(["plane", "y", "x"], ignore_index=True)


@pytest.fixture(scope="module")
def config():
    return load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 1, "seed": 1}},
        "optics": dataclasses.asdict(OPTICS),
        "reconstruction": {"z_bins": Z_BINS, "pad": PAD},
        "particles": {"focus": "logit"},
    })


@pytest.fixture(scope="module")
def full(hologram):
    return sweep(hologram, oracle)


# ---- end to end ----

@pytest.mark.parametrize("coarse_stride", [2, 4, 8])
def test_coarse_to_fine_finds_the_particles_of_the_full_sweep(hologram, full, config, coarse_stride):
    coarse = sweep(hologram, oracle, coarse_stride=coarse_stride)
    particles = merge_detections(coarse, config)
    expected = merge_detections(full, config)
    pd.testing.assert_frame_equal(particles, expected)
    # Each droplet at its place (and one 2-pixel ghost on the first planes, a fringe of the 40 µm droplet, in both):
    # x along the 2.96 µm columns, y along the 3.6 µm rows.
    for x, y in zip(PARTICLES.x * 1e6, PARTICLES.y * 1e6):
        nearest = np.argmin(np.hypot(particles["x"] - x, particles["y"] - y))
        assert abs(particles["x"][nearest] - x) <= 1.5 * OPTICS.dx * 1e6
        assert abs(particles["y"][nearest] - y) <= 1.5 * OPTICS.dy * 1e6
    # A pointwise segmenter gives the same logits on a window as on the whole plane: every detection the full
    # sweep made on a plane with windows is made again, identically.
    columns = ["plane", "x", "y", "d", "area", "prob_max", "prob_mean", "logit_mean", "amplitude_min"]
    pd.testing.assert_frame_equal(coarse[columns], full[full["plane"].isin(coarse["plane"])][columns]
                                  .reset_index(drop=True))


def test_stride_one_is_the_full_sweep_call_for_call(hologram):
    quantize = lambda probability: torch.round(probability * 255).to(torch.uint8)  # noqa: E731
    full_calls, coarse_calls = [], []
    sweep(hologram, oracle, calls=full_calls, quantize=quantize)
    sweep(hologram, oracle, coarse_stride=1, calls=coarse_calls, quantize=quantize)
    assert len(coarse_calls) == len(full_calls) == Z_BINS // 4
    for (first_a, rows_a, values_a, volume_a), (first_b, rows_b, values_b, volume_b) in zip(full_calls, coarse_calls):
        assert first_a == first_b
        np.testing.assert_array_equal(rows_a, rows_b)
        np.testing.assert_array_equal(values_a, values_b)
        np.testing.assert_array_equal(volume_a, volume_b)


def test_a_droplet_between_coarse_planes_is_found_through_the_lower_coarse_threshold(config):
    image = contrast_hologram(BETWEEN)
    full = sweep(image, graded_oracle)
    coarse = set(coarse_planes(Z_BINS, 8))
    assert coarse.isdisjoint(full["plane"]), "no coarse plane sees the droplet above the threshold"
    expected = merge_detections(full, config)
    assert len(expected) == 1 and round(expected["z"][0]) in np.round(PLANES[13:19] * 1e6)
    found = merge_detections(sweep(image, graded_oracle, coarse_stride=8, coarse_threshold=0.2), config)
    pd.testing.assert_frame_equal(found, expected)
    # At the detection threshold the coarse pass sees nothing, so nothing is searched.
    assert merge_detections(sweep(image, graded_oracle, coarse_stride=8, coarse_threshold=THRESHOLD), config).empty


def test_the_model_sees_a_fraction_of_the_pixels(hologram):
    plane_pixels = OPTICS.nx * OPTICS.ny
    full, coarse = Counting(oracle), Counting(oracle)
    sweep(hologram, full)
    sweep(hologram, coarse, coarse_stride=4)
    assert full.pixels == Z_BINS * plane_pixels and full.calls == Z_BINS // 4
    coarse_pixels = coarse_planes(Z_BINS, 4).size * plane_pixels
    assert coarse_pixels < coarse.pixels < 0.45 * full.pixels  # 15 whole planes (25 %) + windows on the others


def test_a_blank_hologram_sweeps_only_the_coarse_planes():
    segment = Counting(oracle)
    found = sweep(np.ones((OPTICS.ny, OPTICS.nx), np.float32), segment, coarse_stride=4)
    assert found.empty and segment.pixels == coarse_planes(Z_BINS, 4).size * OPTICS.nx * OPTICS.ny


def test_no_probability_volume_from_a_coarse_search(hologram):
    with pytest.raises(ValueError, match="coarse_stride 4.*save_probabilities"):
        sweep(hologram, oracle, coarse_stride=4, quantize=lambda probability: probability)


# ---- pieces ----

def test_coarse_planes_are_centred_and_leave_no_plane_far_from_one():
    assert list(coarse_planes(10, 1)) == list(range(10))
    assert list(coarse_planes(10, 4)) == [2, 6, 9]  # plane 9 would be 3 > 4 // 2 from plane 6
    assert list(coarse_planes(9, 4)) == [2, 6]
    assert list(coarse_planes(3, 8)) == [2]
    for n, k in [(60, 8), (1000, 8), (7, 3), (1, 4)]:
        indices = coarse_planes(n, k)
        assert np.abs(np.arange(n)[:, None] - indices[None, :]).min(axis=1).max() <= k // 2


def test_component_boxes_widen_by_the_margin_and_stop_at_the_frame():
    # Two components on a 20 x 30 frame: an L at rows 1-3, cols 2-4, and one pixel at (15, 28).
    rows, cols = np.array([1, 2, 3, 3, 3, 15]), np.array([2, 2, 2, 3, 4, 28])
    boxes = component_boxes(rows, cols, (20, 30), margin=2)
    np.testing.assert_array_equal(boxes, [[0, 6, 0, 7], [13, 18, 26, 30]])
    assert component_boxes(rows[:0], cols[:0], (20, 30), margin=2).shape == (0, 4)


def test_merge_boxes_merges_chains_and_keeps_touching_boxes_apart():
    boxes = np.array([[0, 10, 0, 10], [5, 15, 5, 15], [12, 20, 0, 4],  # 3 overlaps only the union of 1 and 2
                      [30, 40, 0, 10], [40, 50, 0, 10]])  # touching (half-open): apart
    merged = merge_boxes(boxes)
    assert sorted(map(tuple, merged)) == [(0, 20, 0, 15), (30, 40, 0, 10), (40, 50, 0, 10)]


def test_fine_windows_cover_the_planes_within_the_coarse_stride_but_not_the_coarse_planes():
    coarse = coarse_planes(20, 4)  # 2, 6, 10, 14, 18
    boxes = [np.zeros((0, 4), np.int64)] * coarse.size
    boxes[1] = np.array([[0, 10, 0, 10]])  # on plane 6
    boxes[2] = np.array([[5, 15, 5, 15], [50, 60, 50, 60]])  # on plane 10
    windows = fine_windows(coarse, boxes, 20, 4)
    assert sorted(windows) == [3, 4, 5, 7, 8, 9, 11, 12, 13]
    np.testing.assert_array_equal(windows[3], [[0, 10, 0, 10]])
    assert sorted(map(tuple, windows[8])) == [(0, 15, 0, 15), (50, 60, 50, 60)]
    assert len(windows[12]) == 2


def test_window_sides_are_few_multiples_of_the_stride_and_stop_at_the_frame():
    sides = window_side(np.arange(1, 400), 16, 4000)
    assert set(sides) == {16, 32, 48, 64, 96, 128, 192, 256, 384, 512}
    assert np.all(sides >= np.arange(1, 400)) and np.all(sides <= 1.5 * np.ceil(np.arange(1, 400) / 16) * 16)
    assert list(window_side([100, 97], 16, 100)) == [100, 100]  # the frame side, not 128


def test_windows_hold_their_box_inside_a_non_square_frame():
    shape = (96, 160)
    boxes = np.array([[0, 20, 150, 160], [40, 60, 70, 75], [10, 95, 0, 30]])
    windows = place_windows(boxes, shape, 8)
    row0, col0, height, width = windows.T
    assert np.all((row0 >= 0) & (col0 >= 0) & (row0 + height <= 96) & (col0 + width <= 160))
    assert np.all((row0 <= boxes[:, 0]) & (row0 + height >= boxes[:, 1]))
    assert np.all((col0 <= boxes[:, 2]) & (col0 + width >= boxes[:, 3]))
    np.testing.assert_array_equal(height, [24, 24, 96])  # 85 rows: 96 (stride 8: 12 = 3·4 units)
    np.testing.assert_array_equal(width, [16, 8, 32])


def test_window_canvas_is_the_whole_plane_logits_inside_windows_and_the_fill_outside():
    torch.manual_seed(1)
    amplitude, phase = torch.rand(3, 40, 56), torch.rand(3, 40, 56)
    windows = np.array([[0, 0, 0, 16, 24], [0, 8, 16, 16, 24], [2, 24, 40, 16, 16], [1, 0, 0, 40, 56]])
    full = oracle(amplitude, phase)
    expected = torch.full_like(full, FILL_LOGIT)
    for plane, row0, col0, height, width in windows:
        expected[plane, row0:row0 + height, col0:col0 + width] = full[plane, row0:row0 + height, col0:col0 + width]
    for pad_counts in (False, True):
        counting = Counting(oracle)
        segmenter = WindowSegmenter(counting, windows, (40, 56), n_planes=3, batch_pixels=10_000,
                                    device=torch.device("cpu"), pad_counts=pad_counts)
        torch.testing.assert_close(segmenter(amplitude, phase), expected, rtol=0, atol=0)
        segmenter.check_finished()
        # Shapes 16x16, 16x24 (two windows: padded to 2 either way) and 40x56.
        assert sorted(counting.batches) == [1, 1, 2]


def test_overlapping_windows_keep_the_larger_logit():
    def by_window(amplitude, phase):  # each window's logits are its own index in the batch: 0, 1, ...
        return torch.arange(amplitude.shape[0], dtype=torch.float32)[:, None, None].expand_as(amplitude)

    windows = np.array([[0, 0, 0, 8, 8], [0, 4, 4, 8, 8]])
    canvas = WindowSegmenter(by_window, windows, (16, 16), n_planes=1, batch_pixels=1000,
                             device=torch.device("cpu"), pad_counts=False)(torch.ones(1, 16, 16),
                                                                           torch.zeros(1, 16, 16))
    assert canvas[0, 5, 5] == 1 and canvas[0, 1, 1] == 0 and canvas[0, 15, 15] == FILL_LOGIT


def test_window_batches_respect_the_pixel_budget_and_pad_to_powers_of_two():
    windows = np.array([[0, 8 * (i % 4), 8 * (i // 4), 8, 8] for i in range(7)])
    for pad_counts, batches in ((False, [4, 3]), (True, [4, 4])):
        counting = Counting(oracle)
        WindowSegmenter(counting, windows, (32, 32), n_planes=1, batch_pixels=4 * 64, device=torch.device("cpu"),
                        pad_counts=pad_counts)(torch.rand(1, 32, 32), torch.rand(1, 32, 32))
        assert counting.batches == batches


def test_a_whole_frame_window_through_a_unet_is_the_whole_plane():
    torch.manual_seed(0)
    model = PlainUNet(2, width=4, depth=2).eval()  # stride 4; a 30 x 42 frame is no multiple of it
    segment = model_segmenter(model, ["amplitude", "phase"], {"contrast_std": 0.2}, 4)
    amplitude, phase = 1 + 0.2 * torch.randn(2, 30, 42), 0.2 * torch.randn(2, 30, 42)
    windows = np.column_stack([[0, 1], place_windows(np.array([[0, 30, 0, 42]] * 2), (30, 42), 4)])
    np.testing.assert_array_equal(windows[:, 1:], [[0, 0, 30, 42]] * 2)
    canvas = WindowSegmenter(segment, windows, (30, 42), n_planes=2, batch_pixels=10_000,
                             device=torch.device("cpu"), pad_counts=False)(amplitude, phase)
    torch.testing.assert_close(canvas, segment(amplitude, phase))


def test_a_sweep_that_skips_planes_is_caught():
    segmenter = WindowSegmenter(oracle, np.array([[1, 0, 0, 8, 8]]), (16, 16), n_planes=2, batch_pixels=1000,
                                device=torch.device("cpu"), pad_counts=False)
    segmenter(torch.ones(1, 16, 16), torch.zeros(1, 16, 16))
    with pytest.raises(RuntimeError, match="segmented 1 planes, expected 2"):
        segmenter.check_finished()


# ---- on a GPU ----

@pytest.mark.gpu
def test_coarse_to_fine_on_cuda_finds_what_it_finds_on_the_cpu(hologram, config):
    cpu = merge_detections(sweep(hologram, oracle, coarse_stride=4), config)
    # On CUDA the windows are batched in power-of-two counts; cuFFT rounds unlike the CPU FFT, so a pixel at the
    # threshold may flip: the same particles within a pixel and a plane.
    gpu = merge_detections(sweep(hologram, oracle, coarse_stride=4, device="cuda"), config)
    assert len(gpu) == len(cpu)
    for name, tolerance in (("x", OPTICS.dx), ("y", OPTICS.dy), ("z", PLANES[1] - PLANES[0]), ("d", 2 * OPTICS.dy)):
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=0, atol=tolerance * 1e6 + 1e-6)


@pytest.mark.gpu
def test_window_canvas_on_cuda_equals_the_cpu_canvas():
    torch.manual_seed(2)
    model = PlainUNet(2, width=4, depth=2).eval()
    amplitude, phase = 1 + 0.2 * torch.randn(2, 48, 64), 0.2 * torch.randn(2, 48, 64)
    windows = np.array([[0, 0, 0, 16, 24], [0, 8, 16, 16, 24], [1, 24, 40, 16, 16], [1, 30, 0, 16, 24]])
    canvases = []
    for device in (torch.device("cpu"), torch.device("cuda")):
        segment = model_segmenter(model.to(device), ["amplitude", "phase"], {"contrast_std": 0.2}, 4)
        segmenter = WindowSegmenter(segment, windows, (48, 64), n_planes=2, batch_pixels=10_000, device=device,
                                    pad_counts=device.type == "cuda")
        canvases.append(segmenter(amplitude.to(device), phase.to(device)).cpu())
    torch.testing.assert_close(canvases[1], canvases[0], rtol=1e-4, atol=1e-4)

