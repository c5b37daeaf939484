"""``holopipe <stage> ...``: the commands the Snakemake rules run, and users run by hand.

The CLI only parses arguments and configs; the library modules do the work. Each stage declares once which of
its options name files it reads or writes (:func:`_reads`, :func:`_writes`): its provenance record lists those
files, and its Snakemake rule's command passes them from the rule's inputs and outputs (:func:`rule_command`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from holopipe import __version__
from holopipe.core.credentials import mask_secrets

log = logging.getLogger("holopipe")

OPTICS_FLAGS = {
    # flag: (config key, type, default when no --config is given: HOLODEC optics, embedded-default frame)
    "--wavelength": ("wavelength", float, 3.55e-7),
    "--dx": ("dx", float, 2.96e-6),
    "--dy": ("dy", float, 2.96e-6),
    "--nx": ("nx", int, 512),
    "--ny": ("ny", int, 512),
    "--z-min": ("z_min", float, 0.002),
    "--z-max": ("z_max", float, 0.012),
}


def _load_config(args) -> dict:
    from holopipe.core.config import load_config

    if getattr(args, "config_json", None):
        return load_config(json.loads(args.config_json))
    return load_config(args.config)


def _simulation_config(args) -> dict:
    """The validated config a ``simulate`` call stands for: --config (if any) overridden by flags."""
    from holopipe.core.config import load_config

    if args.config:
        with open(args.config) as handle:
            import yaml

            config = yaml.safe_load(handle) or {}
    else:
        config = {"splits": {"cli": {"source": "simulate", "n_holograms": 1, "seed": 0}},
                  "optics": {key: default for key, _, default in OPTICS_FLAGS.values()}}
    optics = config.setdefault("optics", {})
    for flag, (key, _, _) in OPTICS_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            optics[key] = value
    simulate = config.setdefault("simulate", {})
    if args.particles is not None:
        simulate["particles"] = list(args.particles)
    if args.method is not None:
        simulate["method"] = args.method
    if args.pad is not None:
        simulate["pad"] = args.pad
    if args.slab_thickness is not None:
        simulate["slab_thickness"] = args.slab_thickness
    if args.no_noise:
        simulate.setdefault("camera", {})["noise"] = False
    return load_config(config)


def cmd_simulate(args) -> None:
    from holopipe.optics.simulate import SimulationSettings, simulate_file

    settings = SimulationSettings.from_config(_simulation_config(args))
    simulate_file(args.out, n_holograms=args.n_holograms, seed=args.seed, settings=settings,
                  progress=not args.quiet)


def cmd_acquire(args) -> None:
    from holopipe.data.acquire import acquire_split

    acquire_split(_load_config(args), args.split, args.raw, ideal_sensor=args.ideal_sensor)


def cmd_regrid(args) -> None:
    from holopipe.data.regrid import regrid_file

    regrid_file(args.raw, args.store, _load_config(args))


def cmd_augment(args) -> None:
    from holopipe.data.augment import augment_file

    augment_file(args.regridded, args.store, _load_config(args), gallery_path=args.gallery)


def cmd_standardize_fit(args) -> None:
    from holopipe.data.standardize import fit_stats, write_stats

    write_stats(fit_stats(args.store, _load_config(args)), args.stats)


def cmd_standardize_apply(args) -> None:
    from holopipe.data.standardize import apply_stats

    apply_stats(args.store, args.standardized, args.stats, device=args.device)


def cmd_examples(args) -> None:
    from holopipe.core.config import check_tiles_fit
    from holopipe.data.examples import build_examples

    config = _load_config(args)
    check_tiles_fit(config)
    build_examples(args.store, args.examples, config, split=args.split)


def cmd_tune_study(args) -> None:
    from holopipe.ml.tune import start_study

    start_study(_load_config(args), args.study, args.train, args.valid, args.stats)


def cmd_tune_worker(args) -> None:
    from holopipe.ml.tune_worker import TrialProcessError, run_worker

    try:
        run_worker(_load_config(args), args.study, args.train, args.valid, args.stats, args.workdir,
                   worker=args.worker)
    except TrialProcessError as error:  # the job fails with the trial process's own exit status
        log.error("%s", error)
        raise SystemExit(error.exit_status) from error


def cmd_tune_summarize(args) -> None:
    from holopipe.ml.tune import summarize

    summarize(_load_config(args), args.study, args.best, args.trials, args.plots)


def cmd_train(args) -> None:
    import yaml

    from holopipe.core.config import with_overrides
    from holopipe.ml.train import train_model

    config = _load_config(args)
    if args.best:
        with open(args.best) as handle:
            config = with_overrides(config, yaml.safe_load(handle) or {})
    train_model(config, args.train, args.valid, args.out, stats_path=args.stats)


def cmd_infer(args) -> None:
    from holopipe.detect.infer import infer_chunk

    infer_chunk(_load_config(args), args.model, args.store, args.detections, chunk=args.chunk,
                n_chunks=args.chunks, probabilities_path=args.probabilities, mem_mb=args.mem_mb)


def cmd_particles(args) -> None:
    from holopipe.detect.particles import particles_file

    particles_file(args.detections, args.particles, _load_config(args), store_path=args.store)


def cmd_baseline(args) -> None:
    from holopipe.detect.baseline import baseline_file, detections_file

    (detections_file if args.detections else baseline_file)(_load_config(args), args.store, args.particles)


def cmd_tune_postprocessing(args) -> None:
    from holopipe.evaluation.postprocessing import tune_postprocessing, write_settings

    result = tune_postprocessing(_load_config(args), args.detections, args.store, trials=args.trials, seed=args.seed)
    for section in ("particles", "baseline"):
        found = result[section]
        print(f"{section}: F1 on {result['split']} {found['f1_before']:.3f} -> {found['f1']:.3f} "
              f"with {found['settings']}")
    if args.write:
        print(f"written into {write_settings(args.write, result)}")


def cmd_label_candidates(args) -> None:
    from holopipe.core.device import array_mover
    from holopipe.evaluation.labels import write_candidates

    config = _load_config(args)
    write_candidates(config, args.split, args.store, args.unet, args.baseline, args.candidates,
                     to_device=array_mover(config["labels"]["device"], "labels.device"))


def cmd_label(args) -> None:
    from holopipe.evaluation.label_app import serve

    candidates = args.candidates or Path("results") / "labels" / args.split / "candidates"
    labels = args.labels or Path("labels") / args.split
    serve(candidates, labels, labeller=args.labeller, host=args.host, port=args.port)


def _key_values(pairs: list[str], flag: str) -> dict:
    """['test=a.csv', ...] -> {'test': 'a.csv'}; a malformed pair is an error naming the flag."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag} expects KEY=PATH, got {pair!r}")
        parsed[key] = value
    return parsed


