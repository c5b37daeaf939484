"""Tuning: worker processes sharing a study reach exactly n_trials, killed workers leave nothing RUNNING,
pruning and out-of-memory trials, suggestions, the summary files, the study's name."""

import math
import multiprocessing
import os
import socket
import time
import uuid
from functools import partial
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from holopipe.config import load_config, with_overrides
from holopipe.tune import _sweep_stale, open_storage, run_worker, study_name, suggest, summarize

POSTGRES_ENV = "HOLOPIPE_TEST_POSTGRES_URL"
SEARCH_SPACE = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                "model.width": {"type": "categorical", "choices": [4, 8, 16]}}


def make_config(storage=None, **tune):
    return load_config({
        "splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 64, "ny": 64,
                   "z_min": 2e-3, "z_max": 6e-3},
        "model": {"architecture": "plain_unet", "width": 4, "depth": 2},
        "train": {"epochs": 3, "batch_size": 8, "num_workers": 0, "device": "cpu", "optimizer": "adam"},
        # A seed of its own per config: each test gets a fresh study, also in a shared database.
        "tune": {"n_trials": 9, "heartbeat": 0.5, "startup_trials": 3, "storage": storage,
                 "seed": uuid.uuid4().int % 10**9, "search_space": SEARCH_SPACE, **tune},
    })


def quality(params):
    """Best at learning rate 10^-2.5 and the widest model: what TPE should find."""
    return -(math.log10(params["train.learning_rate"]) + 2.5) ** 2 + params["model.width"] / 100


def fake_objective(config, trial, params, *, delay=0.2, hang_marker=None):
    """Sleep like a short training, return ``quality``; with hang_marker, the first trial hangs."""
    if hang_marker is not None and not Path(hang_marker).exists():
        Path(hang_marker).write_text(str(trial.number))
        time.sleep(600)
    time.sleep(delay)
    return quality(params)


def load(config, workdir):
    return optuna.load_study(study_name=study_name(config), storage=open_storage(config, workdir))


def states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


@pytest.fixture(params=["journal", "postgres"])
def storage_url(request):
    if request.param == "journal":
        yield None
        return
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (export {POSTGRES_ENV}=$(.ci/start-postgres))")
    yield url


@pytest.fixture
def cleanup():
    """Delete the tests' studies from a shared database afterwards."""
    configs = []
    yield configs.append
    for config, workdir in configs:
        if config["tune"]["storage"] is not None:
            optuna.delete_study(study_name=study_name(config), storage=open_storage(config, workdir))


def spawn_worker(config, workdir, worker, objective):
    process = multiprocessing.get_context("spawn").Process(
        target=run_worker, args=(config, None, None, None, workdir),
        kwargs={"worker": worker, "objective": objective}, daemon=True)
    process.start()
    return process


def join_all(processes, timeout):
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, "workers did not finish in time"


def test_worker_processes_reach_exactly_n_trials(tmp_path, storage_url, cleanup):
    config = make_config(storage_url, trials_per_gpu=2)  # 3 processes x 2 loops race for 9 trials
    cleanup((config, tmp_path))
    workers = [spawn_worker(config, tmp_path, w, partial(fake_objective, delay=0.3)) for w in range(3)]
    join_all(workers, timeout=40)

    assert [p.exitcode for p in workers] == [0, 0, 0]
    study = load(config, tmp_path)
    trials = study.get_trials(deepcopy=False)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == config["tune"]["n_trials"]
    assert TrialState.RUNNING not in states(study)
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    assert len({t.user_attrs["pid"] for t in trials if t.state == TrialState.COMPLETE}) >= 2
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(quality(trial.params))


def test_killed_worker_leaves_nothing_running_and_the_others_make_up_the_count(tmp_path, storage_url, cleanup):
    config = make_config(storage_url)
    n_trials = config["tune"]["n_trials"]
    cleanup((config, tmp_path))
    marker = tmp_path / "hanging"
    victim = spawn_worker(config, tmp_path, 0, partial(fake_objective, hang_marker=str(marker)))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline and victim.is_alive(), "the victim never started its trial"
        time.sleep(0.1)
    hung = int(marker.read_text())
    survivors = [spawn_worker(config, tmp_path, w, partial(fake_objective, delay=0.1)) for w in (1, 2)]
    # Survivors run trials while the hung one counts as running, then wait for it instead of leaving.
    study = load(config, tmp_path)
    while sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states(study)) < n_trials - 1:
        assert time.monotonic() < deadline + 30, "survivors stalled"
        time.sleep(0.2)
    time.sleep(0.5)
    assert all(p.is_alive() for p in survivors)
    victim.kill()  # SIGKILL: no chance to tell the trial anything, and it may die holding the journal lock
    join_all(survivors, timeout=60)

    assert [p.exitcode for p in survivors] == [0, 0]
    trials = study.get_trials(deepcopy=False)
    assert TrialState.RUNNING not in states(study)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n_trials
    assert trials[hung].state == TrialState.FAIL and trials[hung].user_attrs["stale"]
    assert "gone" in trials[hung].user_attrs["stale_reason"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == hung]
    assert len(retry) == 1 and retry[0].params == trials[hung].params and retry[0].state == TrialState.COMPLETE


