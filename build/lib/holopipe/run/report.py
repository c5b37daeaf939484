"""The workflow's own pictures and report, built by Snakemake from inside a finished run.

The ``workflow_graphs`` and ``report_html`` rules call these through ``holopipe graphs`` and ``holopipe
report``: each runs Snakemake again on the same Snakefile with the resolved config of the run
(``results/provenance/config.yaml``), without taking the working directory's lock (the calling run holds
it, and these calls only read). Graphs come as mermaid (rendered by GitHub, GitLab and most Markdown
viewers, no tool needed) and, where graphviz's ``dot`` is installed, as SVG.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from holopipe.core.files import temporary_sibling, write_atomically

__all__ = ["GRAPHS", "snakemake_output", "write_graphs", "write_report"]

GRAPHS = {"dag": "--dag", "rulegraph": "--rulegraph"}
"""Graph name -> Snakemake flag: every job (one node per split, chunk, worker) and every rule."""


def snakemake_output(snakefile, configfile, *args: str) -> str:
    """Stdout of ``snakemake --nolock`` on ``snakefile`` with ``configfile``; a failure raises with its
    stderr, so the rule's log says why. Without the user's ``SNAKEMAKE_PROFILE``: a cluster profile there
    would load its executor plugin, which drawing a graph or a report never needs (nor has in its env)."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--configfile", str(configfile),
               "--nolock", *args]
    environment = {name: value for name, value in os.environ.items() if name != "SNAKEMAKE_PROFILE"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise ValueError(f"{' '.join(command)} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def _graph_text(stdout: str, opening: str) -> str:
    """The graph proper, from the first line that opens it (Snakemake may log lines before it)."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(opening)), None)
    if start is None:
        raise ValueError(f"Snakemake printed no graph starting with {opening!r}:\n{stdout[-2000:]}")
    return "\n".join(lines[start:]) + "\n"


def write_graphs(snakefile, configfile, targets: list[str], out_dir, *, svg: bool | None = None) -> list[Path]:
    """``dag.mmd`` and ``rulegraph.mmd`` of ``targets`` in ``out_dir``, plus ``dag.svg`` and
    ``rulegraph.svg`` when ``svg`` (default: when ``dot`` is on PATH). Returns the written paths."""
    out_dir = Path(out_dir)
    dot = shutil.which("dot")
    svg = dot is not None if svg is None else svg
    if svg and dot is None:
        raise ValueError("SVG graphs need graphviz's `dot` on PATH (apt-get install graphviz)")
    written = []
    for name, flag in GRAPHS.items():
        mermaid = _graph_text(snakemake_output(snakefile, configfile, *targets, flag, "mermaid-js"), "---")
        written.append(write_atomically(out_dir / f"{name}.mmd", lambda tmp, t=mermaid: Path(tmp).write_text(t)))
        if svg:
            graph = _graph_text(snakemake_output(snakefile, configfile, *targets, flag, "dot"), "digraph")
            rendered = subprocess.run([dot, "-Tsvg"], input=graph, capture_output=True, text=True)
            if rendered.returncode != 0:
                raise ValueError(f"dot -Tsvg failed on the {name}: {rendered.stderr.strip()}")
            written.append(write_atomically(out_dir / f"{name}.svg",
                                            lambda tmp, t=rendered.stdout: Path(tmp).write_text(t)))
    return written


def write_report(snakefile, configfile, targets: list[str], out_html) -> Path:
    """Snakemake's self-contained HTML report of ``targets`` (every ``report()`` output upstream of them),
    written atomically."""
    out_html = Path(out_html)
    tmp = temporary_sibling(out_html, suffix=".html")  # Snakemake picks the format by the suffix
    try:
        snakemake_output(snakefile, configfile, *targets, "--report", str(tmp))
        if not tmp.is_file():
            raise ValueError(f"Snakemake wrote no report at {tmp}")
        tmp.replace(out_html)
    finally:
        tmp.unlink(missing_ok=True)
    return out_html