def cmd_evaluate(args) -> None:
    from holopipe.evaluation.evaluate import evaluate_files, summary

    predictions: dict = {}
    for key, path in _key_values(args.prediction, "--prediction").items():
        method, sep, split = key.partition(":")
        if not sep:
            raise ValueError(f"--prediction expects METHOD:SPLIT=PATH, got {key}={path}")
        predictions.setdefault(method, {})[split] = path
    labels = {split: (path, []) for split, path in _key_values(args.candidates, "--candidates").items()}
    for pair in args.labels:  # several label files per split: not a dict of pairs
        split, _, path = pair.partition("=")
        if not path or split not in labels:
            raise ValueError(f"--labels expects SPLIT=CSV for a split given in --candidates, got {pair!r}")
        labels[split][1].append(path)
    truth = _key_values(args.truth, "--truth")
    evaluate_files(_load_config(args), truth, predictions, args.metrics, args.plots, labels=labels)
    print(summary(args.metrics, list(truth)))


def cmd_provenance(args) -> None:
    from holopipe.core.provenance import write_summary

    write_summary(args.records, _load_config(args), args.out_dir)


def cmd_graphs(args) -> None:
    from holopipe.run.report import write_graphs

    write_graphs(args.snakefile, args.configfile, args.targets, args.out_dir)


def cmd_report(args) -> None:
    from holopipe.run.report import write_report

    write_report(args.snakefile, args.configfile, args.targets, args.out)


