"""Parse-time setup: validate the config, so a bad one fails before any job; input and params functions."""

import functools
import glob
import json
import math
import os
import shlex
import shutil
import subprocess
import sys

from snakemake.exceptions import WorkflowError

from holopipe.core.config import (TUNE_RUNTIME_KEYS, ConfigError, check_tiles_fit, load_config, primary_split,
                                  split_simulation_config)
from holopipe.core.credentials import read_password_file
from holopipe.run import resources as cost_model

# The conda envs' post-deploy script installs holopipe from this checkout, wherever the working directory is.
os.environ.setdefault("HOLOPIPE_REPO", workflow.basedir)

# Replace the content, not the object: Snakemake keeps a reference to this dict.
_validated = load_config(config)
config.clear()
config.update(_validated)
check_tiles_fit(config)
for _split, _role in ((TRAIN_SPLIT, "trains"), (VALID_SPLIT, "validates")):
    if _split not in config["splits"]:
        raise ConfigError(
            f"splits: the workflow {_role} on the split named {_split!r}; configured splits are "
            f"{', '.join(config['splits'])}"
        )
if config["tune"]["storage_password_file"] is not None:
    # Read now as well as in the jobs, so that a missing or loose password file fails before any job runs.
    read_password_file(config["tune"]["storage_password_file"], "tune.storage_password_file")
SPLITS = list(config["splits"])
# The workflow graphs come as mermaid always, as SVG too where graphviz is installed.
GRAPH_FORMATS = ["mmd", "svg"] if shutil.which("dot") else ["mmd"]
for _split in config["infer"]["splits"]:
    if _split not in config["splits"]:
        raise ConfigError(f"infer.splits: {_split!r} is not a configured split ({', '.join(SPLITS)})")


STAGE_TARGETS = set()
"""Rules that only collect a per-split stage's outputs (`snakemake examples`) and run no job themselves."""


def stage_target(stage, job_rule, files):
    """Input of a stage's target rule. `--forcerun examples` alone would force nothing (the target has no
    job), so it stops with what to type instead: the rule of the stage's jobs. Next to a job rule, as in
    `--forcerun regrid_split examples`, the stage name is the run's target, as Snakemake reads it."""
    STAGE_TARGETS.add(stage)

    def files_of_stage(wildcards):
        forced = set(getattr(workflow.dag_settings, "forcerun", ()))
        if stage in forced and forced <= STAGE_TARGETS:
            raise WorkflowError(
                f"--forcerun {stage}: {stage!r} is the target that collects the stage's outputs and runs "
                f"nothing itself; rerun the stage's jobs and what follows with --forcerun {job_rule}"
            )
        return files

    return files_of_stage


def stage_config(*sections, split=None, **keys):
    """JSON of only the config a stage reads: optics, one split's spec, whole `sections`, and single keys
    (`examples=["tile_size"]`), so that Snakemake reruns a stage when, and only when, what it reads
    changes. The command fills in defaults for everything left out."""
    splits = {split: config["splits"][split]} if split else {TRAIN_SPLIT: config["splits"][TRAIN_SPLIT]}
    chosen = {"splits": splits, "optics": config["optics"]}
    chosen.update({section: config[section] for section in sections})
    chosen.update({section: {key: config[section][key] for key in names} for section, names in keys.items()})
    return json.dumps(chosen, sort_keys=True)


def standardize_stats_files():
    """stats.json: the training split's contrast scale and the standardize settings every split is applied with
    (backgrounds are per hologram, so there is no image beside it)."""
    return {"stats": "data/standardized/stats.json"}


EXAMPLE_STORES = [f"data/examples/{split}.zarr" for split in (TRAIN_SPLIT, VALID_SPLIT)]
"""Examples are cut only from the splits that training and validation read."""


def training_inputs(wildcards):
    """The examples a model learns from and is validated on, and the statistics that scale its inputs."""
    return {
        "train": EXAMPLE_STORES[0],
        "valid": EXAMPLE_STORES[1],
        "stats": "data/standardized/stats.json",
    }


