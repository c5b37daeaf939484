"""Angular-spectrum propagation against analytic optics, and across array libraries."""

import math

import numpy as np
import pytest
import scipy.special
import torch
from helpers import WIDE, contrast_hologram, propagator_of

from holopipe.optics.propagation import (
    Propagator,
    TransferFunction,
    effective_depth_of_focus,
    frame_edges,
    hologram_field,
    in_focus_contrast,
    in_focus_contrast_at,
    propagate,
    reconstruct,
)
from holopipe.optics.simulate import ParticleSet

WAVELENGTH = 3.55e-7
HOLODEC_PITCH = 2.96e-6


def disk(n: int, pitch: float, radius: float, supersample: int = 4) -> np.ndarray:
    """Area fraction of each pixel inside a centred disk (antialiased, float64, (n, n))."""
    fine = (np.arange(n * supersample) + 0.5) / supersample - n / 2
    inside = (fine[:, None] ** 2 + fine[None, :] ** 2) * pitch**2 <= radius**2
    return inside.reshape(n, supersample, n, supersample).mean(axis=(1, 3))


def on_axis(field: np.ndarray) -> complex:
    """Field at the optical axis: the corner where the four centre pixels meet."""
    n = field.shape[-1] // 2
    return field[..., n - 1:n + 1, n - 1:n + 1].mean(axis=(-2, -1))


# A 1 mm window at 0.5 µm pitch: fine enough for the disk's edge, wide enough that the periodic
# copies of the FFT grid stay outside the Fresnel zones that reach the axis (2–4 mm).
APERTURE_GRID = dict(n=2048, pitch=0.5e-6, radius=40e-6)


@pytest.mark.parametrize("z", [2e-3, 3e-3, 4e-3])
def test_circular_aperture_on_axis_intensity_matches_rayleigh_sommerfeld(z):
    n, pitch, radius = APERTURE_GRID.values()
    aperture = disk(n, pitch, radius)
    field = propagate(aperture, z, wavelength=WAVELENGTH, dx=pitch)
    r = math.hypot(z, radius)
    k = 2 * math.pi / WAVELENGTH
    expected = abs(1 - (z / r) * np.exp(1j * k * (r - z))) ** 2
    assert 0.5 < expected < 4  # the planes sample both a dark and a bright on-axis fringe
    assert abs(on_axis(field)) ** 2 == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("z", [2e-3, 4e-3])
def test_opaque_disk_shows_the_poisson_spot(z):
    n, pitch, radius = APERTURE_GRID.values()
    screen = 1 - disk(n, pitch, radius)
    intensity = abs(on_axis(propagate(screen, z, wavelength=WAVELENGTH, dx=pitch))) ** 2
    assert intensity == pytest.approx((z / math.hypot(z, radius)) ** 2, rel=0.02)


def test_parseval_energy_is_conserved():
    rng = np.random.default_rng(1)
    field = rng.normal(size=(128, 96)) + 1j * rng.normal(size=(128, 96))
    out = propagate(field, 0.05, wavelength=WAVELENGTH, dx=HOLODEC_PITCH)
    assert np.sum(abs(out) ** 2) == pytest.approx(np.sum(abs(field) ** 2), rel=1e-12)


def test_propagation_is_reversible():
    rng = np.random.default_rng(2)
    field = rng.normal(size=(96, 128)) + 1j * rng.normal(size=(96, 128))
    kwargs = dict(wavelength=WAVELENGTH, dx=HOLODEC_PITCH, dy=2.5e-6)
    back = propagate(propagate(field, 0.03, **kwargs), -0.03, **kwargs)
    np.testing.assert_allclose(back, field, atol=1e-10)


def test_plane_wave_stays_a_plane_wave_with_the_carrier_dropped():
    out = propagate(np.ones((64, 80), np.complex64), 0.158, wavelength=WAVELENGTH, dx=HOLODEC_PITCH)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_zero_distance_is_identity():
    field = np.random.default_rng(3).random((32, 48)).astype(np.float32)
    np.testing.assert_allclose(propagate(field, 0.0, wavelength=WAVELENGTH, dx=HOLODEC_PITCH),
                               field, atol=1e-6)