def cmd_config_reference(args) -> None:
    from holopipe.run.config_reference import config_reference_markdown, update_readme_reference

    if args.readme:
        changed = update_readme_reference(args.readme)
        log.info("%s: configuration reference %s", args.readme, "updated" if changed else "already current")
    else:
        print(config_reference_markdown())


@dataclass(frozen=True)
class FileOption:
    """An option naming files its stage reads or writes: the one declaration that both the provenance record
    (:func:`declared_reads`, :func:`declared_writes`) and the Snakemake rule's command (:func:`rule_command`)
    come from, so that the two cannot drift apart."""

    flag: str
    dest: str
    path_of: Callable[[str], str]  # the path an argument names: itself, or the PATH of KEY=PATH

    def paths(self, args) -> list:
        """The paths it holds in `args` (one, a list, or lists of a repeated option; none when not given)."""
        def flat(value) -> list:
            if isinstance(value, list):
                return [path for item in value for path in flat(item)]
            return [self.path_of(value)] if value else []

        return flat(getattr(args, self.dest, None))


def _as_given(argument: str) -> str:
    return argument


def _pair_path(argument: str) -> str:
    """KEY=PATH -> PATH."""
    return argument.partition("=")[2]


def _declare_file(parser: argparse.ArgumentParser, role: str, flag: str, path_of, options: dict) -> None:
    action = parser.add_argument(flag, **options)
    parser.set_defaults(**{role: (*(parser.get_default(role) or ()), FileOption(flag, action.dest, path_of))})


def _reads(parser: argparse.ArgumentParser, flag: str, *, path_of=_as_given, **options) -> None:
    """Add an option naming files the stage reads (argparse's add_argument otherwise)."""
    _declare_file(parser, "reads", flag, path_of, options)


def _writes(parser: argparse.ArgumentParser, flag: str, *, path_of=_as_given, **options) -> None:
    """Add an option naming files (or a directory) the stage writes (argparse's add_argument otherwise)."""
    _declare_file(parser, "writes", flag, path_of, options)


def _declared(args, role: str) -> list:
    paths = [path for option in getattr(args, role, ()) for path in option.paths(args)]
    implied = getattr(args, f"implied_{role}", None)  # set_defaults(implied_reads=...): files no option names
    return paths + (implied(args) if implied else [])


def declared_reads(args) -> list:
    """The paths a parsed command reads, as its provenance record lists them: its read options' values, then
    what it reads that no option names (a file split's source)."""
    return _declared(args, "reads")


def declared_writes(args) -> list:
    """The paths a parsed command writes: its write options' values, then what it writes beside them (the
    background image beside stats.json)."""
    return _declared(args, "writes")


def _acquire_source(args) -> list:
    """A file split's source file; a simulated or downloaded split reads nothing but its config."""
    spec = _load_config(args)["splits"].get(args.split, {})
    return [spec["path"]] if spec.get("source") == "file" else []


def _stats_background(args) -> list:
    """The median background image written beside stats.json when there is one (known once stats.json is
    written: before the stage runs, none)."""
    if not Path(args.stats).is_file():
        return []
    background = json.loads(Path(args.stats).read_text()).get("background_file")
    return [Path(args.stats).parent / background] if background else []


def _add_snakemake_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snakefile", required=True, help="the workflow's Snakefile")
    _reads(parser, "--configfile", required=True, help="the run's resolved config (provenance config.yaml)")
    parser.add_argument("--targets", nargs="+", default=["all"], help="Snakemake targets (default: all)")


def _add_training_data(parser: argparse.ArgumentParser) -> None:
    _reads(parser, "--train", required=True, help="examples store of the training split")
    _reads(parser, "--valid", required=True, help="examples store of the validation split")
    _reads(parser, "--stats", required=True, help="stats.json of the standardization")


def _add_config_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="config YAML")
    source.add_argument("--config-json", help="config as JSON (what the Snakemake rules pass)")


