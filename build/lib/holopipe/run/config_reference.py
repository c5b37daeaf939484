"""The README's configuration reference, generated from the schema (:func:`holopipe.core.config.schema`):
``holopipe config-reference`` prints it or rewrites it between the README's marker lines."""

import os
import stat
from os import PathLike
from pathlib import Path

import yaml

from holopipe.core.config import schema
from holopipe.core.files import write_atomically

__all__ = ["README_REFERENCE_END", "README_REFERENCE_START", "config_reference_markdown", "update_readme_reference"]

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

    The file is replaced atomically (:func:`holopipe.core.files.write_atomically`) and keeps its permissions;
    an unchanged reference leaves it untouched.
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
    mode = stat.S_IMODE(path.stat().st_mode)

    def write(tmp: Path) -> None:
        tmp.write_text(updated, encoding="utf-8", newline="")
        os.chmod(tmp, mode)

    write_atomically(path, write)
    return True