def test_complex64_agrees_with_complex128_at_158_mm():
    n = 512
    field = 1 - disk(n, HOLODEC_PITCH, 30e-6)
    kwargs = dict(wavelength=WAVELENGTH, dx=HOLODEC_PITCH, band_limit=True)
    single = propagate(field.astype(np.float32), 0.158, **kwargs)
    double = propagate(field, 0.158, **kwargs)
    assert single.dtype == np.complex64 and double.dtype == np.complex128
    np.testing.assert_allclose(single, double, atol=2e-5)


def test_transfer_function_phase_is_float32_safe_at_158_mm():
    """H in complex64 matches the exact float64 formula to float32 rounding, carrier removed."""
    n, z = 256, 0.158
    h = TransferFunction((n, n), wavelength=WAVELENGTH, dx=HOLODEC_PITCH)(z)
    f = np.fft.fftfreq(n, HOLODEC_PITCH)
    a = WAVELENGTH**2 * (f[:, None] ** 2 + f[None, :] ** 2)
    exact = np.exp(2j * np.pi * z / WAVELENGTH * (np.sqrt(1 - a) - 1))
    assert h.dtype == np.complex64
    np.testing.assert_allclose(h, exact, atol=1e-6)


def test_batched_planes_equal_single_planes():
    field = np.random.default_rng(4).random((2, 64, 48)).astype(np.float32)
    z = np.array([-0.01, 0.002, 0.05])
    kwargs = dict(wavelength=WAVELENGTH, dx=HOLODEC_PITCH, pad=8, band_limit=True)
    batched = propagate(field, z, **kwargs)
    assert batched.shape == (2, 3, 64, 48)
    for i, plane in enumerate(z):
        np.testing.assert_allclose(batched[:, i], propagate(field, plane, **kwargs), atol=1e-6)


def test_propagator_reuses_one_fft_for_many_planes():
    field = np.random.default_rng(5).random((64, 64))
    propagator = Propagator(field, wavelength=WAVELENGTH, dx=HOLODEC_PITCH)
    spectrum = propagator.spectrum
    planes = [propagator(z) for z in (0.01, 0.02)]
    assert propagator.spectrum is spectrum
    np.testing.assert_allclose(planes[1], propagate(field, 0.02, wavelength=WAVELENGTH,
                                                    dx=HOLODEC_PITCH))


def test_numpy_and_torch_give_the_same_field():
    field = np.random.default_rng(6).random((3, 64, 96)).astype(np.float32)
    z = np.array([0.014, 0.08, 0.158])
    kwargs = dict(wavelength=WAVELENGTH, dx=HOLODEC_PITCH, dy=3.1e-6, pad=(4, 16), band_limit=True)
    from_numpy = propagate(field, z, **kwargs)
    from_torch = propagate(torch.from_numpy(field), torch.from_numpy(z), **kwargs)
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.complex64
    np.testing.assert_allclose(from_torch.numpy(), from_numpy, atol=2e-6)


def test_output_keeps_library_and_precision():
    assert propagate(torch.ones(8, 8, dtype=torch.float64), 0.01, wavelength=WAVELENGTH,
                     dx=HOLODEC_PITCH).dtype == torch.complex128
    assert propagate(np.ones((8, 8), np.uint8), 0.01, wavelength=WAVELENGTH,
                     dx=HOLODEC_PITCH).dtype == np.complex64


# A non-square frame with dx != dy (ny, nx = 96, 160) and depths past its alias-free range (~4 mm in y),
# so the band limit cuts the spectrum in both axes, and not by the same fraction.
GPU_FRAME = dict(wavelength=WAVELENGTH, dx=2.96e-6, dy=3.6e-6, band_limit=True)
GPU_DEPTHS = [0.02, 0.1]


