"""Shared pieces of the daemon tests: a publisher site, nodes, in-process links.

A ``Site`` is a repository with keys (made through the real CLI, in-process)
plus helpers to publish trees, export bundles and initialise node state
directories. ``link`` joins two ``NodeService`` objects with a trio memory
stream pair, so many nodes run in one process under ``MockClock``.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import secrets
from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing
from conftest import make_tree

from p2pupd.daemon.core import NodeService, ServiceOptions
from p2pupd.daemon.node_ctx import Node
from p2pupd.daemon.offload import inline
from p2pupd.tools.cli import main

__all__ = ["Site", "link", "make_service", "random_tree", "wait_until"]


def cli(*args: str | Path) -> str:
    """Run the CLI in-process; returns stdout, raises on a non-zero exit."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    if code != 0:
        raise AssertionError(f"p2pupd {' '.join(map(str, args))} -> {code}: {err.getvalue()}")
    return out.getvalue()


def random_tree(seed: int, files: int = 3, size: int = 70_000) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"f{i}.bin": rng.randbytes(size + i * 1000) for i in range(files)}


class Site:
    """A publisher repository (1-of-1 keys) and helpers around it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        keys = base / "keys"
        keys.mkdir(parents=True)
        cli("keygen", keys / "root.key")
        cli("keygen", keys / "rel.key")
        self.repo = base / "repo"
        cli("repo", "init", self.repo, "--root-key", keys / "root.key",
            "--release-key", keys / "rel.key")  # fmt: skip
        self.root_file = self.repo / "root.msgpack"
        self.sources: dict[str, Path] = {}

    def publish(self, version: str, files: dict[str, bytes], component: str = "app") -> Path:
        src = make_tree(self.base / "src" / f"{component}-{version}", files)
        cli("publish", self.repo, component, version, src)
        self.sources[version] = src
        return src

    def bundle(self, name: str) -> Path:
        dest = self.base / "bundles" / name
        cli("export", self.repo, dest)
        return dest

    def node(self, name: str, component: str = "app") -> tuple[Path, Path]:
        """Initialise a node; returns (state dir, target dir)."""
        state = self.base / "nodes" / name / "state"
        target = self.base / "nodes" / name / "target" / component
        target.parent.mkdir(parents=True)
        cli("init", "--state-dir", state, "--trust", self.root_file,
            "--component", f"{component}={target}")  # fmt: skip
        return state, target


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
