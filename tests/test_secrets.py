"""Secrets never reach command lines, logs, provenance, the report or error messages: the masking function,
the password file, the config's refusal of a password in tune.storage, Snakemake's printed commands, the
provenance dump and job records, and the errors of a database that cannot be opened. The tests marked by
HOLOPIPE_TEST_POSTGRES_URL check against a real PostgreSQL that the password reaches libpq and nothing else."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from holopipe.core.config import ConfigError, load_config
from holopipe.core.credentials import mask_secrets, read_password_file
from holopipe.core.provenance import job_record, write_summary
from holopipe.ml import tune
from holopipe.run.cli import main

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ENV = "HOLOPIPE_TEST_POSTGRES_URL"
SECRET = "Xy:zz/y-s3cret"
"""A password with the characters that end a URL's other parts (':' and '/'), to catch a mask that stops early."""

CONFIG = {
    "splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 1},
               "valid": {"source": "simulate", "n_holograms": 1, "seed": 2}},
    "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 64, "ny": 48,
               "z_min": 0.001, "z_max": 0.003},
    "examples": {"tile_size": 32},
    "model": {"width": 4, "depth": 2},
    "train": {"epochs": 1, "batch_size": 4, "num_workers": 0, "device": "cpu"},
    "infer": {"splits": ["valid"]},
    "tune": {"n_trials": 1, "workers": 1, "pruner": "none",
             "search_space": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}},
}


def with_tune(**keys) -> dict:
    return {**CONFIG, "tune": {**CONFIG["tune"], **keys}}


@pytest.fixture
def password_file(tmp_path) -> Path:
    path = tmp_path / "db.password"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


# --- the mask -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "masked"), [
    (f"postgresql://me:{SECRET}@db.ucar.edu:5432/optuna", "postgresql://me:***@db.ucar.edu:5432/optuna"),
    (f"postgresql+psycopg2://me:{SECRET}@db/optuna", "postgresql+psycopg2://me:***@db/optuna"),
    (f"postgresql://me@db/optuna?password={SECRET}&sslmode=require",
     "postgresql://me@db/optuna?password=***&sslmode=require"),
    (f"cannot open postgresql://me:{SECRET}@db/optuna: refused\nretry postgresql://me@db/optuna",
     "cannot open postgresql://me:***@db/optuna: refused\nretry postgresql://me@db/optuna"),
])
def test_mask_hides_the_password_and_keeps_the_rest_of_the_url(text, masked):
    assert mask_secrets(text) == masked
    assert mask_secrets(masked) == masked


@pytest.mark.parametrize("text", [
    "postgresql://me@db.ucar.edu:5432/optuna", "postgresql://db:5432/optuna", "sqlite:///results/tune.db",
    "https://data.ucar.edu/holodec/synthetic_holograms.nc", "z_min 0.001: ok",
])
def test_mask_leaves_urls_without_a_password_alone(text):
    assert mask_secrets(text) == text


def test_mask_reaches_every_string_of_a_config_or_command_line():
    url = f"postgresql://me:{SECRET}@db/optuna"
    config = {"tune": {"storage": url, "n_trials": 3, "search_space": {}}, "splits": [{"source": url}]}
    command = ["holopipe", "tune", "study", "--config-json", json.dumps(config)]
    assert SECRET not in json.dumps(mask_secrets(config)) and SECRET not in " ".join(mask_secrets(command))
    assert mask_secrets(config)["tune"] == {"storage": "postgresql://me:***@db/optuna", "n_trials": 3,
                                            "search_space": {}}
    assert SECRET in url, "the original is not modified"


# --- the password file ----------------------------------------------------------------------------------

def test_password_file_gives_its_one_line(password_file):
    assert read_password_file(password_file, "tune.storage_password_file") == SECRET


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_password_file_that_others_may_touch_is_refused_with_the_fix(password_file, mode):
    password_file.chmod(mode)
    fix = f"`chmod 600 {password_file}`"
    with pytest.raises(ValueError, match=rf"{password_file}: group or others may read or change .*{fix}") as error:
        read_password_file(password_file, "tune.storage_password_file")
    assert SECRET not in str(error.value)