def gpu_test_field() -> np.ndarray:
    """A hologram-like float32 field (ny, nx) = (96, 160): background 1 with 10 % speckle."""
    return (1 + 0.1 * np.random.default_rng(7).standard_normal((96, 160))).astype(np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("pad", [0, (24, 16)])
def test_cupy_and_torch_cuda_propagation_equal_numpy(pad):
    cupy = pytest.importorskip("cupy")
    field = gpu_test_field()
    kwargs = dict(GPU_FRAME, pad=pad)
    reference = propagate(field, GPU_DEPTHS, **kwargs)  # (2, 96, 160) complex64
    assert not np.allclose(propagate(field, GPU_DEPTHS, **{**kwargs, "band_limit": False}), reference, atol=1e-3)
    on_cupy = propagate(cupy.asarray(field), GPU_DEPTHS, **kwargs)
    on_torch = propagate(torch.from_numpy(field).cuda(), GPU_DEPTHS, **kwargs)
    assert isinstance(on_cupy, cupy.ndarray) and on_cupy.dtype == cupy.complex64
    assert on_torch.is_cuda and on_torch.dtype == torch.complex64
    for library, out in (("cupy", on_cupy.get()), ("torch CUDA", on_torch.cpu().numpy())):
        assert out.shape == reference.shape == (2, 96, 160)
        np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5, err_msg=library)  # float32 FFT rounding


@pytest.mark.gpu
def test_cupy_and_torch_cuda_reconstruction_equal_numpy():
    """The plane sweep's path: one Propagator per hologram, amplitude of many planes (z from the sensor)."""
    cupy = pytest.importorskip("cupy")
    field = hologram_field(gpu_test_field(), background=1.0)
    kwargs = dict(GPU_FRAME, pad=(24, 16), pad_value=1.0)
    z = np.linspace(0.014, 0.158, 5)
    reference = Propagator(field, **kwargs).reconstruct(z).amplitude
    on_cupy = Propagator(cupy.asarray(field), **kwargs).reconstruct(cupy.asarray(z)).amplitude.get()
    on_torch = Propagator(torch.from_numpy(field).cuda(), **kwargs).reconstruct(z).amplitude.cpu().numpy()
    for library, amplitude in (("cupy", on_cupy), ("torch CUDA", on_torch)):
        np.testing.assert_allclose(amplitude, reference, rtol=0, atol=1e-5, err_msg=library)


def test_padding_with_background_adds_no_edge_diffraction():
    field = np.ones((64, 64), np.complex64)
    padded = propagate(field, 0.1, wavelength=WAVELENGTH, dx=HOLODEC_PITCH, pad=32)
    assert padded.shape == (64, 64)
    np.testing.assert_allclose(padded, 1.0, atol=1e-5)
    zero_padded = propagate(field, 0.1, wavelength=WAVELENGTH, dx=HOLODEC_PITCH, pad=32, pad_value=0)
    assert np.abs(zero_padded - 1).max() > 0.1


def test_band_limit_follows_matsushima_shimobaba():
    n, z = 256, 0.158
    transfer = TransferFunction((n, 2 * n), wavelength=WAVELENGTH, dx=HOLODEC_PITCH, band_limit=True)
    h = transfer(z)
    fx = np.fft.fftfreq(2 * n, HOLODEC_PITCH)
    fy = np.fft.fftfreq(n, HOLODEC_PITCH)
    limit_x = 1 / (WAVELENGTH * np.sqrt((2 * z / (2 * n * HOLODEC_PITCH)) ** 2 + 1))
    limit_y = 1 / (WAVELENGTH * np.sqrt((2 * z / (n * HOLODEC_PITCH)) ** 2 + 1))
    expected = (np.abs(fy)[:, None] < limit_y) & (np.abs(fx)[None, :] < limit_x)
    assert 0 < expected.mean() < 1
    np.testing.assert_array_equal(h != 0, expected)
    # A near plane keeps the full band.
    assert np.all(transfer(0.001) != 0)


def test_evanescent_waves_are_cut():
    pitch = 0.1e-6  # Nyquist 5/µm > 1/λ: part of the grid is evanescent
    h = TransferFunction((64, 64), wavelength=WAVELENGTH, dx=pitch)(1e-6)
    f = np.fft.fftfreq(64, pitch)
    evanescent = WAVELENGTH**2 * (f[:, None] ** 2 + f[None, :] ** 2) >= 1
    assert evanescent.any() and not evanescent.all()
    assert np.all(h[evanescent] == 0)
    np.testing.assert_allclose(np.abs(h[~evanescent]), 1.0, atol=1e-6)


