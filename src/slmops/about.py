"""The installed slmops version (one place, importable from any layer)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slmops")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"