def tune_worker_flags():
    """One flag per tuning worker; none when tuning is off (then best.yaml is empty)."""
    if config["tune"]["n_trials"] == 0:
        return []
    return expand("results/tune/workers/{worker}.done", worker=range(config["tune"]["workers"]))


TUNE_STUDY = "results/tune/study.json"
"""The study file tune_study writes: the study's name, the data digests it was named from, its storage."""


def tune_journal():
    """The study's Optuna journal beside TUNE_STUDY (none with tune.storage: the study is in the database).
    Declared, so that a new study starts in a fresh one; the workers append to it, so they take it as
    ancient() and TUNE_STUDY, which nothing rewrites, tells Snakemake when the study was made anew."""
    return [] if config["tune"]["storage"] is not None else ["results/tune/study.journal"]


def tune_study_inputs(wildcards):
    """A worker's study: the study file, and the journal as ancient (its own appends must not rerun it)."""
    return {"study": TUNE_STUDY, **{"journal": ancient(path) for path in tune_journal()}}


def tune_sections():
    """Config sections the trials read: the model, training and examples, the tuning, and each section
    tune.search_space tunes a key of (its study's name hashes them all)."""
    tuned = {key.split(".")[0] for key in config["tune"]["search_space"]}
    return sorted({"model", "train", "examples", "tune"} | tuned)


def get_tune_config(wildcards):
    """The config a tuning worker and the summary read, as JSON."""
    return stage_config(*tune_sections())


def get_tune_study_config(wildcards):
    """The config of tune_study: what names the study, and tune.storage. Not how the search runs
    (TUNE_RUNTIME_KEYS), so raising n_trials or adding workers continues the study instead of starting one."""
    tune_keys = [key for key in config["tune"] if key not in TUNE_RUNTIME_KEYS]
    return stage_config(*(section for section in tune_sections() if section != "tune"), tune=tune_keys)


def get_tune_summary_study():
    """The summary reads the study file and journal, unless tuning is off (tune.n_trials 0: no study)."""
    return [] if config["tune"]["n_trials"] == 0 else [TUNE_STUDY, *tune_journal()]


def tune_study_flag(wildcards):
    """` --study FILE` for the summary; none with tuning off."""
    return f" --study {TUNE_STUDY}" if config["tune"]["n_trials"] > 0 else ""


def infer_outputs():
    """A chunk's detections, and its probability volume when infer.save_probabilities asks for it."""
    outputs = {"detections": "results/inference/{split}/chunk_{chunk}.csv"}
    if config["infer"]["save_probabilities"]:
        outputs["probabilities"] = directory("results/inference/{split}/probabilities_{chunk}.zarr")
    return outputs


def probabilities_flag(wildcards, output):
    return f"--probabilities {output.probabilities}" if config["infer"]["save_probabilities"] else ""


def evaluation_pairs(pattern, methods=None):
    """Command-line pairs SPLIT=PATH (or METHOD:SPLIT=PATH) for every evaluated split."""
    splits = config["infer"]["splits"]
    if methods is None:
        return " ".join(f"{split}={pattern.format(split=split)}" for split in splits)
    return " ".join(
        f"{method}:{split}={pattern.format(split=split, method=method)}" for method in methods for split in splits
    )


def evaluation_split_metrics():
    """The metrics files evaluate writes beside metrics.json: one per evaluated split but the primary one."""
    splits = config["infer"]["splits"]
    return [f"results/evaluation/{split}/metrics.json" for split in splits if split != primary_split(splits)]


def get_label_files(wildcards):
    """The label files in labels/<split>/ of every evaluated split, listed when the DAG is built, so that a
    new one (or one changed since the evaluation) reruns evaluate."""
    return sorted(path for split in config["infer"]["splits"] for path in glob.glob(f"labels/{split}/*.csv"))


def label_flags(wildcards, input):
    """` --labels SPLIT=CSV ...` for the label files evaluate takes (the split is the file's folder); none without."""
    pairs = [shlex.quote(f"{os.path.basename(os.path.dirname(path))}={path}") for path in input.labels]
    return " --labels " + " ".join(pairs) if pairs else ""


