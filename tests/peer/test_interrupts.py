"""peer.interrupts: Ctrl-C interrupts a command's loop even when a cancellation is swallowed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

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


def test_ctrl_c_raises_keyboard_interrupt_through_a_swallowed_cancellation() -> None:
    with pytest.raises(KeyboardInterrupt):
        run_interruptible(_swallowing())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_plain_asyncio_run_loses_that_ctrl_c() -> None:
    # What the module works around: the same coroutine under asyncio.run returns normally.
    assert asyncio.run(_swallowing()) == "ran on"
