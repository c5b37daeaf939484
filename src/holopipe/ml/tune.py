"""Hyperparameter search with Optuna, shared by several worker jobs.

:func:`start_study` creates the study once and writes its study file (JSON): the study's name, which hashes
the config the trials depend on and the content of the examples and stats they train on
(:func:`study_name`), and where it lives: a fresh journal beside the study file (one node or a shared file
system) or, with ``tune.storage``, a PostgreSQL database (many nodes). Every worker (a separate job,
possibly on another node) refuses a study file whose study is not the one its own config and data give, so
re-made examples never continue an old study. Each worker runs ask/tell loops until the study holds exactly
``tune.n_trials`` *finished* trials, in ``tune.trials_per_gpu`` spawned processes that share the worker's
GPU, so that the seeds and torch's global settings of one trial never reach another. Finished means
COMPLETE or PRUNED (an out-of-memory trial is pruned); FAIL trials never count: those are surplus trials
(asked in a race after enough others had started, or a retry still waiting when the count was made up;
marked ``surplus``), trials of killed workers (marked
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
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import optuna
import psutil
import yaml
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from holopipe.core.config import TUNE_RUNTIME_KEYS, TUNE_STORAGE_KEYS, ConfigError, with_overrides
from holopipe.core.credentials import MASK, mask_secrets, read_password_file
from holopipe.core.files import write_atomically

__all__ = ["TrialProcessError", "TrialSeededSampler", "check_study", "data_digests", "open_storage",
           "recorded_study", "run_worker", "start_study", "study_name", "suggest", "summarize"]

log = logging.getLogger("holopipe")

STALE_HEARTBEATS = 4
"""A running trial whose heartbeat is older than this many heartbeat intervals belongs to a dead worker."""

JOURNAL_LOCK_GRACE_SECONDS = 10
"""A journal lock file untouched this long belongs to a killed worker (an append holds it for milliseconds)
and is broken, so the other workers stall 10 s, not Optuna's default 30 s, when one dies holding it."""

MAX_RETRIES = 1
"""Times a stale trial's parameters are queued again (a trial that kills its worker must not kill them all)."""

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DATA_ROLES = ("train", "valid", "stats")
"""The trials' inputs whose content names the study: the examples stores and the standardize stats."""

Objective = Callable[[dict, optuna.Trial, dict], float]


