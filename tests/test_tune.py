"""Tuning: worker processes sharing a study reach exactly n_trials, killed workers leave nothing RUNNING,
trial processes keep each trial's torch state to themselves, pruning and out-of-memory trials, suggestions,
the summary files, the study's name and its study file (refused by a worker of other data or config)."""

import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from functools import partial
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from holopipe.core.config import load_config, with_overrides
from holopipe.ml.tune import data_digests, open_storage, recorded_study, start_study, study_name, suggest, summarize
from holopipe.ml.tune_worker import TrialProcessError, _sweep_stale, _tell, run_worker
from holopipe.run import cli

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
        # A seed of its own per config: each test gets a fresh study, also in a shared database. A heartbeat
        # that a loaded 2-core machine keeps (4 missed = 20 s) for tests not about staleness (those set theirs).
        "tune": {"n_trials": 9, "heartbeat": 5.0, "startup_trials": 3, "storage": storage,
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


NO_DATA = {"train": None, "valid": None, "stats": None}
"""The data digests of a study whose objective reads no data (the fake objectives)."""


def start(config, directory, train=None, valid=None, stats=None) -> Path:
    """A new study of ``config`` (and data) in a study file under ``directory``; returns the file."""
    study_file = Path(directory) / "study.json"
    start_study(config, study_file, train, valid, stats)
    return study_file


def work(config, study_file, worker=0, objective=None, data=(None, None, None)):
    run_worker(config, study_file, *data, study_file.parent, worker=worker, objective=objective)


def load(config, study_file):
    return optuna.load_study(study_name=recorded_study(config, study_file)["study"],
                             storage=open_storage(config, study_file))


def write_examples(path, n_tiles, seed):
    from holopipe.ml.dataset import write_synthetic_examples  # torch: not in every spawned trial process

    return write_synthetic_examples(path, n_tiles, 32, seed=seed)


def write_stats(stats, path):
    from holopipe.data.standardize import write_stats  # dask: not in every spawned trial process

    return write_stats(stats, path)


def digests(data):
    return data_digests(data["train"], data["valid"], data["stats"])


def synthetic_data(directory, seed=1):
    directory = Path(directory)
    return {"train": write_examples(directory / "train.zarr", 8, seed),
            "valid": write_examples(directory / "valid.zarr", 4, seed + 100),
            "stats": write_stats({"contrast_mean": 1.0, "contrast_std": 0.2}, directory / "stats.json")}


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
    studies = []
    yield studies.append
    for config, study_file in studies:
        if config["tune"]["storage"] is not None:
            optuna.delete_study(study_name=recorded_study(config, study_file)["study"],
                                storage=open_storage(config, study_file))


def spawn_worker(config, study_file, worker, objective):
    """A worker job in a process of its own (not a daemon: its trial processes are its children)."""
    process = multiprocessing.get_context("spawn").Process(
        target=work, args=(config, study_file, worker, objective))
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


@pytest.mark.slow
def test_worker_processes_reach_exactly_n_trials(tmp_path, storage_url, cleanup):
    config = make_config(storage_url, trials_per_gpu=2)  # 3 workers x 2 trial processes race for 9 trials
    study_file = start(config, tmp_path)
    cleanup((config, study_file))
    workers = [spawn_worker(config, study_file, w, partial(fake_objective, delay=0.5)) for w in range(3)]
    join_all(workers, timeout=120)

    assert [p.exitcode for p in workers] == [0, 0, 0]
    study = load(config, study_file)
    trials = study.get_trials(deepcopy=False)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == config["tune"]["n_trials"]
    assert TrialState.RUNNING not in states(study)
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    pids = {t.user_attrs["pid"] for t in trials if t.state == TrialState.COMPLETE}
    assert len(pids) >= 2 and not pids & {p.pid for p in workers}  # trial processes, not the workers
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(quality(trial.params))


@pytest.mark.slow
def test_killed_worker_leaves_nothing_running_and_the_others_make_up_the_count(tmp_path, storage_url, cleanup):
    config = make_config(storage_url)
    n_trials = config["tune"]["n_trials"]
    study_file = start(config, tmp_path)
    cleanup((config, study_file))
    marker = tmp_path / "hanging"
    victim = spawn_worker(config, study_file, 0, partial(fake_objective, hang_marker=str(marker)))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline and victim.is_alive(), "the victim never started its trial"
        time.sleep(0.1)
    hung = int(marker.read_text())
    survivors = [spawn_worker(config, study_file, w, partial(fake_objective, delay=0.1)) for w in (1, 2)]
    # Survivors run trials while the hung one counts as running, then wait for it instead of leaving.
    study = load(config, study_file)
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
    # Survivors that sweep at once each queue a retry; the one that loses the sweep withdraws its own (surplus).
    retries = [t for t in trials if t.user_attrs.get("retry_of") == hung]
    withdrawn = [t for t in retries if t.user_attrs.get("surplus")]
    assert all(t.state == TrialState.FAIL for t in withdrawn)
    retry = [t for t in retries if t not in withdrawn]
    assert len(retry) == 1 and retry[0].params == trials[hung].params and retry[0].state == TrialState.COMPLETE


def test_silent_trial_on_another_host_is_failed_and_retried_once(tmp_path):
    config = make_config(heartbeat=1.0)
    storage = open_storage(config, tmp_path / "study.json")
    study = optuna.create_study(study_name="silent", storage=storage, direction="maximize")
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


def dead_trial(study, pid_of_a_dead_process):
    """A RUNNING trial with parameters whose worker process on this host is gone."""
    trial = study.ask()
    suggest(trial, SEARCH_SPACE)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", pid_of_a_dead_process)
    return trial


def a_dead_pid():
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    return process.pid


def test_a_stale_trial_fails_only_once_its_retry_is_queued(tmp_path, monkeypatch):
    # In the other order a worker looking in between sees a free place, asks a fresh trial and the count is
    # made up without the retry (seen in CI: the retry was left WAITING by workers that had all exited).
    storage = open_storage(make_config(), tmp_path / "study.json")
    study = optuna.create_study(study_name="order", storage=storage, direction="maximize")
    dead = dead_trial(study, a_dead_pid())
    waiting_when_failed = []
    set_state = storage.set_trial_state_values

    def spy(trial_id, state, values=None):
        if state == TrialState.FAIL:
            waiting_when_failed.extend(t.user_attrs.get("retry_of") for t in study.get_trials(
                deepcopy=False, states=(TrialState.WAITING,)))
        return set_state(trial_id, state, values)

    monkeypatch.setattr(storage, "set_trial_state_values", spy)
    _sweep_stale(study, storage, heartbeat=1.0)
    assert waiting_when_failed == [dead.number]


def test_a_worker_that_loses_the_sweep_withdraws_its_retry(tmp_path, monkeypatch):
    storage = open_storage(make_config(), tmp_path / "study.json")
    study = optuna.create_study(study_name="race", storage=storage, direction="maximize")
    dead = dead_trial(study, a_dead_pid())
    seen_running = study.get_trials(deepcopy=True)
    study.tell(dead, state=TrialState.FAIL)  # another worker swept it after this one looked
    with monkeypatch.context() as patch:
        patch.setattr(study, "get_trials", lambda deepcopy=True, states=None: seen_running)
        _sweep_stale(study, storage, heartbeat=1.0)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert trials[1].user_attrs == {"retry_of": 0, "retries": 1, "surplus": True}


def test_a_trial_failed_by_another_worker_while_it_ran_is_dropped_not_raised(tmp_path, caplog):
    storage = open_storage(make_config(), tmp_path / "study.json")
    study = optuna.create_study(study_name="dropped", storage=storage, direction="maximize")
    trial = study.ask()
    suggest(trial, SEARCH_SPACE)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("dropped"), 0)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)  # another worker withdrew or swept it
    with caplog.at_level("WARNING", logger="holopipe"):
        _tell(study, trial, values=1.0)
    assert study.get_trials(deepcopy=False)[0].state == TrialState.FAIL
    assert "its outcome is dropped" in caplog.text


