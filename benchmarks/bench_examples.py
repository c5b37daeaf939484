"""Training examples built per second (and per core) on the default config and on full-size holograms, CPU.

    python benchmarks/bench_examples.py [--full-size-holograms 2]

For each case: simulate holograms, standardize them (I / mean, as `standardize` with background mean),
then time `holopipe.data.examples.build_examples` alone and print examples/s and examples/s per core.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from holopipe.core.config import load_config
from holopipe.core.io import open_holodec, write_zarr
from holopipe.data.examples import build_examples
from holopipe.optics.simulate import SimulationSettings, simulate_file

REPO = Path(__file__).resolve().parents[1]


def standardized_store(config: dict, n_holograms: int, workdir: Path) -> Path:
    raw = simulate_file(workdir / "raw.nc", n_holograms=n_holograms, seed=1,
                        settings=SimulationSettings.from_config(config), progress=False)
    with open_holodec(raw) as ds:
        image = ds["image"].astype("float32")
        ds = ds.assign(image=image / image.mean())
        return write_zarr(ds, workdir / "standardized.zarr")


def bench(name: str, config: dict, n_holograms: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = standardized_store(config, n_holograms, Path(tmp))
        start = time.perf_counter()
        out = build_examples(store, Path(tmp) / "examples.zarr", config, split="train", progress=False)
        seconds = time.perf_counter() - start
        with open_holodec_examples(out) as examples:
            count = examples.sizes["example"]
    cores = len(os.sched_getaffinity(0))
    tile = config["examples"]["tile_size"]
    print(f"{name:<28} {n_holograms} holograms, {count} tiles of {tile}x{tile}: {seconds:6.1f} s, "
          f"{count / seconds:6.2f} examples/s, {count / seconds / cores:6.2f} examples/s per core ({cores} cores)")


def open_holodec_examples(path):
    import xarray as xr

    return xr.open_zarr(path, consolidated=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-holograms", type=int, default=8)
    parser.add_argument("--full-size-holograms", type=int, default=2)
    args = parser.parse_args()
    bench("default (512x512)", load_config(REPO / "config" / "config.yaml"), args.default_holograms)
    if args.full_size_holograms:
        bench("full size (4872x3248)", load_config(REPO / "config" / "holodec.yaml"),
              args.full_size_holograms)


if __name__ == "__main__":
    main()
