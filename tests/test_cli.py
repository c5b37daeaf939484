"""The `holopipe` command: what Snakemake rules and users run."""

import os
import subprocess
import sys

import dask
import numpy as np
import pytest
import scipy.fft
import torch
import yaml

from holopipe.core import device
from holopipe.core.device import ALLOCATION_VARIABLES, THREAD_VARIABLES, cpu_threads, job_threads
from holopipe.core.io import open_holodec
from holopipe.optics.propagation import fft2, ifft2
from holopipe.run.cli import build_parser, declared_writes, main


def test_simulate_from_flags_writes_the_requested_frame(tmp_path):
    out = tmp_path / "h.nc"
    code = main(["simulate", "--out", str(out), "--n-holograms", "2", "--seed", "3", "--nx", "48",
                 "--ny", "32", "--particles", "1", "2", "--pad", "0", "--no-noise", "--quiet"])
    assert code == 0
    with open_holodec(out) as ds:
        assert ds["image"].shape == (2, 48, 32)
        assert ds.attrs["seed"] == 3
        assert 2 <= ds.sizes["particle"] <= 4


def test_simulate_flags_override_the_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 40, "ny": 40,
                   "z_min": 0.001, "z_max": 0.003},
        "simulate": {"method": "fraunhofer"}}))
    out = tmp_path / "h.nc"
    assert main(["simulate", "--config", str(config), "--ny", "24", "--out", str(out),
                 "--n-holograms", "1", "--seed", "0", "--quiet"]) == 0
    with open_holodec(out) as ds:
        assert ds["image"].shape == (1, 40, 24)
        assert ds.attrs["simulation_method"] == "fraunhofer"
        assert ds.attrs["zMax"] == 0.003


def test_bad_values_fail_with_the_key_and_leave_no_file(tmp_path, caplog):
    out = tmp_path / "h.nc"
    code = main(["simulate", "--out", str(out), "--n-holograms", "1", "--seed", "0",
                 "--z-min", "0.02", "--z-max", "0.01", "--quiet"])
    assert code == 1
    assert "z_min" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "holopipe.run.cli", "--version"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.startswith("holopipe ")


@pytest.mark.parametrize("split", ["nope"])
def test_acquire_names_an_unknown_split(tmp_path, caplog, split):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 1}},
        "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 32, "ny": 32,
                   "z_min": 0.001, "z_max": 0.003}}))
    assert main(["acquire", "--config", str(config), "--split", split,
                 "--out", str(tmp_path / "x.nc")]) == 1
    assert "nope" in caplog.text and "train" in caplog.text


# ---- one thread policy ----

@pytest.fixture
def eight_cpus_allowed(monkeypatch):
    """A process allowed 8 CPUs on a 96-core node (a PBS cpuset); no allocation in the environment."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    for variable in ALLOCATION_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def restored_threads(monkeypatch):
    """Undo use_threads: the environment, dask's config, torch's pool and holopipe's own setting."""
    for variable in THREAD_VARIABLES:
        monkeypatch.setenv(variable, os.environ.get(variable, "1"))
    monkeypatch.setattr(device, "_threads", None)
    torch_threads = torch.get_num_threads()
    with dask.config.set(num_workers=dask.config.get("num_workers", None)):
        yield
    torch.set_num_threads(torch_threads)


@pytest.mark.parametrize("environ, expected", [
    ({}, 8),                                          # the CPUs this process may use, not the node's 96
    ({"NCPUS": "4"}, 4),                              # PBS's allocation
    ({"OMP_NUM_THREADS": "2", "NCPUS": "4"}, 2),      # Snakemake's rule threads inside a PBS job win
    ({"OMP_NUM_THREADS": "3,1"}, 3),                  # OpenMP's nested form: the first level
    ({"OMP_NUM_THREADS": "32"}, 8),                   # never more than the CPUs allowed
    ({"OMP_NUM_THREADS": "", "NCPUS": "5"}, 5),       # unset or nonsense values are skipped
    ({"OMP_NUM_THREADS": "0", "NCPUS": "many"}, 8),
])
def test_thread_policy_follows_the_job_allocation(eight_cpus_allowed, environ, expected):
    assert job_threads(environ=environ) == expected


def test_requested_threads_win_over_the_environment(eight_cpus_allowed, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("NCPUS", "4")
    assert job_threads() == 2
    assert job_threads(12) == 12  # asked for explicitly: as given, even above the CPUs allowed
    with pytest.raises(ValueError, match="--threads"):
        job_threads(0)


def test_threads_are_one_option_before_the_stage():
    argv = ["infer", "--model", "m.pt", "--in", "s.zarr", "--out", "d.csv", "--config", "c.yaml"]
    assert build_parser().parse_args(["--threads", "3", *argv]).threads == 3
    assert build_parser().parse_args(argv).threads is None
    with pytest.raises(SystemExit):  # one place for it: the stages have no --threads of their own
        build_parser().parse_args([*argv, "--threads", "3"])


def test_main_applies_the_threads_to_every_pool(restored_threads, monkeypatch, capsys):
    assert main(["--threads", "3", "config-reference"]) == 0
    assert cpu_threads() == 3 and torch.get_num_threads() == 3
    assert dask.config.get("num_workers") == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    seen = []
    monkeypatch.setattr(scipy.fft, "fft2", lambda x, workers, **options: seen.append(workers) or x)
    monkeypatch.setattr(scipy.fft, "ifft2", lambda x, workers, **options: seen.append(workers) or x)
    ifft2(fft2(np.ones((4, 6), np.complex64)))
    assert seen == [3, 3]


def test_a_command_frees_what_a_killed_run_left_beside_its_outputs_even_when_it_fails_early(tmp_path):
    """The temporaries of a killed run go when the command starts, not only when it reaches its write: here
    the rerun fails on its input at once, and the killed run's store and provenance temporaries are gone."""
    import socket

    out, record = tmp_path / "regridded.zarr", tmp_path / "regrid.json"
    left = [tmp_path / f".{path.name}.tmp-{socket.gethostname()}x-1-1" for path in (out, record)]
    for path in left:
        (path / "c").mkdir(parents=True)
    (tmp_path / ".other.zarr.tmp-elsewhere-1-1").mkdir()  # another output's: not this command's to remove
    code = main(["--provenance", str(record), "regrid", "--in", str(tmp_path / "missing.nc"), "--out", str(out),
                 "--config-json", "{}"])
    assert code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.zarr.tmp-elsewhere-1-1"]


def test_standardize_fit_declares_its_stats_before_they_exist(tmp_path):
    """Every command's outputs are asked for before it runs (to free a killed run's temporaries), when
    stats.json does not exist yet: standardize fit then declares stats.json alone, instead of failing."""
    stats = tmp_path / "stats.json"
    args = build_parser().parse_args(["standardize", "fit", "--in", str(tmp_path / "train.zarr"), "--out", str(stats),
                                      "--config-json", "{}"])
    assert declared_writes(args) == [str(stats)]
    stats.write_text('{"background_file": "background.npy"}')
    assert declared_writes(args) == [str(stats), tmp_path / "background.npy"]
