"""`python -m peer.cli`: the `grapevine` command without the installed entry point."""

from __future__ import annotations

from peer.cli.main import console

console()