def test_reconstruct_returns_amplitude_and_phase_of_back_propagated_field():
    hologram = (np.random.default_rng(8).random((32, 32)) * 50 + 100).astype(np.uint8)
    z = np.array([0.01, 0.02])
    result = reconstruct(hologram, z, wavelength=WAVELENGTH, dx=HOLODEC_PITCH)
    field = propagate(hologram_field(hologram), -z, wavelength=WAVELENGTH, dx=HOLODEC_PITCH)
    np.testing.assert_allclose(result.amplitude, np.abs(field), rtol=1e-6)
    np.testing.assert_allclose(result.phase, np.angle(field), atol=1e-6)
    assert result.amplitude.shape == (2, 32, 32) and result.amplitude.dtype == np.float32


def test_hologram_field_normalises_by_background():
    hologram = np.full((4, 4), 64.0)
    np.testing.assert_allclose(hologram_field(hologram), 1.0)
    np.testing.assert_allclose(hologram_field(hologram, background=16.0), 4.0)
    with pytest.raises(ValueError, match="background"):
        hologram_field(np.zeros((4, 4)))


def test_hologram_field_takes_a_scalar_background_for_every_library():
    hologram = torch.full((4, 4), 3.0)
    np.testing.assert_allclose(hologram_field(hologram, background=1.0).numpy(), 3.0)
    with pytest.raises(ValueError, match="background"):
        hologram_field(hologram, background=0.0)


def test_planes_per_batch_fills_the_pixel_budget_of_the_padded_frame():
    propagator = Propagator(np.ones((30, 50), np.complex64), wavelength=3.55e-7, dx=2.96e-6, pad=5)
    assert propagator.planes_per_batch(40 * 60 * 7) == 7  # padded frame 40 x 60
    assert propagator.planes_per_batch(40 * 60 * 7 - 1) == 6
    assert propagator.planes_per_batch(10) == 1  # one plane even when it alone exceeds the budget


def exact_transfer(shape, z, *, dx, dy, band_limit):
    """H(z) on the full FFT grid straight from the formula (complex128), band-limited per axis when asked."""
    ny, nx = shape
    fy, fx = np.fft.fftfreq(ny, dy)[:, None], np.fft.fftfreq(nx, dx)[None, :]
    a = WAVELENGTH**2 * (fx**2 + fy**2)
    h = np.exp(2j * np.pi * z / WAVELENGTH * (np.sqrt(1 - a) - 1))
    if band_limit:
        limit_x = 1 / (WAVELENGTH * np.sqrt((2 * z / (nx * dx)) ** 2 + 1))
        limit_y = 1 / (WAVELENGTH * np.sqrt((2 * z / (ny * dy)) ** 2 + 1))
        h = h * ((np.abs(fx) < limit_x) & (np.abs(fy) < limit_y))
    return h