def get_standardize_input(wildcards):
    """The training split is standardized after augmentation; the others straight from regridding."""
    if wildcards.split == TRAIN_SPLIT:
        return f"data/augmented/{TRAIN_SPLIT}.zarr"
    return f"data/regridded/{wildcards.split}.zarr"


def get_acquire_input(wildcards):
    """A file split's source, so that Snakemake checks it exists and reruns the split when it changes."""
    spec = config["splits"][wildcards.split]
    return [spec["path"]] if spec["source"] == "file" else []


def get_acquire_config(wildcards):
    """Only the config that acquiring this split reads, as JSON: other changes must not rerun it."""
    source = config["splits"][wildcards.split]["source"]
    sections = {"simulate": ["simulate"], "url": ["acquire"]}.get(source, [])
    return stage_config(*sections, split=wildcards.split)


def acquire_sensor_flag(wildcards):
    """The training split is simulated with an ideal sensor: augmentation adds the camera (noise, beam, 8 bits)."""
    return " --ideal-sensor" if wildcards.split == TRAIN_SPLIT else ""


def provenance_records(wildcards):
    """The provenance record of every job of the whole workflow, whatever the config's splits and counts."""
    infer_splits, chunks = config["infer"]["splits"], range(config["infer"]["chunks"])
    records = [
        rules.augment.output.provenance,
        rules.standardize_fit.output.provenance,
        rules.tune.output.provenance,
        rules.train.output.provenance,
        rules.evaluate.output.provenance,
    ]
    used_splits = list(dict.fromkeys([TRAIN_SPLIT, VALID_SPLIT, *infer_splits]))  # not splits nothing reads
    for per_split in (rules.acquire_split, rules.regrid_split, rules.standardize_split):
        records += expand(per_split.output.provenance, split=used_splits)
    records += expand(rules.examples_split.output.provenance, split=(TRAIN_SPLIT, VALID_SPLIT))
    if config["tune"]["n_trials"] > 0:
        records.append(rules.tune_study.output.provenance)
        records += expand(rules.tune_worker.output.provenance, worker=range(config["tune"]["workers"]))
    records += expand(rules.infer_chunk.output.provenance, split=infer_splits, chunk=chunks)
    for per_split in (rules.particles_split, rules.baseline_split, rules.label_candidates):
        records += expand(per_split.output.provenance, split=infer_splits)
    return records


# Resources: the cost model is holopipe.run.resources (memory and walltime as functions of the frame, the planes,
# the holograms and the attempt). These input functions gather its numbers from the config and the splits.

TRAIN_THREADS = max(2, config["train"]["num_workers"] + 1)
"""CPUs of a training job (and of each trial a tuning worker runs): one per DataLoader worker, one for the loop."""


@functools.cache
def split_source(split):
    """(nx, ny, dx, dy, holograms) of a split as acquired. A file split's own header (dimensions and
    attributes only, no image), capped at max_holograms; a simulated or downloaded split has the
    configured optics, and a url split without max_holograms cost_model.URL_HOLOGRAMS_BOUND holograms."""
    spec, optics = config["splits"][split], config["optics"]
    frame = (optics["nx"], optics["ny"], optics["dx"], optics["dy"])
    if spec["source"] == "simulate":
        return (*frame, spec["n_holograms"])
    holograms = cost_model.URL_HOLOGRAMS_BOUND
    if spec["source"] == "file" and os.path.exists(spec["path"]):
        import xarray as xr

        with xr.open_dataset(spec["path"], decode_cf=False, cache=False) as header:
            holograms = header.sizes["hologram_number"]
            frame = (header.sizes["xsize"], header.sizes["ysize"], float(header.attrs.get("dx", optics["dx"])),
                     float(header.attrs.get("dy", optics["dy"])))
    return (*frame, min(holograms, spec.get("max_holograms", holograms)))


def split_holograms(split):
    """Holograms in a split's stores after acquisition; the training split's augmented variants included."""
    holograms = split_source(split)[4]
    return holograms * config["augment"]["variants"] if split == TRAIN_SPLIT else holograms