def test_missing_or_multiline_password_file_names_the_file_and_the_key(tmp_path, password_file):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nowhere'}: .*tune.storage_password_file"):
        read_password_file(tmp_path / "nowhere", "tune.storage_password_file")
    password_file.write_text(f"{SECRET}\nmore\n")
    with pytest.raises(ValueError, match="one line") as error:
        read_password_file(password_file, "tune.storage_password_file")
    assert SECRET not in str(error.value)


# --- the config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [f"postgresql://me:{SECRET}@db/optuna", f"postgresql://me@db/optuna?password={SECRET}"])
def test_config_refuses_a_password_in_the_storage_url_and_says_where_it_goes(url):
    with pytest.raises(ConfigError) as error:
        load_config(with_tune(storage=url))
    message = str(error.value)
    assert "tune.storage (postgresql://me" in message and "holds a password" in message
    assert "tune.storage_password_file" in message and "~/.pgpass" in message
    assert SECRET not in message


def test_config_refuses_a_password_file_without_a_database(password_file):
    with pytest.raises(ConfigError, match="tune.storage_password_file is set, but tune.storage is null"):
        load_config(with_tune(storage_password_file=str(password_file)))


def test_a_yaml_error_quoting_the_password_is_masked(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f'tune:\n  storage: "postgresql://me:{SECRET}@db/optuna\n  workers: 1\n')  # unclosed quote
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_config(path)
    assert SECRET not in str(error.value)


def test_the_password_file_stays_out_of_the_study_name(password_file):
    url = "postgresql://me@db/optuna"
    digests = {"train": None, "valid": None, "stats": None}
    plain = load_config(with_tune(storage=url))
    with_file = load_config(with_tune(storage=url, storage_password_file=str(password_file)))
    assert tune.study_name(plain, digests) == tune.study_name(with_file, digests)


# --- the command line, its log and the error message ----------------------------------------------------

def test_a_hand_typed_password_is_masked_in_the_job_log_and_the_error(tmp_path, caplog):
    config = with_tune(storage=f"postgresql://me:{SECRET}@db/optuna")
    data = [tmp_path / name for name in ("train.zarr", "valid.zarr", "stats.json")]
    for path in data:
        path.write_text("{}")
    caplog.set_level("INFO", logger="holopipe")
    status = main(["tune", "study", "--study", str(tmp_path / "study.json"), "--train", str(data[0]),
                   "--valid", str(data[1]), "--stats", str(data[2]), "--config-json", json.dumps(config)])
    assert status == 1
    assert "postgresql://me:***@db/optuna" in caplog.text and "holds a password" in caplog.text
    assert SECRET not in caplog.text
    assert not (tmp_path / "study.json").exists()


