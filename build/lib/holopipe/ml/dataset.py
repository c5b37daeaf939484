"""PyTorch access to an examples store (:mod:`holopipe.data.examples`): normalised tiles, optional augmentation.

Channels: ``amplitude`` and ``phase`` of the reconstructed field E, or its ``real`` and ``imaginary`` parts
(E itself: no 2π wrap, and no jump at a droplet's dark core, where the phase is undefined). Normalisation:
each channel minus its background value (1 for amplitude and real, 0 for phase and imaginary) over ``s``,
the training set's contrast standard deviation (``contrast_std`` of the standardization statistics). Angular-spectrum
propagation is unitary, so the contrast hologram's fluctuation about its background of 1 keeps its
energy at every plane: one scale serves every plane, and the background maps to 0. The definition
lives in :func:`holopipe.optics.reconstruction.normalize_channels` alone, which inference (:mod:`holopipe.detect.infer`)
calls too.

Augmentation draws a horizontal flip, a vertical flip (each with its own probability 0.5) and a
number of 90° rotations from ``numpy.random.default_rng([seed, epoch, index])``, so an epoch is
reproducible in any worker and any order. The transform is applied to inputs and target together. A
mirrored or rotated field is itself a valid field (the propagation kernel is symmetric), so the phase
channel stays physical.

The target is the ``in_focus`` mask, with :data:`IGNORE` where the store marks the ``band`` (a particle that
looks in focus on a plane of another bin) and nothing is in focus: losses and metrics leave those pixels out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import zarr

from holopipe.core.io import ignoring_snakemake_marker
from holopipe.optics.reconstruction import check_channels, contrast_scale, scale_channels

__all__ = ["IGNORE", "Augmentation", "TileDataset", "apply_augmentation", "draw_augmentation", "target_of",
           "write_synthetic_examples"]

FLIP_PROBABILITY = 0.5
METADATA = ("hid", "z", "z_bin", "row0", "col0", "positive")
IGNORE = -1.0
"""Target value of a pixel the loss and the metrics leave out (the depth-of-focus band of another bin)."""
class Augmentation(NamedTuple):
    """Flip columns (horizontal), flip rows (vertical), then rotate by ``rotations`` × 90°."""

    hflip: bool
    vflip: bool
    rotations: int


def draw_augmentation(seed: int, epoch: int, index: int) -> Augmentation:
    """The augmentation of example ``index`` in ``epoch``; each flip is drawn with its own probability."""
    rng = np.random.default_rng([seed, epoch, index])
    hflip = bool(rng.random() < FLIP_PROBABILITY)
    vflip = bool(rng.random() < FLIP_PROBABILITY)
    return Augmentation(hflip, vflip, int(rng.integers(4)))


def apply_augmentation(array: np.ndarray, augmentation: Augmentation) -> np.ndarray:
    """``array`` (..., H, W) flipped and rotated in its last two axes (a view where numpy allows)."""
    if augmentation.hflip:
        array = array[..., :, ::-1]
    if augmentation.vflip:
        array = array[..., ::-1, :]
    return np.rot90(array, augmentation.rotations, axes=(-2, -1))


def target_of(masks: np.ndarray, mask_channels) -> np.ndarray:
    """The training target (1, H, W) float32 of a stored mask (channels ``mask_channels``): 1 in focus, 0
    empty, :data:`IGNORE` in the band where nothing is in focus. A store without a band has no IGNORE."""
    names = list(mask_channels)
    in_focus = masks[names.index("in_focus")] > 0
    target = in_focus.astype(np.float32)
    if "band" in names:
        target[(masks[names.index("band")] > 0) & ~in_focus] = IGNORE
    return target[None]


class TileDataset(torch.utils.data.Dataset):
    """Examples of one split as ``(inputs (C, H, W) float32, target (1, H, W) float32)`` tensors (target:
    :func:`target_of`).

    The store is opened lazily on the first item in each process and never pickled, so DataLoader
    workers (fork or spawn) each read it themselves. Call :meth:`set_epoch` before iterating a new
    epoch; with ``persistent_workers=True`` the workers keep the epoch they were started with.
    """

    def __init__(self, path, *, augment: bool = False, seed: int = 0, channel_scale: dict | None = None):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise FileNotFoundError(f"{self.path}: not a zarr store (expected an examples store)")
        with ignoring_snakemake_marker():
            group = zarr.open_group(self.path, mode="r")
        missing = [name for name in ("inputs", "masks", *METADATA) if name not in group]
        if missing or "channel_names" not in group.attrs:
            raise ValueError(f"{self.path}: not an examples store (missing {missing or ['attribute channel_names']})")
        self.channels = list(group.attrs["channel_names"])
        self.mask_channels = [str(name) for name in group["mask_channel"][:]] if "mask_channel" in group \
            else ["in_focus"]
        self.tile_size = int(group.attrs["tile_size"])
        self.metadata = pd.DataFrame({name: np.asarray(group[name][:]) for name in METADATA})
        self.augment, self.seed, self.epoch = bool(augment), int(seed), 0
        self._stats = {"contrast_std": contrast_scale(channel_scale)}
        check_channels(self.channels, str(self.path))
        self._arrays = None

    def __len__(self) -> int:
        return len(self.metadata)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = int(epoch)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = None  # each process opens the store itself
        return state

    def _open(self):
        # Reopened in a forked child that inherited the parent's handles.
        if self._arrays is None or self._arrays[2] != os.getpid():
            with ignoring_snakemake_marker():
                group = zarr.open_group(self.path, mode="r")
            self._arrays = (group["inputs"], group["masks"], os.getpid())
        return self._arrays

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Example ``index`` as stored: inputs (C, H, W) and mask (1, H, W), before scaling and augmentation."""
        inputs, masks, _ = self._open()
        return np.asarray(inputs[index]), np.asarray(masks[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"example {index} out of range for {n} examples in {self.path}")
        inputs, mask = self.raw(index % n)
        x = scale_channels(list(inputs.astype(np.float32)), self.channels, self._stats)
        y = target_of(mask, self.mask_channels)
        if self.augment:
            augmentation = draw_augmentation(self.seed, self.epoch, index)
            x, y = apply_augmentation(x, augmentation), apply_augmentation(y, augmentation)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def write_synthetic_examples(path, n_tiles: int, tile_size: int, *, contrast_std: float = 0.2,
                             seed: int = 0) -> Path:
    """An examples store of ``n_tiles`` learnable tiles, for tests and benchmarks that need no simulation.

    Each tile has 1–3 dark disks in amplitude (with a phase bump) over noise of ``contrast_std``, and the
    masks of those disks; the layout is the one :func:`holopipe.data.examples.build_examples` writes.
    """
    import xarray as xr

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:tile_size, :tile_size]
    masks = np.zeros((n_tiles, 1, tile_size, tile_size), np.uint8)
    margin = tile_size / 8
    for example in range(n_tiles):
        for _ in range(rng.integers(1, 4)):
            row, col = rng.uniform(margin, tile_size - margin, 2)
            radius = rng.uniform(tile_size / 16, tile_size / 8)
            masks[example, 0] |= ((rows - row) ** 2 + (cols - col) ** 2 <= radius**2).astype(np.uint8)
    disk = masks[:, 0].astype(np.float32)
    noise = 0.3 * contrast_std * rng.standard_normal((n_tiles, 2, tile_size, tile_size)).astype(np.float32)
    inputs = np.stack([1 - 0.6 * disk, 0.4 * disk], axis=1) + noise
    channels = ("amplitude", "phase")
    ds = xr.Dataset(
        {"inputs": (("example", "channel", "row", "col"), inputs),
         "masks": (("example", "mask_channel", "row", "col"), masks),
         "hid": ("example", np.arange(n_tiles, dtype=np.int32) // 4 + 1),
         "z": ("example", np.full(n_tiles, 5e-3)),
         "z_bin": ("example", np.zeros(n_tiles, np.int32)),
         "row0": ("example", np.zeros(n_tiles, np.int32)),
         "col0": ("example", np.zeros(n_tiles, np.int32)),
         "positive": ("example", np.ones(n_tiles, bool)),
         "near": ("example", np.zeros(n_tiles, bool))},
        coords={"channel": np.array(channels, dtype=object), "mask_channel": np.array(["in_focus"], dtype=object)},
        attrs={"channel_names": list(channels), "tile_size": tile_size},
    )
    ds = ds.chunk({"example": 1})
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    return Path(path)
