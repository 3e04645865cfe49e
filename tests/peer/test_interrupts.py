"""peer.interrupts: Ctrl-C interrupts a command's loop even when a cancellation is swallowed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator

import pytest

from peer.interrupts import run_interruptible


async def _swallowing() -> str:
    # Code that loses a cancellation (as Python 3.11's wait_for can): with asyncio.run alone
    # the SIGINT below would only cancel this task, and it would run on and return.
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
    for _ in range(40):
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.01)
    return "ran on"


@pytest.fixture(autouse=True)
def _sigint_as_from_a_terminal() -> Iterator[None]:
    # A suite started in the background (`... &`) inherits an ignored SIGINT.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_raises_keyboard_interrupt_through_a_swallowed_cancellation() -> None:
    with pytest.raises(KeyboardInterrupt):
        run_interruptible(_swallowing())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_an_ignored_sigint_stays_ignored() -> None:
    # A command started in the background keeps ignoring Ctrl-C, as the shell meant.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop_ran = run_interruptible(asyncio.sleep(0, "done"))
    assert loop_ran == "done" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_plain_asyncio_run_loses_that_ctrl_c() -> None:
    # What the module works around: the same coroutine under asyncio.run returns normally.
    assert asyncio.run(_swallowing()) == "ran on"
