"""The package's layers: every module lives in a subpackage named for its concern, imports only from its own
layer or lower ones, and no modules import each other in a circle. Imports inside functions count: hiding one
there does not make a circle go away. And the tests' own house rules: builders are shared through helpers.py,
never by one test file importing another, and only optional extras may be skipped when missing.

``python tests/test_layers.py`` prints the import graph by layer (what each module imports from holopipe).
"""

import ast
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "holopipe"
TESTS = Path(__file__).resolve().parent

OPTIONAL_IMPORTS = {"cupy", "fsspec"}
"""What a test may skip without (pytest.importorskip): the gpu extra and a remote file system's driver. A hard
dependency's import error must fail the suite, not skip a test."""

LAYERS = ("core", "optics", "data", "ml", "detect", "evaluation", "run")
"""Lowest first: a module may import from its own layer and those before it, never from one after it."""

FORBIDDEN = {("detect", "holopipe.ml.train"): "inference never imports training",
             ("detect", "holopipe.ml.tune"): "inference never imports tuning",
             ("detect", "holopipe.ml.tune_worker"): "inference never imports tuning"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The holopipe modules a file imports anywhere (function bodies included): ``from holopipe.x import y``
    counts as holopipe.x.y where that is a module, else as holopipe.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("holopipe"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("holopipe"):
            named = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found.update(named or {node.module})
    return found & known


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # holopipe itself (its __version__) sits below every layer


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_lives_in_a_layer():
    unplaced = [name for name in modules() if name != "holopipe" and layer(name) not in LAYERS]
    assert not unplaced, f"modules outside the layers {LAYERS}: {unplaced}"


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{source} -> {target}" for source, targets in graph().items() for target in sorted(targets)
              if layer(target) is not None and (layer(source) is None
                                                or LAYERS.index(layer(target)) > LAYERS.index(layer(source)))]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circles():
    assert circles(graph()) == []


@pytest.mark.parametrize(("source_layer", "target"), sorted(FORBIDDEN))
def test_forbidden_imports(source_layer, target):
    offenders = [source for source, targets in graph().items() if layer(source) == source_layer and target in targets]
    assert not offenders, f"{FORBIDDEN[source_layer, target]}: {offenders} import {target}"


def test_no_test_file_imports_another():
    test_modules = {path.stem for path in TESTS.glob("test_*.py")}
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.name}:{node.lineno} imports {name}" for name in names
                          if name.split(".")[-1] in test_modules or name.startswith("tests.")]
    assert not offenders, "share builders through tests/helpers.py instead:\n" + "\n".join(offenders)


def test_only_optional_extras_are_skipped_when_missing():
    skipped = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "importorskip" and node.args and isinstance(node.args[0], ast.Constant)):
                if node.args[0].value.split(".")[0] not in OPTIONAL_IMPORTS:
                    skipped.append(f"{path.name}:{node.lineno} importorskip({node.args[0].value!r})")
    assert not skipped, "hard dependencies skipped instead of failing:\n" + "\n".join(skipped)


def test_the_circle_finder_finds_circles():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(edges) == [["a", "b", "c"]]


def main() -> None:
    edges = graph()
    for name in LAYERS:
        print(f"{name}/")
        for module in sorted(m for m in edges if layer(m) == name):
            short = sorted(target.removeprefix("holopipe.") for target in edges[module])
            print(f"  {module.removeprefix('holopipe.')}: {', '.join(short) or '-'}")
    print(f"circles: {len(circles(edges))}")


if __name__ == "__main__":
    sys.exit(main())