def frame_pixels(split, padding=0):
    """Pixels of a split's regridded frame, with `padding` pixels added on each side."""
    nx, ny, dx, dy, _ = split_source(split)
    return cost_model.regridded_frame_pixels(config, nx, ny, dx, dy, padding)


def padded_pixels(split):
    """Pixels of the frame a reconstruction propagates: regridded, plus reconstruction.pad on each side."""
    return frame_pixels(split, config["reconstruction"]["pad"])


def largest_frame_pixels():
    return max(frame_pixels(split) for split in SPLITS)


def frame_mem_mb(bytes_per_pixel, holograms_in_memory=1, libraries_mb=cost_model.PYTHON_LIBRARIES_MB):
    """`libraries_mb` plus `bytes_per_pixel` for each pixel of the regridded frames held at once (the
    largest split's frame), for rules that run once over every split."""
    return cost_model.memory_mb(bytes_per_pixel * largest_frame_pixels() * holograms_in_memory,
                                libraries_mb=libraries_mb)


def device_kind(section):
    """'cpu' or 'gpu': the device a stage's jobs compute on, as the cost model reads it."""
    return cost_model.device_kind(config, section)


def gpus(section):
    """GPUs a stage's job asks for (torch, or CuPy for data preparation): one, unless `<section>.device` pins
    the stage to the CPU."""
    return int(device_kind(section) == "gpu")


def get_acquire_gpus(wildcards):
    """A simulated split's job asks for one GPU unless its simulate.device (the split's own where it sets one)
    is cpu; a copied or downloaded split asks for none."""
    if config["splits"][wildcards.split]["source"] != "simulate":
        return 0
    return int(split_simulation_config(config, wildcards.split)["simulate"]["device"] != "cpu")


def planes_per_chunk():
    return math.ceil(config["reconstruction"]["z_bins"] / config["infer"]["chunks"])


def epoch_tile_pixels():
    return cost_model.epoch_tile_pixels(config, split_holograms(TRAIN_SPLIT) + split_holograms(VALID_SPLIT))


def get_acquire_mem_mb(wildcards, attempt):
    nx, ny, _, _, _ = split_source(wildcards.split)
    return cost_model.acquire_mem_mb(nx, ny, config["simulate"]["pad"], attempt)


def get_acquire_runtime(wildcards, attempt):
    nx, ny, _, _, holograms = split_source(wildcards.split)
    if config["splits"][wildcards.split]["source"] != "simulate":
        return cost_model.copy_runtime_min(nx * ny, holograms, attempt)
    slabs = cost_model.simulation_slabs(config)
    return cost_model.simulate_runtime_min(nx, ny, holograms, slabs, config["simulate"]["pad"], attempt)


def get_regrid_mem_mb(wildcards, attempt):
    nx, ny, _, _, _ = split_source(wildcards.split)
    return cost_model.regrid_mem_mb(nx * ny, frame_pixels(wildcards.split), attempt)


def get_regrid_runtime(wildcards, attempt):
    """The split as acquired: the training split's augmented variants come after."""
    nx, ny, _, _, holograms = split_source(wildcards.split)
    return cost_model.regrid_runtime_min(nx * ny, frame_pixels(wildcards.split), holograms, attempt)


def get_augment_mem_mb(wildcards, attempt):
    return cost_model.augment_mem_mb(frame_pixels(TRAIN_SPLIT), padded_pixels(TRAIN_SPLIT), attempt)


def get_augment_runtime(wildcards, attempt):
    return cost_model.augment_runtime_min(frame_pixels(TRAIN_SPLIT), split_holograms(TRAIN_SPLIT), attempt)


def get_standardize_runtime(wildcards, attempt):
    """Applying the standardization to a split, or fitting it (no split: the training split)."""
    split = getattr(wildcards, "split", TRAIN_SPLIT)
    nx, ny, dx, dy, _ = split_source(split)
    return cost_model.standardize_runtime_min(frame_pixels(split), split_holograms(split), attempt,
                                              cost_model.window_grid_pixels(config, nx, ny, dx, dy),
                                              device_kind("standardize"))