class TrialProcessError(RuntimeError):
    """A trial process of a worker ended with a non-zero exit status (``exit_status``, 128 + N for signal N,
    as a shell reports it), so the worker fails with that status."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def data_digests(train_store, valid_store, stats_path) -> dict[str, str | None]:
    """SHA-256 of the content of each input the trials read (:data:`DATA_ROLES`): a store's files in sorted
    relative order, each its relative path and its bytes (:func:`holopipe.core.provenance.checksum`); None for an
    input not given (an objective that reads no data). About 1 s per GB on one core with SHA-NI."""
    from holopipe.core.provenance import checksum

    started = time.perf_counter()
    digests = {role: None if path is None else checksum(path)["sha256"]
               for role, path in zip(DATA_ROLES, (train_store, valid_store, stats_path))}
    log.info("content digests of the tuning data in %.1f s: %s", time.perf_counter() - started,
             ", ".join(f"{role} {digest and digest[:12]}" for role, digest in digests.items()))
    return digests


def study_name(config: dict, data: Mapping[str, str | None]) -> str:
    """``holopipe-`` + a hash of everything that shapes the trials' results: the search space, the model,
    training and examples config, and the content ``data`` (:func:`data_digests`) of the examples and stats
    the trials read, so that a changed config or re-made examples never continue an old study.

    Left out: how the search is run and where it is kept (holopipe.core.config's TUNE_RUNTIME_KEYS: workers,
    trials_per_gpu, heartbeat and n_trials; TUNE_STORAGE_KEYS: storage and its password file), so raising n_trials
    continues the same study.
    """
    tune = {k: v for k, v in config["tune"].items() if k not in TUNE_RUNTIME_KEYS + TUNE_STORAGE_KEYS}
    sections = {"model", "train", "examples"} | {key.split(".")[0] for key in tune["search_space"]}
    identity = {"tune": tune, **{name: config[name] for name in sorted(sections - {"tune"})},
                "data": {role: data[role] for role in DATA_ROLES}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"holopipe-{digest[:12]}"


def _journal_path(study_file) -> Path:
    return Path(study_file).with_suffix(".journal")


def _storage_description(config: dict, study_file) -> str:
    url = config["tune"]["storage"]
    return f"journal {_journal_path(study_file).name}" if url is None else mask_secrets(url)


def start_study(config: dict, study_file, train_store, valid_store, stats_path) -> str:
    """Create the study of this config and data and write its study file (returns the study's name).

    The study file is JSON: the study's name, the data digests it was named from and where the study lives:
    with ``tune.storage`` null a fresh journal beside it (``study.journal`` for ``study.json``; an existing
    one is replaced), else the database (its URL without password), where a study of the same name (same
    config and data) is continued.
    """
    digests = data_digests(train_store, valid_store, stats_path)
    name = study_name(config, digests)
    if config["tune"]["storage"] is None:
        write_atomically(_journal_path(study_file),
                         lambda tmp: _create_study(config, _journal_storage(tmp), name))
    else:
        _create_study(config, open_storage(config, study_file), name)
    record = {"study": name, "storage": _storage_description(config, study_file), "data": digests}
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    write_atomically(study_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    log.info("study %s in %s", name, record["storage"])
    return name


def _create_study(config: dict, storage, name: str) -> None:
    optuna.create_study(study_name=name, storage=storage, direction=_direction(config), load_if_exists=True)


def recorded_study(config: dict, study_file) -> dict:
    """The study file's record (``study``, ``storage``, ``data``; :func:`start_study`), checked against
    tune.storage and, for a journal, against the one study the journal holds."""
    path = Path(study_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no study file; create it first with `holopipe tune study` "
                                f"(Snakemake's tune_study rule)")
    record = json.loads(path.read_text(encoding="utf-8"))
    if record["storage"] != _storage_description(config, path):
        raise ValueError(f"{path}: records study {record['study']} in {record['storage']}, but this config's "
                         f"study lives in {_storage_description(config, path)} (tune.storage); start it anew "
                         f"with `holopipe tune study`")
    if config["tune"]["storage"] is None:
        journal = _journal_path(path)
        names = optuna.get_all_study_names(_journal_storage(journal)) if journal.is_file() else []
        if names != [record["study"]]:
            raise ValueError(f"{journal}: holds {', '.join(names) or 'no study'}, not study {record['study']} "
                             f"that {path} records; start it anew with `holopipe tune study`")
    return record


def check_study(config: dict, study_file, expected: str, data: Mapping[str, str | None]) -> None:
    """Refuse a study file whose study is not ``expected`` (this config's and ``data``'s), saying which
    of the data changed since the study was created, or that the config did."""
    record = recorded_study(config, study_file)
    if record["study"] == expected:
        return
    changed = [role for role in DATA_ROLES if record["data"].get(role) != data[role]]
    why = (f"the content of {', '.join(changed)} changed" if changed
           else "the tuning, model, training or examples config changed")
    raise ValueError(f"{study_file} holds study {record['study']}, but this config and data give study "
                     f"{expected} ({why} since the study was created); start a new study with "
                     f"`holopipe tune study` (Snakemake reruns tune_study itself)")


def _journal_storage(path) -> JournalStorage:
    """A journal file with an open-file lock (which works on NFS and Lustre)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileOpenLock(str(path), grace_period=JOURNAL_LOCK_GRACE_SECONDS)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def open_storage(config: dict, study_file):
    """The storage of the study of ``study_file``: its journal beside it when ``tune.storage`` is null,
    else the RDB (PostgreSQL) URL, with Optuna's heartbeat.

    The password of tune.storage_password_file goes to the driver as a connection argument, never into
    the URL, which Optuna and SQLAlchemy keep and may print; without one, libpq reads ~/.pgpass or
    PGPASSWORD itself. An error opening the database is raised with the URL and password masked.
    """
    tune = config["tune"]
    if tune["storage"] is None:
        return _journal_storage(_journal_path(study_file))
    password = (None if tune["storage_password_file"] is None
                else read_password_file(tune["storage_password_file"], "tune.storage_password_file"))
    engine_kwargs = {"pool_pre_ping": True, **({"connect_args": {"password": password}} if password else {})}
    interval = max(1, math.ceil(tune["heartbeat"]))  # Optuna wants whole seconds
    # Workers start together: creating the tables on an empty database can race, so retry briefly.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    tune["storage"],
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=interval,
                    grace_period=STALE_HEARTBEATS * interval,
                    heartbeat_stale_trial_callback=_retry_stale,
                )
        except Exception as exc:  # sqlalchemy errors; the last one is raised with the URL named
            if attempt == 4:
                # Not chained (from None): a traceback would print the unmasked original beneath.
                message = mask_secrets(f"tune.storage {tune['storage']}: cannot open the database "
                                       f"({type(exc).__name__}): {exc}")
                raise RuntimeError(message.replace(password, MASK) if password else message) from None
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


