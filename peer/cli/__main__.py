"""`python -m peer.cli`: the `grapevine` command without the installed entry point."""

from __future__ import annotations

import sys

from peer.cli.main import main

sys.exit(main())
