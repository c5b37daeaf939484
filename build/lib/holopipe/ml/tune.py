"""Hyperparameter search with Optuna: the study that several worker jobs share, and its summary.

:func:`start_study` creates the study once and writes its study file (JSON): the study's name, which hashes
the config the trials depend on and the content of the examples and stats they train on
(:func:`study_name`), and where it lives: a fresh journal beside the study file (one node or a shared file
system) or, with ``tune.storage``, a PostgreSQL database (many nodes). The workers that run its trials are
:mod:`holopipe.ml.tune_worker`; :func:`summarize` writes the best parameters, the trials and the plots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import optuna
import yaml
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from holopipe.core.config import TUNE_RUNTIME_KEYS, TUNE_STORAGE_KEYS, ConfigError
from holopipe.core.credentials import MASK, mask_secrets, read_password_file
from holopipe.core.files import write_atomically

__all__ = ["TrialSeededSampler", "check_study", "data_digests", "open_storage", "recorded_study", "start_study",
           "study_name", "suggest", "summarize"]

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
