"""Provenance records: checksums, config hashes, the CLI's record of a stage run, and the report tables."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

import holopipe
from holopipe.core.provenance import (
    checksum,
    code_identity,
    config_sha256,
    job_record,
    read_records,
    summarize_records,
    write_record,
    write_summary,
)
from holopipe.run.cli import main


def test_file_checksum_is_the_sha256_of_its_bytes(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"holodec" * 1000)
    entry = checksum(path)
    assert entry["sha256"] == hashlib.sha256(b"holodec" * 1000).hexdigest()
    assert (entry["kind"], entry["bytes"], entry["files"]) == ("file", 7000, 1)


def test_directory_checksum_follows_content_and_names_not_creation_order(tmp_path):
    first, second = tmp_path / "one.zarr", tmp_path / "two.zarr"
    for store, order in ((first, ("a", "b/c")), (second, ("b/c", "a"))):
        for name in order:
            (store / name).parent.mkdir(parents=True, exist_ok=True)
            (store / name).write_text(name)
    (first / ".snakemake_timestamp").write_text("left out")
    assert checksum(first)["sha256"] == checksum(second)["sha256"]
    assert checksum(first)["files"] == 2
    (second / "b" / "c").write_text("changed")
    assert checksum(first)["sha256"] != checksum(second)["sha256"]
    (second / "b" / "c").write_text("b/c")
    (second / "b" / "c").rename(second / "b" / "d")
    assert checksum(first)["sha256"] != checksum(second)["sha256"]


def test_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checksum(tmp_path / "nowhere")


def test_config_hash_ignores_key_order_but_not_values():
    assert config_sha256({"a": 1, "b": {"c": 2, "d": 3}}) == config_sha256({"b": {"d": 3, "c": 2}, "a": 1})
    assert config_sha256({"a": 1}) != config_sha256({"a": 2})
    assert config_sha256(None) is None


def test_stage_run_writes_a_record_of_its_inputs_and_outputs(tmp_path):
    config = {"splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 3}},
              "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 32, "ny": 32,
                         "z_min": 0.001, "z_max": 0.002},
              "simulate": {"particles": [1, 1], "pad": 0}}
    raw, record_path = tmp_path / "raw.nc", tmp_path / "prov" / "acquire.json"
    assert main(["--provenance", str(record_path), "acquire", "--split", "train", "--out", str(raw),
                 "--config-json", json.dumps(config)]) == 0
    record = json.loads(record_path.read_text())
    assert record["stage"] == "acquire" and record["command"][:3] == ["holopipe", "--provenance", str(record_path)]
    assert record["inputs"] == []  # a simulated split reads only its config
    assert record["outputs"] == [checksum(raw)]
    assert record["config_sha256"] == config_sha256(record["config"])
    assert record["config"]["splits"] == config["splits"]
    assert record["packages"]["numpy"] and record["cpu_count"] >= 1 and record["host"]
    assert isinstance(record["gpus"], list) and record["seconds"] >= 0

    regridded, regrid_record = tmp_path / "regridded.zarr", tmp_path / "prov" / "regrid.json"
    assert main(["--provenance", str(regrid_record), "regrid", "--in", str(raw), "--out", str(regridded),
                 "--config-json", json.dumps(config)]) == 0
    regrid = json.loads(regrid_record.read_text())
    assert regrid["inputs"] == [checksum(raw)]  # the next stage's input is the file the first one wrote
    assert regrid["outputs"][0]["kind"] == "directory" and regrid["outputs"][0]["files"] > 1


def test_failed_stage_writes_no_record(tmp_path):
    record_path = tmp_path / "record.json"
    assert main(["--provenance", str(record_path), "regrid", "--in", str(tmp_path / "missing.nc"),
                 "--out", str(tmp_path / "out.zarr"), "--config-json", json.dumps({
                     "splits": {"train": {"source": "simulate", "n_holograms": 1, "seed": 0}},
                     "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 32, "ny": 32,
                                "z_min": 0.001, "z_max": 0.002}})]) == 1
    assert not record_path.exists()


def _record(tmp_path, name, numpy_version, output_text):
    output = tmp_path / f"{name}.txt"
    output.write_text(output_text)
    record = job_record(command=["holopipe", name], stage=name, config={"k": name}, inputs=[], outputs=[output],
                        started=0.0, finished=2.5)
    record["packages"]["numpy"] = numpy_version
    return write_record(record, tmp_path / "jobs" / f"{name}.json")


def test_summary_tables_show_every_job_file_and_mixed_versions(tmp_path):
    paths = [_record(tmp_path, "first", "2.0.0", "a"), _record(tmp_path, "second", "2.1.0", "b")]
    tables = summarize_records(read_records(paths))
    assert list(tables["jobs"]["job"]) == ["first", "second"]
    assert list(tables["jobs"]["seconds"]) == [2.5, 2.5]
    assert list(tables["files"]["role"]) == ["output", "output"]
    assert list(tables["files"]["sha256"]) == [hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()]
    numpy = tables["packages"][tables["packages"]["package"] == "numpy"]
    assert sorted(numpy["version"]) == ["2.0.0", "2.1.0"] and list(numpy["jobs"]) == [1, 1]

    written = write_summary(paths, {"optics": {"nx": 8}}, tmp_path / "summary")
    config_text = written["config"].read_text()
    assert config_sha256({"optics": {"nx": 8}}) in config_text.splitlines()[0]
    assert yaml.safe_load(config_text) == {"optics": {"nx": 8}}


def test_a_file_that_is_not_a_record_is_named(tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"stage": "x"}))
    with pytest.raises(ValueError, match="bogus.json"):
        read_records([bogus])
    bogus.write_text("{not json")
    with pytest.raises(ValueError, match="bogus.json"):
        read_records([bogus])


def test_the_code_identity_follows_the_package_source_only(tmp_path):
    """Copies of holopipe's source digest alike; an edit to one module (a git pull) changes the digest, a
    file that is not Python does not."""
    source = Path(holopipe.__file__).parent
    same, edited = tmp_path / "same", tmp_path / "edited"
    for copy in (same, edited):
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (same / "notes.txt").write_text("not code")
    with open(edited / "particles.py", "a", encoding="utf-8") as module:
        module.write("\n# pulled\n")
    identity = code_identity(same)
    assert identity["holopipe_version"] == holopipe.__version__ and code_identity() == identity
    assert code_identity(edited)["source_sha256"] != identity["source_sha256"]


@pytest.mark.workflow
def test_the_report_s_inner_snakemake_ignores_the_user_s_profile(tmp_path, monkeypatch):
    """A user's SNAKEMAKE_PROFILE (say their cluster profile) must not reach the inner Snakemake that draws the
    graphs and the report: its executor plugin is not in the report's env, and nothing there is submitted."""
    from holopipe.run.report import snakemake_output

    snakefile, configfile = tmp_path / "Snakefile", tmp_path / "config.yaml"
    snakefile.write_text('rule all:\n    output: "a.txt"\n    shell: "touch {output}"\n')
    configfile.write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SNAKEMAKE_PROFILE", str(tmp_path / "no-such-profile"))
    graph = snakemake_output(snakefile, configfile, "--rulegraph", "mermaid-js")
    assert "all" in graph