def get_examples_mem_mb(wildcards, attempt):
    return cost_model.examples_mem_mb(padded_pixels(wildcards.split), attempt)


def get_examples_runtime(wildcards, attempt):
    examples = config["examples"]
    planes = examples["positives_per_hologram"] + examples["negatives_per_hologram"]
    split = wildcards.split
    return cost_model.examples_runtime_min(padded_pixels(split), split_holograms(split), planes, attempt)


def get_train_mem_mb(wildcards, attempt):
    """One training process, at the largest batch a tuning trial may draw too."""
    batch_size, tile_size = cost_model.largest_batch_size(config), config["examples"]["tile_size"]
    return cost_model.train_mem_mb(device_kind("train"), batch_size, tile_size, attempt)


def get_tune_worker_mem_mb(wildcards, attempt):
    """A tuning worker runs tune.trials_per_gpu training processes at once."""
    return config["tune"]["trials_per_gpu"] * get_train_mem_mb(wildcards, attempt)


def get_train_runtime(wildcards, attempt):
    return cost_model.train_runtime_min(config["train"]["epochs"], epoch_tile_pixels(), device_kind("train"), attempt)


def get_tune_worker_runtime(wildcards, attempt):
    tune = config["tune"]
    return cost_model.tune_worker_runtime_min(tune["n_trials"], tune["workers"], tune["epochs"], epoch_tile_pixels(),
                                              device_kind("train"), attempt)


def get_infer_mem_mb(wildcards, attempt):
    """infer.device says on which host the job runs; with auto it may be the CPU (cost_model.infer_mem_mb)."""
    split = wildcards.split
    return cost_model.infer_mem_mb(frame_pixels(split), padded_pixels(split), config["infer"]["batch_planes"],
                                   device_kind("infer"), attempt, auto=config["infer"]["device"] == "auto")


def get_infer_runtime(wildcards, attempt):
    split = wildcards.split
    return cost_model.infer_runtime_min(padded_pixels(split), split_holograms(split), planes_per_chunk(),
                                        device_kind("infer"), attempt)


def get_particles_mem_mb(wildcards, attempt):
    return cost_model.sweep_mem_mb(padded_pixels(wildcards.split), attempt)


def get_particles_runtime(wildcards, attempt):
    """The refinement reconstructs up to every plane of every hologram again, on particles.device."""
    return sweep_runtime(wildcards.split, "particles", attempt)


def get_baseline_mem_mb(wildcards, attempt):
    return cost_model.sweep_mem_mb(padded_pixels(wildcards.split), attempt)


def get_baseline_runtime(wildcards, attempt):
    """Every plane of every hologram, reconstructed and thresholded on baseline.device."""
    return sweep_runtime(wildcards.split, "baseline", attempt)


def get_label_candidates_mem_mb(wildcards, attempt):
    return cost_model.label_candidates_mem_mb(padded_pixels(wildcards.split), device_kind("labels"), attempt)


def get_label_candidates_runtime(wildcards, attempt):
    """Every plane of every hologram, on labels.device. Only the planes within 3 of a candidate are
    reconstructed, but candidates are the union of both methods' particles, unknown before they run and not
    few: with c per hologram spread over Z planes, a fraction 1 - (1 - 7/Z)^c of the planes is needed, 97 %
    for HOLODEC's 500 droplets in 1000 planes."""
    return sweep_runtime(wildcards.split, "labels", attempt)


def sweep_runtime(split, section, attempt):
    """Every plane of every hologram of `split`, on the device `<section>.device` names."""
    planes = config["reconstruction"]["z_bins"]
    return cost_model.sweep_runtime_min(padded_pixels(split), split_holograms(split), planes, device_kind(section),
                                        attempt)


def pbs_submit_command():
    """The profile's submit command as a list when it is profiles/pbs/pbs-submit.py, else None (no PBS)."""
    submit = (getattr(workflow.executor_settings, "submit_cmd", None) or "").split()
    return submit if submit and os.path.basename(submit[0]) == "pbs-submit.py" else None


