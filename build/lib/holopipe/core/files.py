"""Files that are never read half-written: atomic writes, the temporaries a killed job leaves (removed by the
next write), the per-hologram parts a killed job resumes from, and what identifies an input file.

Every stage writes through :func:`write_atomically` (or :class:`HologramParts`), so an output on disk is
complete; a job killed by its walltime or memory limit leaves only hidden ``.NAME.tmp-HOST-PID-THREAD``
siblings and parts, which its rerun removes or resumes from.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import threading
from pathlib import Path

import pandas as pd

__all__ = ["HologramParts", "file_sha256", "input_identity", "remove_path", "remove_stale_temporaries",
           "temporary_sibling", "write_atomically"]


def file_sha256(path, block_bytes: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in blocks so that a multi-gigabyte file needs no more memory (Python 3.10
    has no ``hashlib.file_digest``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(block_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_path(path) -> None:
    """Delete a file or a directory tree (a zarr store); nothing when it does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


_TEMPORARY_OWNER = re.compile(r"(?P<host>.+)-(?P<pid>\d+)-(?P<thread>\d+)(?:\.\w+)?")
"""What follows ``.NAME.tmp-`` in a temporary's name: its writer's host, process and thread, and an optional
suffix (see :func:`temporary_sibling`)."""


def temporary_sibling(path, suffix: str = "") -> Path:
    """The hidden sibling ``.NAME.tmp-HOST-PID-THREAD[suffix]`` of ``path`` to write before renaming it over
    ``path``, after removing the temporaries of ``path`` that killed writers left (:func:`remove_stale_temporaries`).

    Every writer of an output takes its temporary here, so the next run of a killed job frees its disk.
    The name says who writes it: concurrent writers never share one, and a later run can tell whether the
    writer lives. ``suffix`` keeps an extension that a tool reads (Snakemake picks a report's format by it).
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}{suffix}")
    remove_path(tmp)  # a dead process whose pid and thread id this one reuses may have left it
    return tmp


def remove_stale_temporaries(path) -> list[Path]:
    """Remove every ``.NAME.tmp-*`` sibling of ``path`` but those of live processes on this host; return them.

    A SIGKILL (walltime, out of memory) skips every ``finally``, so only a later run can remove what a
    killed writer left: gigabytes for a zarr store. Another host's temporary is removed too: on PBS the
    rerun of a killed job lands on any node, and Snakemake never runs two jobs writing one output (nor two
    Snakemake runs on one directory, by its lock), so it can only be a dead job's. A live process of this
    host keeps its own, which makes two writers of one output by hand on one node safe. An unparseable
    name (an older holopipe's) counts as stale.
    """
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    removed = []
    for sibling in path.parent.glob(f"{glob.escape(prefix)}*"):
        owner = _TEMPORARY_OWNER.fullmatch(sibling.name[len(prefix):])
        if owner and owner["host"] == socket.gethostname() and _process_alive(int(owner["pid"])):
            continue
        remove_path(sibling)
        removed.append(sibling)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomically(path, write) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` (:func:`temporary_sibling`), then rename it
    over ``path``.

    ``write`` may create a file or a directory (a zarr store); what is at ``path`` already is replaced.
    A reader never sees a half-written output, and a failing ``write`` leaves nothing behind; what a
    killed one left is removed by the next write of ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        if path.is_dir():
            remove_path(path)  # os.replace cannot replace a directory that is not empty
        os.replace(tmp, path)
    finally:
        remove_path(tmp)
    return path


class HologramParts:
    """Per-hologram results of a stage kept beside its output while it runs, so a killed job resumes.

    A job killed at its walltime (or by the out-of-memory killer) keeps every hologram it finished: each
    is one CSV under ``<out>.parts/``, written atomically, so a part on disk is always complete. The
    parts hold a ``fingerprint`` (JSON-serialisable: the stage's config, its inputs' identity, and under
    ``"code"`` the code's, :func:`holopipe.core.provenance.code_identity`): a rerun with another fingerprint
    starts afresh instead of mixing results of two configs or of the code before and after a ``git pull``
    (a fingerprint without ``"code"`` is refused, so no stage can forget it). :meth:`finish`
    writes the output atomically from all parts and only then removes them: the output is never half
    written, and a kill during :meth:`finish` loses nothing.
    """

    FINGERPRINT = "fingerprint.json"

    def __init__(self, out_path, fingerprint: dict):
        self.out_path = Path(out_path)
        self.directory = self.out_path.with_name(self.out_path.name + ".parts")
        if "code" not in fingerprint:
            raise ValueError(f"{self.directory}: the resume fingerprint has no 'code' entry (keys "
                             f"{sorted(fingerprint)}): parts of other code would be reused")
        text = json.dumps(fingerprint, sort_keys=True, default=str)
        marker = self.directory / self.FINGERPRINT
        if self.directory.is_dir() and not (marker.is_file() and marker.read_text(encoding="utf-8") == text):
            remove_path(self.directory)
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            write_atomically(marker, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _path(self, hid: int) -> Path:
        return self.directory / f"hologram_{int(hid):06d}.csv"

    def done(self) -> set[int]:
        """Holograms (1-based hid) whose results are on disk."""
        return {int(path.stem.split("_")[1]) for path in self.directory.glob("hologram_*.csv")}

    def save(self, hid: int, table: pd.DataFrame) -> None:
        """Keep hologram ``hid``'s table (a complete file, or none)."""
        write_atomically(self._path(hid), lambda tmp: table.to_csv(tmp, index=False))

    def load(self, hids) -> list[pd.DataFrame]:
        """The saved tables of ``hids``, in that order."""
        return [pd.read_csv(self._path(hid)) for hid in hids]

    def finish(self, write) -> Path:
        """``write(tmp)`` the output atomically (see :func:`write_atomically`), then drop the parts."""
        write_atomically(self.out_path, write)
        remove_path(self.directory)
        return self.out_path


def input_identity(*paths) -> list:
    """(path, size, modification time in ns, inode) of files or stores: changes whenever one is rewritten
    (every writer here replaces its output by a rename), so resumable parts of stale inputs are dropped."""
    identity = []
    for path in paths:
        stat = os.stat(path)
        identity.append([os.fspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino])
    return identity
