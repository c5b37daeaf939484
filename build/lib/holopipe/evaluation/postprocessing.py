"""Choosing what follows detection on ``valid``: the particles stage's settings and the physics baseline's,
with the same budget for both, written back into the config file that the workflow reads.

Each method gets ``trials`` Optuna trials (TPE, seeded) over its own :data:`SEARCH_SPACES`, the first one the
config's current settings, so the choice is never worse than today's on ``valid``. A trial runs the real stage
(:func:`holopipe.detect.particles.particles_file` on the U-Net's detections of the split;
:func:`holopipe.detect.baseline.baseline_file` on its store) into a scratch folder and scores F1 against the split's
truth with the evaluation's matching. Only ``valid`` is ever read: the evaluated splits stay unseen (the accuracy
benchmark judges the result on holograms nobody chose anything on).

:func:`write_settings` replaces the file's top-level ``particles:`` and ``baseline:`` blocks by one generated
block between :data:`BEGIN` and :data:`END` markers that says where the values came from; keys of those
sections that were not searched keep their values.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import yaml

from holopipe.core.config import load_config, with_overrides
from holopipe.core.files import write_atomically
from holopipe.core.io import read_particle_csv
from holopipe.evaluation.matching import match, read_truth

__all__ = ["BEGIN", "END", "SEARCH_SPACES", "tune_postprocessing", "write_settings"]

log = logging.getLogger("holopipe")

SEARCH_SPACES = {
    "particles": {
        "distance": ("float", 3.0e-6, 3.0e-5, True),
        "link_depth": ("float", 2.0e-4, 2.0e-3, True),
        "split_prominence": ("float", 0.05, 1.0, True),
        "min_planes": ("int", 1, 3, False),
        "min_contrast": ("float", 0.05, 0.6, False),
        "min_disk_contrast": ("float", 0.0, 0.6, False),
        "refine_margin": ("float", 2.0e-4, 2.0e-2, True),
        "beyond_planes": ("int", 0, 10, False),
        "refine_window": ("float", 1.0, 4.0, False),
        "ghost_depths_of_focus": ("float", 0.0, 4.0, False),
        "ghost_diameters": ("float", 0.0, 4.0, False),
        "contrast_diameter": ("optional_float", 5.0e-6, 6.0e-5, True),
    },
    "baseline": {
        "threshold_sigmas": ("float", 2.0, 8.0, False),
        "min_voxels": ("int", 1, 20, True),
        "min_contrast": ("float", 0.2, 0.8, False),
        "focus_metric": ("categorical", ("tamura", "min_amplitude", "edge_sharpness")),
        "split_prominence": ("float", 0.05, 1.0, True),
        "beyond_planes": ("int", 0, 10, False),
        "ghost_depths_of_focus": ("float", 0.0, 4.0, False),
        "ghost_diameters": ("float", 0.0, 6.0, False),
        "contrast_diameter": ("optional_float", 5.0e-6, 6.0e-5, True),
    },
}
"""Per section, key -> (kind, low, high, log) or ("categorical", choices): 12 knobs after the U-Net's detector,
9 after the physics detector (threshold and contrast are the physics detector's own knobs). An
``optional_float`` is a key whose null switches a behaviour off (``contrast_diameter``: fixed thresholds): a trial
first draws whether it is on (Optuna parameter ``<key>_on``), then its value only where it is."""

_ON = "_on"

BEGIN = "# >>> make tune-postprocessing"
END = "# <<< make tune-postprocessing"


def _suggest(trial: optuna.Trial, section: str) -> dict:
    chosen = {}
    for key, spec in SEARCH_SPACES[section].items():
        if spec[0] == "categorical":
            chosen[key] = trial.suggest_categorical(key, list(spec[1]))
        elif spec[0] == "optional_float":
            on = trial.suggest_categorical(key + _ON, [False, True])
            chosen[key] = trial.suggest_float(key, spec[1], spec[2], log=spec[3]) if on else None
        elif spec[0] == "int":
            chosen[key] = trial.suggest_int(key, spec[1], spec[2], log=spec[3])
        else:
            chosen[key] = trial.suggest_float(key, spec[1], spec[2], log=spec[3])
    return chosen


def _as_params(section: str, settings: dict) -> dict:
    """``settings`` as the Optuna parameters that :func:`_suggest` draws (an optional float's on/off beside it)."""
    params = {}
    for key, spec in SEARCH_SPACES[section].items():
        value = settings[key]
        if spec[0] == "optional_float":
            params[key + _ON] = value is not None
            if value is None:
                continue
        params[key] = value
    return params


def _as_settings(section: str, params: dict) -> dict:
    """The config values of a trial's Optuna parameters: the inverse of :func:`_as_params`."""
    return {key: (params[key] if params.get(key + _ON, True) else None) if spec[0] == "optional_float"
            else params[key] for key, spec in SEARCH_SPACES[section].items()}


def _f1(truth: pd.DataFrame, csvs, evaluate: dict) -> float:
    """F1 of counts pooled over particle CSVs (one per training run's detections) of one split."""
    tp = fp = fn = 0
    for csv in csvs:
        predicted = read_particle_csv(csv)
        matched = len(match(truth, predicted, float(evaluate["tolerance_xy"]), float(evaluate["tolerance_z"])))
        tp, fp, fn = tp + matched, fp + len(predicted) - matched, fn + len(truth) - matched
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 1.0


def _search(section: str, config: dict, run, truth: pd.DataFrame, trials: int, seed: int) -> optuna.Study:
    """``trials`` TPE trials of ``section``'s knobs, the first being the config's own values."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial(_as_params(section, config[section]))
    with tempfile.TemporaryDirectory(prefix=f"holopipe-tune-{section}-") as scratch:
        def objective(trial):
            chosen = _suggest(trial, section)
            out = Path(scratch) / str(trial.number)
            out.mkdir()
            csvs = run(with_overrides(config, {f"{section}.{key}": value for key, value in chosen.items()}), out)
            return _f1(truth, csvs, config["evaluate"])

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=trials)
    return study


def tune_postprocessing(config: dict, detection_sets, store_path, *, trials: int, seed: int = 0) -> dict:
    """Search the particles stage's settings and the baseline's, ``trials`` each; returns ``{section:
    {"settings", "f1", "f1_before"}, "split", "n_holograms", "n_true", "trials", "runs"}``.

    ``detection_sets`` holds, per trained model, the U-Net's detection CSVs of the split (its inference
    chunks): the particles stage is scored on counts pooled over them, so that its settings suit the
    detector rather than one training's quirks. The baseline runs on ``store_path``, the split's
    standardized store.
    """
    from holopipe.detect.baseline import baseline_file
    from holopipe.detect.particles import particles_file

    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    detection_sets = [[Path(p) for p in csvs] for csvs in detection_sets]
    if not detection_sets or not all(detection_sets):
        raise ValueError("tune_postprocessing: every set of detections needs at least one CSV")
    store_path = Path(store_path)
    truth = read_truth(store_path).particles
    if truth.empty:
        raise ValueError(f"{store_path}: no true particles to score settings against (a simulated split is needed)")
    runs = {
        "particles": lambda c, out: [particles_file(csvs, out / f"run_{k}.csv", c, store_path=store_path,
                                                    progress=False) for k, csvs in enumerate(detection_sets)],
        "baseline": lambda c, out: [baseline_file(c, store_path, out / "baseline.csv", progress=False)],
    }
    result = {"split": store_path.name.removesuffix(".zarr"), "n_holograms": int(truth["hid"].nunique()),
              "n_true": len(truth), "trials": trials, "runs": len(detection_sets)}
    for section, run in runs.items():
        study = _search(section, config, run, truth, trials, seed)
        log.info("%s: F1 %.3f -> %.3f on %s", section, study.trials[0].value, study.best_value, store_path)
        result[section] = {"settings": _as_settings(section, study.best_params), "f1": study.best_value,
                           "f1_before": study.trials[0].value}
    return result


_TOP_LEVEL = re.compile(r"^([A-Za-z_][\w-]*):")


def _without_sections(lines: list[str], sections) -> tuple[list[str], int]:
    """The lines without the top-level blocks of ``sections`` (and an earlier generated block), and where the
    first removed one began (the end when none)."""
    kept, first, skipping = [], None, False
    for line in lines:
        if line.startswith(BEGIN):
            skipping, first = True, len(kept) if first is None else first
            continue
        if line.startswith(END):
            skipping = False
            continue
        top = _TOP_LEVEL.match(line)
        if top:
            skipping = top.group(1) in sections
            if skipping and first is None:
                first = len(kept)
        if not skipping:
            kept.append(line)
    return kept, len(kept) if first is None else first


def write_settings(config_path, result: dict) -> Path:
    """Write :func:`tune_postprocessing`'s choice into the config file at ``config_path`` (atomically), in place
    of its ``particles:`` and ``baseline:`` blocks; the file must still validate (it is checked before writing)."""
    config_path = Path(config_path)
    text = config_path.read_text()
    current = yaml.safe_load(text) or {}
    sections = {section: {**(current.get(section) or {}), **result[section]["settings"]}
                for section in SEARCH_SPACES}
    merged_config = {**current, **sections}
    load_config(merged_config)  # a tuned value the schema refuses must not reach the file
    header = (f"{BEGIN}: chosen on {result['split']} ({result['n_holograms']} holograms, {result['n_true']} "
              f"droplets, the U-Net's detections of {result.get('runs', 1)} trained models), {result['trials']} "
              f"trials per method;\n# F1 there: particles "
              f"{result['particles']['f1_before']:.3f} -> {result['particles']['f1']:.3f}, baseline "
              f"{result['baseline']['f1_before']:.3f} -> {result['baseline']['f1']:.3f}. Rerun it rather than "
              "editing by hand.\n")
    body = yaml.safe_dump({section: {key: (float(v) if isinstance(v, (float, np.floating)) else v)
                                     for key, v in values.items()} for section, values in sections.items()},
                          sort_keys=False, default_flow_style=False)
    kept, at = _without_sections(text.splitlines(keepends=True), SEARCH_SPACES)
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    block = [header, body, END + "\n"]
    new_text = "".join(kept[:at] + block + (["\n"] if at < len(kept) and kept[at].strip() else []) + kept[at:])
    if yaml.safe_load(new_text) != merged_config:
        raise RuntimeError(f"{config_path}: the rewritten file would not read back as the chosen config")
    return write_atomically(config_path, lambda tmp: tmp.write_text(new_text))
