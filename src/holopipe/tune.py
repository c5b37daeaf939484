"""Hyperparameter search with Optuna, shared by several worker jobs.

Every worker (a separate job, possibly on another node) opens the same study: a journal file under the
tuning directory (one node or a shared file system) or a PostgreSQL database (many nodes). Each worker
runs ask/tell loops until the study holds exactly ``tune.n_trials`` *finished* trials. Finished means
COMPLETE or PRUNED (an out-of-memory trial is pruned); FAIL trials never count: those are surplus trials
(asked in a race after enough others had started, marked ``surplus``), trials of killed workers (marked
``stale``) and failed ones.

Counting is by trial number, so concurrent workers never overshoot: after ``ask`` a trial runs only if
fewer than ``n_trials`` trials with a smaller number are finished, running or waiting. A worker that sees
enough trials running waits for them instead of leaving, so if one of their workers dies the survivors
make up the count.

Killed workers: a running trial carries user attrs ``host``, ``pid``, ``pid_start``, ``worker`` and a
``heartbeat`` (epoch seconds) that a background thread refreshes every ``tune.heartbeat`` seconds. Each
loop first sweeps stale trials: a RUNNING trial whose process is gone from this host, or whose heartbeat
is older than four heartbeats, is set to FAIL (``stale=True``) and enqueued once more with the same
parameters (``retry_of``). The journal backend has no heartbeat of its own; with PostgreSQL the storage
also records Optuna's heartbeat.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import optuna
import psutil
import yaml
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from holopipe.config import ConfigError, with_overrides
from holopipe.io import write_atomically

__all__ = ["TrialSeededSampler", "open_storage", "run_worker", "study_name", "suggest", "summarize"]

log = logging.getLogger("holopipe")

STALE_HEARTBEATS = 4
"""A running trial whose heartbeat is older than this many heartbeat intervals belongs to a dead worker."""

JOURNAL_LOCK_GRACE_SECONDS = 10
"""A journal lock file untouched this long belongs to a killed worker (an append holds it for milliseconds)
and is broken, so the other workers stall 10 s, not Optuna's default 30 s, when one dies holding it."""

MAX_RETRIES = 1
"""Times a stale trial's parameters are queued again (a trial that kills its worker must not kill them all)."""

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_RUNTIME_KEYS = ("n_trials", "workers", "trials_per_gpu", "storage", "heartbeat")

Objective = Callable[[dict, optuna.Trial, dict], float]


def study_name(config: dict) -> str:
    """``holopipe-`` + a hash of everything that shapes the trials' results, so a changed search space,
    model, training or examples config starts a new study in the same storage.

    Left out: how the search is run (workers, trials_per_gpu, storage, heartbeat) and n_trials, so
    raising n_trials continues the same study.
    """
    tune = {k: v for k, v in config["tune"].items() if k not in _RUNTIME_KEYS}
    sections = {"model", "train", "examples"} | {key.split(".")[0] for key in tune["search_space"]}
    identity = {"tune": tune, **{name: config[name] for name in sorted(sections - {"tune"})}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"holopipe-{digest[:12]}"


def _journal_path(workdir) -> Path:
    return Path(workdir) / "study.journal"


def open_storage(config: dict, workdir):
    """The study's storage: a journal file ``workdir/study.journal`` when ``tune.storage`` is null
    (open-file lock, which works on NFS and Lustre), else an RDB (PostgreSQL) URL with Optuna's heartbeat.
    """
    tune = config["tune"]
    if tune["storage"] is None:
        path = _journal_path(workdir)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = JournalFileOpenLock(str(path), grace_period=JOURNAL_LOCK_GRACE_SECONDS)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    interval = max(1, math.ceil(tune["heartbeat"]))  # Optuna wants whole seconds
    # Workers start together: creating the tables on an empty database can race, so retry briefly.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    tune["storage"],
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=interval,
                    grace_period=STALE_HEARTBEATS * interval,
                    heartbeat_stale_trial_callback=_retry_stale,
                )
        except Exception as exc:  # sqlalchemy errors; the last one is raised with the URL named
            if attempt == 4:
                raise RuntimeError(f"tune.storage {tune['storage']}: cannot open the database: {exc}") from exc
            time.sleep(0.5 + attempt)


def _direction(config: dict) -> str:
    return "minimize" if config["train"]["early_stopping"]["metric"] == "loss" else "maximize"


