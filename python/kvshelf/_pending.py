"""Awaiting a native call over caller memory (``Pending``) from asyncio, so that a
coroutine that is cancelled returns control only once the call can no longer touch the
memory it was lent."""

from __future__ import annotations

import asyncio
from typing import Any

from ._native import Pending


async def finish(pending: Pending) -> Any:
    """The result of ``pending``. If the awaiting coroutine is cancelled (a cancelled task,
    ``asyncio.wait_for`` giving up, LMCache's ``future.cancel()``), the native call is
    cancelled and awaited to its end before ``CancelledError`` propagates: when the caller
    sees the cancellation, its buffers are its own again. A second cancellation while
    waiting for that end is absorbed (the end comes within one poll of the task); the
    coroutine still raises ``CancelledError``.

    ``pending.wait()`` blocks (GIL released) on a worker thread of the loop's default
    executor; the loop keeps running meanwhile."""
    waiter = asyncio.get_running_loop().run_in_executor(None, pending.wait)
    try:
        # Shielded: cancelling this coroutine must not cancel the waiter, which is the
        # only way to learn that the native call has ended.
        return await asyncio.shield(waiter)
    except asyncio.CancelledError:
        pending.cancel()
        while not waiter.done():
            try:
                await asyncio.shield(waiter)
            except asyncio.CancelledError:
                continue
            except BaseException:  # the call's own end: cancelled, or failed meanwhile
                break
        if not waiter.cancelled():
            waiter.exception()  # retrieved: no "exception was never retrieved" warning
        raise
    except BaseException:
        # GeneratorExit (the coroutine closed unawaited): nothing can be awaited here.
        # Stop the call; the Pending holds the buffers (and their owner) until it ends.
        pending.cancel()
        raise
