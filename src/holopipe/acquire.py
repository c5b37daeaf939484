"""First stage: put each split's raw holograms at data/raw/{split}.nc, simulated or taken from a file.

Either way the output appears atomically (written under a temporary name, then renamed), so an interrupted
job never leaves a file that later stages would take for a complete one.
"""

import os
import shutil
from pathlib import Path

from holopipe import io, simulate
from holopipe.config import ConfigError


def acquire_split(config: dict, split: str, out_path) -> Path:
    """Write split `split` of a validated config to `out_path` as HOLODEC netCDF and return the path."""
    splits = config["splits"]
    if split not in splits:
        raise ConfigError(f"unknown split {split!r}; configured splits are {', '.join(splits)}")
    spec = splits[split]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if spec["source"] == "simulate":
        simulate.simulate_file(
            out_path,
            n_holograms=spec["n_holograms"],
            seed=spec["seed"],
            settings=simulate.SimulationSettings.from_config(config),
        )
    else:
        optics = config["optics"]
        _copy_holodec(Path(spec["path"]), out_path, z_limits=(optics["z_min"], optics["z_max"]))
    return out_path


def _copy_holodec(source: Path, out_path: Path, *, z_limits: tuple[float, float]) -> None:
    """Validate a HOLODEC file, then copy it via a temporary file next to `out_path`.

    Validating first makes a bad file fail here, naming the file, rather than in a later stage. The
    temporary file shares the destination's directory so that the final rename stays on one file system.
    """
    io.open_holodec(source, z_limits=z_limits).close()
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