def _load_study(config: dict, storage, name: str) -> optuna.Study:
    tune = config["tune"]
    sampler = TrialSeededSampler(tune["seed"], n_startup_trials=tune["startup_trials"], constant_liar=True,
                                 multivariate=True)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=_pruner(tune))


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
                     stats_path, trials_dir) -> float:
    """Train one trial's model for tune.epochs and return its best validation metric."""
    from holopipe.ml.train import train_model  # torch loads only where trials really train

    trial_config = with_overrides(config, {**params, "train.epochs": config["tune"]["epochs"]})
    out_dir = Path(trials_dir) / f"{trial.number}"
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


def _retry_of(trial: FrozenTrial) -> FrozenTrial | None:
    """A WAITING trial with a stale trial's parameters (and clean attrs, not the dead worker's), or None
    where the trial gets no more retries."""
    retries = trial.user_attrs.get("retries", 0)
    if retries >= MAX_RETRIES or not trial.params:
        return None
    return optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={"fixed_params": trial.params},
                                     user_attrs={"retry_of": trial.number, "retries": retries + 1})


def _retry_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's stale-trial callback (PostgreSQL heartbeats): queue the failed trial once more."""
    retry = _retry_of(trial)
    if retry is not None:
        study.add_trial(retry)


def _fail_as_surplus(storage, trial_id: int) -> None:
    """Fail a trial that must not run (it would overshoot n_trials); one that finished meanwhile stays."""
    try:
        storage.set_trial_user_attr(trial_id, "surplus", True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def _sweep_stale(study: optuna.Study, storage, heartbeat: float) -> None:
    """Fail the RUNNING trials of dead workers, so none stays RUNNING and the others make up the count.

    The retry is queued *before* the stale trial fails: in the other order a worker that looked in between
    saw a free place, asked a fresh trial, and the retry was left waiting once the count was made up. A
    worker that loses the race to fail the trial (another swept it first) withdraws its own retry."""
    host = socket.gethostname()
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _stale_reason(trial, heartbeat, host)
        if reason is None:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        retry = _retry_of(trial)
        if retry is not None:
            retry = storage.create_new_trial(study_id, template_trial=retry)
        try:
            storage.set_trial_user_attr(trial_id, "stale", True)
            storage.set_trial_user_attr(trial_id, "stale_reason", reason)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile, or swept by another worker
            if retry is not None:
                _fail_as_surplus(storage, retry)
            continue
        log.warning("trial %d failed as stale (%s)", trial.number, reason)


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


def _worker_loop(config, study_file, name: str, objective, worker: int, stop) -> None:
    """Ask, run and tell trials until the study has n_trials finished, or until ``stop`` is set."""
    tune = config["tune"]
    n_trials, heartbeat = tune["n_trials"], tune["heartbeat"]
    # The RDB heartbeat is meant for study.optimize; with ask/tell we record it ourselves.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    storage = open_storage(config, study_file)
    study = _load_study(config, storage, name)
    identity = _identity(worker)
    poll = min(heartbeat, 2.0)
    while not stop.is_set():
        _sweep_stale(study, storage, heartbeat)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        if finished >= n_trials:
            study_id = storage.get_study_id_from_name(study.study_name)
            for trial in trials:  # a retry queued while the last places filled is never run
                if trial.state == TrialState.WAITING:
                    _fail_as_surplus(storage, storage.get_trial_id_from_study_id_trial_number(
                        study_id, trial.number))
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


def run_worker(config: dict, study_file, train_store, valid_store, stats_path, workdir, *, worker: int,
               objective: Objective | None = None) -> None:
    """Run trials of the study in ``study_file`` (:func:`start_study`) until it holds exactly tune.n_trials
    finished trials; refuses a study file of another config or other data (:func:`check_study`).

    ``objective(config, trial, params) -> float`` defaults to training the model for tune.epochs
    (``holopipe.ml.train.train_model``, outputs under ``workdir/trials/<study>/N``). With tune.trials_per_gpu
    above 1 the trial loops run in as many spawned processes on this worker's GPU (so ``objective`` must be
    picklable), and one that fails makes the worker fail (:class:`TrialProcessError`). A CUDA
    out-of-memory error prunes the trial (``oom=True``) and the loop carries on; any other error fails the
    trial and stops the worker.
    """
    tune = config["tune"]
    if tune["n_trials"] == 0:
        log.info("tuning disabled (tune.n_trials = 0)")
        return
    data = data_digests(train_store, valid_store, stats_path)
    name = study_name(config, data)
    check_study(config, study_file, name, data)
    if objective is None:
        objective = functools.partial(_train_objective, train_store=train_store, valid_store=valid_store,
                                      stats_path=stats_path, trials_dir=Path(workdir) / "trials" / name)
    if tune["trials_per_gpu"] == 1:
        _worker_loop(config, study_file, name, objective, worker, threading.Event())
    else:
        _run_trial_processes(config, study_file, name, objective, worker)


def _trial_gpu_environment(config: dict) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` for a worker's trial processes: the one GPU of the worker's slot
    (:func:`holopipe.core.device.gpu_slot`, held by this process for its lifetime), so that they share it and
    see it as their only one. Empty where the trials run on the CPU or on the GPU train.device names."""
    if config["train"]["device"] not in ("auto", "cuda"):
        return {}
    import torch  # no CUDA context: counting GPUs does not create one

    if not torch.cuda.is_available():
        return {}  # the trials resolve train.device themselves, and fail where a GPU was allocated
    from holopipe.core.device import allocated_gpus, gpu_slot

    count = torch.cuda.device_count()
    names = allocated_gpus() or [str(index) for index in range(count)]
    return {"CUDA_VISIBLE_DEVICES": names[gpu_slot(count)]}


@contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables while the trial processes start (they inherit them), then restore."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _exit_with(parent: int) -> None:
    """End this trial process when its worker is gone (killed by the scheduler: its trials must stop too)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        log.error("worker process %d is gone; trial process %d exits", parent, os.getpid())
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _trial_process(config, study_file, name, objective, worker, stop, parent: int, threads: int,
                   log_level: int) -> None:
    """A spawned trial process: a fresh interpreter, so no seed, determinism flag, default dtype or cuDNN
    setting of another trial's process reaches its trials. Runs the worker loop with ``threads`` CPUs."""
    from holopipe.core.device import use_threads

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(processName)s %(message)s")
    use_threads(threads)
    _exit_with(parent)
    _worker_loop(config, study_file, name, objective, worker, stop)


def _exit_status(exitcode: int) -> int:
    return 128 - exitcode if exitcode < 0 else exitcode  # -N: killed by signal N


def _run_trial_processes(config, study_file, name, objective, worker: int) -> None:
    """tune.trials_per_gpu worker loops in spawned processes (CUDA and fork do not mix) on this worker's GPU,
    with this worker's CPU threads split between them. When one fails the others end after their current
    trial, the failed one's running trial is swept as stale, and the worker raises
    :class:`TrialProcessError` with its exit status."""
    from holopipe.core.device import cpu_threads

    count = config["tune"]["trials_per_gpu"]
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    args = (config, study_file, name, objective, worker, stop, os.getpid(), max(1, cpu_threads() // count),
            log.getEffectiveLevel())
    processes = [context.Process(target=_trial_process, args=args, name=f"trials-{worker}.{index}")
                 for index in range(count)]
    with _environment(_trial_gpu_environment(config)):
        for process in processes:
            process.start()
    log.info("worker %d: trial processes %s", worker, ", ".join(str(p.pid) for p in processes))
    failed = None
    try:
        running = list(processes)
        while running:
            multiprocessing.connection.wait([process.sentinel for process in running])
            for process in [p for p in running if p.exitcode is not None]:
                running.remove(process)
                if process.exitcode != 0 and failed is None:
                    failed = process
                    stop.set()  # the others end after their current trial
                    log.error("trial process %d exited with status %d; the others end after their current "
                              "trial", process.pid, _exit_status(process.exitcode))
    finally:
        stop.set()
        for process in processes:
            process.join()
    if failed is not None:
        storage = open_storage(config, study_file)
        _sweep_stale(_load_study(config, storage, name), storage, config["tune"]["heartbeat"])
        status = _exit_status(failed.exitcode)
        signame = f" (killed by {signal.Signals(-failed.exitcode).name})" if failed.exitcode < 0 else ""
        raise TrialProcessError(f"worker {worker}: trial process {failed.pid} exited with status {status}"
                                f"{signame}", status)


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


def summarize(config: dict, study_file, best_path, trials_csv, plots_dir) -> None:
    """Write the best trial's parameters of the study in ``study_file`` (a flat mapping of dotted keys for
    ``with_overrides``, with the study's facts as YAML comments), every trial as CSV, and the history,
    importance and intermediate plots. With tune.n_trials = 0 (no study file needed) the mapping is empty
    and the plots say tuning is disabled.
    """
    import pandas as pd

    best_path, trials_csv, plots_dir = Path(best_path), Path(trials_csv), Path(plots_dir)
    if config["tune"]["n_trials"] == 0:
        text = "# tuning disabled (tune.n_trials = 0): no overrides\n{}\n"
        frame, study = pd.DataFrame(columns=["number", "value", "state"]), None
    else:
        if study_file is None:
            raise ValueError("tune.n_trials > 0: summarizing needs the study file (--study)")
        name = recorded_study(config, study_file)["study"]
        study = optuna.load_study(study_name=name, storage=open_storage(config, study_file))
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
            raise ValueError(f"study {name}: no trial completed, nothing to pick ({counts})")
        best = study.best_trial
        metric = config["train"]["early_stopping"]["metric"]
        header = (f"# Best trial of Optuna study {name}: trial {best.number}, validation {metric} "
                  f"{best.value:.6g} ({_direction(config)}), out of {sum(t.state in FINISHED for t in trials)} "
                  f"finished trials.\n# Dotted config keys, applied with holopipe.core.config.with_overrides.\n")
        text = header + yaml.safe_dump(dict(best.params), sort_keys=True, default_flow_style=False)
        frame = study.trials_dataframe()
    write_atomically(best_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    write_atomically(trials_csv, lambda tmp: frame.to_csv(tmp, index=False))
    plots_dir.mkdir(parents=True, exist_ok=True)
    _plots(study, plots_dir, disabled=study is None)
