"""Running blocking work (disk, apply, state files) off the trio event loop.

``in_thread`` is the daemon's choice: a trio worker thread. ``inline`` runs the
work directly; tests use it under ``MockClock``, where virtual time would jump
ahead while the event loop waited for a thread and fire timeouts early.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import trio

T = TypeVar("T")


class Offload(Protocol):
    """Runs ``fn()`` somewhere it may block; returns its result."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def in_thread(fn: Callable[[], T]) -> T:
    """The production ``Offload``: a trio worker thread."""
    return await trio.to_thread.run_sync(fn)


async def inline(fn: Callable[[], T]) -> T:
    """An ``Offload`` for tests under ``MockClock``: no thread, so time only moves when idle."""
    return fn()
