"""Training throughput: the real pipeline (zarr DataLoader + augmentations + AMP step) against the bare
model step on random tensors already on the device, in one run.

    python benchmarks/bench_train.py                 # CPU: default config (plain U-Net, 128-pixel tiles)
    python benchmarks/bench_train.py --gpu-config    # GPU: 512-pixel tiles, batch 16, as on an H100/H200

Prints tiles/s of both and their ratio (target >= 0.8 on a GPU): the gap is what data loading and
augmentation cost the accelerator.
"""

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from holopipe.core.config import load_config, with_overrides
from holopipe.core.device import autocast, autocast_dtype, resolve_device
from holopipe.data.standardize import write_stats
from holopipe.ml.dataset import write_synthetic_examples
from holopipe.ml.losses import build_loss
from holopipe.ml.models import build_model
from holopipe.ml.train import train_model

REPO = Path(__file__).resolve().parents[1]


def bare_steps_per_second(config: dict, tile: int, steps: int) -> float:
    """Tiles/s of forward + loss + backward + optimizer step on random tensors resident on the device."""
    train = config["train"]
    device = resolve_device(train["device"])
    amp = autocast_dtype(train["precision"], device)
    model = build_model(config["model"], 2).to(device)
    if device.type == "cuda" and train["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = build_loss(train["loss"])
    batch = train["batch_size"]
    inputs = torch.randn(batch, 2, tile, tile, device=device)
    masks = (torch.rand(batch, 1, tile, tile, device=device) > 0.99).float()

    def step():
        with autocast(device, amp):
            logits = model(inputs)
        loss = loss_fn(logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: kernels, allocator
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-config", action="store_true", help="512-pixel tiles, batch 16, 8 workers")
    parser.add_argument("--tiles", type=int, default=None, help="training tiles in the store")
    args = parser.parse_args()
    config = load_config(REPO / "config" / "config.yaml")
    tile = config["examples"]["tile_size"]
    overrides = {"train.epochs": 2, "train.warmup_epochs": 0}
    if args.gpu_config:
        tile = 512
        overrides.update({"train.batch_size": 16, "train.num_workers": 8})
    config = with_overrides(config, overrides)
    n_tiles = args.tiles or (512 if args.gpu_config else 96)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_store = write_synthetic_examples(tmp / "train.zarr", n_tiles, tile, seed=1)
        valid_store = write_synthetic_examples(tmp / "valid.zarr", config["train"]["batch_size"], tile, seed=2)
        stats = write_stats({"contrast_mean": 1.0, "contrast_std": 0.2}, tmp / "stats.json")
        train_model(config, train_store, valid_store, tmp / "model", stats_path=stats, progress=False)
        seconds = pd.read_csv(tmp / "model" / "metrics.csv")["seconds"].iloc[-1]  # 2nd epoch: warm
    pipeline = n_tiles / seconds
    bare = bare_steps_per_second(config, tile, steps=max(4, n_tiles // config["train"]["batch_size"] // 2))
    device = resolve_device(config["train"]["device"])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}: {config['model']['architecture']} width {config['model']['width']}, {tile}x{tile} tiles, "
          f"batch {config['train']['batch_size']}: epoch of {n_tiles} tiles {seconds:.1f} s; pipeline "
          f"{pipeline:.1f} tiles/s, bare step {bare:.1f} tiles/s, ratio {pipeline / bare:.2f}")


if __name__ == "__main__":
    main()
