"""Parse-time setup: validate the config, so a bad one fails before any job; input and params functions."""

import json
import math
import os
import shutil

from holopipe.config import ConfigError, check_tiles_fit, load_config

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
SPLITS = list(config["splits"])
# The workflow graphs come as mermaid always, as SVG too where graphviz is installed.
GRAPH_FORMATS = ["mmd", "svg"] if shutil.which("dot") else ["mmd"]
for _split in config["infer"]["splits"]:
    if _split not in config["splits"]:
        raise ConfigError(f"infer.splits: {_split!r} is not a configured split ({', '.join(SPLITS)})")


def stage_config(*sections, split=None, **keys):
    """JSON of only the config a stage reads: optics, one split's spec, whole `sections`, and single keys
    (`examples=["tile_size"]`), so that Snakemake reruns a stage when, and only when, what it reads
    changes. The command fills in defaults for everything left out."""
    splits = {split: config["splits"][split]} if split else {TRAIN_SPLIT: config["splits"][TRAIN_SPLIT]}
    chosen = {"splits": splits, "optics": config["optics"]}
    chosen.update({section: config[section] for section in sections})
    chosen.update({section: {key: config[section][key] for key in names} for section, names in keys.items()})
    return json.dumps(chosen, sort_keys=True)


# Resident memory of a job that imports torch, before its frames: `import torch` alone is 650 MB, and
# `holopipe infer` on the embedded default peaks at 1.4 GB (measured with /usr/bin/time -v).
TORCH_LIBRARIES_MB = 1536


def frame_mem_mb(bytes_per_pixel, holograms_in_memory=1, libraries_mb=512):
    """`libraries_mb` for Python and the libraries (512 MB; TORCH_LIBRARIES_MB for jobs that import torch)
    plus `bytes_per_pixel` for each pixel of the frames held at once."""
    pixels = config["optics"]["nx"] * config["optics"]["ny"] * holograms_in_memory
    return libraries_mb + math.ceil(bytes_per_pixel * pixels / 2**20)


def split_index(wildcards):
    """A split's position in the config: distinct random streams for the examples of each split."""
    return SPLITS.index(wildcards.split)


def standardize_stats_files():
    """stats.json, and with the median background its image, which `standardize apply` reads beside it."""
    files = {"stats": "data/standardized/stats.json"}
    if config["standardize"]["background"] == "median":
        files["background"] = "data/standardized/stats_background.npy"
    return files


def training_inputs(wildcards):
    """The examples a model learns from and is validated on, and the statistics that scale its inputs."""
    return {
        "train": f"data/examples/{TRAIN_SPLIT}.zarr",
        "valid": f"data/examples/{VALID_SPLIT}.zarr",
        "stats": "data/standardized/stats.json",
    }


def tune_worker_flags():
    """One flag per tuning worker; none when tuning is off (then best.yaml is empty)."""
    if config["tune"]["n_trials"] == 0:
        return []
    return expand("results/tune/workers/{worker}.done", worker=range(config["tune"]["workers"]))


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


def _padded_pixels():
    pad = config["simulate"]["pad"]
    return (config["optics"]["nx"] + 2 * pad) * (config["optics"]["ny"] + 2 * pad)


def get_acquire_mem_mb(wildcards):
    """About eight double-precision complex frames (128 B per padded pixel) on top of 512 MB for Python and
    the libraries: 560 MB for the embedded config, 3 GB for a full HOLODEC frame."""
    return 512 + math.ceil(128 * _padded_pixels() / 2**20)


def get_acquire_runtime(wildcards):
    """Minutes. Simulation measured 0.04 µs per padded pixel per z slab per hologram on a 2-core node
    (benchmarks/bench_simulate.py: 24 s per full-size hologram); 0.1 µs leaves a 2.5x margin for slower
    nodes: 1.7 h for 100 full-size holograms. A file or url split is a (downloaded and) validated copy."""
    spec = config["splits"][wildcards.split]
    if spec["source"] != "simulate":
        return 30
    optics, simulate = config["optics"], config["simulate"]
    slabs = math.ceil((optics["z_max"] - optics["z_min"]) / simulate["slab_thickness"])
    return 10 + math.ceil(spec["n_holograms"] * slabs * _padded_pixels() * 1e-7 / 60)


def provenance_records(wildcards):
    """The provenance record of every job of the whole workflow, whatever the config's splits and counts."""
    infer_splits, chunks = config["infer"]["splits"], range(config["infer"]["chunks"])
    records = [
        rules.augment_train.output.provenance,
        rules.standardize_fit.output.provenance,
        rules.tune_summary.output.provenance,
        rules.train_model.output.provenance,
        rules.evaluate_splits.output.provenance,
    ]
    for per_split in (rules.acquire_split, rules.regrid_split, rules.standardize_split, rules.examples_split):
        records += expand(per_split.output.provenance, split=SPLITS)
    if config["tune"]["n_trials"] > 0:
        records += expand(rules.tune_worker.output.provenance, worker=range(config["tune"]["workers"]))
    records += expand(rules.infer_chunk.output.provenance, split=infer_splits, chunk=chunks)
    for per_split in (rules.particles_split, rules.baseline_split):
        records += expand(per_split.output.provenance, split=infer_splits)
    return records