def test_silent_trial_on_another_host_is_failed_and_retried_once(tmp_path):
    config = make_config(heartbeat=1.0)
    storage = open_storage(config, tmp_path)
    study = optuna.create_study(study_name=study_name(config), storage=storage, direction="maximize")
    silent, beating, local = study.ask(), study.ask(), study.ask()
    for trial, host, pid, age in ((silent, "elsewhere", 1, 100.0), (beating, "elsewhere", 1, 0.0),
                                  (local, socket.gethostname(), os.getpid(), 0.0)):
        suggest(trial, SEARCH_SPACE)
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
        trial.set_user_attr("heartbeat", time.time() - age)

    _sweep_stale(study, storage, heartbeat=1.0)

    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING,
                                         TrialState.WAITING]
    assert trials[0].user_attrs["stale"] and "heartbeat" in trials[0].user_attrs["stale_reason"]
    assert trials[3].user_attrs["retry_of"] == 0
    retry = study.ask()
    assert retry.number == 3 and suggest(retry, SEARCH_SPACE) == trials[0].params
    # The retry, silent in turn, is failed but not queued a second time.
    retry.set_user_attr("host", "elsewhere")
    retry.set_user_attr("heartbeat", time.time() - 100)
    _sweep_stale(study, storage, heartbeat=1.0)
    assert [t.state for t in study.get_trials(deepcopy=False)][3:] == [TrialState.FAIL]


