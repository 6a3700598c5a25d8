"""Shared pieces of the daemon tests: a publisher site, nodes, in-process links.

A ``Site`` is a repository with keys (made through the real CLI, in-process)
plus helpers to publish trees, export bundles and initialise node state
directories. ``link`` joins two ``NodeService`` objects with a trio memory
stream pair, so many nodes run in one process under ``MockClock``.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing
from _kit import Site

from p2pupd.daemon.offload import inline
from p2pupd.daemon.service.nodeservice import NodeService, ServiceOptions
from p2pupd.daemon.state.node import Node

__all__ = ["Site", "link", "make_service", "random_tree", "wait_until"]


def random_tree(seed: int, files: int = 3, size: int = 70_000) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"f{i}.bin": rng.randbytes(size + i * 1000) for i in range(files)}


def make_service(
    state: Path, seed: int, cls: type[NodeService] = NodeService, **options: object
) -> NodeService:
    """A NodeService on ``state`` for MockClock tests (blocking work inline)."""
    opts = ServiceOptions(seed=seed, **options)  # type: ignore[arg-type]
    return cls(Node(state), opts, offload=inline, rng=random.Random(seed))


def link(nursery: trio.Nursery, a: NodeService, b: NodeService) -> None:
    """Connect ``a`` (dialling) and ``b`` with an in-memory stream pair."""
    sa, sb = trio.testing.memory_stream_pair()
    tag = secrets.token_hex(2)
    nursery.start_soon(
        lambda: a.run_stream(sa, outbound=True, address=f"mem-{tag}:1", source="memory")
    )
    nursery.start_soon(
        lambda: b.run_stream(sb, outbound=False, address=f"mem-{tag}:2", source="memory")
    )


async def wait_until(pred: Callable[[], bool], timeout: float, step: float = 1.0) -> None:
    """Poll ``pred`` every ``step`` (virtual) seconds; ``TooSlowError`` after ``timeout``."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(step)


def installed(state: Path, component: str = "app") -> int | None:
    return Node(state).state.read_state(component).installed


def env_now() -> dict[str, str]:
    return dict(os.environ)
