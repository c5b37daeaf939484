"""Train the segmentation model on an examples store, validated each epoch, resumable after a kill.

One visible loop in :func:`train_model`: per step the learning rate comes from the pure
:func:`learning_rate`, the forward pass runs under autocast (bf16 where the GPU supports it, fp16 with a
gradient scaler otherwise, fp32 on CPU), and each epoch ends with validation, early stopping and an
atomically written ``checkpoint.pt``. A batch job killed at its walltime reruns the same command: the
checkpoint carries the weights, optimizer, scaler, random states and history, and every epoch's tile
order and augmentations are functions of ``(train.seed, epoch)`` only, so the resumed run continues
exactly where the killed one stopped (bitwise on CPU). ``model.pt`` holds the best weights and everything
inference needs to rebuild the model (:func:`holopipe.ml.models.load_model`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # not tqdm.auto: its constructor calls iter(), starting a DataLoader twice

from holopipe import __version__
from holopipe.core.device import autocast, autocast_dtype, describe_device, resolve_device
from holopipe.core.files import write_atomically
from holopipe.data.standardize import read_stats
from holopipe.ml.dataset import TileDataset
from holopipe.ml.losses import ObjectCounts, PixelCounts, build_loss
from holopipe.ml.models import MODEL_FORMAT, build_model, model_stride

__all__ = ["CHECKPOINT_FORMAT", "TrainResult", "is_improvement", "learning_rate", "train_model"]

log = logging.getLogger("holopipe")

CHECKPOINT, MODEL, METRICS, CURVE = "checkpoint.pt", "model.pt", "metrics.csv", "learning_curve.png"
CHECKPOINT_FORMAT = "holopipe-checkpoint/1"
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "valid_loss", "dice", "iou", "precision", "recall", "object_f1",
                  "object_precision", "object_recall", "seconds")
# Early-stopping metric -> metrics column; loss is minimised, the others maximised.
METRIC_COLUMN = {"object_f1": "object_f1", "dice": "dice", "iou": "iou", "loss": "valid_loss"}
# train keys that change how training runs, not what it computes: a checkpoint stays valid across them.
EXECUTION_KEYS = ("num_workers", "compile", "device", "channels_last")
WARMUP_START, COSINE_FLOOR = 0.1, 0.01  # fractions of the peak learning rate


class TrainResult(NamedTuple):
    """Best early-stopping metric (nan if no epoch gave a finite one), its 1-based epoch, epochs run, model.pt."""

    best_metric: float
    best_epoch: int
    epochs_run: int
    model_path: Path


def learning_rate(epoch: float, train: dict) -> float:
    """Learning rate at fractional, 0-based ``epoch`` (epoch index + fraction of its steps done).

    Linear warm-up from 10 % of ``train.learning_rate`` over ``train.warmup_epochs``, then constant, or
    a half cosine that reaches 1 % of the peak at ``train.epochs``.
    """
    peak, warmup, epochs = train["learning_rate"], train["warmup_epochs"], train["epochs"]
    if epoch < warmup:
        return peak * (WARMUP_START + (1 - WARMUP_START) * epoch / warmup)
    if train["schedule"] == "constant" or epochs <= warmup:
        return peak
    progress = min(1.0, (epoch - warmup) / (epochs - warmup))
    return peak * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def is_improvement(value: float, best: float | None, metric: str) -> bool:
    """Whether validation ``value`` of early-stopping ``metric`` strictly beats ``best`` (None: nothing yet).

    A non-finite value never improves, so a diverged epoch cannot become the best model.
    """
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def _epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the tile order of ``epoch``: a function of (seed, epoch) only, so a resumed run replays it."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA generators too


def _rng_states(device: torch.device) -> dict:
    """Random states in types ``torch.load(weights_only=True)`` accepts (numpy's key as a list)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (name, key.tolist(), pos, has_gauss, gauss),
              "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


@contextmanager
def _deterministic(enabled: bool):
    """Deterministic kernels while training on CPU (warn only), restoring the caller's setting after."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _save(payload: dict, path: Path) -> None:
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def _cpu_copy(state_dict: dict) -> dict:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state_dict.items()}


def _store_identity(dataset: TileDataset) -> dict:
    """The store's path and shape, and a digest of its tiles (the metadata of all, the pixels of the first
    and last): a store rebuilt with other tiles must not resume this run's checkpoint."""
    tiles = hashlib.sha256(pd.util.hash_pandas_object(dataset.metadata, index=True).to_numpy().tobytes())
    for index in (0, len(dataset) - 1):
        inputs, mask = dataset.raw(index)
        tiles.update(inputs.tobytes())
        tiles.update(mask.tobytes())
    return {"path": str(dataset.path.resolve()), "examples": len(dataset), "channels": dataset.channels,
            "tile_size": dataset.tile_size, "tiles": tiles.hexdigest()}


