"""Running blocking work (disk, apply, state files) off the trio event loop.

``in_thread`` is the daemon's choice: a trio worker thread. ``inline`` is for
tests under ``MockClock``, where virtual time would jump ahead while the event
loop waited for a worker thread and fire timeouts early: it runs the work in
another thread but *blocks* the event loop until it is done, so time only
moves when the loop is idle, and work that wrongly calls into trio from the
worker (``trio.current_time()`` and the like) fails in tests as it would in
the daemon instead of passing unnoticed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import trio

T = TypeVar("T")


class Offload(Protocol):
    """Runs ``fn()`` somewhere it may block; returns its result."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def in_thread(fn: Callable[[], T]) -> T:
    """The production ``Offload``: a trio worker thread."""
    return await trio.to_thread.run_sync(fn)


_INLINE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-inline")


async def inline(fn: Callable[[], T]) -> T:
    """An ``Offload`` for tests under ``MockClock``: off the trio thread, loop blocked."""
    return _INLINE.submit(fn).result()