def test_a_retry_still_waiting_when_the_count_is_made_up_is_failed_as_surplus(tmp_path):
    config = make_config(n_trials=2)
    study_file = start(config, tmp_path)
    study = load(config, study_file)
    for value in (1.0, 2.0):
        study.tell(study.ask(), value)
    study.enqueue_trial({"train.learning_rate": 1e-3, "model.width": 4}, user_attrs={"retry_of": 0})
    work(config, study_file, objective=fake_objective)
    trials = load(config, study_file).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL]
    assert trials[2].user_attrs["surplus"]


def pruned_after_startup(config, trial, params):
    """Each trial worse than all before it: past the startup trials the median pruner stops it at step 1."""
    for step in range(3):
        trial.report(-trial.number + 0.1 * step, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return -trial.number + 0.2


def test_median_pruner_prunes_trials_below_the_median(tmp_path):
    config = make_config(n_trials=5, startup_trials=2, pruner="median")
    study_file = start(config, tmp_path)
    work(config, study_file, objective=pruned_after_startup)

    trials = load(config, study_file).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 3
    assert all(max(t.intermediate_values) == 1 for t in trials[2:])  # warm-up step 0 never prunes


def test_out_of_memory_prunes_the_trial_and_the_worker_carries_on(tmp_path):
    import torch  # here: not in every spawned trial process

    def objective(config, trial, params):
        if trial.number == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return quality(params)

    config = make_config(n_trials=3, pruner="none")
    study_file = start(config, tmp_path)
    work(config, study_file, objective=objective)

    trials = load(config, study_file).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[1].user_attrs["oom"] and "oom" not in trials[0].user_attrs


def test_a_bug_in_a_trial_fails_it_and_stops_the_worker(tmp_path):
    def objective(config, trial, params):
        raise ZeroDivisionError("a bug")

    config = make_config(n_trials=3)
    study_file = start(config, tmp_path)
    with pytest.raises(ZeroDivisionError):
        work(config, study_file, objective=objective)
    assert states(load(config, study_file)) == [TrialState.FAIL]


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
    study_file = start(config, tmp_path)
    work(config, study_file, objective=partial(fake_objective, delay=0.0))
    out = tmp_path / "out"
    summarize(config, study_file, out / "best.yaml", out / "trials.csv", out / "plots")

    best = yaml.safe_load((out / "best.yaml").read_text())
    study = load(config, study_file)
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
    run_worker(off, None, None, None, None, tmp_path / "off", worker=0)  # no study file, no data
    summarize(off, None, tmp_path / "off.yaml", tmp_path / "off.csv", tmp_path / "off_plots")
    assert yaml.safe_load((tmp_path / "off.yaml").read_text()) == {}
    assert with_overrides(off, {}) == off
    assert len(list((tmp_path / "off_plots").glob("*.png"))) == 3

    def always_pruned(config, trial, params):
        raise optuna.TrialPruned()

    config = make_config(n_trials=2, pruner="none")
    study_file = start(config, tmp_path)
    work(config, study_file, objective=always_pruned)
    with pytest.raises(ValueError, match="no trial completed"):
        summarize(config, study_file, tmp_path / "best.yaml", tmp_path / "t.csv", tmp_path / "plots")
    assert not (tmp_path / "best.yaml").exists()


def test_study_name_follows_the_search_not_how_it_is_run():
    config = make_config()
    same = with_overrides(config, {"tune.workers": 5, "tune.trials_per_gpu": 3, "tune.n_trials": 20,
                                   "tune.storage": "postgresql://u@h/db"})
    assert study_name(same, NO_DATA) == study_name(config, NO_DATA)
    wider = with_overrides(config, {"tune.search_space": {**SEARCH_SPACE, "train.weight_decay": {
        "type": "float", "low": 0.0, "high": 0.1}}})
    assert study_name(wider, NO_DATA) != study_name(config, NO_DATA)
    assert study_name(with_overrides(config, {"train.batch_size": 4}), NO_DATA) != study_name(config, NO_DATA)


def test_study_name_follows_the_content_of_the_examples_and_stats(tmp_path):
    config = make_config()
    data = synthetic_data(tmp_path / "a")
    name = study_name(config, digests(data))
    # The same bytes elsewhere, with Snakemake's timestamp file in a store, name the same study.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "train.zarr" / ".snakemake_timestamp").touch()
    copied = {role: tmp_path / "b" / Path(path).name for role, path in data.items()}
    assert study_name(config, digests(copied)) == name
    # Re-made examples (other tiles), one changed byte of a chunk, other stats: each a new study.
    remade = synthetic_data(tmp_path / "c", seed=2)
    assert study_name(config, digests({**data, "train": remade["train"]})) != name
    assert study_name(config, digests({**data, "valid": remade["valid"]})) != name
    chunk = max((p for p in (tmp_path / "b" / "valid.zarr").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    content = bytearray(chunk.read_bytes())
    content[len(content) // 2] ^= 1
    chunk.write_bytes(bytes(content))
    assert study_name(config, digests(copied)) != name
    stats = write_stats({"contrast_mean": 1.0, "contrast_std": 0.25}, tmp_path / "other_stats.json")
    assert study_name(config, digests({**data, "stats": stats})) != name
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        data_digests(tmp_path / "missing.zarr", data["valid"], data["stats"])


def test_a_worker_refuses_the_study_file_of_other_examples_or_config(tmp_path):
    config = make_config(n_trials=2, pruner="none")
    data = synthetic_data(tmp_path / "data")
    study_file = start(config, tmp_path / "tune", **data)
    created = recorded_study(config, study_file)["study"]
    assert created == study_name(config, digests(data))
    assert (tmp_path / "tune" / "study.journal").is_file()
    inputs = (data["train"], data["valid"], data["stats"])
    objective = partial(fake_objective, delay=0.0)

    # The validation examples are re-made: the study file still holds the old study.
    shutil.rmtree(data["valid"])
    write_examples(data["valid"], 4, seed=7)
    with pytest.raises(ValueError) as refused:
        work(config, study_file, objective=objective, data=inputs)
    remade = study_name(config, digests(data))
    message = str(refused.value)
    assert str(study_file) in message and created in message and remade in message
    assert "content of valid changed" in message
    assert states(load(config, study_file)) == []  # no trial ran

    # A new study file for the new data; then a wider search space with the same data.
    study_file = start(config, tmp_path / "tune", **data)
    assert recorded_study(config, study_file)["study"] == remade
    work(config, study_file, objective=objective, data=inputs)
    assert [s for s in states(load(config, study_file))] == [TrialState.COMPLETE] * 2
    wider = with_overrides(config, {"tune.search_space": {**SEARCH_SPACE, "train.weight_decay": {
        "type": "float", "low": 0.0, "high": 0.1}}})
    with pytest.raises(ValueError, match="tuning, model, training or examples config changed"):
        work(wider, study_file, objective=objective, data=inputs)
    with pytest.raises(FileNotFoundError, match="tune study"):
        work(config, tmp_path / "nowhere" / "study.json", objective=objective, data=inputs)
    # A journal that is not the study file's (another study's, copied over it) is refused too.
    other = start(wider, tmp_path / "other", **data)
    shutil.copy(other.with_suffix(".journal"), study_file.with_suffix(".journal"))
    with pytest.raises(ValueError, match=f"study.journal: holds {recorded_study(wider, other)['study']}, not"):
        work(config, study_file, objective=objective, data=inputs)


def test_the_study_file_of_a_database_study_records_it_without_the_password(tmp_path, cleanup):
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (export {POSTGRES_ENV}=$(.ci/start-postgres))")
    password_file = tmp_path / "db.password"
    password_file.write_text("s3cret-of-the-test\n")
    password_file.chmod(0o600)
    config = make_config(url, n_trials=2, pruner="none", storage_password_file=str(password_file))
    study_file = start(config, tmp_path)
    cleanup((config, study_file))
    record = json.loads(study_file.read_text())
    assert record["study"] == study_name(config, NO_DATA) and record["data"] == NO_DATA
    assert record["storage"] == url and "s3cret-of-the-test" not in study_file.read_text()
    assert not study_file.with_suffix(".journal").exists()
    work(config, study_file, objective=partial(fake_objective, delay=0.0))
    assert states(load(config, study_file)) == [TrialState.COMPLETE] * 2
    moved = with_overrides(config, {"tune.storage": "postgresql://someone@elsewhere/db"})
    with pytest.raises(ValueError, match="lives in postgresql://someone@elsewhere/db"):
        recorded_study(moved, study_file)


def isolation_probe(config, trial, params):
    """Record the process-wide torch state a trial finds, then change it as a careless trial might, and wait
    until trials run in two processes, so that the other one reads its state after this one changed it."""
    import torch

    trial.set_user_attr("found", {"deterministic": torch.are_deterministic_algorithms_enabled(),
                                  "dtype": str(torch.get_default_dtype()), "seed": torch.initial_seed(),
                                  "cudnn_benchmark": torch.backends.cudnn.benchmark})
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1000 + trial.number)
    torch.backends.cudnn.benchmark = True
    deadline = time.monotonic() + 60
    while len({t.user_attrs.get("pid") for t in trial.study.get_trials(deepcopy=False)} - {None}) < 2:
        assert time.monotonic() < deadline, "no trial of a second process"
        time.sleep(0.1)
    return quality(params)


@pytest.mark.slow
def test_trials_per_gpu_runs_trials_in_processes_that_keep_their_torch_state_to_themselves(tmp_path):
    config = make_config(n_trials=4, trials_per_gpu=2, pruner="none")
    study_file = start(config, tmp_path)
    work(config, study_file, worker=3, objective=isolation_probe)

    trials = sorted(load(config, study_file).get_trials(deepcopy=False), key=lambda t: t.datetime_start)
    # Two processes that ask at once may overshoot n_trials by one: the later-numbered trial is told FAIL as
    # surplus before it runs (its start time can precede the other's: the journal numbers trials in the order
    # their records land, not by the clock).
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    trials = [t for t in trials if not t.user_attrs.get("surplus")]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    by_pid = {}
    for trial in trials:
        by_pid.setdefault(trial.user_attrs["pid"], []).append(trial)
    assert len(by_pid) == 2 and os.getpid() not in by_pid and {t.user_attrs["worker"] for t in trials} == {3}
    for own in by_pid.values():
        first = own[0].user_attrs["found"]  # whatever the other process's trials had set
        assert first["seed"] not in {1000 + t.number for t in trials}  # a fresh process's own seed
        assert {**first, "seed": None} == {"deterministic": False, "dtype": "torch.float32", "seed": None,
                                           "cudnn_benchmark": False}
        for before, trial in zip(own, own[1:]):  # state does persist within a process
            assert trial.user_attrs["found"] == {"deterministic": True, "dtype": "torch.float64",
                                                 "seed": 1000 + before.number, "cudnn_benchmark": True}


def killed_in_trial_zero(config, trial, params):
    if trial.number == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1.0)
    return quality(params)


@pytest.mark.slow
def test_a_killed_trial_process_fails_the_worker_with_its_status(tmp_path):
    config = make_config(n_trials=6, trials_per_gpu=2, pruner="none")
    study_file = start(config, tmp_path)
    with pytest.raises(TrialProcessError, match="SIGKILL") as failed:
        work(config, study_file, objective=killed_in_trial_zero)
    assert failed.value.exit_status == 128 + signal.SIGKILL

    trials = load(config, study_file).get_trials(deepcopy=False)
    assert TrialState.RUNNING not in [t.state for t in trials]  # the killed one's trial swept, not left
    assert trials[0].state == TrialState.FAIL and "gone" in trials[0].user_attrs["stale_reason"]
    # Its retry is queued once; the other process may have run it before ending (seen under load). Where the
    # worker and the other process swept it at once, the loser's retry is withdrawn (FAIL, surplus).
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 0 and not t.user_attrs.get("surplus")]
    assert len(retries) == 1 and retries[0].state in (TrialState.WAITING, TrialState.COMPLETE)
    assert sum(t.state == TrialState.COMPLETE for t in trials) < config["tune"]["n_trials"]  # it stopped early


def test_the_worker_command_exits_with_the_trial_process_status(tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise TrialProcessError("worker 0: trial process 123 exited with status 137", 137)

    monkeypatch.setattr("holopipe.ml.tune_worker.run_worker", killed)
    config = json.dumps(make_config())
    with pytest.raises(SystemExit) as exited:
        cli.main(["tune", "worker", "--worker", "0", "--study", str(tmp_path / "study.json"), "--workdir",
                  str(tmp_path), "--train", "t.zarr", "--valid", "v.zarr", "--stats", "s.json",
                  "--config-json", config])
    assert exited.value.code == 137


@pytest.mark.slow
def test_real_training_trials(tmp_path):
    train = write_examples(tmp_path / "train.zarr", 16, 1)
    valid = write_examples(tmp_path / "valid.zarr", 8, 2)
    stats = write_stats({"contrast_mean": 1.0, "contrast_std": 0.2}, tmp_path / "stats.json")
    config = make_config(n_trials=2, epochs=1, startup_trials=2, search_space={
        "train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    config = with_overrides(config, {"model.width": 4})

    study_file = start(config, tmp_path / "tune", train, valid, stats)
    run_worker(config, study_file, train, valid, stats, tmp_path / "tune", worker=0)

    study = load(config, study_file)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for trial in trials:
        assert 0.0 <= trial.value <= 1.0  # the particles' F1 in the validation tiles (the default metric)
        metrics = pd.read_csv(tmp_path / "tune" / "trials" / study.study_name / str(trial.number) / "metrics.csv")
        assert len(metrics) == 1 and metrics["object_f1"].max() == pytest.approx(trial.value)
    summarize(config, study_file, tmp_path / "best.yaml", tmp_path / "trials.csv", tmp_path / "plots")
    assert set(yaml.safe_load((tmp_path / "best.yaml").read_text())) == {"train.learning_rate"}


@pytest.mark.slow
def test_a_trials_parameters_do_not_depend_on_the_worker_that_runs_it(tmp_path):
    """Reruns of one config tune alike whichever worker wins the race for each trial: trial k draws from
    tune.seed + k. Two studies of one config, run by worker 0 alone and by worker 7 with three trial processes,
    give every startup trial the same parameters."""
    config = make_config(n_trials=3, pruner="none")
    first, second = start(config, tmp_path / "first"), start(config, tmp_path / "second")
    work(config, first, worker=0, objective=partial(fake_objective, delay=0.0))
    parallel = with_overrides(config, {"tune.trials_per_gpu": 3})
    work(parallel, second, worker=7, objective=partial(fake_objective, delay=0.0))
    params = [[t.params for t in sorted(load(c, f).get_trials(deepcopy=False), key=lambda t: t.number)
               if not t.user_attrs.get("surplus")]  # an overshooting ask, failed before it ran (see above)
              for c, f in ((config, first), (parallel, second))]
    assert len(params[0]) == 3 and params[0] == params[1]
    assert len({p["train.learning_rate"] for p in params[0]}) == 3  # distinct draws, not one repeated


REPO = Path(__file__).resolve().parents[1]
CHAIN = {
    "splits": {"train": {"source": "simulate", "n_holograms": 2, "seed": 1},
               "valid": {"source": "simulate", "n_holograms": 1, "seed": 2}},
    "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.2e-6, "nx": 64, "ny": 48,
               "z_min": 0.001, "z_max": 0.003},
    "examples": {"tile_size": 16},
    "model": {"width": 4, "depth": 2},
    "train": {"device": "cpu", "num_workers": 0},
    "tune": {"n_trials": 2, "workers": 2, "epochs": 1},
    "infer": {"splits": ["valid"]},
}


def chain_config(**tune):
    """CHAIN with these tune keys (a raw config: Snakemake validates it)."""
    return {**CHAIN, "tune": {**CHAIN["tune"], **tune}}
FAKE_HOLOPIPE = '''#!{python}
"""Stands in for holopipe: records its arguments and writes the files they name."""
import json, sys
from pathlib import Path

args = sys.argv[1:]
with open("calls.jsonl", "a") as calls:
    calls.write(json.dumps(args) + "\\n")
value = {{flag: args[args.index(flag) + 1] for flag in ("--provenance", "--study", "--best", "--trials", "--plots")
         if flag in args}}
for flag in ("--provenance", "--best", "--trials"):
    if flag in value:
        Path(value[flag]).parent.mkdir(parents=True, exist_ok=True)
        Path(value[flag]).write_text("{{}}\\n")
study = Path(value.get("--study", "results/tune/study.json"))
if "study" in args:
    study.parent.mkdir(parents=True, exist_ok=True)
    study.write_text("{{}}\\n")
    if json.loads(args[args.index("--config-json") + 1])["tune"]["storage"] is None:
        study.with_suffix(".journal").write_text("created\\n")
if "worker" in args and study.with_suffix(".journal").exists():
    with open(study.with_suffix(".journal"), "a") as journal:  # as the trials append to it
        journal.write("trial\\n")
if "--plots" in value:
    Path(value["--plots"]).mkdir(parents=True, exist_ok=True)
    for name in ("history", "importances", "intermediate"):
        Path(value["--plots"], name + ".png").write_bytes(b"png")
'''


def tune_chain(workdir: Path, config: dict, *args: str):
    """Snakemake on the tuning rules alone (the examples and stats are given files), with FAKE_HOLOPIPE:
    the jobs it runs (or plans, with -n): {rule: [{"input": [...], "output": [...]}, ...]}."""
    import subprocess

    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{workdir / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                 f"{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(configfile), "--cores", "2", "--allowed-rules", "tune_study", "tune_worker", "tune",
         *args, "--", "results/tune/best.yaml"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {}
    for rule, inputs, outputs in re.findall(r"^(?:local)?rule (\w+):\n(?:    input: (.*)\n)?    output: (.*)$",
                                            result.stdout + result.stderr, re.MULTILINE):
        jobs.setdefault(rule, []).append({"input": inputs.split(", "), "output": outputs.split(", ")})
    return jobs


@pytest.fixture
def chain_dir(tmp_path):
    """A run directory with the examples stores and stats the tuning rules read, and FAKE_HOLOPIPE."""
    for store in ("train", "valid"):
        (tmp_path / "data" / "examples" / f"{store}.zarr").mkdir(parents=True)
        (tmp_path / "data" / "examples" / f"{store}.zarr" / "zarr.json").write_text("{}")
    (tmp_path / "data" / "standardized").mkdir()
    (tmp_path / "data" / "standardized" / "stats.json").write_text("{}")
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "holopipe"
    fake.write_text(FAKE_HOLOPIPE.format(python=sys.executable))
    fake.chmod(0o755)
    return tmp_path


@pytest.mark.workflow
def test_the_rule_chain_starts_a_fresh_study_when_the_search_or_the_examples_change(chain_dir):
    ran = tune_chain(chain_dir, CHAIN)
    assert {rule: len(jobs) for rule, jobs in ran.items()} == {"tune_study": 1, "tune_worker": 2, "tune": 1}
    assert set(ran["tune_study"][0]["output"]) >= {"results/tune/study.json", "results/tune/study.journal"}
    calls = [json.loads(line) for line in (chain_dir / "calls.jsonl").read_text().splitlines()]
    for call in calls[1:]:  # the workers and the summary read the study file tune_study wrote
        assert call[call.index("--study") + 1] == "results/tune/study.json"
    # The workers appended to the journal after tune_study: nothing is stale for that.
    assert tune_chain(chain_dir, CHAIN, "-n") == {}

    def planned(config):
        return {rule: len(jobs) for rule, jobs in tune_chain(chain_dir, config, "-n").items()}

    # More trials continue the study; a changed search space starts a new one, and every worker and the summary.
    assert planned(chain_config(n_trials=4, workers=3)) == {"tune_worker": 3, "tune": 1}
    wider = chain_config(search_space={"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2}})
    assert planned(wider) == {"tune_study": 1, "tune_worker": 2, "tune": 1}
    assert planned(chain_config(n_trials=0)) == {"tune": 1}
    # Re-made examples (newer than the study): a new study.
    later = time.time() + 5
    os.utime(chain_dir / "data" / "examples" / "valid.zarr" / "zarr.json", (later, later))
    os.utime(chain_dir / "data" / "examples" / "valid.zarr", (later, later))
    assert planned(CHAIN) == {"tune_study": 1, "tune_worker": 2, "tune": 1}


@pytest.mark.workflow
def test_a_database_study_has_a_study_file_and_no_journal(chain_dir):
    jobs = tune_chain(chain_dir, chain_config(storage="postgresql://u@h/db"), "-n")
    assert {rule: len(planned) for rule, planned in jobs.items()} == {"tune_study": 1, "tune_worker": 2, "tune": 1}
    assert not [path for job in jobs.values() for planned in job for path in planned["input"] + planned["output"]
                if path.endswith(".journal")]
    assert "results/tune/study.json" in jobs["tune_worker"][0]["input"]