def _fingerprint(config: dict, train_set: TileDataset, valid_set: TileDataset, stats: dict) -> dict:
    """What a checkpoint must share with this run to be resumed: everything that changes the numbers."""
    train = {key: value for key, value in config["train"].items() if key not in EXECUTION_KEYS}
    return json.loads(json.dumps({"model": config["model"], "train": train, "stats": stats,
                                  "train_store": _store_identity(train_set),
                                  "valid_store": _store_identity(valid_set)}, sort_keys=True))


def _set_aside(path: Path, reason: str) -> None:
    number = 1
    while (target := path.with_name(f"{path.stem}.incompatible-{number}{path.suffix}")).exists():
        number += 1
    os.replace(path, target)
    log.warning("%s: %s; moved to %s, training starts afresh", path, reason, target.name)


def _resumable_checkpoint(path: Path, fingerprint: dict, device: torch.device) -> dict | None:
    """The checkpoint at ``path`` if it belongs to this run; an unreadable or foreign one is set aside."""
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is set aside, never resumed
        _set_aside(path, f"unreadable checkpoint ({type(exc).__name__}: {exc})")
        return None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        _set_aside(path, "not a holopipe checkpoint")
        return None
    old = json.loads(checkpoint["fingerprint"])
    if old != fingerprint:
        differing = sorted(key for key in fingerprint.keys() | old.keys() if old.get(key) != fingerprint.get(key))
        _set_aside(path, f"checkpoint of a different run (differs in {', '.join(differing)})")
        return None
    return checkpoint


def _build_optimizer(model: torch.nn.Module, train: dict) -> torch.optim.Optimizer:
    params, lr, decay = model.parameters(), train["learning_rate"], train["weight_decay"]
    if train["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    if train["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=decay)