def snakemake(workdir: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(configfile), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.workflow
def test_snakemake_prints_no_password_in_its_commands_or_its_refusal(tmp_path, password_file):
    url = "postgresql://me@db.ucar.edu/optuna"
    planned = snakemake(tmp_path, with_tune(storage=url, storage_password_file=str(password_file)),
                        "-n", "-p", "--cores", "1", "tune")
    assert planned.returncode == 0, planned.stderr
    printed = planned.stdout + planned.stderr
    assert "holopipe --provenance results/provenance/jobs/tune_study.json" in printed
    assert "tune worker --worker 0" in printed and url in printed and str(password_file) in printed
    assert SECRET not in printed

    refused = snakemake(tmp_path, with_tune(storage=f"postgresql://me:{SECRET}@db.ucar.edu/optuna"),
                        "-n", "-p", "--cores", "1", "tune")
    assert refused.returncode != 0
    assert "holds a password" in refused.stdout + refused.stderr
    assert SECRET not in refused.stdout + refused.stderr

    password_file.chmod(0o644)
    loose = snakemake(tmp_path, with_tune(storage=url, storage_password_file=str(password_file)),
                      "-n", "--cores", "1", "tune")
    assert loose.returncode != 0 and "chmod 600" in loose.stdout + loose.stderr


# --- provenance -----------------------------------------------------------------------------------------

def test_provenance_records_and_config_dump_mask_a_password(tmp_path):
    """The second line of defence: a config that never passed load_config (the first line) and holds a
    password is masked in the job record and in config.yaml, which the report shows."""
    config = {"tune": {"storage": f"postgresql://me:{SECRET}@db/optuna"}}
    output = tmp_path / "out.txt"
    output.write_text("result")
    record = job_record(command=["tune", "study", "--config-json", json.dumps(config)], stage="tune study",
                        config=config, inputs=[], outputs=[output], started=0.0, finished=1.0)
    assert SECRET not in json.dumps(record)
    assert record["config"]["tune"]["storage"] == "postgresql://me:***@db/optuna"
    (tmp_path / "record.json").write_text(json.dumps(record))
    written = write_summary([tmp_path / "record.json"], config, tmp_path / "provenance")
    dumped = written["config"].read_text()
    assert SECRET not in dumped and "postgresql://me:***@db/optuna" in dumped


# --- opening the database -------------------------------------------------------------------------------

def test_an_error_echoing_the_password_is_raised_masked_and_unchained(monkeypatch, password_file):
    config = load_config(with_tune(storage="postgresql://me@db/optuna", storage_password_file=str(password_file)))

    def echoing_storage(url, engine_kwargs, **kwargs):
        password = engine_kwargs["connect_args"]["password"]
        raise RuntimeError(f"bad DSN 'password={password}' for postgresql://me:{password}@db/optuna")

    monkeypatch.setattr(tune, "RDBStorage", echoing_storage)
    monkeypatch.setattr(tune.time, "sleep", lambda seconds: None)
    with pytest.raises(RuntimeError, match=r"tune.storage postgresql://me@db/optuna: cannot open") as error:
        tune.open_storage(config, "study.json")
    assert SECRET not in str(error.value) and "postgresql://me:***@db/optuna" in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_a_database_that_refuses_the_connection_is_named_without_the_password(monkeypatch, password_file):
    url = "postgresql://me@127.0.0.1:1/optuna"  # port 1: nothing listens, psycopg2 fails at once
    config = load_config(with_tune(storage=url, storage_password_file=str(password_file)))
    monkeypatch.setattr(tune.time, "sleep", lambda seconds: None)
    with pytest.raises(RuntimeError, match=rf"tune.storage {url}: cannot open the database \(OperationalError\)"):
        tune.open_storage(config, "study.json")


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (export {POSTGRES_ENV}=$(.ci/start-postgres))")
    return url


def libpq_password(storage) -> str | None:
    """The password libpq used for a storage's connection (psycopg2's connection.info.password)."""
    connection = storage.engine.raw_connection()
    try:
        return connection.driver_connection.info.password
    finally:
        connection.close()


def test_the_password_reaches_libpq_from_the_file_or_from_pgpassword(monkeypatch, password_file):
    url = postgres_url()
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with_file = load_config(with_tune(storage=url, storage_password_file=str(password_file)))
    storage = tune.open_storage(with_file, "study.json")
    assert libpq_password(storage) == SECRET
    assert SECRET not in storage.url and SECRET not in repr(storage.engine.url)
    monkeypatch.setenv("PGPASSWORD", "from-the-environment")
    assert libpq_password(tune.open_storage(load_config(with_tune(storage=url)), "study.json")) == (
        "from-the-environment"), "libpq reads PGPASSWORD by itself"


def test_a_database_study_keeps_the_password_out_of_the_job_log_record_and_study_file(tmp_path, password_file):
    url = postgres_url()
    config = load_config(with_tune(storage=url, storage_password_file=str(password_file)))
    data = [tmp_path / name for name in ("train.zarr", "valid.zarr", "stats.json")]
    for path in data:
        path.write_text(path.name)
    study_file, record, log = tmp_path / "study.json", tmp_path / "record.json", tmp_path / "study.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = (f"holopipe --provenance {record} tune study --study {study_file} --train {data[0]} "
               f"--valid {data[1]} --stats {data[2]} --config-json '{json.dumps(config)}' > {log} 2>&1")
    result = subprocess.run(command, shell=True, env=env, timeout=300)
    name = json.loads(study_file.read_text())["study"] if study_file.exists() else None
    try:
        assert result.returncode == 0, log.read_text()
        for path in (log, record, study_file):
            assert SECRET not in path.read_text(), path
        assert f"study {name} in {url}" in log.read_text()
    finally:
        if name is not None:
            optuna.delete_study(study_name=name, storage=tune.open_storage(config, study_file))