def build_parser() -> argparse.ArgumentParser:
    """Every stage and its options; the options naming files are declared with :func:`_reads` or :func:`_writes`,
    whence the provenance record's inputs and outputs and the rules' commands."""
    parser = argparse.ArgumentParser(prog="holopipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"holopipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--provenance", metavar="JSON",
                        help="after success, write the run's provenance record here (see holopipe.core.provenance)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for every pool of the stage (torch, FFTs, dask, I/O); default: the job's "
                             "allocation (OMP_NUM_THREADS, set by Snakemake and PBS, or PBS's NCPUS), else the "
                             "CPUs this process may use")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    simulate = stages.add_parser("simulate", help="write synthetic HOLODEC holograms to netCDF")
    _writes(simulate, "--out", required=True, help="output netCDF file")
    simulate.add_argument("--n-holograms", type=int, required=True)
    simulate.add_argument("--seed", type=int, required=True)
    _reads(simulate, "--config", help="config YAML whose optics and simulate sections to use")
    for flag, (key, kind, default) in OPTICS_FLAGS.items():
        simulate.add_argument(flag, type=kind, help=f"optics.{key} (default without --config: {default})")
    simulate.add_argument("--particles", type=int, nargs=2, metavar=("MIN", "MAX"),
                          help="particles per hologram")
    simulate.add_argument("--method", choices=["angular_spectrum", "fraunhofer"])
    simulate.add_argument("--pad", type=int, help="background pixels added on each side")
    simulate.add_argument("--slab-thickness", type=float, help="metres")
    simulate.add_argument("--no-noise", action="store_true", help="noise-free camera")
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(func=cmd_simulate)

    acquire = stages.add_parser("acquire", help="bring one split's holograms to data/raw/{split}.nc")
    acquire.add_argument("--split", required=True)
    _writes(acquire, "--out", dest="raw", required=True, help="the split's HOLODEC netCDF file")
    acquire.add_argument("--ideal-sensor", action="store_true",
                         help="simulate without the camera (noise-free float32 images): for the split that "
                              "augmentation corrupts, so the camera is added once")
    _add_config_source(acquire)
    acquire.set_defaults(func=cmd_acquire, implied_reads=_acquire_source)

    regrid = stages.add_parser("regrid", help="resample a split to the training grid (zarr)")
    _reads(regrid, "--in", dest="raw", required=True, help="HOLODEC netCDF or zarr store")
    _writes(regrid, "--out", dest="store", required=True, help="output zarr store")
    _add_config_source(regrid)
    regrid.set_defaults(func=cmd_regrid)

    augment = stages.add_parser("augment", help="corrupt clean training holograms into realistic ones")
    _reads(augment, "--in", dest="regridded", required=True, help="regridded training zarr store")
    _writes(augment, "--out", dest="store", required=True, help="output zarr store")
    _writes(augment, "--gallery", help="PNG of clean vs corrupted holograms")
    _add_config_source(augment)
    augment.set_defaults(func=cmd_augment)

    standardize = stages.add_parser("standardize", help="fit statistics on train, apply to a split")
    steps = standardize.add_subparsers(dest="step", required=True, metavar="STEP")
    fit = steps.add_parser("fit", help="fit statistics on the training split")
    _reads(fit, "--in", dest="store", required=True, help="training zarr store")
    _writes(fit, "--out", dest="stats", required=True, help="stats.json")
    _add_config_source(fit)
    fit.set_defaults(func=cmd_standardize_fit, implied_writes=_stats_background)
    apply = steps.add_parser("apply", help="apply fitted statistics to one split")
    _reads(apply, "--in", dest="store", required=True, help="zarr store of the split")
    _reads(apply, "--stats", required=True, help="stats.json from `standardize fit`")
    _writes(apply, "--out", dest="standardized", required=True, help="output zarr store")
    apply.add_argument("--device", default="cpu",
                       help="where the holograms are standardized (standardize.device: cpu, auto, cuda, cuda:N)")
    apply.set_defaults(func=cmd_standardize_apply)

    examples = stages.add_parser("examples", help="cut training tiles and masks from reconstructed planes")
    _reads(examples, "--in", dest="store", required=True, help="standardized zarr store")
    _writes(examples, "--out", dest="examples", required=True, help="output zarr store")
    examples.add_argument("--split", required=True,
                          help="the split's name: it picks the random stream, so splits never share tile draws")
    _add_config_source(examples)
    examples.set_defaults(func=cmd_examples)

    tune = stages.add_parser("tune", help="Optuna hyperparameter trials")
    tune_steps = tune.add_subparsers(dest="step", required=True, metavar="STEP")
    study = tune_steps.add_parser("study", help="create the study of this config and these examples and stats")
    _writes(study, "--study", required=True,
            help="study file to write: a fresh journal, or with tune.storage a record of the database")
    _add_training_data(study)
    _add_config_source(study)
    study.set_defaults(func=cmd_tune_study)
    worker = tune_steps.add_parser("worker", help="run trials until the study has tune.n_trials finished")
    worker.add_argument("--worker", type=int, required=True, help="worker number (recorded with its trials)")
    _add_training_data(worker)
    _reads(worker, "--study", required=True, help="study file from `tune study` (refused if of other data)")
    worker.add_argument("--workdir", required=True, help="directory of the trials' outputs (trials/<study>/N)")
    _add_config_source(worker)
    worker.set_defaults(func=cmd_tune_worker)
    summary = tune_steps.add_parser("summarize", help="best.yaml, trials CSV and plots of the study")
    _reads(summary, "--study", help="study file from `tune study` (not needed when tune.n_trials is 0)")
    _writes(summary, "--best", required=True, help="best.yaml: the winning values by dotted key")
    _writes(summary, "--trials", required=True, help="trials CSV")
    _writes(summary, "--plots", required=True, help="directory for history/importances/intermediate PNGs")
    _add_config_source(summary)
    summary.set_defaults(func=cmd_tune_summarize)

    train = stages.add_parser("train", help="train the segmentation model")
    _add_training_data(train)
    _reads(train, "--best", help="best.yaml of the tuning; its values override the config")
    _writes(train, "--out", required=True, help="output directory (model.pt, metrics.csv, checkpoint)")
    _add_config_source(train)
    train.set_defaults(func=cmd_train)

    infer = stages.add_parser("infer", help="segment every reconstruction plane of one z chunk of a split")
    _reads(infer, "--model", required=True, help="model.pt from `holopipe train`")
    _reads(infer, "--in", dest="store", required=True, help="standardized zarr store of the split")
    _writes(infer, "--out", dest="detections", required=True, help="detections CSV of this chunk")
    infer.add_argument("--chunk", type=int, default=0, help="which z chunk (0-based)")
    infer.add_argument("--chunks", type=int, default=1, help="how many z chunks the planes are split into")
    _writes(infer, "--probabilities", help="also write the probability volume to this zarr store")
    infer.add_argument("--mem-mb", type=int, help="memory the job was given (MB; the rule's mem_mb): on the CPU a "
                       "plane batch holds no more planes than fit (default: the machine's available memory)")
    _add_config_source(infer)
    infer.set_defaults(func=cmd_infer)

    particles = stages.add_parser("particles", help="merge per-plane detections across z into particles")
    _reads(particles, "--in", dest="detections", nargs="+", required=True, help="detection CSVs of the chunks")
    _writes(particles, "--out", dest="particles", required=True, help="particle CSV (hid, x, y, z, d in µm, prob)")
    _reads(particles, "--store", help="standardized zarr store of the split (refines each particle's depth)")
    _add_config_source(particles)
    particles.set_defaults(func=cmd_particles)

    baseline = stages.add_parser("baseline", help="physics-only particle finding on the same planes")
    _reads(baseline, "--in", dest="store", required=True, help="standardized zarr store of the split")
    _writes(baseline, "--out", dest="particles", required=True, help="particle CSV (hid, x, y, z, d in µm, score)")
    baseline.add_argument("--detections", action="store_true",
                          help="write the physics detector's per-plane detections instead (inference's CSV "
                               "columns, for `holopipe particles`: the ablation that runs physics through the "
                               "U-Net's particles stage)")
    _add_config_source(baseline)
    baseline.set_defaults(func=cmd_baseline)

    evaluate = stages.add_parser("evaluate", help="match particles to the truth; metrics and plots")
    _reads(evaluate, "--truth", path_of=_pair_path, nargs="+", required=True, metavar="SPLIT=STORE",
           help="store holding each split's true particles")
    _reads(evaluate, "--prediction", path_of=_pair_path, nargs="+", required=True, metavar="METHOD:SPLIT=CSV",
           help="particle CSV of each method and split")
    _writes(evaluate, "--out", dest="metrics", required=True,
            help="metrics.json of the primary split (test, else the first); every other split's goes to <its "
                 "folder>/<split>/metrics.json")
    _writes(evaluate, "--plots", required=True, help="directory for the evaluation plots")
    _reads(evaluate, "--candidates", path_of=_pair_path, nargs="*", default=[], metavar="SPLIT=DIR",
           help="candidates directory of each split with hand labels (holopipe label-candidates)")
    _reads(evaluate, "--labels", path_of=_pair_path, nargs="*", default=[], metavar="SPLIT=CSV",
           help="label files (labels/<split>/<labeller>.csv), any number per split")
    _add_config_source(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    postprocessing = stages.add_parser(
        "tune-postprocessing", help="choose the particles stage's and the baseline's settings on valid, the same "
                                    "budget for both")
    _reads(postprocessing, "--detections", nargs="+", action="append", required=True,
           help="the U-Net's detection CSVs of the split (its inference chunks); repeat the option for each "
                "trained model whose detections to pool (the accuracy benchmark's runs)")
    _reads(postprocessing, "--store", required=True, help="standardized zarr store of the split (with truth)")
    postprocessing.add_argument("--trials", type=int, default=40, help="trials per method (default: %(default)s)")
    postprocessing.add_argument("--seed", type=int, default=0, help="seed of the search (default: %(default)s)")
    _writes(postprocessing, "--write", metavar="CONFIG_YAML",
            help="write the choice into this config file, in place of its particles: and baseline: blocks")
    _add_config_source(postprocessing)
    postprocessing.set_defaults(func=cmd_tune_postprocessing)

    candidates = stages.add_parser("label-candidates",
                                   help="the union of both methods' particles of a split, with crops, to label by hand")
    candidates.add_argument("--split", required=True, help="the split's name (recorded with the candidates)")
    _reads(candidates, "--store", required=True, help="standardized zarr store of the split (the crops)")
    _reads(candidates, "--unet", required=True, help="the U-Net's particle CSV of the split")
    _reads(candidates, "--baseline", required=True, help="the baseline's particle CSV of the split")
    _writes(candidates, "--out", dest="candidates", required=True,
            help="candidates directory (candidates.csv, crops.zarr, manifest.json)")
    _add_config_source(candidates)
    candidates.set_defaults(func=cmd_label_candidates)

    label = stages.add_parser("label", help="a page on localhost to label a split's candidates by hand (open the "
                                            "URL with ?token= that it prints)")
    label.add_argument("--split", required=True, help="the split whose candidates to label")
    label.add_argument("--labeller", default="anonymous", help="your name: labels go to labels/<split>/<labeller>.csv")
    label.add_argument("--port", type=int, default=8050,
                       help="port (default 8050); through ssh -L, forward the same port number")
    label.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; any other warns)")
    _reads(label, "--candidates", type=Path, help="candidates directory (default results/labels/<split>/candidates)")
    _writes(label, "--labels", type=Path, help="folder of the label files (default labels/<split>)")
    label.set_defaults(func=cmd_label)

    provenance = stages.add_parser("provenance", help="tables of the jobs' provenance records, for the report")
    _reads(provenance, "--records", nargs="+", required=True, help="the jobs' provenance JSON records")
    _writes(provenance, "--out-dir", required=True, help="directory for jobs/files/packages CSV, config.yaml")
    _add_config_source(provenance)
    provenance.set_defaults(func=cmd_provenance)

    graphs = stages.add_parser("graphs", help="the job DAG and rule graph as mermaid (and SVG with graphviz)")
    _add_snakemake_run(graphs)
    _writes(graphs, "--out-dir", required=True, help="directory for dag.mmd, rulegraph.mmd (and .svg)")
    graphs.set_defaults(func=cmd_graphs)

    report = stages.add_parser("report", help="Snakemake's HTML report of a finished run")
    _add_snakemake_run(report)
    _writes(report, "--out", required=True, help="report HTML")
    report.set_defaults(func=cmd_report)

    reference = stages.add_parser("config-reference", help="Markdown reference of every config key (schema)")
    _writes(reference, "--readme", help="rewrite the reference between the markers of this README instead")
    reference.set_defaults(func=cmd_config_reference)
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser of `holopipe WORDS` ("standardize", "apply"). argparse offers no public way to its
    subparsers or options: these helpers read its _actions."""
    for word in words:
        subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        parser = subparsers.choices[word]
    return parser


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> option of every option of a parser, in declaration order."""
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def rule_command(stage: str, *words: str, recorded: bool = True, **values: str | None) -> str:
    """The shell command of the Snakemake rule that runs `holopipe STAGE` ("regrid", "standardize apply"), from
    the stage's declaration: each option naming files it reads passes the rule's ``{input.DEST}``, each naming
    files it writes ``{output.DEST}``, so a rule whose keys differ fails as Snakemake fills the command in.
    `values` gives an option's words instead (a directory whose files the rule lists, pairs made in params),
    None to leave it out, or those of an option naming no file ({wildcards.split}); `words` follow as they are
    (params that hold a whole flag, or nothing). A `recorded` stage writes its provenance record and sizes its
    pools to the rule's threads; a stage that takes --config-json is given the rule's params.config."""
    parser = _subcommand_parser(build_parser(), stage.split())
    options = _options(parser)
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise ValueError(f"holopipe {stage} has no option {', '.join(unknown)}: its options are {', '.join(options)}")
    placeholders = {option.dest: f"{{{directive}.{option.dest}}}"
                    for role, directive in (("reads", "input"), ("writes", "output"))
                    for option in parser.get_default(role) or ()}
    command = ["holopipe", *(["--provenance", "{output.provenance}", "--threads", "{threads}"] if recorded else []),
               *stage.split()]
    for dest, option in options.items():
        value = values.get(dest, placeholders.get(dest))
        if value is not None:
            command += [option.option_strings[0], value]
        elif option.required:
            raise ValueError(f"holopipe {stage} requires {option.option_strings[0]}: give {dest}=...")
    command += words
    if "config_json" in options:
        command += ["--config-json", "{params.config:q}"]
    return " ".join([*command, "> {log} 2>&1"])