def pruned_after_startup(config, trial, params):
    """Each trial worse than all before it: past the startup trials the median pruner stops it at step 1."""
    for step in range(3):
        trial.report(-trial.number + 0.1 * step, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return -trial.number + 0.2


def test_median_pruner_prunes_trials_below_the_median(tmp_path):
    config = make_config(n_trials=5, startup_trials=2, pruner="median")
    run_worker(config, None, None, None, tmp_path, worker=0, objective=pruned_after_startup)

    trials = load(config, tmp_path).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 3
    assert all(max(t.intermediate_values) == 1 for t in trials[2:])  # warm-up step 0 never prunes


def test_out_of_memory_prunes_the_trial_and_the_worker_carries_on(tmp_path):
    torch = pytest.importorskip("torch")

    def objective(config, trial, params):
        if trial.number == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return quality(params)

    config = make_config(n_trials=3, pruner="none")
    run_worker(config, None, None, None, tmp_path, worker=0, objective=objective)

    trials = load(config, tmp_path).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[1].user_attrs["oom"] and "oom" not in trials[0].user_attrs


def test_a_bug_in_a_trial_fails_it_and_stops_the_worker(tmp_path):
    def objective(config, trial, params):
        raise ZeroDivisionError("a bug")

    config = make_config(n_trials=3)
    with pytest.raises(ZeroDivisionError):
        run_worker(config, None, None, None, tmp_path, worker=0, objective=objective)
    assert states(load(config, tmp_path)) == [TrialState.FAIL]


def test_suggest_draws_from_each_distribution():
    space = {"a.float": {"type": "float", "low": 0.5, "high": 1.5},
             "a.log": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
             "a.step": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25},
             "a.int": {"type": "int", "low": 2, "high": 10, "step": 4},
             "a.intlog": {"type": "int", "low": 1, "high": 1000, "log": True},
             "a.cat": {"type": "categorical", "choices": ["x", 3, None]}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(60):
        trial = study.ask()
        drawn.append(suggest(trial, space))
        study.tell(trial, 0.0)
    frame = pd.DataFrame(drawn)
    assert frame["a.float"].between(0.5, 1.5).all() and frame["a.float"].nunique() == 60
    assert frame["a.log"].between(1e-5, 1e-1).all()
    assert (frame["a.log"] < 1e-3).mean() > 0.3  # uniform in log: half the draws in the lower 2 of 4 decades
    assert set(frame["a.step"]) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert set(frame["a.int"]) == {2, 6, 10} and all(isinstance(v, int) for v in frame["a.int"])
    assert frame["a.intlog"].between(1, 1000).all()
    assert {repr(d["a.cat"]) for d in drawn} == {"'x'", "3", "None"}
    assert study.trials[0].distributions["a.log"].log


def test_summary_writes_overrides_trials_and_plots(tmp_path):
    config = make_config(n_trials=4, pruner="none")
    run_worker(config, None, None, None, tmp_path, worker=0, objective=partial(fake_objective, delay=0.0))
    out = tmp_path / "out"
    summarize(config, tmp_path, out / "best.yaml", out / "trials.csv", out / "plots")

    best = yaml.safe_load((out / "best.yaml").read_text())
    study = load(config, tmp_path)
    assert best == study.best_trial.params
    assert quality(best) == max(t.value for t in study.trials)
    tuned = with_overrides(config, best)
    assert tuned["train"]["learning_rate"] == best["train.learning_rate"]
    assert tuned["model"]["width"] == best["model.width"]
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 4 and {"value", "params_train.learning_rate", "state"} <= set(table.columns)
    for name in ("history", "importances", "intermediate"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_summary_with_tuning_disabled_and_without_complete_trials(tmp_path):
    off = make_config(n_trials=0)
    run_worker(off, None, None, None, tmp_path / "off", worker=0, objective=None)
    summarize(off, tmp_path / "off", tmp_path / "off.yaml", tmp_path / "off.csv", tmp_path / "off_plots")
    assert yaml.safe_load((tmp_path / "off.yaml").read_text()) == {}
    assert with_overrides(off, {}) == off
    assert len(list((tmp_path / "off_plots").glob("*.png"))) == 3

    def always_pruned(config, trial, params):
        raise optuna.TrialPruned()

    config = make_config(n_trials=2, pruner="none")
    run_worker(config, None, None, None, tmp_path, worker=0, objective=always_pruned)
    with pytest.raises(ValueError, match="no trial completed"):
        summarize(config, tmp_path, tmp_path / "best.yaml", tmp_path / "t.csv", tmp_path / "plots")
    assert not (tmp_path / "best.yaml").exists()


def test_study_name_follows_the_search_not_how_it_is_run():
    config = make_config()
    same = with_overrides(config, {"tune.workers": 5, "tune.trials_per_gpu": 3, "tune.n_trials": 20,
                                   "tune.storage": "postgresql://u@h/db"})
    assert study_name(same) == study_name(config)
    wider = with_overrides(config, {"tune.search_space": {**SEARCH_SPACE, "train.weight_decay": {
        "type": "float", "low": 0.0, "high": 0.1}}})
    assert study_name(wider) != study_name(config)
    assert study_name(with_overrides(config, {"train.batch_size": 4})) != study_name(config)


def test_real_training_trials(tmp_path):
    pytest.importorskip("holopipe.train", reason="holopipe.train (train_model) is missing")
    from holopipe.standardize import write_stats
    from test_train import examples_store

    train = examples_store(tmp_path / "train.zarr", 16, 1)
    valid = examples_store(tmp_path / "valid.zarr", 8, 2)
    stats = write_stats({"contrast_mean": 1.0, "contrast_std": 0.2}, tmp_path / "stats.json")
    config = make_config(n_trials=2, epochs=1, startup_trials=2, search_space={
        "train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    config = with_overrides(config, {"model.width": 4})

    run_worker(config, train, valid, stats, tmp_path / "tune", worker=0)

    trials = load(config, tmp_path / "tune").get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for trial in trials:
        assert 0.0 <= trial.value <= 1.0  # validation dice
        metrics = pd.read_csv(tmp_path / "tune" / "trials" / str(trial.number) / "metrics.csv")
        assert len(metrics) == 1 and metrics["dice"].max() == pytest.approx(trial.value)
    summarize(config, tmp_path / "tune", tmp_path / "best.yaml", tmp_path / "trials.csv", tmp_path / "plots")
    assert set(yaml.safe_load((tmp_path / "best.yaml").read_text())) == {"train.learning_rate"}


def test_a_trials_parameters_do_not_depend_on_the_worker_that_runs_it(tmp_path):
    """Reruns of one config tune alike whichever worker wins the race for each trial: trial k draws from
    tune.seed + k. Two studies of one config, run by worker 0 alone and by worker 7 with three trial threads,
    give every startup trial the same parameters."""
    config = make_config(n_trials=3, pruner="none")
    first, second = tmp_path / "first", tmp_path / "second"
    run_worker(config, None, None, None, first, worker=0, objective=partial(fake_objective, delay=0.0))
    threaded = with_overrides(config, {"tune.trials_per_gpu": 3})
    run_worker(threaded, None, None, None, second, worker=7, objective=partial(fake_objective, delay=0.0))
    params = [[t.params for t in sorted(load(c, d).get_trials(deepcopy=False), key=lambda t: t.number)]
              for c, d in ((config, first), (threaded, second))]
    assert len(params[0]) == 3 and params[0] == params[1]
    assert len({p["train.learning_rate"] for p in params[0]}) == 3  # distinct draws, not one repeated