def _pruner(tune: dict) -> optuna.pruners.BasePruner:
    if tune["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune["startup_trials"], n_warmup_steps=1)
    if tune["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tune["epochs"])
    return optuna.pruners.NopPruner()


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE with its random draws seeded by ``seed + trial number``, not per worker.

    Workers race for trials, so with a per-worker seed the parameters of trial k depended on which worker
    happened to ask for it, and a rerun of the same config tuned (then trained) differently. Here trial k
    draws from the same stream whoever runs it: the random startup trials, and any study one worker runs,
    are reproducible. Later TPE trials still depend on which trials had finished when they were asked, as
    in any asynchronous parallel study. TPE keeps no state but its random generator, so a fresh one per
    trial changes nothing else.
    """

    def __init__(self, seed: int, **tpe_options):
        self._seed = seed
        self._tpe_options = tpe_options
        self._per_trial: dict[int, optuna.samplers.TPESampler] = {}

    def _tpe(self, trial) -> optuna.samplers.TPESampler:
        if trial.number not in self._per_trial:
            self._per_trial[trial.number] = optuna.samplers.TPESampler(seed=self._seed + trial.number,
                                                                       **self._tpe_options)
        return self._per_trial[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._tpe(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe(trial).after_trial(study, trial, state, values)
        self._per_trial.pop(trial.number, None)


def _open_study(config: dict, storage) -> optuna.Study:
    tune = config["tune"]
    sampler = TrialSeededSampler(tune["seed"], n_startup_trials=tune["startup_trials"], constant_liar=True,
                                 multivariate=True)
    return optuna.create_study(study_name=study_name(config), storage=storage, sampler=sampler,
                               pruner=_pruner(tune), direction=_direction(config), load_if_exists=True)


def suggest(trial: optuna.Trial, search_space: dict) -> dict:
    """Values for one trial: dotted config key -> value, drawn from each key's distribution."""
    params = {}
    for key, dist in search_space.items():
        kind = dist["type"]
        if kind == "categorical":
            bad = [c for c in dist["choices"] if not isinstance(c, (type(None), bool, int, float, str))]
            if bad:
                raise ConfigError(f"tune.search_space.{key}.choices: only null, booleans, numbers and "
                                  f"strings can be tuned, got {bad}")
            params[key] = trial.suggest_categorical(key, dist["choices"])
        elif kind == "int":
            params[key] = trial.suggest_int(key, int(dist["low"]), int(dist["high"]),
                                            step=int(dist.get("step") or 1), log=dist.get("log", False))
        else:
            params[key] = trial.suggest_float(key, float(dist["low"]), float(dist["high"]),
                                              step=dist.get("step"), log=dist.get("log", False))
    return params


def _train_objective(config: dict, trial: optuna.Trial, params: dict, *, train_store, valid_store,
                     stats_path, workdir) -> float:
    """Train one trial's model for tune.epochs and return its best validation metric."""
    from holopipe.train import train_model  # torch loads only where trials really train

    trial_config = with_overrides(config, {**params, "train.epochs": config["tune"]["epochs"]})
    out_dir = Path(workdir) / "trials" / f"{trial.number}"
    return train_model(trial_config, train_store, valid_store, out_dir, stats_path=stats_path,
                       trial=trial, progress=False).best_metric


# --- liveness -----------------------------------------------------------------------------------------

def _process_start(pid: int) -> float | None:
    """When the process started, or None if it is gone (a zombie, killed but not yet reaped, is gone)."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.NoSuchProcess:
        return None


def _process_gone(pid: int, started: float | None) -> bool:
    """Whether the process that recorded (pid, start time) has ended; a reused pid counts as ended."""
    try:
        now_started = _process_start(pid)
    except psutil.AccessDenied:  # another user's live process
        return False
    return now_started is None or (started is not None and abs(now_started - started) > 1)


def _identity(worker: int) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": psutil.Process().create_time(), "worker": worker}


def _stale_reason(trial: FrozenTrial, heartbeat: float, host: str) -> str | None:
    """Why a RUNNING trial's worker is dead, or None while it may be alive."""
    attrs = trial.user_attrs
    if attrs.get("host") == host and "pid" in attrs and _process_gone(attrs["pid"], attrs.get("pid_start")):
        return f"process {attrs['pid']} on {host} is gone"
    limit = STALE_HEARTBEATS * heartbeat
    if "heartbeat" in attrs:
        silence = time.time() - attrs["heartbeat"]
    elif trial.datetime_start is not None:  # killed between ask and its first attrs
        silence = (datetime.now() - trial.datetime_start).total_seconds()
    else:
        return None
    return f"no heartbeat for {silence:.0f} s" if silence > limit else None


def _retry_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a stale trial's parameters once more (with clean attrs, not the dead worker's)."""
    retries = trial.user_attrs.get("retries", 0)
    if retries < MAX_RETRIES and trial.params:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retries": retries + 1})


def _sweep_stale(study: optuna.Study, storage, heartbeat: float) -> None:
    """Fail the RUNNING trials of dead workers, so none stays RUNNING and the others make up the count."""
    host = socket.gethostname()
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _stale_reason(trial, heartbeat, host)
        if reason is None:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, "stale", True)
            storage.set_trial_user_attr(trial_id, "stale_reason", reason)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile, or another worker swept it first
        log.warning("trial %d failed as stale (%s)", trial.number, reason)
        _retry_stale(study, trial)


class _Heartbeat:
    """Refreshes the trial's ``heartbeat`` user attr (and Optuna's RDB heartbeat) from a thread."""

    def __init__(self, storage, trial_id: int, trial: optuna.Trial, interval: float):
        self._storage, self._trial_id, self._trial, self._interval = storage, trial_id, trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial.number}")

    def beat(self) -> None:
        self._trial.set_user_attr("heartbeat", time.time())
        if isinstance(self._storage, RDBStorage):
            self._storage.record_heartbeat(self._trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # another worker failed it as stale; the owner learns at tell
            except Exception as exc:  # a flaky database must not kill the trial; the next beat retries
                log.warning("trial %d: heartbeat not recorded: %s", self._trial.number, exc)

    def __enter__(self):
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()


# --- worker -------------------------------------------------------------------------------------------

def _is_cuda_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # an OOM can only come from torch once something imported it
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def _free_cuda_memory() -> None:
    gc.collect()  # the exception's frames held the trial's tensors
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tell(study: optuna.Study, trial: optuna.Trial, **kwargs) -> None:
    try:
        study.tell(trial, **kwargs)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was failed as stale by another worker before it ended", trial.number)


def _run_trial(study, storage, config, objective, trial, identity) -> None:
    """Run one asked trial and tell its outcome; a bug (any other exception) fails it and is re-raised."""
    tune = config["tune"]
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), trial.number)
    oom = None
    with _Heartbeat(storage, trial_id, trial, tune["heartbeat"]):
        try:
            params = suggest(trial, tune["search_space"])
            log.info("trial %d (worker %d): %s", trial.number, identity["worker"], params)
            value = float(objective(config, trial, params))
        except optuna.TrialPruned as exc:
            log.info("trial %d pruned: %s", trial.number, exc)
            outcome = {"state": TrialState.PRUNED}
        except Exception as exc:
            if not _is_cuda_oom(exc):
                _tell(study, trial, state=TrialState.FAIL)
                raise
            oom = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
            outcome = {"state": TrialState.PRUNED}
        else:
            outcome = {"values": value}
            log.info("trial %d finished: %s", trial.number, value)
    if oom is not None:  # outside the except block, so the traceback's tensors can be freed
        _free_cuda_memory()
        log.warning("trial %d ran out of GPU memory (%s); pruned", trial.number, oom)
        trial.set_user_attr("oom", True)
    _tell(study, trial, **outcome)


def _worker_loop(config, storage, objective, worker: int, stop: threading.Event) -> None:
    tune = config["tune"]
    n_trials, heartbeat = tune["n_trials"], tune["heartbeat"]
    study = _open_study(config, storage)
    identity = _identity(worker)
    poll = min(heartbeat, 2.0)
    while not stop.is_set():
        _sweep_stale(study, storage, heartbeat)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        if finished >= n_trials:
            return
        if finished + sum(t.state == TrialState.RUNNING for t in trials) >= n_trials:
            stop.wait(poll)  # enough trials are running; stay to replace any whose worker dies
            continue
        trial = study.ask()
        for key, value in {**identity, "heartbeat": time.time()}.items():
            trial.set_user_attr(key, value)
        _sweep_stale(study, storage, heartbeat)  # so every RUNNING trial counted below is alive
        counted = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
        earlier = sum(t.number < trial.number and t.state in counted
                      for t in study.get_trials(deepcopy=False))
        if earlier >= n_trials:  # others asked first: running it would overshoot n_trials
            trial.set_user_attr("surplus", True)
            _tell(study, trial, state=TrialState.FAIL)
            continue
        _run_trial(study, storage, config, objective, trial, identity)


def run_worker(config: dict, train_store, valid_store, stats_path, workdir, *, worker: int,
               objective: Objective | None = None) -> None:
    """Run trials of the shared study until it holds exactly tune.n_trials finished trials.

    ``objective(config, trial, params) -> float`` defaults to training the model for tune.epochs
    (``holopipe.train.train_model``, outputs under ``workdir/trials/N``). tune.trials_per_gpu loops
    run in threads of this process and share its device. A CUDA out-of-memory error prunes the trial
    (``oom=True``) and the worker carries on; any other error fails the trial and stops the worker.
    """
    tune = config["tune"]
    if tune["n_trials"] == 0:
        log.info("tuning disabled (tune.n_trials = 0)")
        return
    if objective is None:
        objective = functools.partial(_train_objective, train_store=train_store, valid_store=valid_store,
                                      stats_path=stats_path, workdir=workdir)
    # The RDB heartbeat is meant for study.optimize; with ask/tell we record it ourselves.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    storage = open_storage(config, workdir)
    _open_study(config, storage)  # create it once before the threads race to
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=tune["trials_per_gpu"], thread_name_prefix="trials") as pool:
        futures = [pool.submit(_worker_loop, config, storage, objective, worker, stop)
                   for _ in range(tune["trials_per_gpu"])]
        try:
            for future in futures:
                future.result()
        finally:
            stop.set()  # on a bug in one loop, the others end after their current trial


# --- summary ------------------------------------------------------------------------------------------

def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)  # Optuna draws with pyplot, which keeps its figures until closed


def _message_figure(title: str, message: str):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    return fig


def _plots(study: optuna.Study | None, plots_dir: Path, disabled: bool) -> None:
    """history.png, importances.png and intermediate.png (a message figure where a plot cannot be drawn)."""
    from optuna.visualization import matplotlib as ovm

    titles = {"history": "Optimization history", "importances": "Hyperparameter importances",
              "intermediate": "Intermediate values"}
    if disabled:
        for name, title in titles.items():
            _save_figure(_message_figure(title, "tuning disabled (tune.n_trials = 0)"), plots_dir / f"{name}.png")
        return
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    n_params = len({key for t in complete for key in t.params})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figures = {"history": ovm.plot_optimization_history(study).figure}
        if len(complete) >= 2 and n_params >= 1:
            try:
                figures["importances"] = ovm.plot_param_importances(study).figure
            except (ValueError, RuntimeError) as exc:  # e.g. a parameter that never varied
                figures["importances"] = _message_figure(titles["importances"], f"not computable: {exc}")
        else:
            figures["importances"] = _message_figure(
                titles["importances"], f"needs 2 complete trials and 1 tuned parameter "
                                       f"({len(complete)} complete, {n_params} parameters)")
        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            figures["intermediate"] = ovm.plot_intermediate_values(study).figure
        else:
            figures["intermediate"] = _message_figure(titles["intermediate"], "no trial reported intermediate values")
    for name, fig in figures.items():
        _save_figure(fig, plots_dir / f"{name}.png")


def summarize(config: dict, workdir, best_path, trials_csv, plots_dir) -> None:
    """Write the best trial's parameters (a flat mapping of dotted keys for ``with_overrides``, with the
    study's facts as YAML comments), every trial as CSV, and the history, importance and intermediate
    plots. With tune.n_trials = 0 the mapping is empty and the plots say tuning is disabled.
    """
    import pandas as pd

    best_path, trials_csv, plots_dir = Path(best_path), Path(trials_csv), Path(plots_dir)
    if config["tune"]["n_trials"] == 0:
        text = "# tuning disabled (tune.n_trials = 0): no overrides\n{}\n"
        frame, study = pd.DataFrame(columns=["number", "value", "state"]), None
    else:
        storage, name = open_storage(config, workdir), study_name(config)
        if name not in optuna.get_all_study_names(storage):
            where = config["tune"]["storage"] or _journal_path(workdir)
            raise ValueError(f"{where}: no study {name} (run the tune workers with this config first)")
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
            raise ValueError(f"study {name}: no trial completed, nothing to pick ({counts})")
        best = study.best_trial
        metric = config["train"]["early_stopping"]["metric"]
        header = (f"# Best trial of Optuna study {name}: trial {best.number}, validation {metric} "
                  f"{best.value:.6g} ({_direction(config)}), out of {sum(t.state in FINISHED for t in trials)} "
                  f"finished trials.\n# Dotted config keys, applied with holopipe.config.with_overrides.\n")
        text = header + yaml.safe_dump(dict(best.params), sort_keys=True, default_flow_style=False)
        frame = study.trials_dataframe()
    write_atomically(best_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    write_atomically(trials_csv, lambda tmp: frame.to_csv(tmp, index=False))
    plots_dir.mkdir(parents=True, exist_ok=True)
    _plots(study, plots_dir, disabled=study is None)