def _write_provenance(args, argv: list[str], started: float) -> None:
    from holopipe.core.provenance import job_record, write_record

    has_config = getattr(args, "config_json", None) or getattr(args, "config", None)
    stage = " ".join(filter(None, (args.stage, getattr(args, "step", None))))
    record = job_record(command=["holopipe", *argv], stage=stage, config=_load_config(args) if has_config else None,
                        inputs=declared_reads(args), outputs=declared_writes(args), started=started,
                        finished=time.time())
    write_record(record, args.provenance)
    log.info("provenance: %s", args.provenance)


def _remove_stale_temporaries(args) -> None:
    """Free what a killed run of this command left beside its outputs before anything else: a run that fails
    early would otherwise never reach the write that clears them (:func:`holopipe.core.files.temporary_sibling`)."""
    from holopipe.core.files import remove_stale_temporaries

    for path in [*declared_writes(args), *filter(None, [args.provenance])]:
        for removed in remove_stale_temporaries(path):
            log.info("removed %s, left by a killed run", removed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Masked: this line is the job's log, and a hand-typed --config-json may hold a storage password.
    log.info("holopipe %s: %s", __version__, mask_secrets(" ".join(sys.argv[1:] if argv is None else argv)))
    started = time.time()
    try:
        from holopipe.core.device import job_threads, use_threads

        log.info("CPU threads: %d", use_threads(job_threads(args.threads)))
        _remove_stale_temporaries(args)
        args.func(args)
        if args.provenance:
            _write_provenance(args, sys.argv[1:] if argv is None else argv, started)
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", mask_secrets(str(error)))
        return 1
    log.info("%s finished in %.1f s", args.stage, time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
