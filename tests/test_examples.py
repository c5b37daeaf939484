"""Training examples: tiles and masks against the physics, counts, splits, the torch Dataset."""

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import torch
import xarray as xr
import zarr

from holopipe.core.config import ConfigError, load_config
from holopipe.core.io import open_holodec, particle_table, write_zarr
from holopipe.data.examples import (
    build_examples,
    in_band,
    particles_in_pixels,
    plan_hologram,
    rasterize_disks,
    split_stream,
)
from holopipe.ml.dataset import IGNORE, Augmentation, TileDataset, apply_augmentation, draw_augmentation
from holopipe.optics.reconstruction import SampleVolume, normalize_channels, z_bin_centres, z_bin_edges, z_bin_of
from holopipe.optics.simulate import Camera, DiameterModel, Optics, SimulationSettings, simulate_file

OPTICS = Optics(wavelength=3.55e-7, dx=2.96e-6, dy=2.96e-6, nx=128, ny=128, z_min=2e-3, z_max=6e-3)
SETTINGS = SimulationSettings(optics=OPTICS, particles=(2, 3),
                              diameter=DiameterModel("uniform", d_min=20e-6, d_max=40e-6),
                              camera=Camera(noise=False, beam_waist=None), pad=32)
N_HOLOGRAMS, POSITIVES, NEGATIVES, Z_BINS, TILE = 3, 3, 4, 20, 64


def make_config(**examples):
    return load_config({
        "splits": {"train": {"source": "simulate", "n_holograms": N_HOLOGRAMS, "seed": 1}},
        "optics": dataclasses.asdict(OPTICS),
        "reconstruction": {"z_bins": Z_BINS, "pad": 32},
        "examples": {"tile_size": TILE, "positives_per_hologram": POSITIVES,
                     "negatives_per_hologram": NEGATIVES, "near_negative_fraction": 0.5, **examples},
    })


def standardized_store(directory, name, seed):
    """A standardized split: noise-free simulated holograms as float32 contrast I / mean(I)."""
    ds = open_holodec(simulate_file(directory / f"{name}.nc", n_holograms=N_HOLOGRAMS, seed=seed,
                                    settings=SETTINGS, progress=False)).load()
    image = ds["image"].astype(np.float32)
    ds = ds.assign(image=(image / image.mean(("xsize", "ysize"))).astype(np.float32))
    return write_zarr(ds, directory / f"{name}.zarr")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    directory = tmp_path_factory.mktemp("examples")
    train, valid = standardized_store(directory, "train", 1), standardized_store(directory, "valid", 2)
    config = make_config()
    return {
        "dir": directory, "train_in": train, "valid_in": valid,
        "train": build_examples(train, directory / "ex_train.zarr", config, split="train", progress=False),
        "valid": build_examples(valid, directory / "ex_valid.zarr", config, split="valid", progress=False),
    }


def particle_bins(store_in):
    ds = open_holodec(store_in)
    table = particle_table(ds)
    table["z_bin"] = np.floor((table["z"] * 1e-6 - ds.attrs["zMin"])
                              / ((ds.attrs["zMax"] - ds.attrs["zMin"]) / Z_BINS)).clip(0, Z_BINS - 1)
    return {hid: set(group["z_bin"].astype(int)) for hid, group in table.groupby("hid")}


def test_bins_split_the_range_equally_and_planes_are_their_centres():
    edges, centres = z_bin_edges(2e-3, 6e-3, 20), z_bin_centres(2e-3, 6e-3, 20)
    assert np.allclose(np.diff(edges), 0.2e-3) and edges[0] == 2e-3 and edges[-1] == pytest.approx(6e-3)
    assert np.array_equal(z_bin_of(centres, 2e-3, 6e-3, 20), np.arange(20))
    assert list(z_bin_of([2e-3 - 1e-7, 6e-3, 6e-3 + 1e-7], 2e-3, 6e-3, 20)) == [0, 19, 19]


def test_the_sample_volume_searches_beyond_its_ends_but_not_behind_the_sensor():
    volume = SampleVolume.of({"zMin": 0.002, "zMax": 0.006})
    planes = volume.planes(4)
    np.testing.assert_allclose(planes, [0.0025, 0.0035, 0.0045, 0.0055])
    np.testing.assert_allclose(volume.planes(4, beyond=3), [0.0005, 0.0015, *planes, 0.0065, 0.0075, 0.0085])
    np.testing.assert_array_equal(volume.contains([0.0019, 0.002, 0.004, 0.006, 0.0061]),
                                  [False, True, True, True, False])


