"""Load and check holopipe configurations.

The JSON Schema shipped in the package (`schemas/config.schema.yaml`) is the single source of truth for
keys, types, units and defaults. This module fills in the defaults, adds the checks a schema cannot express
(one key against another) and reports every problem at once, each with its key path, so that a bad config
fails before any job runs and says where to look.
"""

import copy
from collections.abc import Iterator, Mapping
from importlib import resources
from os import PathLike
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from holopipe.core.credentials import mask_secrets
from holopipe.core.grid import bin_ratio, framed_pixels, resampled_pixels, resamples

__all__ = [
    "TUNE_RUNTIME_KEYS", "TUNE_STORAGE_KEYS", "ConfigError", "check_tiles_fit", "load_config", "merged_config",
    "schema", "with_overrides",
]


class ConfigError(ValueError):
    """A configuration that breaks the schema or a cross-field rule; the message names the keys."""


def schema() -> dict:
    """The packaged config schema, parsed afresh so that callers may modify it."""
    text = resources.files("holopipe").joinpath("schemas/config.schema.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


_validate_properties = Draft202012Validator.VALIDATORS["properties"]


def _properties_with_defaults(validator, properties, instance, schema):
    """The `properties` keyword, but missing keys are first set to their `default`.

    Filling before validating lets a section that was defaulted to `{}` receive its nested defaults.
    Defaults are deep-copied so that configs never share (and mutate) the schema's objects.
    """
    if validator.is_type(instance, "object"):
        for key, subschema in properties.items():
            if isinstance(subschema, dict) and "default" in subschema:
                instance.setdefault(key, copy.deepcopy(subschema["default"]))
    yield from _validate_properties(validator, properties, instance, schema)


_DefaultingValidator = validators.extend(Draft202012Validator, {"properties": _properties_with_defaults})


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _describe(error: ValidationError) -> Iterator[str]:
    """Lines for one schema error, each starting with the dotted key path of the offending key or value."""
    keys = [str(key) for key in error.absolute_path]
    if error.validator == "additionalProperties" and error.validator_value is False:
        allowed = list(error.schema.get("properties", {}))
        for key in error.instance:
            if key not in allowed:
                yield f"{'.'.join([*keys, key])}: unknown key; allowed keys are {', '.join(allowed)}"
    elif "propertyNames" in error.relative_schema_path:  # about a key (error.instance), not a value
        where = ".".join([*keys, error.instance])
        if error.validator == "enum":
            yield f"{where}: key not allowed here; allowed keys are {', '.join(error.validator_value)}"
        else:
            yield f"{where}: bad key name: {error.message}"
    elif error.validator == "type" and isinstance(error.instance, str) and _looks_like_number(error.instance):
        yield f"{'.'.join(keys)}: {error.message} (YAML reads a number such as 1e5 as text; write 1.0e+5)"
    else:
        yield f"{'.'.join(keys) or 'config'}: {error.message}"


PRIMARY_SPLIT = "test"
"""The evaluated split whose metrics are results/evaluation/metrics.json (else the first evaluated split)."""


TUNE_RUNTIME_KEYS = ("n_trials", "workers", "trials_per_gpu", "heartbeat")
"""tune keys that say how the search runs, not what it finds: left out of the study's name
(holopipe.ml.tune.study_name) and of the workflow's tune_study config, so that raising n_trials or adding workers
continues the study instead of starting one."""

TUNE_STORAGE_KEYS = ("storage", "storage_password_file")
"""tune keys that say where the study is kept: left out of its name (one study, wherever it is), but read by the
workflow's tune_study, which opens the storage."""


def primary_split(splits) -> str:
    """The split of ``infer.splits`` whose metrics are ``metrics.json``: :data:`PRIMARY_SPLIT` where
    evaluated, else the first; every other's go to ``<split>/metrics.json`` beside it. Here, not in
    holopipe.evaluation.evaluate, so that the workflow's parse (which imports this module) names the same files."""
    splits = list(splits)
    return PRIMARY_SPLIT if PRIMARY_SPLIT in splits else splits[0]


def merged_config(base: dict, overrides: Mapping) -> dict:
    """``base`` with ``overrides`` merged in key by key (nested mappings merged, everything else replaced), as
    Snakemake merges ``--configfile`` files."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merged_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def split_simulation_config(config: dict, split: str) -> dict:
    """The config a split is simulated with: its ``splits.<split>.simulate`` keys merged over ``simulate``."""
    overrides = config["splits"][split].get("simulate", {})
    return {**config, "simulate": merged_config(config["simulate"], overrides)} if overrides else config


def _simulate_problems(config: dict, where: str) -> list[str]:
    simulate = config["simulate"]
    diameter = simulate["diameter"]
    problems = []
    low, high = simulate["particles"]
    if low > high:
        problems.append(f"{where}.particles: minimum {low} exceeds maximum {high}")
    if not diameter["min"] < diameter["max"]:
        problems.append(
            f"{where}.diameter.min ({diameter['min']}) must be less than "
            f"{where}.diameter.max ({diameter['max']})"
        )
    low, high = diameter["gamma_mu"]
    if low > high:
        problems.append(f"{where}.diameter.gamma_mu: minimum {low} exceeds maximum {high}")
    for key, (low, high) in (("ice.aspect", simulate["ice"]["aspect"]),
                             ("window_dust.diameter", simulate["window_dust"]["diameter"]),
                             ("outside.count", simulate["outside"]["count"])):
        if low > high:
            problems.append(f"{where}.{key}: minimum {low} exceeds maximum {high}")
    return problems


def _split_simulate_problems(config: dict) -> list[str]:
    """The schema of the simulate section applied to each split's merged simulate section."""
    simulate_schema = schema()["properties"]["simulate"]
    problems = []
    for split, spec in config["splits"].items():
        if not spec.get("simulate"):
            continue
        where = f"splits.{split}.simulate"
        merged = split_simulation_config(config, split)
        errors = sorted(Draft202012Validator(simulate_schema).iter_errors(merged["simulate"]),
                        key=lambda e: [str(k) for k in e.absolute_path])
        found = [where + line[len("config"):] if line.startswith("config: ") else f"{where}.{line}"
                 for error in errors for line in _describe(error)]
        problems.extend(found or _simulate_problems(merged, where))
    return problems


def _cross_field_problems(config: dict) -> list[str]:
    """Rules between keys, checked once the schema holds (so every key is present and typed)."""
    optics = config["optics"]
    problems = []
    if not optics["z_min"] < optics["z_max"]:
        problems.append(
            f"optics.z_min ({optics['z_min']}) must be less than optics.z_max ({optics['z_max']})"
        )
    problems += _simulate_problems(config, "simulate") + _split_simulate_problems(config)
    for key in config["tune"]["search_space"]:
        try:
            _lookup(config, key)
        except KeyError:
            problems.append(f"tune.search_space.{key}: no such config key to tune")
    for index, corruption in enumerate(config["augment"]["corruptions"]):
        for key in ("count", "diameter", "z"):
            if key in corruption and corruption[key][0] > corruption[key][1]:
                problems.append(f"augment.corruptions.{index}.{key}: minimum {corruption[key][0]} "
                                f"exceeds maximum {corruption[key][1]}")
    infer = config["infer"]
    if infer["coarse_stride"] > 1 and infer["save_probabilities"]:
        problems.append(f"infer.coarse_stride ({infer['coarse_stride']}) > 1 segments only windows of most planes, "
                        "so there is no whole probability volume to save: set infer.save_probabilities to false "
                        "or infer.coarse_stride to 1")
    if infer["coarse_stride"] > 1 and infer["compile"]:
        problems.append(f"infer.coarse_stride ({infer['coarse_stride']}) > 1 segments windows of many shapes, and "
                        "infer.compile compiles the model for one: set one of them off (infer.compile: false or "
                        "infer.coarse_stride: 1)")
    return problems + _storage_secret_problems(config["tune"])


def _storage_secret_problems(tune: dict) -> list[str]:
    """A password in tune.storage would ride on every job's command line (printed, visible in `ps`) and
    into logs, provenance and the report: refused, with where the password goes instead."""
    storage = tune["storage"]
    if storage is not None and mask_secrets(storage) != storage:
        return [f"tune.storage ({mask_secrets(storage)}) holds a password, which would show on every job's "
                "command line and in logs and provenance: remove it from the URL and put it in a file only you "
                "can read (chmod 600) named by tune.storage_password_file, or for PostgreSQL in ~/.pgpass or "
                "PGPASSWORD, which libpq reads by itself"]
    if storage is None and tune["storage_password_file"] is not None:
        return ["tune.storage_password_file is set, but tune.storage is null: a journal file has no password"]
    return []


def _lookup(config, dotted_key: str):
    """The value at a dotted key (list items by index: augment.corruptions.3.electrons)."""
    node = config
    for part in dotted_key.split("."):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise KeyError(dotted_key)
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(dotted_key)
    return node


def with_overrides(config: dict, overrides: Mapping) -> dict:
    """A validated copy of ``config`` with dotted keys replaced (tuned values from best.yaml, a trial's
    parameters); an override of a key that does not exist raises ConfigError naming it."""
    updated = copy.deepcopy(config)
    for dotted_key, value in overrides.items():
        *parents, last = dotted_key.split(".")
        try:
            parent = _lookup(updated, ".".join(parents)) if parents else updated
            _lookup(updated, dotted_key)
        except KeyError:
            raise ConfigError(f"{dotted_key}: no such config key to override") from None
        parent[int(last) if isinstance(parent, list) else last] = value
    return load_config(updated)


def check_tiles_fit(config: dict) -> None:
    """Raise ConfigError unless the regridded frame holds a tile (binning: an integer pitch ratio too).

    Separate from load_config because only the tile-cutting stages care: a simulate call on a small
    frame is fine with any tile size. The workflow calls it at parse time.
    """
    problems = _grid_problems(config)
    if problems:
        raise ConfigError("invalid configuration (config):\n  " + "\n  ".join(problems))


def _grid_problems(config: dict) -> list[str]:
    """The optics frame regridded as holopipe.data.regrid will regrid it (holopipe.core.grid): a bin ratio that is
    not whole, a frame that holds no tile."""
    optics, regrid, tile = config["optics"], config["regrid"], config["examples"]["tile_size"]
    problems = []
    pitch, method, frame = regrid["pixel_pitch"], regrid["method"], regrid["frame"]
    for axis in ("x", "y"):
        size, own_pitch = optics[f"n{axis}"], optics[f"d{axis}"]
        if method == "bin" and resamples(own_pitch, pitch) and bin_ratio(own_pitch, pitch) is None:
            problems.append(f"regrid.pixel_pitch ({pitch}) must be an integer multiple of "
                            f"optics.d{axis} ({own_pitch}) for regrid.method bin")
            continue
        resampled = resampled_pixels(size, own_pitch, pitch, method)
        if framed_pixels(resampled, frame, tile) < tile:
            problems.append(f"examples.tile_size ({tile}) is larger than the regridded frame along "
                            f"{axis} ({resampled} pixels after resampling: regrid.frame {frame} leaves no tile)")
    return problems


def load_config(source: str | PathLike | Mapping) -> dict:
    """Validate a config (a YAML file's path or a parsed mapping) and return a copy with defaults filled in.

    Raises ConfigError listing every problem, one per line, each starting with its key path.
    """
    if isinstance(source, Mapping):
        config, origin = copy.deepcopy(dict(source)), "config"
    else:
        origin = str(source)
        try:
            config = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(mask_secrets(f"{origin}: not valid YAML: {exc}")) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(config).__name__}")
    errors = sorted(
        _DefaultingValidator(schema()).iter_errors(config), key=lambda e: [str(k) for k in e.absolute_path]
    )
    problems = [line for error in errors for line in _describe(error)] or _cross_field_problems(config)
    if problems:
        # Masked: a problem may quote a value, and a value may hold a password (tune.storage).
        listed = "\n".join(f"  {p}" for p in problems)
        raise ConfigError(mask_secrets(f"invalid configuration ({origin}):\n{listed}"))
    return config
