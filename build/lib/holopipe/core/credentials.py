"""Secrets: where the tuning database's password comes from, and the one function that hides passwords.

The config never holds a password (:mod:`holopipe.core.config` refuses one in ``tune.storage``): the config
travels as ``--config-json`` on every job's command line, which Snakemake prints and ``ps`` shows, and
into the provenance records and the report. The password lives in a file only its owner can read
(``tune.storage_password_file``) or where libpq looks by itself (``~/.pgpass``, ``PGPASSWORD``), and is
read only when the storage is opened. :func:`mask_secrets` is the second line: whatever text or record
leaves a process (logs, provenance, error messages) goes through it, so a password that slipped into a
URL shows as ``***``.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = ["MASK", "mask_secrets", "read_password_file"]

MASK = "***"

# The password of scheme://user:password@host as SQLAlchemy's URL parser reads it (everything up to the
# first @), kept to one line; a user name ends at a space or quote, so that a URL without a password
# in a JSON or log line does not reach into the text after it.
_URL_PASSWORD = re.compile(r"(?P<before>\b[\w+]+://[^:/\s'\"]*:)[^@\n]*(?=@)")
# A password given as a query parameter (?password=... or &password=...), which drivers also accept.
_QUERY_PASSWORD = re.compile(r"(?P<before>[?&]password=)[^&\s'\"]*", re.IGNORECASE)


def mask_secrets(value):
    """``value`` with every URL password replaced by ``***``: a string, or the strings inside a mapping
    or list (a config, a command line, a provenance record); anything else unchanged."""
    if isinstance(value, str):
        return _QUERY_PASSWORD.sub(rf"\g<before>{MASK}", _URL_PASSWORD.sub(rf"\g<before>{MASK}", value))
    if isinstance(value, Mapping):
        return {key: mask_secrets(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets(item) for item in value]
    return value


def read_password_file(path, key: str) -> str:
    """The password in the file ``path`` (its text without the line break that ends it), named by the
    config key ``key``. Refused when group or others may read or write it, as libpq refuses such a
    ~/.pgpass: a password file anyone can read is no secret."""
    path = Path(path).expanduser()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such password file ({key})") from None
    if mode & 0o077:
        raise ValueError(f"{path}: group or others may read or change this password file (mode {mode:04o}, {key}); "
                         f"make it yours alone with `chmod 600 {path}`")
    password = path.read_text(encoding="utf-8").rstrip("\r\n")
    if not password or "\n" in password:
        raise ValueError(f"{path}: a password file holds the password on one line, nothing else ({key})")
    return password
