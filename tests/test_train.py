"""Training: the learning-rate schedule, learning, exact resume after a kill, outputs, early stopping, pruning."""

import logging
import math

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from holopipe.core.config import load_config, with_overrides
from holopipe.data.standardize import write_stats
from holopipe.ml import train as train_module
from holopipe.ml.dataset import TileDataset, write_synthetic_examples
from holopipe.ml.losses import ObjectCounts
from holopipe.ml.models import build_model, load_model
from holopipe.ml.train import is_improvement, learning_rate, train_model

TILE, CHANNELS, CONTRAST_STD = 32, ("amplitude", "phase"), 0.2
CSV_COLUMNS = ["epoch", "lr", "train_loss", "valid_loss", "dice", "iou", "precision", "recall", "object_f1",
               "object_precision", "object_recall", "seconds"]


def examples_store(path, n, seed):
    """Learnable tiles of TILE pixels (dark disks and their masks), as holopipe.data.examples lays them out."""
    return write_synthetic_examples(path, n, TILE, contrast_std=CONTRAST_STD, seed=seed)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("train_data")
    return {"train": examples_store(directory / "train.zarr", 24, 1),
            "valid": examples_store(directory / "valid.zarr", 8, 2),
            "stats": write_stats({"contrast_mean": 1.0, "contrast_std": CONTRAST_STD}, directory / "stats.json")}


def make_config(**train):
    return load_config({
        "splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 64, "ny": 64,
                   "z_min": 2e-3, "z_max": 6e-3},
        "model": {"architecture": "plain_unet", "width": 4, "depth": 2},
        "train": {"epochs": 3, "batch_size": 8, "num_workers": 0, "learning_rate": 1e-2, "warmup_epochs": 1,
                  "optimizer": "adam", "device": "cpu", **train},
    })


def run(config, data, out_dir, **kwargs):
    return train_model(config, data["train"], data["valid"], out_dir, stats_path=data["stats"], progress=False,
                       **kwargs)


# ---- learning rate and early-stopping rule (pure functions) ----

def test_learning_rate_warmup_then_cosine_to_one_percent():
    train = make_config(epochs=11, warmup_epochs=2, learning_rate=1e-3, schedule="cosine")["train"]
    assert learning_rate(0, train) == pytest.approx(1e-4)  # warm-up starts at 10 %
    assert learning_rate(1, train) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(2, train) == pytest.approx(1e-3)  # peak after warm-up
    # Halfway through the cosine (epoch 2 + 9/2): half-way between the peak and its 1 % floor.
    assert learning_rate(6.5, train) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert learning_rate(11, train) == pytest.approx(1e-5)
    positions = np.linspace(2, 11, 50)
    assert np.all(np.diff([learning_rate(p, train) for p in positions]) < 0)


def test_learning_rate_constant_and_without_warmup():
    train = make_config(epochs=5, warmup_epochs=0, learning_rate=3e-3, schedule="constant")["train"]
    assert [learning_rate(e, train) for e in (0, 0.5, 4.9)] == [3e-3] * 3


def test_improvement_rule():
    assert is_improvement(0.2, None, "dice") and is_improvement(0.3, 0.2, "dice")
    assert not is_improvement(0.2, 0.2, "iou") and not is_improvement(0.1, 0.2, "dice")
    assert is_improvement(0.1, 0.2, "loss") and not is_improvement(0.3, 0.2, "loss")
    assert not is_improvement(math.nan, None, "loss")


# ---- training ----

