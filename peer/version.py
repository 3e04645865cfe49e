"""The installed Grapevine version, as `grapevine --version`, `GET /v1/self` and `/metrics`
report it.

Invariants:
- Read from the installed distribution's metadata (`importlib.metadata`), so it is the version
  pip installed, never a constant that drifts from pyproject.toml.
- Importing it costs nothing (the metadata is read when asked for): `grapevine` builds its
  parser with it.
"""

from __future__ import annotations

DISTRIBUTION = "grapevine-agents"
"""The distribution name in pyproject.toml (`[project] name`)."""
UNINSTALLED = "0.0.0+unknown"
"""Reported when the code runs from a checkout that was never installed."""


def installed_version() -> str:
    """Return the installed version of the `grapevine-agents` distribution (e.g. "0.1.0"), or
    `UNINSTALLED` when it is not installed."""
    # Imported here: importlib.metadata and the search of the installed distributions cost tens
    # of milliseconds, which `grapevine` pays only when it shows the version.
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNINSTALLED
