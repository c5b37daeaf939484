"""The conda environments of the Snakemake rules: pinned as pyproject.toml pins (one source of truth), each holding
what its rules' commands import, and able to install holopipe itself through their post-deploy script."""

import ast
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from holopipe.run.cli import rule_command

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src" / "holopipe"
WORKFLOW_FILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
ENVS = {name: REPO / "envs" / f"{name}.yaml" for name in ("cpu", "gpu")}
# Test ids as file names: an id "gpu" would be a keyword that conftest's gpu skip matches, hiding the gpu env's
# checks on every machine without a GPU.
ENV_IDS = [f"envs/{name}.yaml" for name in ENVS]

# In no env: the executor plugin submits jobs, which only the Snakemake that runs the workflow does.
NOT_IN_ENVS = {"snakemake-executor-plugin-cluster-generic"}
# Only in the cpu env: the graphs and report rules run Snakemake again on the workflow (--dag, --report).
REPORT_ONLY = {"snakemake", "pygments"}
# PyPI name -> conda name, where they differ (torch: the CPU or CUDA build, checked below).
CONDA_NAMES = {
    "snakemake": {"snakemake-minimal"},  # bioconda; without the optional extras of the full `snakemake` package
    "torch": {"pytorch-cpu", "pytorch-gpu"},
    "psycopg2-binary": {"psycopg2"},
    "matplotlib": {"matplotlib-base"},
    "cupy-cuda13x": {"cupy"},
}
PYPI_NAMES = {conda: pypi for pypi, condas in CONDA_NAMES.items() for conda in condas}


def env_requirements(name: str) -> list[Requirement]:
    """What envs/<name>.yaml must hold: pyproject.toml's dependencies less the executor plugin; for the gpu env
    also less what only the report rules need, plus the gpu extra."""
    project = PYPROJECT["project"]
    entries = project["dependencies"] + (project["optional-dependencies"]["gpu"] if name == "gpu" else [])
    left_out = NOT_IN_ENVS | (REPORT_ONLY if name == "gpu" else set())
    return [req for req in map(Requirement, entries) if canonicalize_name(req.name) not in left_out]


def conda_specs(path: Path) -> dict[str, SpecifierSet]:
    """Package name -> version specifier of an env file's conda dependencies (`numpy>=1.26`, `python=3.11`)."""
    env = yaml.safe_load(path.read_text(encoding="utf-8"))
    specs = {}
    for entry in env["dependencies"]:
        assert isinstance(entry, str), f"{path}: unexpected entry {entry!r} (a pip: section?)"
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", entry)
        package, spec = match.group(1).lower(), match.group(2).replace(" ", "")
        if re.fullmatch(r"=[^=<>!].*", spec):  # conda's `=3.11` means 3.11.*
            spec = f"=={spec[1:]}.*" if not spec.endswith("*") else f"=={spec[1:]}"
        specs[package] = SpecifierSet(spec)
    return specs


def conda_name(req: Requirement, specs: dict[str, SpecifierSet]) -> str:
    candidates = CONDA_NAMES.get(canonicalize_name(req.name), {canonicalize_name(req.name)})
    present = candidates & set(specs)
    assert len(present) == 1, f"{req.name} (pyproject.toml) is missing, conda-forge name {sorted(candidates)}"
    return present.pop()


@pytest.mark.parametrize("name", ENVS, ids=ENV_IDS)
def test_env_parses_and_uses_conda_forge(name):
    env = yaml.safe_load(ENVS[name].read_text(encoding="utf-8"))
    assert env["channels"][0] == "conda-forge"
    assert set(env["channels"]) <= {"conda-forge", "bioconda", "nodefaults"}, f"{ENVS[name]}: {env['channels']}"
    python = re.fullmatch(r"==(\d+\.\d+)\.\*", str(conda_specs(ENVS[name])["python"]))
    assert python, f"{ENVS[name]}: pin python to one minor version (python=3.X)"
    assert Version(python.group(1)) in SpecifierSet(PYPROJECT["project"]["requires-python"]), ENVS[name]