# Odd and even, non-square grids (ny, nx): the mirror images of the quarter grid differ by one row or column.
@pytest.mark.parametrize("shape", [(96, 160), (45, 64), (64, 51)])
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_apply_equals_the_spectrum_times_the_full_grid_formula(shape, library):
    """Far planes keep a small rectangle of the quarter grid (and its mirrors) and zero the rest."""
    depths = np.array([0.0005, 0.02, 0.1])
    dx, dy = 2.96e-6, 3.6e-6
    rng = np.random.default_rng(9)
    spectrum = (rng.standard_normal((2, *shape)) + 1j * rng.standard_normal((2, *shape))).astype(np.complex64)
    transfer = TransferFunction(shape, wavelength=WAVELENGTH, dx=dx, dy=dy, band_limit=True,
                                xp=torch if library == "torch" else np)
    extents = [transfer.kept_extent(z) for z in depths]
    assert extents[0] == (shape[0] // 2 + 1, shape[1] // 2 + 1)  # the nearest plane keeps every frequency
    assert extents[2][0] < shape[0] // 4 and extents[2][1] < shape[1] // 4
    product = transfer.apply(torch.from_numpy(spectrum) if library == "torch" else spectrum, depths)
    product = np.asarray(product)
    assert product.shape == (2, 3, *shape) and product.dtype == np.complex64
    for plane, z in enumerate(depths):
        expected = spectrum * exact_transfer(shape, z, dx=dx, dy=dy, band_limit=True)
        np.testing.assert_allclose(product[:, plane], expected, rtol=0, atol=2e-6, err_msg=f"z = {z}")


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_reconstruct_sweep_equals_the_field_of_every_plane(library):
    """The sweep's plane-by-plane path (one buffer, 1/N in the spectrum) against the batched field path, for a
    stack of two non-square holograms, one plane and many."""
    holograms = (1 + 0.1 * np.random.default_rng(10).standard_normal((2, 40, 72))).astype(np.float32)
    field = hologram_field(torch.from_numpy(holograms) if library == "torch" else holograms, background=1.0)
    propagator = Propagator(field, wavelength=WAVELENGTH, dx=2.96e-6, dy=3.6e-6, pad=(12, 20), band_limit=True)
    z = np.array([0.014, 0.05, 0.158])
    sweep = propagator.reconstruct(z)
    one = propagator.reconstruct(0.05)
    reference = np.asarray(propagator(-z))
    assert sweep.amplitude.shape == sweep.phase.shape == (2, 3, 40, 72)
    assert one.amplitude.shape == (2, 40, 72) and sweep.amplitude.dtype == (torch.float32 if library == "torch"
                                                                            else np.float32)
    np.testing.assert_allclose(np.asarray(sweep.amplitude), np.abs(reference), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sweep.phase), np.angle(reference), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(one.amplitude), np.asarray(sweep.amplitude)[:, 1])
    np.testing.assert_array_equal(np.asarray(propagator.amplitude(z)), np.asarray(sweep.amplitude))


def test_depths_on_a_device_array_or_of_two_dimensions():
    field = np.ones((16, 24), np.complex64)
    propagator = Propagator(field, wavelength=WAVELENGTH, dx=HOLODEC_PITCH)
    from_tensor = propagator.reconstruct(torch.tensor([0.01, 0.02], dtype=torch.float64))
    np.testing.assert_array_equal(from_tensor.amplitude, propagator.reconstruct(np.array([0.01, 0.02])).amplitude)
    with pytest.raises(ValueError, match=r"z must be a scalar or 1-D .*\(2, 1\)"):
        propagator.reconstruct(np.zeros((2, 1)))


def test_effective_depth_of_focus_is_d2_over_lambda_uncut_and_longer_where_the_frame_cuts_the_pattern():
    wavelength, d, z = 3.55e-7, 15e-6, 25e-3
    reach = z * wavelength / d  # 0.59 mm: how far the droplet's pattern spreads on the sensor
    wide = (2 * reach, 3 * reach)
    uncut = effective_depth_of_focus(z, d, wide, wide, wavelength=wavelength)
    assert uncut == pytest.approx(d**2 / wavelength)
    # 0.1 mm from the left edge: x sees (0.1 + 0.59) / 2 mm of aperture, not 0.59, and x is the narrower axis.
    edge = effective_depth_of_focus(z, d, (0.1e-3, 2 * reach), wide, wavelength=wavelength)
    assert edge == pytest.approx(wavelength / ((0.1e-3 + reach) / 2 / z) ** 2)
    assert edge > 2.5 * uncut
    # The narrower axis sets the depth, whichever it is (a frame cut in y only).
    assert effective_depth_of_focus(z, d, wide, (0.1e-3, 2 * reach), wavelength=wavelength) == pytest.approx(edge)
    # A small frame (the crop) cuts both sides: λ / NA² of its half-width.
    half = 0.2e-3
    assert effective_depth_of_focus(z, d, (half, half), wide, wavelength=wavelength) == pytest.approx(
        wavelength / (half / z) ** 2)


