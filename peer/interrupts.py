"""Ctrl-C that always interrupts a command's event loop.

`asyncio.run` (Python 3.11 and later) turns SIGINT into a cancellation of the main task. A
cancellation can be lost: Python 3.11's `asyncio.wait_for` swallows one that arrives as the
awaited future completes (CPython issue gh-86296), and code that catches it by mistake does
the same. The user's Ctrl-C is then ignored and the command runs on
(`tests/peer/test_interrupts.py` shows it with a coroutine that swallows its cancellation).

Commands with nothing to wind down gracefully run their loop under a SIGINT handler that
raises `KeyboardInterrupt` where the main thread is, as Python did before 3.11: it cannot be
swallowed by a cancellation race, and `asyncio.run` still cancels and awaits the remaining
tasks on its way out. `grapevine agent` keeps its own handling (it leaves the network first).
A SIGINT the command was started ignoring (a background job's) stays ignored.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Coroutine
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")


def run_interruptible(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, with SIGINT raising `KeyboardInterrupt` (see the module).

    Raises:
        KeyboardInterrupt: Ctrl-C (or whatever the SIGINT handler in place raises).
    """
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(main)  # signal handlers belong to the main thread
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return asyncio.run(main)  # the caller handles SIGINT its own way
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return asyncio.run(main)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