def test_rasterized_disk_holds_the_pixel_centres_inside_it_and_a_tiny_particle_its_nearest_pixel():
    mask = rasterize_disks(10.2, 20.7, 5.0, 5.0, (32, 40))
    rows, cols = np.nonzero(mask)
    assert np.all((rows - 10.2) ** 2 + (cols - 20.7) ** 2 <= 25.0)
    assert mask.sum() == pytest.approx(np.pi * 25, rel=0.1)
    tiny = rasterize_disks(3.4, 7.6, 0.2, 0.2, (32, 40))
    assert np.argwhere(tiny).tolist() == [[3, 8]]
    clipped = rasterize_disks(10.2, 20.7, 5.0, 5.0, (32, 40), window=(8, 18, 4, 4))
    assert np.array_equal(clipped, mask[8:12, 18:22])


FRAME_MARGIN = 16  # pixels: a particle nearer the edge loses most of its fringes and refocuses faintly


def particle_frame(row, col, radius, z_bin, d_um=30.0):
    """Particles in pixels, at their bin's centre of the test's planes, ``d_um`` across, in focus over
    D²/λ (the depth of a pattern the frame does not cut)."""
    planes = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)
    return pd.DataFrame({"row": row, "col": col, "radius_row": radius, "radius_col": radius, "z_bin": z_bin,
                         "z": planes[np.asarray(z_bin)] * 1e6, "d": d_um,
                         "depth_of_focus": (d_um * 1e-6) ** 2 / OPTICS.wavelength})


def test_plan_reuses_a_lone_particle_at_new_positions_and_skips_positives_without_particles():
    examples = make_config()["examples"]
    lone = particle_frame(row=[70.3], col=[5.2], radius=[4.0], z_bin=[7], d_um=15.0)
    planes = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)
    plan = plan_hologram(np.random.default_rng(0), lone, (128, 128), planes, examples)
    positives = plan[plan["positive"]]
    assert len(positives) == POSITIVES and set(positives["z_bin"]) == {7}
    assert len(set(zip(positives["row0"], positives["col0"]))) == POSITIVES
    # The whole disk (rows 66.3-74.3, columns 1.2-9.2) lies inside every tile.
    assert np.all((positives["row0"] <= 67) & (positives["row0"] + TILE - 1 >= 74))
    assert np.all((positives["col0"] <= 2) & (positives["col0"] + TILE - 1 >= 9))
    # A 15 µm droplet stays in focus over D²/λ = 0.63 mm, 3.2 bins of 0.2 mm: its near negatives lie 4 to 6
    # bins from bin 7, over the droplet.
    near = plan[plan["near"]]
    assert len(near) == NEGATIVES // 2 and set(near["z_bin"]) <= {1, 2, 3, 11, 12, 13}
    depth_of_focus = (15e-6) ** 2 / OPTICS.wavelength
    offsets = np.abs(planes[near["z_bin"]] - planes[7])
    assert np.all(offsets > depth_of_focus) and np.all(offsets <= 2 * depth_of_focus)
    assert np.all((near["row0"] <= 67) & (near["row0"] + TILE - 1 >= 74))
    none = plan_hologram(np.random.default_rng(0), lone.iloc[:0], (128, 128), planes, examples)
    assert not none["positive"].any() and not none["near"].any() and len(none) == NEGATIVES


def test_near_negatives_lie_beyond_the_effective_depth_of_focus_of_a_droplet_the_frame_cuts():
    """A 15 µm droplet at 5.1 mm, 3 pixels from the left edge of a 96 x 128 frame (dx != dy): its pattern
    (0.12 mm across) is cut on one side, so it stays in focus over 2.2 mm, not D²/λ = 0.63 mm. No near
    negative may be cut inside that depth, and the band marks it on every plane within it."""
    attrs = {"Nx": 96, "Ny": 128, "dx": 2.96e-6, "dy": 3.5e-6, "lambda": OPTICS.wavelength,
             "zMin": OPTICS.z_min, "zMax": OPTICS.z_max}
    planes = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)
    col, row = 3.0, 60.0
    table = pd.DataFrame({"hid": [1], "x": [(col + 0.5 - 48) * 2.96], "y": [(row + 0.5 - 64) * 3.5],
                          "z": [planes[15] * 1e6], "d": [15.0]})
    particles = particles_in_pixels(table, attrs, Z_BINS)
    assert particles["col"].iloc[0] == pytest.approx(col) and particles["row"].iloc[0] == pytest.approx(row)
    depth = particles["depth_of_focus"].iloc[0]
    assert depth > 3 * (15e-6) ** 2 / OPTICS.wavelength
    plan = plan_hologram(np.random.default_rng(3), particles, (128, 96), planes,
                         make_config(near_negative_fraction=1.0)["examples"])
    near = plan[plan["near"]]
    assert len(near) == NEGATIVES
    assert np.all(np.abs(planes[near["z_bin"]] - planes[15]) > depth)
    banded = [b for b in range(Z_BINS) if in_band(particles, planes[b], b).any()]
    assert banded == [b for b in range(Z_BINS) if b != 15 and abs(planes[b] - planes[15]) <= depth]
    assert banded == [*range(5, 15), *range(16, 20)]  # 2.2 mm each side of bin 15, 0.2 mm bins


