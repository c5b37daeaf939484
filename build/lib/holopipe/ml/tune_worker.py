"""Tuning workers: ask/tell loops on a study of :mod:`holopipe.ml.tune`, one per worker job (possibly on
another node).

A worker refuses a study file whose study is not the one its own config and data give, so re-made examples
never continue an old study. It runs ask/tell loops until the study holds exactly ``tune.n_trials``
*finished* trials, in ``tune.trials_per_gpu`` spawned processes that share the worker's GPU, so that the
seeds and torch's global settings of one trial never reach another. Finished means COMPLETE or PRUNED (an
out-of-memory trial is pruned); FAIL trials never count: those are surplus trials (asked in a race after
enough others had started, or a retry still waiting when the count was made up; marked ``surplus``), trials
of killed workers (marked ``stale``) and failed ones.

Counting is by trial number, so concurrent workers never overshoot: after ``ask`` a trial runs only if
fewer than ``n_trials`` trials with a smaller number are finished, running or waiting. A worker that sees
enough trials running waits for them instead of leaving, so if one of their workers dies the survivors
make up the count.

Killed workers: a running trial carries user attrs ``host``, ``pid``, ``pid_start``, ``worker`` and a
``heartbeat`` (epoch seconds) that a background thread refreshes every ``tune.heartbeat`` seconds. Each
loop first sweeps stale trials: a RUNNING trial whose process is gone from this host, or whose heartbeat
is older than four heartbeats, is enqueued once more with the same parameters (``retry_of``) and then set
to FAIL (``stale=True``). The journal backend has no heartbeat of its own; with PostgreSQL the storage
also records Optuna's heartbeat.
"""

from __future__ import annotations

import functools
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import optuna
import psutil
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from holopipe.core.config import with_overrides
from holopipe.ml.tune import (
    FINISHED,
    STALE_HEARTBEATS,
    Objective,
    _load_study,
    _retry_of,
    check_study,
    data_digests,
    open_storage,
    study_name,
    suggest,
)

__all__ = ["TrialProcessError", "run_worker"]

log = logging.getLogger("holopipe")


class TrialProcessError(RuntimeError):
    """A trial process of a worker ended with a non-zero exit status (``exit_status``, 128 + N for signal N,
    as a shell reports it), so the worker fails with that status."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


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
    """Tell a trial's outcome, unless another worker failed it while it ran (as stale, or as a withdrawn duplicate
    retry): then the outcome is dropped with a warning, and the worker carries on."""
    try:
        told = study.tell(trial, skip_if_finished=True, **kwargs)
    except optuna.exceptions.UpdateFinishedTrialError:  # failed between optuna's check and its write
        told = None
    if told is None or told.state != kwargs.get("state", TrialState.COMPLETE):
        log.warning("trial %d was failed by another worker before it ended (stale, or a withdrawn retry); "
                    "its outcome is dropped", trial.number)


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
    """Run trials of the study in ``study_file`` (:func:`holopipe.ml.tune.start_study`) until it holds exactly
    tune.n_trials finished trials; refuses a study file of another config or other data
    (:func:`~holopipe.ml.tune.check_study`).

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