def _to_device(inputs, masks, device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    inputs = inputs.to(device, non_blocking=True, memory_format=memory_format)
    return inputs, masks.to(device, non_blocking=True)


@torch.no_grad()
def _evaluate(forward, loader, loss_fn, device, amp_dtype, threshold: float, channels_last: bool) -> dict:
    """Mean validation loss (weighted by batch size), pixel and object metrics over the whole split."""
    counts, objects, total, n = PixelCounts(), ObjectCounts(), torch.zeros((), device=device), 0
    for inputs, masks in loader:
        inputs, masks = _to_device(inputs, masks, device, channels_last)
        with autocast(device, amp_dtype):
            logits = forward(inputs)  # (B, 1, H, W)
        logits = logits.float()
        total += loss_fn(logits, masks) * len(inputs)
        n += len(inputs)
        counts.add(logits, masks, threshold)
        objects.add(logits, masks, threshold)
    return {"valid_loss": float(total / n), **{name: float(value) for name, value in counts.metrics().items()},
            **objects.metrics()}


def _write_metrics(history: list[dict], path: Path) -> None:
    table = pd.DataFrame(history, columns=list(METRIC_COLUMNS))
    write_atomically(path, lambda tmp: table.to_csv(tmp, index=False))


def _plot_learning_curve(history: list[dict], path: Path, metric: str, best_epoch: int) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    table = pd.DataFrame(history, columns=list(METRIC_COLUMNS))
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    losses, scores = figure.subplots(1, 2)
    losses.plot(table["epoch"], table["train_loss"], "o-", label="train")
    losses.plot(table["epoch"], table["valid_loss"], "o-", label="valid")
    losses.set(xlabel="epoch", ylabel="loss", title="Loss")
    scores.plot(table["epoch"], table["dice"], "o-", label="dice")
    scores.plot(table["epoch"], table["iou"], "o-", label="IoU")
    scores.plot(table["epoch"], table["object_f1"], "s-", label="particles F1")
    scores.set(xlabel="epoch", ylabel="validation score", title="Validation tiles", ylim=(0, 1))
    for axes in (losses, scores):
        if best_epoch:
            axes.axvline(best_epoch, color="grey", linestyle=":", label=f"best {metric}")
        axes.legend()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def train_model(config: dict, train_store, valid_store, out_dir, *, stats_path=None, trial=None,
                progress=True) -> TrainResult:
    """Train ``config["model"]`` with ``config["train"]`` on two examples stores; outputs go to ``out_dir``.

    ``config`` is validated (:func:`holopipe.core.config.load_config`). ``stats_path`` is the standardization
    stats JSON whose ``contrast_std`` scales the inputs (and which ``model.pt`` carries). Resumes from a
    compatible ``out_dir/checkpoint.pt``. With an optuna ``trial``, reports the early-stopping metric
    every epoch and raises ``optuna.TrialPruned`` when the trial should be pruned.
    """
    train, model_config = config["train"], config["model"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = read_stats(stats_path) if stats_path is not None else {}
    device = resolve_device(train["device"])
    amp_dtype = autocast_dtype(train["precision"], device)
    channels_last = train["channels_last"] and device.type == "cuda"
    seed, epochs = train["seed"], train["epochs"]
    metric, patience = train["early_stopping"]["metric"], train["early_stopping"]["patience"]
    _seed_everything(seed)

    # Data: no persistent workers, so each epoch's workers see the epoch set on the dataset. The tile
    # order and the workers' seeds come from two generators reseeded per epoch, so the order depends
    # on (seed, epoch) alone, whatever the loader draws for its workers.
    train_set = TileDataset(train_store, augment=train["augment"], seed=seed, channel_scale=stats)
    valid_set = TileDataset(valid_store, augment=False, seed=seed, channel_scale=stats)
    if valid_set.channels != train_set.channels:
        raise ValueError(f"{valid_set.path}: channels {valid_set.channels} differ from the training "
                         f"store's {train_set.channels} ({train_set.path})")
    stride = model_stride(model_config)
    if train_set.tile_size % stride or valid_set.tile_size % stride:
        raise ValueError(f"tile sizes {train_set.tile_size} ({train_set.path}) and {valid_set.tile_size} "
                         f"({valid_set.path}) must be multiples of the model's stride {stride}")
    order, worker_seeds = torch.Generator(), torch.Generator()
    loader_options = {"batch_size": train["batch_size"], "num_workers": train["num_workers"],
                      "pin_memory": device.type == "cuda"}
    train_loader = torch.utils.data.DataLoader(
        train_set, sampler=torch.utils.data.RandomSampler(train_set, generator=order), generator=worker_seeds,
        **loader_options)
    valid_loader = torch.utils.data.DataLoader(valid_set, shuffle=False, **loader_options)

    model = build_model(model_config, len(train_set.channels)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if train["compile"] else model  # the uncompiled `model` is saved
    optimizer = _build_optimizer(model, train)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # only fp16 needs it
    log.info("train.device: %s%s", describe_device(device, amp_dtype),
             ", gradients through a GradScaler" if scaler.is_enabled() else "")
    loss_fn = build_loss(train["loss"])

    fingerprint = _fingerprint(config, train_set, valid_set, stats)
    checkpoint_path = out_dir / CHECKPOINT
    epoch, best_metric, best_epoch, waited, history = 0, None, 0, 0, []
    best_state = _cpu_copy(model.state_dict())
    checkpoint = _resumable_checkpoint(checkpoint_path, fingerprint, device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when the scaler was off (not fp16), e.g. auto on another device
            scaler.load_state_dict(checkpoint["scaler"])
        _restore_rng_states(checkpoint["rng"])
        epoch, best_metric, best_epoch = checkpoint["epoch"], checkpoint["best_metric"], checkpoint["best_epoch"]
        waited, history = checkpoint["epochs_without_improvement"], checkpoint["history"]
        best_state = _cpu_copy(checkpoint["best_model"])
        log.info("%s: resuming after epoch %d (best %s %s at epoch %d)", checkpoint_path, epoch, metric,
                 best_metric, best_epoch)
        del checkpoint

    steps = len(train_loader)
    bar = tqdm(total=epochs, initial=epoch, desc="train", unit="epoch", disable=not progress)
    with bar, _deterministic(device.type == "cpu"):
        while epoch < epochs and waited < patience:
            start = time.perf_counter()
            train_set.set_epoch(epoch)
            order.manual_seed(_epoch_seed(seed, epoch))
            worker_seeds.manual_seed(_epoch_seed(seed, epoch) + 1)
            model.train()
            total, n = torch.zeros((), device=device), 0
            for step, (inputs, masks) in enumerate(tqdm(train_loader, desc=f"epoch {epoch + 1}", unit="batch",
                                                        leave=False, disable=not progress)):
                lr = learning_rate(epoch + step / steps, train)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                inputs, masks = _to_device(inputs, masks, device, channels_last)  # (B, C, H, W), (B, 1, H, W)
                with autocast(device, amp_dtype):
                    logits = forward(inputs)  # (B, 1, H, W)
                loss = loss_fn(logits.float(), masks)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += loss.detach() * len(inputs)  # summed on the device: no sync per step
                n += len(inputs)

            model.eval()
            valid = _evaluate(forward, valid_loader, loss_fn, device, amp_dtype, train["threshold"], channels_last)
            epoch += 1
            row = {"epoch": epoch, "lr": learning_rate(epoch - 1, train), "train_loss": float(total / n), **valid,
                   "seconds": time.perf_counter() - start}
            history.append(row)
            value = row[METRIC_COLUMN[metric]]
            if is_improvement(value, best_metric, metric):
                best_metric, best_epoch, waited = value, epoch, 0
                best_state = _cpu_copy(model.state_dict())
            else:
                waited += 1

            _save({"format": CHECKPOINT_FORMAT, "fingerprint": json.dumps(fingerprint, sort_keys=True),
                   "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scaler": scaler.state_dict(), "best_metric": best_metric, "best_epoch": best_epoch,
                   "epochs_without_improvement": waited, "best_model": best_state, "history": history,
                   "rng": _rng_states(device)}, checkpoint_path)
            _write_metrics(history, out_dir / METRICS)
            bar.update()
            log.info("epoch %d/%d: lr %.3g, train loss %.4f, valid loss %.4f, dice %.4f, iou %.4f, "
                     "precision %.4f, recall %.4f, particles F1 %.4f (%.1f s)", epoch, epochs, row["lr"],
                     row["train_loss"], row["valid_loss"], row["dice"], row["iou"], row["precision"], row["recall"],
                     row["object_f1"], row["seconds"])
            if trial is not None:
                trial.report(value, epoch)
                if trial.should_prune():
                    import optuna  # only tuning needs it

                    raise optuna.TrialPruned(f"pruned after epoch {epoch} with validation {metric} {value:.4g}")
    if waited >= patience:
        log.info("early stopping after epoch %d: validation %s has not improved for %d epochs (best %s at "
                 "epoch %d)", epoch, metric, waited, best_metric, best_epoch)

    # Again here: a rerun of a finished run (Snakemake deleted the outputs first) resumes past the last
    # epoch, skips the loop and must still leave every output.
    _write_metrics(history, out_dir / METRICS)
    model_path = out_dir / MODEL
    _save({"format": MODEL_FORMAT, "state_dict": best_state, "model": copy.deepcopy(model_config),
           "in_channels": len(train_set.channels), "channel_names": list(train_set.channels),
           "tile_size": train_set.tile_size, "stride": stride, "stats": stats, "train": copy.deepcopy(train),
           "holopipe_version": __version__, "metric": metric, "best_metric": best_metric,
           "best_epoch": best_epoch, "epochs_run": epoch}, model_path)
    _plot_learning_curve(history, out_dir / CURVE, metric, best_epoch)
    return TrainResult(math.nan if best_metric is None else best_metric, best_epoch, epoch, model_path)