def test_every_particle_gets_a_positive_tile_before_the_count_is_topped_up():
    particles = particle_frame(row=[20.0, 50.0, 80.0, 100.0, 110.0], col=[20.0, 60.0, 90.0, 30.0, 100.0],
                               radius=[4.0] * 5, z_bin=[1, 4, 8, 12, 16])
    planes = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)
    every = plan_hologram(np.random.default_rng(0), particles, (128, 128), planes,
                          make_config(every_particle=True)["examples"])
    assert sorted(every.loc[every["positive"], "z_bin"]) == [1, 4, 8, 12, 16]
    some = plan_hologram(np.random.default_rng(0), particles, (128, 128), planes, make_config()["examples"])
    assert some["positive"].sum() == POSITIVES < len(particles)


def test_a_droplet_in_focus_over_the_whole_slice_gives_its_near_negative_slots_to_empty_bins():
    examples = make_config()["examples"]
    planes = z_bin_centres(OPTICS.z_min, OPTICS.z_max, Z_BINS)
    huge = particle_frame(row=[60.0], col=[60.0], radius=[10.0], z_bin=[10], d_um=60.0)  # D²/λ = 10 mm
    plan = plan_hologram(np.random.default_rng(1), huge, (128, 128), planes, examples)
    negatives = plan[~plan["positive"]]
    assert len(negatives) == NEGATIVES and not negatives["near"].any() and 10 not in set(negatives["z_bin"])


def test_positive_mask_lies_under_the_dark_disk_of_the_reconstructed_amplitude(stores):
    ds = xr.open_zarr(stores["train"], consolidated=False).load()
    checked = 0
    for i in np.flatnonzero(ds["positive"].values):
        amplitude = ds["inputs"].sel(channel="amplitude")[i].values
        mask = ds["masks"][i, 0].values.astype(bool)
        in_frame = np.array(scipy.ndimage.center_of_mass(mask)) + [ds["row0"][i], ds["col0"][i]]
        if mask[[0, -1], :].any() or mask[:, [0, -1]].any() or not np.all(
                (in_frame > FRAME_MARGIN) & (in_frame < OPTICS.nx - FRAME_MARGIN)):
            continue  # cut by the tile edge, or too near the frame edge to keep its fringes
        assert amplitude[mask].mean() < amplitude[~mask].mean() - 0.3
        labels, _ = scipy.ndimage.label(amplitude < 0.5)
        blob = labels == np.bincount(labels[mask], minlength=labels.max() + 1)[1:].argmax() + 1
        assert np.allclose(scipy.ndimage.center_of_mass(mask), scipy.ndimage.center_of_mass(blob), atol=1.0)
        checked += 1
    assert checked >= 2


def test_counts_and_planes_follow_the_config_and_the_particles(stores):
    ds = xr.open_zarr(stores["train"], consolidated=False).load()
    bins = particle_bins(stores["train_in"])
    assert (ds.attrs["channel_names"] == ["amplitude", "phase"]
            and list(ds["channel"].values) == ds.attrs["channel_names"])
    assert ds["inputs"].dtype == np.float32 and ds["masks"].dtype == np.uint8
    assert ds["inputs"].encoding["chunks"] == (1, 2, TILE, TILE)
    width = (OPTICS.z_max - OPTICS.z_min) / Z_BINS
    assert np.allclose(ds["z"], OPTICS.z_min + (ds["z_bin"] + 0.5) * width)
    n_near = 0
    for hid in range(1, N_HOLOGRAMS + 1):
        mine = ds.where(ds["hid"] == hid, drop=True)
        positive, near = mine["positive"].values.astype(bool), mine["near"].values.astype(bool)
        # A 20-40 µm droplet's depth of focus (1.1-4.5 mm) may leave no near plane in the 4 mm slice.
        assert positive.sum() == POSITIVES and (~positive).sum() == NEGATIVES and near.sum() <= NEGATIVES // 2
        n_near += near.sum()
        mask_pixels = mine["masks"].sel(mask_channel="in_focus").sum(("row", "col")).values
        z_bin = mine["z_bin"].values.astype(int)
        far = ~positive & ~near
        assert np.all(mask_pixels[positive] > 0) and np.all(mask_pixels[far] == 0)
        assert all(b in bins[hid] for b in z_bin[positive])
        assert not any(b in bins[hid] for b in z_bin[far])
        # A near negative's mask marks only particles in focus in its own bin, as any tile's does.
        assert np.all((mask_pixels[near] == 0) | np.isin(z_bin[near], list(bins[hid])))
        assert all(min(abs(b - p) for p in bins[hid]) >= 1 for b in z_bin[near])
    assert n_near > 0
    assert np.all((ds["row0"] >= 0) & (ds["row0"] <= OPTICS.ny - TILE))
    assert np.all((ds["col0"] >= 0) & (ds["col0"] <= OPTICS.nx - TILE))