@pytest.mark.parametrize("name", ENVS, ids=ENV_IDS)
def test_env_pins_each_dependency_as_pyproject_does(name):
    specs = conda_specs(ENVS[name])
    for req in env_requirements(name):
        package = conda_name(req, specs)
        assert specs[package] == req.specifier, (
            f"{ENVS[name]}: {package}{specs[package] or ' (any version)'}, but pyproject.toml says {req}")


@pytest.mark.parametrize("name", ENVS, ids=ENV_IDS)
def test_env_lists_nothing_pyproject_does_not(name):
    """Beyond pyproject's dependencies an env holds only the interpreter and the post-deploy build's tools (as
    pyproject's build-system pins them), and the gpu env the CUDA major."""
    specs = conda_specs(ENVS[name])
    build_tools = {canonicalize_name(req.name): req.specifier
                   for req in map(Requirement, PYPROJECT["build-system"]["requires"])}
    for tool, specifier in build_tools.items():
        assert specs.get(tool) == specifier, (f"{ENVS[name]}: {tool}{specs.get(tool, ' missing')}, "
                                              f"build-system {specifier}")
    allowed = {"python", "pip", *build_tools, *(["cuda-version"] if name == "gpu" else [])}
    allowed |= {conda_name(req, specs) for req in env_requirements(name)}
    assert set(specs) <= allowed, f"{ENVS[name]}: {sorted(set(specs) - allowed)} not in pyproject.toml"


def test_only_the_gpu_env_has_cupy_and_both_build_holopipe():
    cpu, gpu = conda_specs(ENVS["cpu"]), conda_specs(ENVS["gpu"])
    assert "cupy" in gpu and "cupy" not in cpu
    assert "pytorch-gpu" in gpu and "pytorch-cpu" in cpu
    for name, specs in (("cpu", cpu), ("gpu", gpu)):
        assert {"pip", "setuptools"} <= set(specs), f"{ENVS[name]}: post-deploy needs pip and setuptools"


@pytest.mark.parametrize("name", ENVS, ids=ENV_IDS)
def test_each_env_has_an_executable_post_deploy_script(name):
    script = ENVS[name].with_suffix(".post-deploy.sh")
    assert script.is_file() and os.access(script, os.X_OK), f"{script} missing or not executable"
    assert script.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")


# --- Each rule runs where what its command imports is installed: read statically from the rules and holopipe's
# source (importing the stages would take torch's import time per stage).

def rule_blocks(path: Path) -> dict[str, str]:
    """Rule name -> text of that rule in a .smk file (each `rule x:` runs until the next top-level line)."""
    blocks = re.split(r"^rule (\w+):\n", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {name: re.split(r"^\S", body, maxsplit=1, flags=re.MULTILINE)[0]
            for name, body in zip(blocks[1::2], blocks[2::2])}


@cache
def shell_rules() -> dict[str, tuple[str, Path | None]]:
    """Rule name -> (shell command, conda env file or None) of every rule that runs a shell command."""
    rules = {}
    for smk in WORKFLOW_FILES[1:]:
        for rule, body in rule_blocks(smk).items():
            shell = re.search(r"^(\s+)shell:\n((?:\1\s+\S.*\n?)+)", body, flags=re.MULTILINE)
            if shell is None:
                continue
            conda = re.search(r"^\s+conda:\s*\n?\s*\"([^\"]+)\"", body, flags=re.MULTILINE)
            env = (smk.parent / conda.group(1)).resolve() if conda else None
            rules[rule] = (shell_command(shell.group(2)), env)
    return rules


def shell_command(expression: str) -> str:
    """The command a rule's `shell:` gives: rule_command(...) of literals (holopipe.run.cli), or string literals."""
    node = ast.parse(f"({expression.strip()})", mode="eval").body  # adjacent literals join as in Python
    if not isinstance(node, ast.Call):
        return ast.literal_eval(node)
    assert isinstance(node.func, ast.Name) and node.func.id == "rule_command", ast.unparse(node)
    return rule_command(*map(ast.literal_eval, node.args),
                        **{keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords})


def cli_function(command: str) -> str:
    """The holopipe.run.cli function that `holopipe [options] STAGE [STEP] ...` calls: cmd_STAGE or cmd_STAGE_STEP."""
    words = shlex.split(re.sub(r"\{[^{}]*\}", "", command.split(">")[0]))  # placeholders: Snakemake fills them
    assert words[0] == "holopipe", f"`{command}` does not run holopipe: the rules run a holopipe stage each"
    tree = ast.parse((SOURCE / "run" / "cli.py").read_text(encoding="utf-8"))
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    for word, following in zip(words[1:], [*words[2:], ""]):
        stage, step = (f"cmd_{part.replace('-', '_')}" for part in (word, f"{word}_{following}"))
        for name in (step, stage):
            if name in functions:
                return name
    raise AssertionError(f"`{command}`: no stage of holopipe.run.cli (cmd_* function) in it")


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(name, ast.Name) and name.id in ("ImportError", "ModuleNotFoundError") for name in caught)


