"""Parse-time setup: validate the config, so a bad one fails before any job; input and params functions."""

import json
import math

from holopipe.config import load_config

# Replace the content, not the object: Snakemake keeps a reference to this dict.
_validated = load_config(config)
config.clear()
config.update(_validated)


def get_raw_files():
    return expand("data/raw/{split}.nc", split=config["splits"])


def get_acquire_input(wildcards):
    """A file split's source, so that Snakemake checks it exists and reruns the split when it changes."""
    spec = config["splits"][wildcards.split]
    return [spec["path"]] if spec["source"] == "file" else []


def get_acquire_config(wildcards):
    """Only the config that acquiring this split reads, as JSON: other changes must not rerun it."""
    spec = config["splits"][wildcards.split]
    sections = {"splits": {wildcards.split: spec}, "optics": config["optics"]}
    if spec["source"] == "simulate":
        sections["simulate"] = config["simulate"]
    return json.dumps(sections, sort_keys=True)


def _padded_pixels():
    pad = config["simulate"]["pad"]
    return (config["optics"]["nx"] + 2 * pad) * (config["optics"]["ny"] + 2 * pad)


def get_acquire_mem_mb(wildcards):
    """About eight double-precision complex frames (128 B per padded pixel) on top of 512 MB for Python and
    the libraries: 560 MB for the embedded config, 3 GB for a full HOLODEC frame."""
    return 512 + math.ceil(128 * _padded_pixels() / 2**20)


def get_acquire_runtime(wildcards):
    """Minutes. Simulation costs about 0.2 µs per padded pixel per z slab per hologram on one core (two FFTs
    per slab): 3.5 h for 100 full-size holograms. A file split is a validated copy."""
    spec = config["splits"][wildcards.split]
    if spec["source"] == "file":
        return 30
    optics, simulate = config["optics"], config["simulate"]
    slabs = math.ceil((optics["z_max"] - optics["z_min"]) / simulate["slab_thickness"])
    return 10 + math.ceil(spec["n_holograms"] * slabs * _padded_pixels() * 2e-7 / 60)
