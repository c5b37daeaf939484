"""Focus metrics: one result on numpy and torch, one edge rule, and windows or pixels equal to whole planes."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import holopipe.optics.focus
from holopipe.optics.focus import (
    SMOOTHING_PIXELS,
    device_indices,
    gradient_magnitude,
    host_windows,
    pixel_values,
    smoothed_amplitude,
    tamura_coefficient,
    window_buckets,
    window_scores,
)

# Non-square planes (rows != columns), so a transposed axis cannot pass.
STACK = np.random.default_rng(7).uniform(0.2, 1.2, (3, 23, 37)).astype(np.float32)


def test_smoothing_is_the_nearest_edge_box_average_on_numpy_and_torch():
    expected = ndi.uniform_filter(STACK.astype(np.float64), (1, SMOOTHING_PIXELS, SMOOTHING_PIXELS), mode="nearest")
    np.testing.assert_allclose(smoothed_amplitude(STACK.astype(np.float64)), expected, rtol=1e-12)
    on_torch = smoothed_amplitude(torch.from_numpy(STACK))
    assert isinstance(on_torch, torch.Tensor) and on_torch.shape == STACK.shape
    np.testing.assert_array_equal(on_torch.numpy(), smoothed_amplitude(STACK))


def test_gradient_is_central_with_repeated_edges_on_numpy_and_torch():
    gradient = gradient_magnitude(STACK.astype(np.float64))
    d_row, d_col = np.gradient(STACK.astype(np.float64), axis=(-2, -1))
    np.testing.assert_allclose(gradient[:, 1:-1, 1:-1], np.hypot(d_row, d_col)[:, 1:-1, 1:-1], rtol=1e-12)
    # On the first row the row difference is (a[1] - a[0]) / 2: the edge pixel repeated outward.
    edge_row = (STACK[:, 1, 1:-1].astype(np.float64) - STACK[:, 0, 1:-1]) / 2
    np.testing.assert_allclose(gradient[:, 0, 1:-1], np.hypot(edge_row, d_col[:, 0, 1:-1]), rtol=1e-12)
    np.testing.assert_allclose(gradient_magnitude(torch.from_numpy(STACK)).numpy(), gradient_magnitude(STACK),
                               rtol=1e-6)


WINDOWS = {  # planes, row0, row1, col0, col1: inside, at every edge, one pixel wide, and the whole plane
    "planes": np.array([0, 1, 2, 2, 1, 0]), "row0": np.array([5, 0, 15, 3, 10, 0]),
    "row1": np.array([14, 6, 23, 20, 11, 23]), "col0": np.array([4, 30, 0, 2, 9, 0]),
    "col1": np.array([20, 37, 9, 36, 30, 37])}


@pytest.mark.parametrize("metric", ["tamura", "min_amplitude"])
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_window_scores_are_the_whole_plane_metric_cut_to_each_window(metric, library):
    planes = STACK.astype(np.float64)
    expected = []
    for plane, r0, r1, c0, c1 in zip(*WINDOWS.values()):
        if metric == "tamura":
            gradient = gradient_magnitude(planes[plane])[r0:r1, c0:c1]
            expected.append(np.sqrt(gradient.std() / gradient.mean()))
        else:
            expected.append(-smoothed_amplitude(planes[plane])[r0:r1, c0:c1].min())
    stack = torch.from_numpy(planes) if library == "torch" else planes
    found = window_scores(stack, *WINDOWS.values(), metric)
    assert isinstance(found, torch.Tensor) == (library == "torch")
    np.testing.assert_allclose(np.asarray(found), expected, rtol=1e-10)


def test_window_scores_do_not_depend_on_the_windows_scored_with_them():
    alone = [float(window_scores(STACK, *(v[k:k + 1] for v in WINDOWS.values()), "tamura")[0])
             for k in range(WINDOWS["planes"].size)]
    np.testing.assert_allclose(window_scores(STACK, *WINDOWS.values(), "tamura"), alone, rtol=1e-12)
    with pytest.raises(ValueError, match="metric 'variance'"):
        window_scores(STACK, *WINDOWS.values(), "variance")


def test_buckets_hold_every_window_once_and_pad_little():
    heights, widths = np.array([3, 4, 5, 9, 100, 120, 4]), np.array([3, 3, 70, 9, 100, 128, 4])
    buckets = window_buckets(heights, widths)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(heights.size))
    for bucket in buckets:
        padded = heights[bucket].max() * widths[bucket].max()
        assert np.all(heights[bucket] * widths[bucket] * 4 >= padded)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_pixel_values_are_the_whole_plane_values_at_the_pixels(library):
    rng = np.random.default_rng(1)
    planes, rows, cols = rng.integers(0, 3, 50), rng.integers(0, 23, 50), rng.integers(0, 37, 50)
    rows[:3], cols[:3] = (0, 22, 11), (36, 0, 0)  # corners and an edge
    double = STACK.astype(np.float64)
    stack = torch.from_numpy(double) if library == "torch" else double
    for measure, whole in (("smoothed", smoothed_amplitude(double)), ("gradient", gradient_magnitude(double))):
        found = np.asarray(pixel_values(stack, planes, rows, cols, measure))
        np.testing.assert_allclose(found, whole[planes, rows, cols], rtol=1e-12)


def test_tamura_of_a_flat_window_is_zero_and_of_a_ring_is_larger_than_of_noise():
    assert tamura_coefficient(0.0, 0.0, 10) == 0.0
    ring = np.zeros((21, 21))
    ring[10, :] = ring[:, 10] = 1.0  # the gradient concentrated on a few pixels
    spread = np.random.default_rng(0).uniform(0.9, 1.1, (21, 21))
    scores = [tamura_coefficient(v.sum(), np.square(v).sum(), v.size) for v in (ring, spread)]
    assert scores[0] > scores[1]
    on_torch = tamura_coefficient(torch.tensor([ring.sum()]), torch.tensor([np.square(ring).sum()]), ring.size)
    assert isinstance(on_torch, torch.Tensor) and float(on_torch[0]) == pytest.approx(scores[0])


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_device_indices_keep_each_arrays_values_and_shape(library):
    like = torch.zeros(1) if library == "torch" else np.zeros(1)
    flat, grid, empty = device_indices(like, [3, 1, 2], np.arange(6, dtype=np.int32).reshape(2, 3), [])
    for found, expected in ((flat, [3, 1, 2]), (grid, np.arange(6).reshape(2, 3)), (empty, np.zeros(0))):
        assert isinstance(found, torch.Tensor) == (library == "torch") and found.dtype == (
            torch.int64 if library == "torch" else np.int64)
        np.testing.assert_array_equal(np.asarray(found), expected)


def counting(monkeypatch, name):
    """Calls of holopipe.optics.focus.``name``, recorded while it still does its work."""
    calls, original = [], getattr(holopipe.optics.focus, name)
    monkeypatch.setattr(holopipe.optics.focus, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_windows_of_every_size_group_go_up_in_one_upload_and_come_back_in_one_copy(monkeypatch, library):
    assert len(window_buckets(WINDOWS["row1"] - WINDOWS["row0"], WINDOWS["col1"] - WINDOWS["col0"])) >= 4
    stack = torch.from_numpy(STACK) if library == "torch" else STACK
    uploads, copies = counting(monkeypatch, "device_indices"), counting(monkeypatch, "host_array")
    window_scores(stack, *WINDOWS.values(), "tamura")
    assert len(uploads) == 1
    uploads.clear()
    windows = host_windows(stack, *WINDOWS.values())
    assert (len(uploads), len(copies)) == (1, 1)
    for window, (plane, r0, r1, c0, c1) in zip(windows, zip(*WINDOWS.values())):
        assert window.dtype == np.float64
        np.testing.assert_array_equal(window, STACK[plane, r0:r1, c0:c1])
    uploads.clear()
    pixel_values(stack, WINDOWS["planes"], WINDOWS["row0"], WINDOWS["col0"], "smoothed", chunk=2)
    assert len(uploads) == 1, "one upload for all the chunks"


@pytest.mark.gpu
def test_window_metrics_on_cuda_equal_numpys():
    """The packed, pinned, non-blocking index upload and the one-copy download on a real device."""
    double = STACK.astype(np.float64)
    on_cuda = torch.from_numpy(double).cuda()
    for metric in ("tamura", "min_amplitude"):
        found = window_scores(on_cuda, *WINDOWS.values(), metric)
        assert found.is_cuda
        np.testing.assert_allclose(found.cpu().numpy(), window_scores(double, *WINDOWS.values(), metric),
                                   rtol=1e-12)
    for window, expected in zip(host_windows(on_cuda, *WINDOWS.values()), host_windows(double, *WINDOWS.values())):
        np.testing.assert_array_equal(window, expected)
    rows, cols = WINDOWS["row0"], WINDOWS["col1"] - 1
    for measure in ("smoothed", "gradient"):
        np.testing.assert_allclose(pixel_values(on_cuda, WINDOWS["planes"], rows, cols, measure).cpu().numpy(),
                                   pixel_values(double, WINDOWS["planes"], rows, cols, measure), rtol=1e-12)
