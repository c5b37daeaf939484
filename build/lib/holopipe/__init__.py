"""holopipe: find cloud particles in HOLODEC digital in-line holograms.

The Python API works in SI metres; files keep NCAR's micrometres for particle tables.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("holopipe")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"