def imports_in(node: ast.AST) -> set[str]:
    """Dotted names of the modules that code imports anywhere below `node`, function bodies included, and of those
    it runs as `python -m NAME`; not those imported in a `try` that catches ImportError (optional extras)."""
    found = set()

    def visit(node):
        if isinstance(node, ast.Try) and any(map(_catches_import_error, node.handlers)):
            children = [*node.handlers, *node.orelse, *node.finalbody]
        else:
            children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import of {node.module}: holopipe imports absolutely"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from holopipe import io`
        elif isinstance(node, (ast.List, ast.Tuple)):
            words = [element.value if isinstance(element, ast.Constant) else None for element in node.elts]
            found.update(module for flag, module in zip(words, words[1:]) if flag == "-m" and isinstance(module, str))
        for child in children:
            visit(child)

    visit(node)
    return found


def holopipe_closure(modules: set[str]) -> set[str]:
    """`modules` and everything the holopipe modules among them import, transitively. A used module counts
    whole (a stage may reach any of its functions), lazy imports included."""
    modules, pending = set(modules), sorted(modules)
    seen = set()
    while pending:
        module = pending.pop()
        if module.split(".")[0] != "holopipe" or module in seen:
            continue
        seen.add(module)
        parts = module.split(".")[1:]
        path = SOURCE.joinpath(*parts)
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if not path.is_file():
            continue  # `from holopipe.core.config import X` also names holopipe.core.config.X, not a module
        found = imports_in(ast.parse(path.read_text(encoding="utf-8"))) | {"holopipe"}
        pending.extend(found - modules)
        modules |= found
    return modules


def workflow_imports() -> set[str]:
    """What parsing the workflow imports: the `import`/`from` lines of the Snakefile and the .smk files."""
    pattern = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", flags=re.MULTILINE)
    return {"snakemake"} | {a or b for path in WORKFLOW_FILES
                            for a, b in pattern.findall(path.read_text(encoding="utf-8"))}


