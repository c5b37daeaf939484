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

from holopipe.core.config import ConfigError, check_tiles_fit, load_config, primary_split, split_simulation_config
from holopipe.core.credentials import read_password_file

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


TUNE_RUNTIME_KEYS = ("n_trials", "workers", "trials_per_gpu", "heartbeat")
"""How the search runs, not what it finds: left out of the study's identity (holopipe.ml.tune.study_name)."""

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


# Resources: functions of the data and of the attempt. A job's memory and walltime follow from the frame it
# holds (after regridding, plus the reconstruction padding where it propagates), the planes it
# reconstructs, the holograms of its split and `attempt` (Snakemake passes it to resource functions: a
# job killed at its walltime or memory limit and resubmitted by `retries` asks for more).

PYTHON_LIBRARIES_MB = 512
"""Resident memory of Python, numpy, xarray and dask before any frame."""
TORCH_LIBRARIES_MB = 1536
"""The same for a job that imports torch: `import torch` alone is 650 MB, and `holopipe infer` on the
embedded default peaks at 1.4 GB (measured with /usr/bin/time -v)."""

# Inference's host memory, measured on a CPU by benchmarks/bench_infer_memory.py (fp32, plain_unet width 16
# and LinkNet/ResNet-18): C + a·P + batch_planes·(p·P + m·N), P the padded pixels, N the frame's. holopipe.detect.infer
# sizes its plane batches to the job's --mem-mb by the same figures (its INFER_* constants; a test keeps them equal).
INFER_LIBRARIES_MB = 1100
"""C: torch and the model."""
INFER_BYTES_PER_PADDED_PIXEL = 40
"""a: the hologram's spectrum and transfer function, once."""
INFER_BYTES_PER_PADDED_PIXEL_PLANE = 30
"""p: per plane of a batch, the propagated field and its amplitude and phase."""
INFER_BYTES_PER_PIXEL_PLANE = {"cpu": 470, "gpu": 8}
"""m: per frame pixel per plane of a batch: on a CPU the model's activations (470 B measured; a full
HOLODEC frame needs 9.3 GB per plane); on a GPU they stay in the GPU's memory and the host receives the
plane's probability and amplitude (8 B, assumed)."""

URL_HOLOGRAMS_BOUND = 600
"""Holograms assumed for a url split without max_holograms, whose count is known only once downloaded:
NCAR's real hour-long files hold about 560 (CSET RF07 20:00-21:00 holds 559)."""

# Seconds of work per unit. CPU figures are per job on this project's 2-core node (threads 2); GPU figures
# are assumed rates for one A100/H100-class GPU, with the CPU rates as the fallback when the config pins a
# stage to the CPU (`<section>.device: cpu`). Each runtime is RUNTIME_MARGIN times the estimate plus
# RUNTIME_FLOOR_MIN minutes of start-up (imports, opening stores), times the attempt.
SECONDS_PER_PADDED_PIXEL_SLAB = 1e-7
"""Simulation, per hologram per z slab (benchmarks/bench_simulate.py: 0.04 µs; 24 s per full-size hologram)."""
SECONDS_PER_PIXEL_COPY = 2e-8
"""Validating and copying a file split, regridding, standardizing: per pixel per hologram (a few passes over
the frame; resampling by matrix products on both axes)."""
SECONDS_PER_PIXEL_AUGMENT = 3e-7
"""Augmentation, per regridded pixel per corrupted variant (clutter particles propagate a frame each)."""
SECONDS_PER_PADDED_PIXEL_PLANE = {"cpu": 1.5e-7, "gpu": 1e-8}
"""Reconstructing one plane (angular spectrum, |E| and arg E), per padded pixel: the baseline took 54 s for 24
planes of a 23.1 Mpx padded frame on 2 cores in issue 10 (0.1 µs); the GPU rate is assumed."""
SECONDS_PER_PADDED_PIXEL_PLANE_INFER = {"cpu": 8e-6, "gpu": 5e-8}
"""Inference, per padded pixel per plane: plain_unet took 67 s per 23.1 Mpx plane on 2 cores in issue 10
(2.9 µs), LinkNet/ResNet-18 about 6 µs (a third of its training step); on a GPU an assumed 1.2 s per
full-size plane (propagation, U-Net in bf16, labelling)."""
SECONDS_PER_TILE_PIXEL_EPOCH = {"cpu": 2e-5, "gpu": 2e-8}
"""Training, per tile pixel per epoch over the training and validation examples (forward and backward):
LinkNet/ResNet-18 took 20 s for 4 tiles of 512² on 2 shared cores (19 µs); on a GPU an assumed 200 tiles/s."""
RUNTIME_MARGIN = 2
RUNTIME_FLOOR_MIN = 5