def keys(path):
    ds = xr.open_zarr(path, consolidated=False)
    return {(int(h), float(z), int(r), int(c), ds.attrs["source"])
            for h, z, r, c in zip(ds["hid"].values, ds["z"].values, ds["row0"].values, ds["col0"].values)}


def test_splits_share_no_example_and_a_seed_reproduces_its_store(stores):
    train = keys(stores["train"])
    assert len(train) == N_HOLOGRAMS * (POSITIVES + NEGATIVES)
    assert not train & keys(stores["valid"])
    again = build_examples(stores["train_in"], stores["dir"] / "again.zarr", make_config(), split="train",
                           progress=False)
    xr.testing.assert_identical(xr.open_zarr(stores["train"], consolidated=False).load(),
                                xr.open_zarr(again, consolidated=False).load())
    # The same holograms under another split's name draw other tiles.
    other = build_examples(stores["train_in"], stores["dir"] / "other.zarr", make_config(), split="test",
                           progress=False)
    assert keys(other) != train


def test_a_splits_random_stream_is_a_digest_of_its_name():
    # hashlib.sha256(b"train").digest()[:8], big-endian: the same in every process, unlike Python's hash().
    assert split_stream("train") == 0x116F54C41D0405DB
    assert len({split_stream(name) for name in ("train", "valid", "test", "Train", "train ")}) == 5


def test_float16_option_stores_the_same_tiles_in_half_precision(stores):
    half = build_examples(stores["train_in"], stores["dir"] / "half.zarr", make_config(dtype="float16"),
                          split="train", progress=False)
    ds16, ds32 = (xr.open_zarr(p, consolidated=False).load() for p in (half, stores["train"]))
    assert ds16["inputs"].dtype == np.float16
    assert np.allclose(ds16["inputs"].astype(np.float32), ds32["inputs"], atol=4e-3)
    assert np.array_equal(ds16["masks"], ds32["masks"])


def test_tile_larger_than_the_frame_is_refused_and_writes_nothing(stores):
    out = stores["dir"] / "too_big.zarr"
    with pytest.raises(ConfigError, match=r"tile_size \(256\).*train\.zarr.*ny=128, nx=128"):
        build_examples(stores["train_in"], out, make_config(tile_size=256), split="train", progress=False)
    assert not out.exists()


def test_empty_split_is_refused(stores):
    ds = open_holodec(stores["train_in"]).load().isel(hologram_number=slice(0, 0), particle=slice(0, 0))
    empty = stores["dir"] / "empty.zarr"
    ds.to_zarr(empty, mode="w", zarr_format=3, consolidated=False)
    with pytest.raises(ValueError, match="no holograms"):
        build_examples(empty, stores["dir"] / "empty_ex.zarr", make_config(), split="train", progress=False)


def test_dataset_normalises_channels_and_reads_masks(stores):
    data = TileDataset(stores["train"], channel_scale={"contrast_std": 0.5})
    group = zarr.open_group(stores["train"], mode="r")
    assert len(data) == N_HOLOGRAMS * (POSITIVES + NEGATIVES) == len(data.metadata)
    x, y = data[0]
    assert x.dtype == y.dtype == torch.float32 and x.shape == (2, TILE, TILE) and y.shape == (1, TILE, TILE)
    raw = group["inputs"][0]
    assert np.allclose(x[0].numpy(), (raw[0] - 1) / 0.5) and np.allclose(x[1].numpy(), raw[1] / 0.5)
    masks = group["masks"][:]
    targets = np.stack([data[i][1].numpy() for i in range(len(data))])[:, 0]
    in_focus, band = masks[:, 0] > 0, masks[:, 1] > 0
    assert np.array_equal(targets == 1, in_focus)
    assert np.array_equal(targets == IGNORE, band & ~in_focus) and (targets == IGNORE).any()


