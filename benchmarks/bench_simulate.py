"""Simulator cost on full-size HOLODEC holograms (4872x3248, 500 particles, config/holodec.yaml), CPU.

    python benchmarks/bench_simulate.py [--n-holograms 2]

Runs ``holopipe simulate --config config/holodec.yaml`` in a child process and prints seconds per
hologram and the child's peak resident memory (the target is under 3 GB for a 10-hologram file:
memory must not grow with the number of holograms, since they are written one at a time).
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-holograms", type=int, default=2)
    parser.add_argument("--config", default=str(REPO / "config" / "holodec.yaml"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full_size.nc"
        command = [sys.executable, "-m", "holopipe.run.cli", "simulate", "--config", args.config,
                   "--out", str(out), "--n-holograms", str(args.n_holograms), "--seed", "1",
                   "--quiet"]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        size_mb = out.stat().st_size / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{args.n_holograms} full-size holograms ({args.config}): {seconds / args.n_holograms:.1f} s "
          f"per hologram (incl. start-up), peak RSS {peak_mb:.0f} MB, file {size_mb:.0f} MB")


if __name__ == "__main__":
    main()