def remote_jobs():
    """The jobs of this run that go to the cluster (not localrules)."""
    return [job for job in workflow.dag.needrun_jobs() if not job.is_local]


def pbs_jobs():
    """The PBS jobs this run submits: each remote job, the jobs of a group as the one job they share."""
    return list(dict.fromkeys(workflow.dag.get_job_group(job) or job for job in remote_jobs()))


def pbs_account_problem():
    """Why the PBS profile cannot submit this run's jobs, or None. Every qsub needs an account (-A), so a
    missing one stops the run here, once, before the first submission, rather than inside every job's
    error report. Asks profiles/pbs/pbs-submit.py, the one home of where the account comes from, unless
    each job to submit names its own pbs_account resource."""
    submit = pbs_submit_command()
    if submit is None or all(job.resources.get("pbs_account") for job in remote_jobs()):
        return None
    check = subprocess.run([*submit, "--check-account"], capture_output=True, text=True)
    if check.returncode == 0:
        return None
    return check.stderr.strip() or f"{shlex.join(submit)} --check-account failed (exit {check.returncode})"


def runtime_remedy(rule, wildcards):
    """The config that shortens a job of `rule`, as the walltime check names it."""
    split = wildcards.get("split", TRAIN_SPLIT)
    holograms = f"fewer holograms in splits.{split} (n_holograms, or max_holograms of a file or url split)"
    remedies = {
        "augment": f"fewer augment.variants (now {config['augment']['variants']}) or {holograms}",
        "tune_worker": f"more tune.workers (now {config['tune']['workers']}) or fewer tune.epochs "
        f"(now {config['tune']['epochs']})",
        "train": f"fewer train.epochs (now {config['train']['epochs']})",
        "infer_chunk": f"more infer.chunks (now {config['infer']['chunks']})",
        "label_candidates": f"labels.device on a GPU (now {config['labels']['device']}) or {holograms}",
    }
    return remedies.get(rule, holograms)


def pbs_walltime_job(job):
    """What pbs-submit.py --check-walltime reads of one PBS job: its name, the resources that choose its
    queue and walltime, and what to change to shorten it."""
    resources = {key: job.resources[key] for key in ("runtime", "gpu", "pbs_queue", "pbs_gpu_queue")
                 if key in job.resources.keys()}
    if job.is_group():
        members = sorted({member.rule.name for member in job.jobs})
        remedies = sorted({runtime_remedy(member.rule.name, member.wildcards_dict) for member in job.jobs})
        return {"name": f"group {job.groupid} ({', '.join(members)}, one after another)", "resources": resources,
                "remedy": "Submit its rules as separate jobs (a copy of profiles/pbs without `groups:`), or "
                + "; or ".join(remedies)}
    wildcards = ", ".join(f"{key}={value}" for key, value in job.wildcards_dict.items())
    return {"name": job.rule.name + (f" ({wildcards})" if wildcards else ""), "resources": resources,
            "remedy": f"Shorten it with {runtime_remedy(job.rule.name, job.wildcards_dict)}, or, where it runs "
            f"faster than estimated, --set-resources {job.rule.name}:runtime=MINUTES"}


def pbs_walltime_problem():
    """Why some PBS job of this run would be refused by its queue, or None: qsub refuses a walltime above the
    queue's limit, and a retry could never ask for more. Asks profiles/pbs/pbs-submit.py, the one home of the
    queues and their limits (profiles/pbs/queues.yaml), before the first submission, naming every such job."""
    submit = pbs_submit_command()
    if submit is None:
        return None
    jobs = json.dumps([pbs_walltime_job(job) for job in pbs_jobs()])
    check = subprocess.run([*submit, "--check-walltime"], input=jobs, capture_output=True, text=True)
    if check.returncode == 0:
        return None
    return check.stderr.strip() or f"{shlex.join(submit)} --check-walltime failed (exit {check.returncode})"


onstart:
    problem = pbs_account_problem() or pbs_walltime_problem()
    if problem:
        sys.exit(problem)