TRAIN_THREADS = max(2, config["train"]["num_workers"] + 1)
"""CPUs of a training job (and of each trial a tuning worker runs): one per DataLoader worker, one for the loop."""


def runtime_min(seconds, attempt=1):
    """Walltime in minutes for `seconds` of estimated work, with margin and start-up; doubled on the first
    retry (a job killed at its walltime is resubmitted with twice as much), tripled on the second."""
    return attempt * (RUNTIME_FLOOR_MIN + math.ceil(RUNTIME_MARGIN * seconds / 60))


def memory_mb(frame_bytes, attempt=1, libraries_mb=PYTHON_LIBRARIES_MB):
    """mem_mb for `frame_bytes` of frames held at once on top of the libraries; half as much again per retry."""
    return math.ceil((libraries_mb + frame_bytes / 2**20) * (1 + (attempt - 1) / 2))


@functools.cache
def split_source(split):
    """(nx, ny, dx, dy, holograms) of a split as acquired. A file split's own header (dimensions and
    attributes only, no image), capped at max_holograms; a simulated or downloaded split has the
    configured optics, and a url split without max_holograms URL_HOLOGRAMS_BOUND holograms."""
    spec, optics = config["splits"][split], config["optics"]
    frame = (optics["nx"], optics["ny"], optics["dx"], optics["dy"])
    if spec["source"] == "simulate":
        return (*frame, spec["n_holograms"])
    holograms = URL_HOLOGRAMS_BOUND
    if spec["source"] == "file" and os.path.exists(spec["path"]):
        import xarray as xr

        with xr.open_dataset(spec["path"], decode_cf=False, cache=False) as header:
            holograms = header.sizes["hologram_number"]
            frame = (header.sizes["xsize"], header.sizes["ysize"], float(header.attrs.get("dx", optics["dx"])),
                     float(header.attrs.get("dy", optics["dy"])))
    return (*frame, min(holograms, spec.get("max_holograms", holograms)))


def regridded_size(n_pixels, pitch):
    """Pixels along one axis after regridding, as holopipe.data.regrid.plan_axis plans them (without building its
    resampling matrix): resampled to regrid.pixel_pitch, then cropped or padded to whole tiles."""
    regrid, tile = config["regrid"], config["examples"]["tile_size"]
    target = regrid["pixel_pitch"]
    if target is not None and abs(target / pitch - 1) >= 1e-6:
        ratio = target / pitch
        n_pixels = n_pixels // round(ratio) if regrid["method"] == "bin" else math.floor(n_pixels / ratio + 1e-6)
    return n_pixels // tile * tile if regrid["frame"] == "crop" else -(-n_pixels // tile) * tile


def split_holograms(split):
    """Holograms in a split's stores after acquisition; the training split's augmented variants included."""
    holograms = split_source(split)[4]
    return holograms * config["augment"]["variants"] if split == TRAIN_SPLIT else holograms


def frame_pixels(split, padding=0):
    """Pixels of a split's regridded frame, with `padding` pixels added on each side."""
    nx, ny, dx, dy, _ = split_source(split)
    return (regridded_size(nx, dx) + 2 * padding) * (regridded_size(ny, dy) + 2 * padding)


def padded_pixels(split):
    """Pixels of the frame a reconstruction propagates: regridded, plus reconstruction.pad on each side."""
    return frame_pixels(split, config["reconstruction"]["pad"])


def largest_frame_pixels():
    return max(frame_pixels(split) for split in SPLITS)


def frame_mem_mb(bytes_per_pixel, holograms_in_memory=1, libraries_mb=PYTHON_LIBRARIES_MB):
    """`libraries_mb` plus `bytes_per_pixel` for each pixel of the regridded frames held at once (the
    largest split's frame), for rules that run once over every split."""
    return memory_mb(bytes_per_pixel * largest_frame_pixels() * holograms_in_memory, libraries_mb=libraries_mb)


def device_kind(section):
    """'cpu' where the config pins a stage to the CPU; otherwise the GPU its rule asks for ('gpu')."""
    return "cpu" if config[section]["device"] == "cpu" else "gpu"


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


def tiles_per_epoch():
    """Training and validation tiles a training epoch passes over, times the pixels of a tile."""
    examples = config["examples"]
    per_hologram = examples["positives_per_hologram"] + examples["negatives_per_hologram"]
    tiles = per_hologram * (split_holograms(TRAIN_SPLIT) + split_holograms(VALID_SPLIT))
    return tiles * examples["tile_size"] ** 2


def get_acquire_mem_mb(wildcards, attempt):
    """About eight double-precision complex frames (128 B per pixel padded by simulate.pad); a copied or
    downloaded file is validated a hologram at a time."""
    nx, ny, _, _, _ = split_source(wildcards.split)
    pad = config["simulate"]["pad"]
    return memory_mb(128 * (nx + 2 * pad) * (ny + 2 * pad), attempt)