def test_loss_decreases_and_outputs_are_written(data, tmp_path):
    config = make_config(epochs=4, warmup_epochs=0)
    result = run(config, data, tmp_path)
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert list(table.columns) == CSV_COLUMNS
    assert table["epoch"].tolist() == [1, 2, 3, 4] and result.epochs_run == 4
    assert table["train_loss"].iloc[-1] < table["train_loss"].iloc[0]
    # The default metric is the particles' F1 in the validation tiles; a tie keeps the earlier epoch.
    assert result.best_metric == table["object_f1"].max()
    assert result.best_epoch == table["object_f1"].idxmax() + 1
    assert (tmp_path / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoint.pt").is_file() and result.model_path == tmp_path / "model.pt"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_model_file_rebuilds_the_best_model(data, tmp_path):
    config = make_config(epochs=3)
    result = run(config, data, tmp_path)
    model, info = load_model(result.model_path)
    assert not model.training
    assert info["model"] == config["model"] and info["train"] == config["train"]
    assert info["in_channels"] == 2 and info["channel_names"] == list(CHANNELS) and info["tile_size"] == TILE
    assert info["stats"]["contrast_std"] == CONTRAST_STD and info["best_epoch"] == result.best_epoch

    # Same outputs as the best weights kept in the checkpoint, rebuilt independently.
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    reference = build_model(config["model"], 2)
    reference.load_state_dict(checkpoint["best_model"])
    reference.eval()
    valid = TileDataset(data["valid"], channel_scale={"contrast_std": CONTRAST_STD})
    inputs, masks = map(torch.stack, zip(*[valid[i] for i in range(len(valid))]))
    with torch.no_grad():
        logits = model(inputs)
        assert torch.equal(logits, reference(inputs))
    # ... and the validation particles' F1 recorded for the best epoch.
    counts = ObjectCounts()
    counts.add(logits, masks, config["train"]["threshold"])
    assert counts.metrics()["object_f1"] == pytest.approx(result.best_metric, abs=1e-6)


@pytest.mark.slow
def test_training_twice_from_the_same_examples_is_bit_identical_and_the_seed_alone_changes_it(data, tmp_path):
    """The accuracy benchmark's training runs differ by their seeds and by nothing else: a rerun of one seed
    gives the same weights to the bit (with a DataLoader worker and augmentation on), another seed others."""
    config = make_config(epochs=2, num_workers=1, augment=True)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run(with_overrides(config, {"train.seed": seed}), data, tmp_path / name)
    weights = {name: torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"] for name in "abc"}
    assert all(torch.equal(weights["a"][key], weights["b"][key]) for key in weights["a"])
    assert not all(torch.equal(weights["a"][key], weights["c"][key]) for key in weights["a"])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_reduced_precision_and_the_scaler(data, tmp_path, precision):
    result = run(make_config(epochs=1, precision=precision), data, tmp_path)
    assert math.isfinite(pd.read_csv(tmp_path / "metrics.csv")["train_loss"].iloc[0])
    scaler = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (precision == "fp16")  # the gradient scaler acts only for fp16
    assert load_model(result.model_path)[1]["train"]["precision"] == precision


def test_load_model_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a model")
    for name in ("other.pt", "text.pt"):
        with pytest.raises(ValueError, match=f"{name}: not a holopipe model file"):
            load_model(tmp_path / name)


def kill_in_epoch_3(config, data, out, monkeypatch) -> None:
    """Train into ``out`` until a walltime kill (KeyboardInterrupt) in the middle of the third epoch."""

    def killed_in_epoch_3(epoch, train):
        if epoch >= 2.5:
            raise KeyboardInterrupt
        return learning_rate(epoch, train)

    monkeypatch.setattr(train_module, "learning_rate", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run(config, data, out)
    monkeypatch.setattr(train_module, "learning_rate", learning_rate)


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(data, tmp_path, monkeypatch, caplog):
    config = make_config(epochs=3)
    run(config, data, tmp_path / "a")
    kill_in_epoch_3(config, data, tmp_path / "b", monkeypatch)
    assert len(pd.read_csv(tmp_path / "b" / "metrics.csv")) == 2
    assert not (tmp_path / "b" / "model.pt").exists()

    # Resumed with a DataLoader worker: execution-only keys keep the checkpoint, and the tile order and
    # augmentations do not depend on the worker count.
    with caplog.at_level(logging.INFO, logger="holopipe"):
        result = run(with_overrides(config, {"train.num_workers": 1}), data, tmp_path / "b")
    assert "resuming after epoch 2" in caplog.text and result.epochs_run == 3
    metrics = [pd.read_csv(tmp_path / name / "metrics.csv").drop(columns="seconds") for name in "ab"]
    pd.testing.assert_frame_equal(metrics[0], metrics[1], check_exact=True)
    models = [torch.load(tmp_path / name / "model.pt", weights_only=True) for name in "ab"]
    finals = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"] for name in "ab"]
    for a, b in [(models[0]["state_dict"], models[1]["state_dict"]), (finals[0], finals[1])]:
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_incompatible_checkpoint_is_set_aside(data, tmp_path, caplog):
    config = make_config(epochs=1)
    run(config, data, tmp_path)
    changed = with_overrides(make_config(epochs=2), {"train.learning_rate": 5e-3})
    with caplog.at_level(logging.WARNING, logger="holopipe"):
        result = run(changed, data, tmp_path)
    assert "differs in train" in caplog.text
    assert (tmp_path / "checkpoint.incompatible-1.pt").is_file()
    assert result.epochs_run == 2  # started afresh, not resumed after epoch 1
    assert pd.read_csv(tmp_path / "metrics.csv")["lr"].iloc[0] == pytest.approx(5e-4)

    # A rerun of a finished run (Snakemake deletes the outputs first) resumes after its last epoch, trains
    # no further and writes every output again.
    metrics = (tmp_path / "metrics.csv").read_text()
    for name in ("metrics.csv", "model.pt", "learning_curve.png"):
        (tmp_path / name).unlink()
    with caplog.at_level(logging.INFO, logger="holopipe"):
        result = run(changed, data, tmp_path)
    assert "resuming after epoch 2" in caplog.text and result.epochs_run == 2
    assert not (tmp_path / "checkpoint.incompatible-2.pt").exists()
    assert (tmp_path / "metrics.csv").read_text() == metrics
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "learning_curve.png").is_file()

    (tmp_path / "checkpoint.pt").write_text("garbage")
    run(changed, data, tmp_path)
    assert (tmp_path / "checkpoint.incompatible-2.pt").read_text() == "garbage"


@pytest.mark.slow
def test_rebuilt_examples_store_is_not_resumed(data, tmp_path):
    """Same path, same size, other tiles: the checkpoint of the old tiles must not be resumed."""
    store = examples_store(tmp_path / "train.zarr", 24, 1)
    run(make_config(epochs=1), {**data, "train": store}, tmp_path / "run")
    examples_store(store, 24, 7)  # rebuilt in place with other tiles
    run(make_config(epochs=1), {**data, "train": store}, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint.incompatible-1.pt").is_file()


@pytest.mark.slow
def test_early_stopping_after_patience_epochs(data, tmp_path, monkeypatch):
    scripted = iter([0.1, 0.3, 0.2, 0.3, 0.25, 0.9, 0.9])  # best at epoch 2; epochs 3-5 do not improve
    real = train_module._evaluate

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "dice": next(scripted)}

    monkeypatch.setattr(train_module, "_evaluate", evaluate)
    result = run(make_config(epochs=7, early_stopping={"metric": "dice", "patience": 3}), data, tmp_path)
    assert (result.best_epoch, result.best_metric, result.epochs_run) == (2, 0.3, 5)
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 5


def test_trial_is_reported_then_pruned(data, tmp_path):
    class Trial:
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((value, step))

        def should_prune(self):
            return True

    trial = Trial()
    with pytest.raises(optuna.TrialPruned):
        run(make_config(epochs=3, early_stopping={"metric": "loss"}), data, tmp_path, trial=trial)
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert trial.reports == [(table["valid_loss"].iloc[0], 1)]
    assert not (tmp_path / "model.pt").exists()


# ---- on a CUDA GPU (skipped without one) ----

def recording_first_convolution(monkeypatch) -> list:
    """Patch the model builder so the first convolution records (dtype, device type, channels-last) per call."""
    seen, real = [], train_module.build_model

    def build(model_config, in_channels):
        model = real(model_config, in_channels)
        conv = next(module for module in model.modules() if isinstance(module, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, inputs, output: seen.append(
            (output.dtype, output.device.type, module.weight.is_contiguous(memory_format=torch.channels_last))))
        return model

    monkeypatch.setattr(train_module, "build_model", build)
    return seen


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_precision_on_cuda_runs_reduced_and_fp16_scales_gradients(data, tmp_path, monkeypatch, caplog, precision):
    from holopipe.core.device import autocast_dtype

    expected = autocast_dtype(precision, torch.device("cuda"))  # auto: bf16 from compute capability 8.0
    seen = recording_first_convolution(monkeypatch)
    with caplog.at_level(logging.INFO, logger="holopipe"):
        run(make_config(epochs=2, precision=precision, device="cuda"), data, tmp_path)
    assert seen and set(seen) == {(expected, "cuda", True)}  # every step autocast, channels-last, on the GPU
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert np.isfinite(table["train_loss"]).all() and table["train_loss"].iloc[-1] < table["train_loss"].iloc[0]
    scaler = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (expected == torch.float16)
    if scaler:
        assert 0 < scaler["scale"] < float("inf")
    line = next(record.getMessage() for record in caplog.records if record.getMessage().startswith("train.device"))
    assert torch.cuda.get_device_name() in line and str(expected).removeprefix("torch.") in line
    assert ("GradScaler" in line) == (expected == torch.float16)


@pytest.mark.gpu
def test_cuda_resume_restores_the_cuda_random_state(data, tmp_path, monkeypatch):
    """Killed and resumed on a GPU, with dropout drawing from the CUDA generator, training ends with the
    uninterrupted run's CUDA random state and weights. Deterministic kernels are switched on for the GPU too
    (training leaves them off there for speed), so the weights can be compared."""
    real_build, real_deterministic = train_module.build_model, train_module._deterministic
    monkeypatch.setattr(train_module, "build_model",
                        lambda model_config, in_channels: torch.nn.Sequential(
                            torch.nn.Dropout(0.2), real_build(model_config, in_channels)))
    monkeypatch.setattr(train_module, "_deterministic", lambda enabled: real_deterministic(True))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    config = make_config(epochs=3, device="cuda", precision="fp32")
    run(config, data, tmp_path / "a")
    kill_in_epoch_3(config, data, tmp_path / "b", monkeypatch)
    run(config, data, tmp_path / "b")  # reseeds, so the CUDA state after 2 epochs comes only from the checkpoint

    checkpoints = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in "ab"]
    states = [[state.cpu() for state in checkpoint["rng"]["cuda"]] for checkpoint in checkpoints]
    torch.manual_seed(config["train"]["seed"])
    seeded = torch.cuda.get_rng_state_all()
    assert not all(torch.equal(a, b) for a, b in zip(states[0], seeded))  # dropout did draw from the GPU
    assert len(states[0]) == len(states[1]) and all(torch.equal(a, b) for a, b in zip(*states))
    weights = [checkpoint["model"] for checkpoint in checkpoints]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6,
                                   msg=lambda text: f"{key}: {text}")