def test_effective_depth_of_focus_runs_on_arrays_of_any_library():
    z = np.array([20e-3, 25e-3])
    d = np.array([15e-6, 40e-6])
    edges = (np.array([0.1e-3, 1e-3]), np.array([1e-3, 1e-3]))
    expected = effective_depth_of_focus(z, d, edges, edges, wavelength=3.55e-7)
    as_torch = effective_depth_of_focus(torch.from_numpy(z), torch.from_numpy(d),
                                        tuple(map(torch.from_numpy, edges)), tuple(map(torch.from_numpy, edges)),
                                        wavelength=3.55e-7)
    assert isinstance(as_torch, torch.Tensor) and np.allclose(as_torch.numpy(), expected)
    assert expected[1] == pytest.approx(d[1] ** 2 / 3.55e-7)  # the 40 µm droplet's pattern is not cut


@pytest.mark.parametrize(("x_m", "d_m"), [(0.0, 5e-6), (0.0, 7e-6), (-200e-6, 7e-6), (0.0, 10e-6)])
def test_in_focus_contrast_is_what_the_reconstruction_shows_of_a_droplet_the_aperture_cannot_resolve(x_m, d_m):
    """Droplets at 9 mm behind a 0.52 x 0.40 mm frame (dx != dy): the aperture, not the droplet, sets how dark its
    focus gets (0.3 for 5 µm, 0.9 for 10 µm), one 60 µm from the left edge sees less of it."""
    z = 9e-3
    hologram = contrast_hologram(ParticleSet(x=np.array([x_m]), y=np.array([0.0]), z=np.array([z]),
                                             d=np.array([d_m])), WIDE)
    measured = 1 - propagator_of(hologram, WIDE).reconstruct(np.array([z])).amplitude[0].min()
    expected = in_focus_contrast_at(x_m, 0.0, z, d_m, nx=WIDE.nx, ny=WIDE.ny, dx=WIDE.dx, dy=WIDE.dy,
                                    wavelength=WIDE.wavelength)
    assert expected < 0.95 and measured == pytest.approx(expected, abs=0.03)


def test_in_focus_contrast_is_one_minus_j0_up_to_its_first_zero_then_one_on_any_array_library():
    z, d = np.array([0.14, 0.14, 0.02, 0.06]), np.array([10e-6, 20e-6, 10e-6, 20e-6])
    edges = frame_edges(np.array([0.0, 0.0, 0.0, 1.4e-3]), np.zeros(4), nx=1024, ny=1024, dx=2.96e-6, dy=2.96e-6)
    contrast = in_focus_contrast(z, d, *edges, wavelength=WAVELENGTH)
    # Through the 3 mm crop: 10 µm at 140 mm reaches 0.22, 20 µm 0.73; 10 µm at 20 mm is resolved.
    half_width = 1024 * 2.96e-6 / 2
    assert contrast[0] == pytest.approx(1 - scipy.special.j0(math.pi * 10e-6 * half_width / 0.14 / WAVELENGTH))
    assert contrast[0] == pytest.approx(0.216, abs=0.002) and contrast[1] == pytest.approx(0.73, abs=0.01)
    assert contrast[2] == 1.0
    # 0.12 mm from the right edge: the pattern reaches 1.07 mm, so x sees (1.07 + 0.12) / 2 mm and y 1.07 mm.
    reach = 0.06 * WAVELENGTH / 20e-6
    assert edges[0][1][3] == pytest.approx(half_width - 1.4e-3)
    aperture_x, aperture_y = (reach + half_width - 1.4e-3) / 2 / 0.06, reach / 0.06
    assert contrast[3] == pytest.approx(
        1 - scipy.special.j0(math.pi * 20e-6 * math.sqrt(aperture_x * aperture_y) / WAVELENGTH))
    assert contrast[3] < 0.99
    on_torch = in_focus_contrast(torch.from_numpy(z), torch.from_numpy(d), *(tuple(map(torch.from_numpy, e))
                                                                             for e in edges), wavelength=WAVELENGTH)
    assert isinstance(on_torch, torch.Tensor) and np.allclose(on_torch.numpy(), contrast, rtol=1e-12)
