"""What a stage reads and writes is declared once, in holopipe.run.cli (its options made with _reads and
_writes): the provenance record lists exactly those files, and each Snakemake rule's command is made from them
(rule_command), so a rule's inputs and outputs and the stage's options cannot part."""

import argparse
import json
import re
import shlex
from pathlib import PurePosixPath

import pytest
from helpers import TINY, snakemake

from holopipe.run import cli
from holopipe.run.cli import build_parser, declared_reads, declared_writes, main, rule_command


def stage_parsers(parser: argparse.ArgumentParser, words: tuple = ()) -> dict[str, argparse.ArgumentParser]:
    """'standardize apply' -> its parser, for every stage of the CLI."""
    subparsers = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subparsers:
        return {" ".join(words): parser}
    return {name: stage for word, child in subparsers[0].choices.items()
            for name, stage in stage_parsers(child, (*words, word)).items()}


STAGES = stage_parsers(build_parser())


def test_rule_command_passes_the_rules_files_by_the_declared_names():
    assert rule_command("regrid") == ("holopipe --provenance {output.provenance} --threads {threads} regrid "
                                      "--in {input.raw} --out {output.store} --config-json {params.config:q} "
                                      "> {log} 2>&1")
    train = rule_command("train", out="results/model")  # a directory: the rule lists the files in it
    assert "--best {input.best} --out results/model --config-json" in train
    assert rule_command("infer", "{params.probabilities}", probabilities=None, chunk="{wildcards.chunk}") == (
        "holopipe --provenance {output.provenance} --threads {threads} infer --model {input.model} --in "
        "{input.store} --out {output.detections} --chunk {wildcards.chunk} {params.probabilities} "
        "--config-json {params.config:q} > {log} 2>&1")
    assert rule_command("report", recorded=False, snakefile="S").startswith("holopipe report --snakefile S ")


def test_rule_command_refuses_an_option_the_stage_lacks_or_a_required_one_left_out():
    with pytest.raises(ValueError, match="holopipe train has no option bestt"):
        rule_command("train", bestt="{input.best}")
    with pytest.raises(ValueError, match="holopipe examples requires --split"):
        rule_command("examples")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_record_lists_exactly_the_files_the_stage_declares(stage, tmp_path, monkeypatch):
    """Every file option given (pairs as KEY=PATH): the record's inputs and outputs are those files, in the
    order declared, and nothing else (the stage's work itself is stubbed out; each file holds a valid config,
    JSON being YAML, for the stages that read one)."""
    for name in dir(cli):
        if name.startswith("cmd_"):
            monkeypatch.setattr(cli, name, lambda args: None)
    parser, argv, listed = STAGES[stage], [], {"reads": [], "writes": []}
    for role, paths in listed.items():
        for option in parser.get_default(role) or ():
            path = tmp_path / f"{role}-{option.dest}.json"
            path.write_text(json.dumps(TINY))
            argv += [option.flag, str(path) if option.path_of(str(path)) == str(path) else f"key={path}"]
            paths.append(str(path))
    declared = {option.dest for role in listed for option in parser.get_default(role) or ()}
    for action in parser._actions:
        if action.required and action.option_strings and action.dest not in declared:
            argv += [action.option_strings[0], "1" if action.type is int else "x"]
    if "config_json" in {action.dest for action in parser._actions}:
        argv += ["--config-json", json.dumps(TINY)]
    record = tmp_path / "record.json"
    assert main(["--provenance", str(record), *stage.split(), *argv]) == 0
    written = json.loads(record.read_text())
    assert [entry["path"] for entry in written["inputs"]] == listed["reads"]
    assert [entry["path"] for entry in written["outputs"]] == listed["writes"]


def test_training_records_the_tuned_settings_it_read():
    """The drift this declaration ended: train reads --best, and its record lists it with the data."""
    args = build_parser().parse_args(["train", "--train", "t.zarr", "--valid", "v.zarr", "--stats", "s.json",
                                      "--best", "best.yaml", "--out", "model", "--config", "c.yaml"])
    assert declared_reads(args) == ["t.zarr", "v.zarr", "s.json", "best.yaml"]
    assert declared_writes(args) == ["model"]


def planned_jobs(output: str) -> list[dict]:
    """rule, inputs, outputs and shell command of every job a `snakemake -n -p` run lists."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        command = re.search(r"^Shell command: (.*)$", block, re.MULTILINE)
        if rule and command and command.group(1) != "None":
            files = {kind: (re.search(rf"^\s+{kind}: (.*)$", block, re.MULTILINE) or [None, ""])[1]
                     for kind in ("input", "output")}
            jobs.append({"rule": rule.group(1), "command": command.group(1),
                         **{kind: set(filter(None, listed.split(", "))) for kind, listed in files.items()}})
    return jobs


def snakemakes_own(path: str) -> bool:
    """Files a rule lists that are not its command's: the tune workers' done flags (Snakemake touches them) and
    the Optuna journal, which holopipe.ml.tune keeps beside the study file the command is given."""
    return path.endswith((".done", ".journal"))


def disagreement(job_files: set, declared: list) -> list[str]:
    """The rule's files no declared path is or holds (a declared directory holds the files the rule lists in
    it), and the declared paths that neither are nor hold one of the rule's files."""
    declared = [PurePosixPath(path) for path in declared]
    job = [PurePosixPath(path) for path in job_files if not snakemakes_own(path)]
    return ([f"rule only: {path}" for path in job if not any(path.is_relative_to(mine) for mine in declared)]
            + [f"command only: {mine}" for mine in declared if not any(path.is_relative_to(mine) for path in job)])


WITH_PROBABILITIES_UNTUNED = {**TINY, "infer": {**TINY["infer"], "save_probabilities": True},
                              "tune": {**TINY["tune"], "n_trials": 0}}


@pytest.mark.workflow
@pytest.mark.parametrize("config", [TINY, WITH_PROBABILITIES_UNTUNED], ids=["tiny", "probabilities-untuned-labels"])
def test_each_rule_gives_its_command_exactly_its_inputs_and_outputs(config, tmp_path):
    """The dry run fills every command in (a rule key the command names that the rule lacks fails it); each
    recorded command, parsed as holopipe parses it, reads the rule's inputs and writes its outputs, no more."""
    (tmp_path / "labels" / "valid").mkdir(parents=True)
    (tmp_path / "labels" / "valid" / "ana.csv").write_text("candidates_id,candidate,label,confidence\n")
    result = snakemake(tmp_path, "-n", "-p", "--cores", "2", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = planned_jobs(result.stdout)
    recorded = [job for job in jobs if job["command"].startswith("holopipe --provenance ")]
    assert {job["rule"] for job in recorded} >= {"acquire_split", "regrid_split", "augment", "standardize_fit",
                                                 "standardize_split", "examples_split", "train", "infer_chunk",
                                                 "particles_split", "baseline_split", "label_candidates",
                                                 "evaluate", "tune"}
    problems = []
    for job in recorded:
        words = shlex.split(job["command"])
        args = build_parser().parse_args(words[1:words.index(">")])
        for kind, declared in (("input", declared_reads(args)), ("output", [*declared_writes(args), args.provenance])):
            problems += [f"{job['rule']} {kind} {problem}" for problem in disagreement(job[kind], declared)]
    assert not problems, "\n".join(problems)
