"""The conda environments of the Snakemake rules: complete against pyproject.toml, named by every rule that runs
a command, and able to install holopipe itself through their post-deploy script."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
ENVS = {name: REPO / "envs" / f"{name}.yaml" for name in ("cpu", "gpu")}
# Test ids as file names: an id "gpu" would be a keyword that conftest's gpu skip matches, hiding the gpu env's
# checks on every machine without a GPU.
ENV_IDS = [f"envs/{name}.yaml" for name in ENVS]

# pyproject.toml dependencies that are not imported by the stages a rule env runs.
NOT_IN_ENVS = {"snakemake", "snakemake-executor-plugin-cluster-generic", "pygments"}
# pip name -> the conda-forge names that provide it (any one will do).
CONDA_NAMES = {
    "torch": {"pytorch", "pytorch-cpu", "pytorch-gpu"},
    "netcdf4": {"netcdf4"},
    "psycopg2-binary": {"psycopg2"},
    "matplotlib": {"matplotlib-base", "matplotlib"},
}


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [req for req in map(Requirement, project["dependencies"]) if req.name.lower() not in NOT_IN_ENVS]


def conda_specs(name: str) -> dict[str, SpecifierSet]:
    """Package name -> version specifier of an env file's conda dependencies (`numpy>=1.26`, `python=3.11`)."""
    env = yaml.safe_load(ENVS[name].read_text(encoding="utf-8"))
    specs = {}
    for entry in env["dependencies"]:
        assert isinstance(entry, str), f"{ENVS[name]}: unexpected entry {entry!r} (a pip: section?)"
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", entry)
        package, spec = match.group(1).lower(), match.group(2).replace(" ", "")
        if re.fullmatch(r"=[^=<>!].*", spec):  # conda's `=3.11` means 3.11.*
            spec = f"=={spec[1:]}.*" if not spec.endswith("*") else f"=={spec[1:]}"
        specs[package] = SpecifierSet(spec)
    return specs


@pytest.mark.parametrize("name", ENVS, ids=ENV_IDS)
def test_env_parses_and_uses_conda_forge(name):
    env = yaml.safe_load(ENVS[name].read_text(encoding="utf-8"))
    assert env["channels"][0] == "conda-forge"
    assert "defaults" not in env["channels"]
    assert "python" in conda_specs(name)


@pytest.mark.parametrize("name", ENVS, ids=ENV_IDS)
def test_env_has_every_runtime_dependency_with_pyproject_floors(name):
    specs = conda_specs(name)
    for req in runtime_requirements():
        candidates = CONDA_NAMES.get(req.name.lower(), {req.name.lower()})
        present = candidates & set(specs)
        assert present, f"{ENVS[name]}: {req.name} (pyproject.toml) is missing; conda-forge name {sorted(candidates)}"
        conda_spec = specs[present.pop()]
        floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        for floor in floors:
            # The env accepts pyproject's lowest version and nothing below it.
            assert conda_spec.contains(floor), f"{ENVS[name]}: {req} but the env says {conda_spec}"
            below = [Version(s.version) for s in conda_spec if s.operator in (">=", "==")]
            assert below and max(below) >= floor, f"{ENVS[name]}: {req} but the env says {conda_spec or 'any'}"


def test_only_the_gpu_env_has_cupy_and_both_build_holopipe():
    assert "cupy" in conda_specs("gpu") and "cupy" not in conda_specs("cpu")
    assert "pytorch-gpu" in conda_specs("gpu") and "pytorch-cpu" in conda_specs("cpu")
    for name in ENVS:
        assert {"pip", "setuptools"} <= set(conda_specs(name)), f"{ENVS[name]}: post-deploy needs pip and setuptools"


def rule_blocks(path: Path) -> dict[str, str]:
    """Rule name -> text of that rule in a .smk file (each `rule x:` runs until the next top-level line)."""
    blocks = re.split(r"^rule (\w+):\n", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {name: re.split(r"^\S", body, maxsplit=1, flags=re.MULTILINE)[0]
            for name, body in zip(blocks[1::2], blocks[2::2])}


def test_every_shell_rule_names_an_existing_env():
    checked = 0
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for rule, body in rule_blocks(smk).items():
            if not re.search(r"^\s+shell:", body, flags=re.MULTILINE):
                continue
            conda = re.search(r"^\s+conda:\s*\n?\s*\"([^\"]+)\"", body, flags=re.MULTILINE)
            assert conda, f"{smk.name}: rule {rule} runs a shell command without a conda: env"
            env = (smk.parent / conda.group(1)).resolve()
            assert env in {path.resolve() for path in ENVS.values()}, f"{smk.name}: rule {rule} names {env}"
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("name", ENVS, ids=ENV_IDS)
def test_each_env_has_an_executable_post_deploy_script(name):
    script = ENVS[name].with_suffix(".post-deploy.sh")
    assert script.is_file() and os.access(script, os.X_OK), f"{script} missing or not executable"
    assert script.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")


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
    from holopipe.device import CUDA_MAJOR

    assert gpu_extra_cuda_majors() == {CUDA_MAJOR}, "pyproject.toml's gpu extra"
    specs = conda_specs("gpu")
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
        f"holopipe's stack is CUDA {CUDA_MAJOR} (holopipe.device.CUDA_MAJOR)")


@pytest.mark.gpu
def test_cupy_and_torch_load_the_same_cuda_runtime_major():
    cupy = pytest.importorskip("cupy")
    import torch

    from holopipe.device import CUDA_MAJOR

    cupy_major = cupy.cuda.runtime.runtimeGetVersion() // 1000  # e.g. 13000 for CUDA 13.0
    torch_major = int(torch.version.cuda.split(".")[0])
    assert cupy_major == torch_major == CUDA_MAJOR, (
        f"cupy {cupy.__version__} runs CUDA runtime {cupy_major}, torch {torch.__version__} CUDA {torch.version.cuda}")
    # Both libraries work on the GPU in one process (one driver serves both runtimes).
    assert float(cupy.asarray([1.0, 2.0]).sum()) == float(torch.tensor([1.0, 2.0], device="cuda").sum()) == 3.0