DIHEDRAL = [Augmentation(h, v, k) for h, v, k in itertools.product((False, True), (False, True), range(4))]


def test_augmentation_transforms_inputs_and_mask_identically(stores):
    plain = TileDataset(stores["train"])
    augmented = TileDataset(stores["train"], augment=True, seed=3)
    transforms_seen = set()
    for epoch in range(4):
        augmented.set_epoch(epoch)
        for index in np.flatnonzero(plain.metadata["positive"])[:4]:
            (x, y), (xa, ya) = plain[index], augmented[index]
            # Which of the 16 (8 distinct) flip/rotation combinations turn the plain item into the augmented one.
            matches_x = {t for t in DIHEDRAL if np.array_equal(apply_augmentation(x.numpy(), t), xa.numpy())}
            matches_y = {t for t in DIHEDRAL if np.array_equal(apply_augmentation(y.numpy(), t), ya.numpy())}
            assert matches_x and matches_x <= matches_y
            transforms_seen |= {apply_augmentation(np.arange(4).reshape(2, 2), t).tobytes() for t in matches_x}
    assert len(transforms_seen) > 2


def test_flips_have_their_own_rates_and_epochs_are_reproducible(stores):
    draws = np.array([tuple(draw_augmentation(7, epoch, index)) for epoch in range(10) for index in range(300)])
    hflip, vflip, rotations = draws[:, 0].astype(bool), draws[:, 1].astype(bool), draws[:, 2]
    assert abs(hflip.mean() - 0.5) < 0.04 and abs(vflip.mean() - 0.5) < 0.04
    assert abs(np.corrcoef(hflip, vflip)[0, 1]) < 0.06
    assert np.allclose(np.bincount(rotations, minlength=4) / len(rotations), 0.25, atol=0.03)
    first, second = (TileDataset(stores["train"], augment=True, seed=1) for _ in range(2))
    for data in (first, second):
        data.set_epoch(2)
    assert all(torch.equal(a, b) for i in range(len(first)) for a, b in zip(first[i], second[i]))
    second.set_epoch(3)
    assert not all(torch.equal(first[i][0], second[i][0]) for i in range(len(first)))


def test_dataloader_with_two_workers_iterates_every_example(stores):
    data = TileDataset(stores["train"], augment=True)
    data[0]  # the parent has opened the store: the workers must still read it themselves
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2)
    masks = torch.cat([y for _, y in loader])
    assert masks.shape == (len(data), 1, TILE, TILE)
    assert (masks.sum((1, 2, 3)) > 0).sum().item() == int(data.metadata["positive"].sum())


def test_real_and_imaginary_channels_are_the_field_of_the_amplitude_and_phase_tiles(stores):
    """examples.channels [real, imaginary]: the same tiles as amplitude and phase, as E = a e^{i phase} minus
    its background 1, with no 2π jump where the phase wraps."""
    config = make_config(channels=["real", "imaginary"])
    store = build_examples(stores["train_in"], stores["dir"] / "ex_field.zarr", config, split="train",
                           progress=False)
    field = TileDataset(store, channel_scale={"contrast_std": 0.5})
    polar = TileDataset(stores["train"], channel_scale={"contrast_std": 0.5})
    assert field.channels == ["real", "imaginary"] and len(field) == len(polar)
    wrapped = 0
    for i in range(len(field)):
        (real, imaginary), (amplitude, phase) = field[i][0].numpy(), polar[i][0].numpy()
        amplitude, phase = amplitude * 0.5 + 1, phase * 0.5
        assert np.allclose(real * 0.5 + 1, amplitude * np.cos(phase), atol=1e-5)
        assert np.allclose(imaginary * 0.5, amplitude * np.sin(phase), atol=1e-5)
        assert np.array_equal(field[i][1], polar[i][1])
        jumps = np.abs(np.diff(phase, axis=-1)) > np.pi
        wrapped += int(jumps.sum())
        assert np.all(np.abs(np.diff(imaginary * 0.5, axis=-1))[jumps] < 1.0)
    assert wrapped > 0  # the phase tiles do wrap somewhere; the field does not jump there


def test_normalize_channels_names_what_a_channel_lacks():
    with pytest.raises(ValueError, match=r"without \['phase'\]"):
        normalize_channels(np.ones((4, 4)), None, ["real"], None)
    with pytest.raises(ValueError, match="unknown channels"):
        normalize_channels(np.ones((4, 4)), np.zeros((4, 4)), ["intensity"], None)
