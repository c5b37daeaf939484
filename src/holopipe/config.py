"""Load and check holopipe configurations.

The JSON Schema shipped in the package (`schemas/config.schema.yaml`) is the single source of truth for
keys, types, units and defaults. This module fills in the defaults, adds the checks a schema cannot express
(one key against another) and reports every problem at once, each with its key path, so that a bad config
fails before any job runs and says where to look.
"""

import copy
import os
import stat
from collections.abc import Iterator, Mapping
from importlib import resources
from os import PathLike
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from holopipe.credentials import mask_secrets

__all__ = [
    "ConfigError", "check_tiles_fit", "config_reference_markdown", "load_config", "merged_config", "schema",
    "update_readme_reference", "with_overrides",
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


def primary_split(splits) -> str:
    """The split of ``infer.splits`` whose metrics are ``metrics.json``: :data:`PRIMARY_SPLIT` where
    evaluated, else the first; every other's go to ``<split>/metrics.json`` beside it. Here, not in
    holopipe.evaluate, so that the workflow's parse (which imports this module) names the same files."""
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
    optics, regrid, tile = config["optics"], config["regrid"], config["examples"]["tile_size"]
    problems = []
    pitch = regrid["pixel_pitch"]
    for axis in ("x", "y"):
        size, own_pitch = optics[f"n{axis}"], optics[f"d{axis}"]
        if pitch is not None:
            ratio = pitch / own_pitch
            if regrid["method"] == "bin" and abs(ratio - round(ratio)) > 1e-6:
                problems.append(f"regrid.pixel_pitch ({pitch}) must be an integer multiple of "
                                f"optics.d{axis} ({own_pitch}) for regrid.method bin")
            size = int(size / ratio)
        if size < tile:
            problems.append(f"examples.tile_size ({tile}) is larger than the regridded frame along "
                            f"{axis} ({size} pixels)")
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


README_REFERENCE_START = "<!-- config-reference:start -->"
README_REFERENCE_END = "<!-- config-reference:end -->"


def config_reference_markdown(schema_dict: dict | None = None) -> str:
    """A Markdown reference of every config key, rendered from the schema (the packaged one by default).

    Generated rather than written so that the documentation cannot drift from what load_config accepts:
    one `###` section per top-level key in schema order, each with a table of dotted key paths
    (`splits.<name>.source` for the entries of a map, `train.loss.<i>.type` for the items of a list),
    their type and constraints, default and description.
    """
    root = schema() if schema_dict is None else schema_dict
    parts = []
    if root.get("description"):
        parts.append(_cell_text(root["description"]))
    for name, raw_section in root.get("properties", {}).items():
        section = _resolve_ref(raw_section, root)
        intro = _cell_text(section.get("description", ""))
        if name in root.get("required", []):
            intro = f"{intro} Required.".strip()
        rows = list(_reference_rows(name, raw_section, root, is_section=True, required=(), conditions={}))
        table = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
        table += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        parts.append("\n\n".join(p for p in (f"### {name}", intro, "\n".join(table)) if p))
    return "\n\n".join(parts) + "\n"


def _resolve_ref(node: dict, root: dict) -> dict:
    """The node with local `$ref`s (`#/$defs/split`) replaced by their target; the node's own keys win."""
    seen = []
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#") or ref in seen:
            raise ValueError(f"config schema: cannot resolve $ref {ref!r} (only acyclic local references)")
        seen.append(ref)
        target = root
        for part in filter(None, ref[1:].split("/")):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = {**target, **{key: value for key, value in node.items() if key != "$ref"}}
    return node


def _reference_rows(path: str, raw: dict, root: dict, *, is_section: bool, required, conditions):
    """(key, type, default, description) rows for the key at `path` and every key below it."""
    node = _resolve_ref(raw, root)
    properties = node.get("properties") if isinstance(node.get("properties"), dict) else None
    entries = node.get("additionalProperties")
    entries = _resolve_ref(entries, root) if isinstance(entries, dict) else None
    items = node.get("items")
    items = _resolve_ref(items, root) if isinstance(items, dict) else None
    leaf = properties is None and entries is None
    if not is_section or leaf:
        yield (f"`{path}`", _type_text(node, root), _default_text(path, node, required, conditions),
               _cell_text(node.get("description", "")))
    if properties is not None:
        yield from _child_rows(path, node, root)
    if entries is not None:
        names = node.get("propertyNames", {})
        entry_type = _type_text(entries, root)
        if "pattern" in names:
            entry_type += f", name matching `{names['pattern']}`"
        yield (f"`{path}.<name>`", entry_type, "", _cell_text(entries.get("description", "")))
        yield from _child_rows(f"{path}.<name>", entries, root)
    if items is not None and not is_section:
        yield from _child_rows(f"{path}.<i>", items, root)


def _child_rows(path: str, node: dict, root: dict):
    """Rows for the keys of the object at `path` (one key, a map entry or a list item), not for itself."""
    conditions = _conditional_requirements(node)
    for key, child in node.get("properties", {}).items():
        yield from _reference_rows(f"{path}.{key}", child, root, is_section=False,
                                   required=node.get("required", []), conditions=conditions)


def _conditional_requirements(node: dict) -> dict[str, str]:
    """Key -> "required if ..." for the keys that `allOf: [{if: ..., then: {required: [...]}}]` requires.

    Conditions on one and the same key merge into one list of values: "type is `a` or `b`".
    """
    found: dict[str, list[tuple[str, list]]] = {}
    for rule in node.get("allOf", []):
        tests = rule.get("if", {}).get("properties", {})
        condition = [(key, [test["const"]] if "const" in test else test.get("enum", []))
                     for key, test in tests.items()]
        condition = [(key, values) for key, values in condition if values]
        for key in rule.get("then", {}).get("required", []) if condition else []:
            found.setdefault(key, []).append(condition)
    texts = {}
    for key, conditions in found.items():
        tested = {name for condition in conditions for name, _ in condition}
        if len(tested) == 1 and all(len(condition) == 1 for condition in conditions):
            conditions = [[(tested.pop(), [value for condition in conditions for value in condition[0][1]])]]
        texts[key] = "required if " + " or ".join(
            " and ".join(f"{name} is " + " or ".join(f"`{_inline_yaml(v)}`" for v in values)
                         for name, values in condition)
            for condition in conditions
        )
    return texts


def _default_text(path: str, node: dict, required, conditions: dict[str, str]) -> str:
    key = path.rsplit(".", 1)[-1]
    if "default" in node:
        return f"`{_inline_yaml(node['default'])}`"
    if key in required:
        return "required"
    if key in conditions:
        return conditions[key]
    return ""


def _type_text(node: dict, root: dict) -> str:
    """Type and constraints of a schema node in words, e.g. "number > 0 or null" or "one of `a`, `b`"."""
    node = _resolve_ref(node, root)
    if "const" in node:
        return f"`{_inline_yaml(node['const'])}`"
    if "enum" in node:
        return "one of " + ", ".join(f"`{_inline_yaml(value)}`" for value in node["enum"])
    alternatives = node.get("oneOf") or node.get("anyOf")
    if alternatives:
        return " or ".join(_type_text(alternative, root) for alternative in alternatives)
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    nullable = "null" in types
    names = []
    for name in types:
        if name == "array":
            items = node.get("items")
            item = _type_text(items, root) if isinstance(items, dict) else ""
            name = f"list of ({item})" if " " in item else f"list of {item}" if item else "list"
        elif name == "object" and isinstance(node.get("additionalProperties"), dict):
            entry = _type_text(node["additionalProperties"], root)
            name = f"map of ({entry})" if " " in entry else f"map of {entry}"
        if name != "null":
            names.append(name)
    text = " or ".join(names) or ("any" if not nullable else "")
    value_range, others = _constraints(node)
    text = " ".join(filter(None, [text, value_range]))
    text = ", ".join(filter(None, [text, others]))
    if nullable:
        text = f"{text} or null" if text else "null"
    return text


def _constraints(node: dict) -> tuple[str, str]:
    """The value range (`≥ 0`, `in [0, 1]`) and the other constraints (lengths, uniqueness, pattern) in words."""
    low, low_open = (node["exclusiveMinimum"], True) if "exclusiveMinimum" in node else (node.get("minimum"), False)
    high, high_open = (node["exclusiveMaximum"], True) if "exclusiveMaximum" in node else (node.get("maximum"), False)
    if low is not None and high is not None:
        brackets = ("(" if low_open else "[", ")" if high_open else "]")
        value_range = f"in {brackets[0]}{_inline_yaml(low)}, {_inline_yaml(high)}{brackets[1]}"
    elif low is not None:
        value_range = f"{'>' if low_open else '≥'} {_inline_yaml(low)}"
    elif high is not None:
        value_range = f"{'<' if high_open else '≤'} {_inline_yaml(high)}"
    else:
        value_range = ""
    words = []
    for least, most, unit in (("minItems", "maxItems", "items"), ("minLength", "maxLength", "characters"),
                              ("minProperties", "maxProperties", "entries")):
        if least == "minLength" and node.get(least) == 1 and most not in node:
            words.append("non-empty")
        elif least in node and node.get(most) == node[least]:
            words.append(f"{node[least]} {unit}")
        else:
            words += [f"{sign} {node[key]} {unit}" for sign, key in (("≥", least), ("≤", most)) if key in node]
    if node.get("uniqueItems"):
        words.append("unique")
    if "pattern" in node:
        words.append(f"matching `{node['pattern']}`")
    return value_range, ", ".join(words)


def _inline_yaml(value) -> str:
    """A value as one line of flow-style YAML, as a config file would spell it (1.0e-05, not 1e-05)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def _cell_text(text: str) -> str:
    return " ".join(str(text).split())


def update_readme_reference(readme_path: str | PathLike) -> bool:
    """Rewrite the generated config reference between the README's marker lines; True if it changed.

    The file is replaced atomically (:func:`holopipe.io.write_atomically`) and keeps its permissions; an unchanged reference leaves it untouched.
    """
    path = Path(readme_path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    stripped = [line.rstrip() for line in lines]
    starts = [i for i, line in enumerate(stripped) if line == README_REFERENCE_START]
    ends = [i for i, line in enumerate(stripped) if line == README_REFERENCE_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(
            f"{path}: needs exactly one line {README_REFERENCE_START} followed later by exactly one line "
            f"{README_REFERENCE_END} (found {len(starts)} start and {len(ends)} end markers"
            + (", end before start)" if starts and ends and ends[0] < starts[0] else ")")
        )
    block = f"{README_REFERENCE_START}\n\n{config_reference_markdown().strip(chr(10))}\n\n"
    updated = "".join(lines[: starts[0]]) + block + "".join(lines[ends[0]:])
    if updated == text:
        return False
    from holopipe.io import write_atomically  # here: io loads xarray and netCDF4, and Snakemake imports config

    mode = stat.S_IMODE(path.stat().st_mode)

    def write(tmp: Path) -> None:
        tmp.write_text(updated, encoding="utf-8", newline="")
        os.chmod(tmp, mode)

    write_atomically(path, write)
    return True

