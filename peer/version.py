"""The installed Grapevine version, as `grapevine --version`, `GET /v1/self` and `/metrics`
report it.

Invariants:
- Read from the installed distribution's metadata, so it is the version pip installed, never a
  constant that drifts from pyproject.toml.
- Importing it costs nothing (the metadata is read when asked for): `grapevine` builds its
  parser with it.
- The answer is `importlib.metadata.version`'s: the first `sys.path` entry holding the
  distribution wins. The version is read from the name of that entry's `.dist-info` directory
  (`grapevine_agents-0.1.0.dist-info`, the wheel format's name), which costs a directory
  listing; `importlib.metadata` itself (tens of milliseconds to import and search) is asked only
  when that name is not there or not alone.
"""

from __future__ import annotations

import os
import sys

DISTRIBUTION = "grapevine-agents"
"""The distribution name in pyproject.toml (`[project] name`)."""
UNINSTALLED = "0.0.0+unknown"
"""Reported when the code runs from a checkout that was never installed."""

_DIST_INFO_PREFIX = DISTRIBUTION.replace("-", "_") + "-"
_DIST_INFO_SUFFIX = ".dist-info"


def installed_version() -> str:
    """Return the installed version of the `grapevine-agents` distribution (e.g. "0.1.0"), or
    `UNINSTALLED` when it is not installed."""
    for entry in sys.path:
        versions = _dist_info_versions(entry or ".")
        if len(versions) == 1:
            return versions[0]
        if versions:
            break  # stale copies beside each other: let importlib.metadata choose as pip does
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNINSTALLED


def _dist_info_versions(directory: str) -> list[str]:
    """The versions named by the distribution's `.dist-info` directories in `directory`."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []  # not a directory (a zip file on sys.path) or gone: nothing installed here
    return [
        name[len(_DIST_INFO_PREFIX) : -len(_DIST_INFO_SUFFIX)]
        for name in names
        if name.startswith(_DIST_INFO_PREFIX) and name.endswith(_DIST_INFO_SUFFIX)
    ]