def get_acquire_runtime(wildcards, attempt):
    """Simulation: holograms × z slabs × padded pixels; a file or url split: a validated copy."""
    nx, ny, _, _, holograms = split_source(wildcards.split)
    if config["splits"][wildcards.split]["source"] != "simulate":
        return runtime_min(holograms * nx * ny * SECONDS_PER_PIXEL_COPY + 1500, attempt)  # + a download's wait
    optics, simulate = config["optics"], config["simulate"]
    slabs = math.ceil((optics["z_max"] - optics["z_min"]) / simulate["slab_thickness"])
    padded = (nx + 2 * simulate["pad"]) * (ny + 2 * simulate["pad"])
    return runtime_min(holograms * slabs * padded * SECONDS_PER_PADDED_PIXEL_SLAB, attempt)


def get_regrid_mem_mb(wildcards, attempt):
    """Two holograms in flight, 40 B per pixel of the larger of the source and the regridded frame."""
    nx, ny, _, _, _ = split_source(wildcards.split)
    return memory_mb(2 * 40 * max(nx * ny, frame_pixels(wildcards.split)), attempt)


def get_regrid_runtime(wildcards, attempt):
    nx, ny, _, _, holograms = split_source(wildcards.split)
    return runtime_min(holograms * max(nx * ny, frame_pixels(wildcards.split)) * SECONDS_PER_PIXEL_COPY, attempt)


def get_augment_mem_mb(wildcards, attempt):
    """A clean and a corrupted hologram in double precision, and a padded clutter field (complex128)."""
    return memory_mb(40 * frame_pixels(TRAIN_SPLIT) * 2 + 32 * padded_pixels(TRAIN_SPLIT), attempt)


def get_augment_runtime(wildcards, attempt):
    pixels = split_holograms(TRAIN_SPLIT) * frame_pixels(TRAIN_SPLIT)
    return runtime_min(pixels * SECONDS_PER_PIXEL_AUGMENT, attempt)


def get_standardize_runtime(wildcards, attempt):
    """Fitting or applying the standardization: a few passes over each hologram of the split (the
    training split when fitting)."""
    split = getattr(wildcards, "split", TRAIN_SPLIT)
    return runtime_min(4 * split_holograms(split) * frame_pixels(split) * SECONDS_PER_PIXEL_COPY, attempt)


def get_examples_mem_mb(wildcards, attempt):
    """Two holograms in flight, each with its padded spectrum and reconstructed planes (64 B per padded pixel)."""
    return memory_mb(2 * 64 * padded_pixels(wildcards.split), attempt)


def get_examples_runtime(wildcards, attempt):
    """One reconstructed plane per tile: (positives + negatives) planes per hologram."""
    examples = config["examples"]
    planes = examples["positives_per_hologram"] + examples["negatives_per_hologram"]
    work = split_holograms(wildcards.split) * planes * padded_pixels(wildcards.split)
    return runtime_min(work * SECONDS_PER_PADDED_PIXEL_PLANE["cpu"], attempt)


TRAIN_GPU_HOST_MB = 16000
"""Host memory of a training process on a GPU node: torch with CUDA, the DataLoader workers, pinned batches."""
TRAIN_CPU_BYTES_PER_TILE_PIXEL = 2000
"""Training on the CPU holds the activations for the backward pass in host memory, per pixel of a batch's
tiles: plain_unet (width 16, depth 5) with 16 tiles of 512² peaked at 7.3 GB (1.4 kB per tile pixel)."""


def largest_batch_size():
    """train.batch_size, or the largest a tuning trial may draw (tune.search_space's train.batch_size)."""
    space = config["tune"]["search_space"].get("train.batch_size", {})
    return max([config["train"]["batch_size"], *space.get("choices", []), space.get("high") or 0])


def get_train_mem_mb(wildcards, attempt):
    """One training process (a tuning worker runs tune.trials_per_gpu of them at once)."""
    if device_kind("train") == "gpu":
        return memory_mb(0, attempt, TRAIN_GPU_HOST_MB)
    tile_pixels = largest_batch_size() * config["examples"]["tile_size"] ** 2
    return memory_mb(TRAIN_CPU_BYTES_PER_TILE_PIXEL * tile_pixels, attempt, TORCH_LIBRARIES_MB)


def get_tune_worker_mem_mb(wildcards, attempt):
    return config["tune"]["trials_per_gpu"] * get_train_mem_mb(wildcards, attempt)


def get_train_runtime(wildcards, attempt):
    """train.epochs over the examples, on the device train.device names."""
    work = config["train"]["epochs"] * tiles_per_epoch()
    return runtime_min(300 + work * SECONDS_PER_TILE_PIXEL_EPOCH[device_kind("train")], attempt)


def get_tune_worker_runtime(wildcards, attempt):
    """This worker's share of the trials, tune.epochs each, trials_per_gpu at once sharing its device."""
    tune = config["tune"]
    trials = math.ceil(tune["n_trials"] / tune["workers"])
    work = trials * tune["epochs"] * tiles_per_epoch()
    return runtime_min(300 + work * SECONDS_PER_TILE_PIXEL_EPOCH[device_kind("train")], attempt)


def infer_host_bytes(split, kind, planes):
    """Host bytes of an infer job on a `kind` ('cpu' or 'gpu') device with `planes` planes per batch, beyond C."""
    padded, frame = padded_pixels(split), frame_pixels(split)
    per_plane = INFER_BYTES_PER_PADDED_PIXEL_PLANE * padded + INFER_BYTES_PER_PIXEL_PLANE[kind] * frame
    return INFER_BYTES_PER_PADDED_PIXEL * padded + planes * per_plane


def get_infer_mem_mb(wildcards, attempt):
    """Torch and the model, a hologram's spectrum and infer.batch_planes planes, on the host of the device the
    job will use: infer.device cpu or cuda says which. With auto a job on a node without a GPU runs on the CPU,
    so it asks for the larger of the GPU figure and one plane on the CPU: `holopipe infer --mem-mb` then runs as
    many planes per batch as that memory holds."""
    planes, split = config["infer"]["batch_planes"], wildcards.split
    held = infer_host_bytes(split, device_kind("infer"), planes)
    if config["infer"]["device"] == "auto":
        held = max(held, infer_host_bytes(split, "cpu", 1))
    return memory_mb(held, attempt, INFER_LIBRARIES_MB)


def get_infer_runtime(wildcards, attempt):
    """Every hologram of the split × this chunk's planes × padded pixels, on infer.device."""
    work = split_holograms(wildcards.split) * planes_per_chunk() * padded_pixels(wildcards.split)
    return runtime_min(work * SECONDS_PER_PADDED_PIXEL_PLANE_INFER[device_kind("infer")], attempt)


def get_particles_mem_mb(wildcards, attempt):
    """Torch and a hologram's padded spectrum with a plane batch (80 B per padded pixel), two holograms' worth."""
    return memory_mb(2 * 80 * padded_pixels(wildcards.split), attempt, TORCH_LIBRARIES_MB)


def get_particles_runtime(wildcards, attempt):
    """The refinement reconstructs up to every plane of every hologram again, on particles.device."""
    work = split_holograms(wildcards.split) * config["reconstruction"]["z_bins"] * padded_pixels(wildcards.split)
    return runtime_min(work * SECONDS_PER_PADDED_PIXEL_PLANE[device_kind("particles")], attempt)


def get_baseline_mem_mb(wildcards, attempt):
    """Torch and a hologram's padded spectrum with a plane batch (80 B per padded pixel), two holograms' worth."""
    return memory_mb(2 * 80 * padded_pixels(wildcards.split), attempt, TORCH_LIBRARIES_MB)


def get_baseline_runtime(wildcards, attempt):
    """Every plane of every hologram, reconstructed and thresholded on baseline.device."""
    work = split_holograms(wildcards.split) * config["reconstruction"]["z_bins"] * padded_pixels(wildcards.split)
    return runtime_min(work * SECONDS_PER_PADDED_PIXEL_PLANE[device_kind("baseline")], attempt)


LABEL_CANDIDATES_BATCH_BYTES = 2**24 * 16
"""A batch of planes as holopipe.optics.propagation.PLANE_BATCH_PIXELS complex64 pixels, with their amplitude and phase."""


def get_label_candidates_mem_mb(wildcards, attempt):
    """A hologram's padded spectrum and transfer function (40 B per padded pixel) and one batch of planes on
    numpy (torch's libraries too where labels.device is a GPU); the crops of one hologram's candidates are
    small (130 kB each)."""
    libraries_mb = TORCH_LIBRARIES_MB if device_kind("labels") == "gpu" else PYTHON_LIBRARIES_MB
    return memory_mb(40 * padded_pixels(wildcards.split) + LABEL_CANDIDATES_BATCH_BYTES, attempt, libraries_mb)


def get_label_candidates_runtime(wildcards, attempt):
    """Every plane of every hologram, on labels.device. Only the planes within 3 of a candidate are
    reconstructed, but candidates are the union of both methods' particles, unknown before they run and not
    few: with c per hologram spread over Z planes, a fraction 1 - (1 - 7/Z)^c of the planes is needed, 97 %
    for HOLODEC's 500 droplets in 1000 planes."""
    work = split_holograms(wildcards.split) * config["reconstruction"]["z_bins"] * padded_pixels(wildcards.split)
    return runtime_min(work * SECONDS_PER_PADDED_PIXEL_PLANE[device_kind("labels")], attempt)


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
