"""The `holopipe` command: what Snakemake rules and users run."""

import subprocess
import sys

import pytest
import yaml

from holopipe.cli import main
from holopipe.io import open_holodec


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
    result = subprocess.run([sys.executable, "-m", "holopipe.cli", "--version"], capture_output=True,
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
