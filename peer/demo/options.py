"""The options of `grapevine demo`, apart from running it: `grapevine` builds its parser from
here without importing the demo (rich, the live view, the process manager), so its other
commands start fast; `peer.demo.command` runs the demo with the options parsed.
"""

from __future__ import annotations

import argparse

OFFLINE_MODEL = "grapevine/offline"
DEFAULT_JOB = "Plan a small city's policy on urban heat"
DEFAULT_TIMEOUT = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `demo` options to `parser`."""
    parser.add_argument(
        "--model",
        default=OFFLINE_MODEL,
        help=f"litellm model string for every agent (default {OFFLINE_MODEL}, which needs no "
        "network or key), e.g. openai/gpt-4o-mini with OPENAI_API_KEY set",
    )
    parser.add_argument(
        "--job", default=DEFAULT_JOB, metavar="TEXT", help=f"the job (default: {DEFAULT_JOB!r})"
    )
    parser.add_argument(
        "--peers", type=int, default=3, metavar="N", help="peers to start (default 3, at least 3)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long (default {DEFAULT_TIMEOUT:.0f})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object {answer, tree, audit} instead of the live view",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (configs, data directories, logs) afterwards",
    )