@cache
def command_modules(function: str) -> frozenset[str]:
    """Top-level names of the modules `holopipe ... STAGE` imports or runs: holopipe.run.cli's own imports and its
    helpers' (main, config loading, provenance), the stage function's, and what the holopipe modules among them
    import. A command that runs Snakemake (the graphs, the report) also imports what parsing the workflow does."""
    tree = ast.parse((SOURCE / "run" / "cli.py").read_text(encoding="utf-8"))
    shared = [node for node in tree.body if not (isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_"))]
    stage = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
    modules = holopipe_closure(imports_in(ast.Module(body=shared, type_ignores=[])) | imports_in(stage))
    if "snakemake" in {module.split(".")[0] for module in modules}:
        modules |= holopipe_closure(workflow_imports())
    return frozenset(module.split(".")[0] for module in modules)


@cache
def providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(top_level: frozenset[str]) -> set[str]:
    """Canonical PyPI names of the distributions that provide these top-level modules (none for the standard
    library and holopipe itself). Snakemake, when run, writes its --report: that takes its `reports` extra."""
    names = set()
    for module in sorted(top_level - set(sys.stdlib_module_names) - {"__future__", "holopipe"}):
        assert module in providers(), f"holopipe imports {module!r}, which no installed distribution provides"
        names.update(canonicalize_name(name) for name in providers()[module])
    if "snakemake" in names:
        names.update(canonicalize_name(req.name) for req in map(Requirement, importlib.metadata.requires("snakemake"))
                     if req.marker and "extra" in str(req.marker) and req.marker.evaluate({"extra": "reports"}))
    return names


def env_distributions(env: Path) -> set[str]:
    """Canonical PyPI names of a conda env file's packages."""
    return {canonicalize_name(PYPI_NAMES.get(package, package)) for package in conda_specs(env)}


def test_every_shell_rule_names_an_existing_env():
    envs = {path.resolve() for path in ENVS.values()}
    for rule, (command, env) in shell_rules().items():
        assert env in envs, f"rule {rule} runs `{command.split(' >')[0]}` in conda env {env}, not one of envs/"
    assert len(shell_rules()) >= 15


@pytest.mark.parametrize("rule", sorted(shell_rules()))
def test_rule_env_holds_what_its_command_imports(rule):
    command, env = shell_rules()[rule]
    assert env is not None, f"rule {rule}: no conda: env"
    missing = distributions(command_modules(cli_function(command))) - env_distributions(env)
    assert not missing, (f"rule {rule}: `{command.split(' >')[0]}` imports {sorted(missing)}, "
                         f"not in {env.relative_to(REPO)}")


def test_pyproject_lists_every_distribution_holopipe_imports():
    """Every module of holopipe, the stages no rule runs included (`holopipe label`): a package it imports without
    declaring it installs today only because some dependency happens to pull it in."""
    everything = holopipe_closure({f"holopipe.{path.stem}" for path in SOURCE.glob("*.py")})
    project = PYPROJECT["project"]
    declared = {canonicalize_name(Requirement(entry).name)
                for entry in project["dependencies"] + project["optional-dependencies"]["gpu"]}
    undeclared = distributions(frozenset(module.split(".")[0] for module in everything)) - declared
    assert not undeclared, f"holopipe imports {sorted(undeclared)}, which pyproject.toml's dependencies leave out"


# --- Running the post-deploy script for real, against a throwaway venv and a fake repository.

FAKE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "holopipe"
version = "0.0.1"

[tool.setuptools.packages.find]
where = ["src"]
"""


@pytest.fixture
def fake_repo(tmp_path) -> Path:
    """A repository layout with the real post-deploy scripts (gpu still a link) and a tiny `holopipe` package."""
    repo = tmp_path / "repo"
    (repo / "envs").mkdir(parents=True)
    for script in (REPO / "envs").glob("*.post-deploy.sh"):
        shutil.copy2(script, repo / "envs" / script.name, follow_symlinks=False)
    (repo / "pyproject.toml").write_text(FAKE_PYPROJECT)
    (repo / "src" / "holopipe").mkdir(parents=True)
    (repo / "src" / "holopipe" / "__init__.py").write_text("FAKE = True\n")
    return repo


@pytest.fixture
def venv(tmp_path) -> Path:
    """A fresh venv that sees only pip and setuptools, borrowed from the test interpreter (offline).

    Not --system-site-packages: from a venv interpreter that would expose the base Python's packages, and the
    whole test environment would show pip a real holopipe already installed.
    """
    tools = tmp_path / "tools"
    tools.mkdir()
    for module in ("pip", "setuptools", "pkg_resources", "_distutils_hack"):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            if module in ("pip", "setuptools"):
                pytest.skip(f"the test interpreter has no {module} to lend to a venv offline")
            continue
        package = Path(next(iter(spec.submodule_search_locations)))
        (tools / module).symlink_to(package)
        for info in package.parent.glob(f"{module}-*.dist-info"):
            (tools / info.name).symlink_to(info)
    path = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, capture_output=True)
    purelib = subprocess.run([path / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "borrowed-tools.pth").write_text(f"{tools}\n")
    return path


def run_script(script: Path, venv: Path, cwd: Path, *, shell="bash", **env) -> subprocess.CompletedProcess:
    """Run a post-deploy script as Snakemake does: `<shell> <path>` with the env's python first on PATH."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("HOLOPIPE_REPO", "PYTHONPATH", "VIRTUAL_ENV")}
    environment.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", **env)
    return subprocess.run([shell, str(script)], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=120)


def installed_from(venv: Path, cwd: Path) -> str:
    """Where the venv imports holopipe from ('' if it cannot)."""
    code = "import holopipe; assert holopipe.FAKE; print(holopipe.__file__)"
    result = subprocess.run([venv / "bin" / "python", "-c", code], cwd=cwd, capture_output=True, text=True)
    return result.stdout.strip()


def test_post_deploy_in_place_installs_editable(fake_repo, venv, tmp_path):
    elsewhere = tmp_path / "workdir"
    elsewhere.mkdir()
    # In place, through the gpu link, with `sh` (dash here): the script must go on under bash and find the
    # repository from its own path, whatever the working directory.
    result = run_script(fake_repo / "envs" / "gpu.post-deploy.sh", venv, elsewhere, shell="sh")
    assert result.returncode == 0, result.stdout + result.stderr
    location = installed_from(venv, elsewhere)
    assert location == str(fake_repo / "src" / "holopipe" / "__init__.py")  # editable: the repository's source


def test_post_deploy_copied_by_snakemake_finds_the_repo(fake_repo, venv, tmp_path):
    # Snakemake copies the script to .snakemake/conda/<hash>_.post-deploy.sh and runs it from its working
    # directory: the repository when snakemake runs from there ...
    copied = fake_repo / ".snakemake" / "conda" / "0123abcd_.post-deploy.sh"
    copied.parent.mkdir(parents=True)
    shutil.copy(fake_repo / "envs" / "gpu.post-deploy.sh", copied)
    result = run_script(copied, venv, fake_repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed_from(venv, tmp_path) == str(fake_repo / "src" / "holopipe" / "__init__.py")
    # ... and with another working directory HOLOPIPE_REPO names it.
    workdir = tmp_path / "workdir"
    elsewhere = workdir / ".snakemake" / "conda" / "4567_.post-deploy.sh"
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(copied, elsewhere)
    failed = run_script(elsewhere, venv, workdir)
    assert failed.returncode != 0
    assert "cannot find the holopipe repository" in failed.stderr and "HOLOPIPE_REPO" in failed.stderr
    result = run_script(elsewhere, venv, workdir, HOLOPIPE_REPO=str(fake_repo))
    assert result.returncode == 0, result.stdout + result.stderr


def test_post_deploy_fails_clearly_without_pyproject(fake_repo, venv, tmp_path):
    (fake_repo / "pyproject.toml").unlink()
    result = run_script(fake_repo / "envs" / "cpu.post-deploy.sh", venv, tmp_path)
    assert result.returncode != 0
    assert "pyproject.toml" in result.stderr and str(fake_repo) in result.stderr
    assert installed_from(venv, tmp_path) == ""
    wrong = run_script(fake_repo / "envs" / "cpu.post-deploy.sh", venv, tmp_path, HOLOPIPE_REPO=str(tmp_path))
    assert wrong.returncode != 0 and f"HOLOPIPE_REPO={tmp_path}" in wrong.stderr


# --- One CUDA stack: the pinned torch wheel, envs/gpu.yaml and the gpu extra's CuPy name one CUDA major.

def gpu_extra_cuda_majors() -> set[int]:
    """CUDA majors the pyproject ``gpu`` extra's CuPy wheels are built for (``cupy-cuda13x`` -> 13)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    names = [Requirement(entry).name.lower() for entry in extras["gpu"]]
    cupy_wheels = [name for name in names if name.startswith("cupy")]
    assert cupy_wheels, f"pyproject.toml: the gpu extra {extras['gpu']} names no CuPy wheel"
    majors = set()
    for name in cupy_wheels:
        match = re.fullmatch(r"cupy-cuda(\d+)x", name)
        assert match, f"pyproject.toml: gpu extra names {name}, not a CUDA-major CuPy wheel (cupy-cudaNNx)"
        majors.add(int(match.group(1)))
    return majors


def test_one_cuda_major_across_pyproject_gpu_env_and_torch():
    from holopipe.core.device import CUDA_MAJOR

    assert gpu_extra_cuda_majors() == {CUDA_MAJOR}, "pyproject.toml's gpu extra"
    specs = conda_specs(ENVS["gpu"])
    assert "cuda-version" in specs, f"{ENVS['gpu']}: no cuda-version pin"
    assert specs["cuda-version"].contains(f"{CUDA_MAJOR}.0"), f"{ENVS['gpu']}: cuda-version {specs['cuda-version']}"
    assert not specs["cuda-version"].contains(f"{CUDA_MAJOR - 1}.8"), f"{ENVS['gpu']}: admits CUDA {CUDA_MAJOR - 1}"
    # CuPy 14 is the first release built for CUDA 13; an older floor would let conda pick a CUDA 12 stack.
    assert specs["cupy"].contains("14.0.0") and not specs["cupy"].contains("13.6.0"), f"{ENVS['gpu']}: cupy"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert all(Requirement(entry).specifier.contains("14.0.0") and not Requirement(entry).specifier.contains("13.6.0")
               for entry in extras["gpu"]), f"pyproject.toml: gpu extra {extras['gpu']}"

    import torch

    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU build: no CUDA major to compare")
    assert int(torch.version.cuda.split(".")[0]) == CUDA_MAJOR, (
        f"the installed torch {torch.__version__} is built for CUDA {torch.version.cuda}, "
        f"holopipe's stack is CUDA {CUDA_MAJOR} (holopipe.core.device.CUDA_MAJOR)")


@pytest.mark.gpu
def test_cupy_and_torch_load_the_same_cuda_runtime_major():
    cupy = pytest.importorskip("cupy")
    import torch

    from holopipe.core.device import CUDA_MAJOR

    cupy_major = cupy.cuda.runtime.runtimeGetVersion() // 1000  # e.g. 13000 for CUDA 13.0
    torch_major = int(torch.version.cuda.split(".")[0])
    assert cupy_major == torch_major == CUDA_MAJOR, (
        f"cupy {cupy.__version__} runs CUDA runtime {cupy_major}, torch {torch.__version__} CUDA {torch.version.cuda}")
    # Both libraries work on the GPU in one process (one driver serves both runtimes).
    assert float(cupy.asarray([1.0, 2.0]).sum()) == float(torch.tensor([1.0, 2.0], device="cuda").sum()) == 3.0


def constraint_pins() -> dict[str, Requirement]:
    """constraints.txt's pins by canonical name."""
    lines = (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
    return {canonicalize_name(req.name): req for req in
            (Requirement(line) for line in lines if line.strip() and not line.startswith("#"))}


def test_the_lock_pins_every_dependency_within_what_pyproject_allows():
    """make setup installs constraints.txt's versions: each of pyproject.toml's dependencies (the test extra's too)
    must be pinned there exactly, at a version pyproject accepts, for the Python the lock was made on; a pyproject
    edit without `make lock` fails here, not on a fresh machine."""
    pins = constraint_pins()
    project = PYPROJECT["project"]
    for req in map(Requirement, project["dependencies"] + project["optional-dependencies"]["test"]):
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"constraints.txt: {req.name} is not pinned (run make lock)"
        (spec,) = pin.specifier
        assert spec.operator == "==", f"constraints.txt: {pin} is not an exact pin"
        assert req.specifier.contains(spec.version, prereleases=True), (
            f"constraints.txt pins {pin.name} {spec.version}, which pyproject.toml's {req} refuses (run make lock)")
        assert pin.marker is not None and "python_version" in str(pin.marker), f"constraints.txt: {pin} has no Python"


def test_the_lock_is_what_this_environment_runs():
    """Where the lock's Python is the running one, each pinned distribution installed here is at its pin (make
    setup used the lock)."""
    for name, pin in constraint_pins().items():
        if not pin.marker.evaluate():
            pytest.skip(f"constraints.txt is pinned for another Python ({pin.marker})")
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert pin.specifier.contains(installed, prereleases=True), f"{name} {installed} installed, {pin} locked"
