"""Shared fixtures: a publisher world (keys, repository) and a node, driven
through the real command line in-process (``p2pupd.tools.cli.main``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _kit import TREE_MTIME, make_tree, tree_snapshot
from hypothesis import settings

from p2pupd.tools.cli import main

# Hypothesis fails an example slower than 200 ms by default. `make test` runs
# three workers on two cores beside daemons and SIGKILLed children, where a
# fast example now and then waits that long for a core: a failure that says
# nothing about the code. Time is bounded where it matters by the decoders'
# own budgets (tests/property/_fuzz.py), not by this.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (stable otherwise): ``make test`` spreads the suite over
    pytest-xdist workers, and a minute-long test started last keeps one worker
    busy while the others sit idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

__all__ = ["TREE_MTIME", "make_tree", "tree_snapshot"]  # re-exported for the tests


@dataclass
class Result:
    code: int
    out: str
    err: str


Run = Callable[..., Result]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run the CLI in-process; returns exit code, stdout and stderr."""

    def _run(*args: str | Path) -> Result:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        cap = capsys.readouterr()
        return Result(code, cap.out, cap.err)

    return _run


def state_snapshot(state: Path) -> dict[str, tuple[str, int, str]]:
    """Snapshot of a state dir, leaving out the lock and scratch files."""
    snap = tree_snapshot(state)
    return {k: v for k, v in snap.items() if k != "lock" and not k.startswith(("tmp/", "cache/"))}


@dataclass
class World:
    """Keys, a repository with 2-of-3 root keys and 2-of-2 release keys, and a node."""

    base: Path
    run: Run

    @property
    def repo(self) -> Path:
        return self.base / "repo"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def target(self) -> Path:
        return self.base / "target" / "app"

    def key(self, name: str) -> Path:
        return self.base / "keys" / f"{name}.key"

    def publish(self, version: str, files: dict[str, bytes], **kw: object) -> Path:
        src = make_tree(self.base / "src" / version, files, **kw)  # type: ignore[arg-type]
        r = self.run("publish", self.repo, "app", version, src)
        assert r.code == 0, r.err
        return src

    def export(self, name: str, *extra: str) -> Path:
        dest = self.base / name
        r = self.run("export", self.repo, dest, *extra)
        assert r.code == 0, r.err
        return dest

    def import_(self, bundle: Path, *extra: str) -> Result:
        return self.run("import", bundle, "--state-dir", self.state, *extra)

    def reinit(self, *extra: str) -> None:
        """(Re)configure the component with extra ``init`` options."""
        r = self.run("init", "--state-dir", self.state, "--trust", self.repo / "root.msgpack",
                     "--component", f"app={self.target}", *extra)  # fmt: skip
        assert r.code == 0, r.err

    def app_status(self) -> dict[str, Any]:
        """The component's part of ``status --json``."""
        r = self.run("status", "--state-dir", self.state, "--json")
        assert r.code == 0, r.err
        doc: dict[str, Any] = json.loads(r.out)["components"]["app"]
        return doc

    def app_history(self) -> list[dict[str, Any]]:
        """The component's ``history --json`` entries."""
        r = self.run("history", "app", "--state-dir", self.state, "--json")
        assert r.code == 0, r.err
        entries: list[dict[str, Any]] = json.loads(r.out)["history"]
        return entries

    def snapshot(self) -> tuple[object, object]:
        return state_snapshot(self.state), tree_snapshot(self.target)


@pytest.fixture
def world(tmp_path: Path, run: Run) -> World:
    w = World(tmp_path, run)
    (tmp_path / "keys").mkdir()
    for name in ("root1", "root2", "root3", "rel1", "rel2"):
        assert run("keygen", w.key(name)).code == 0
    r = run(
        "repo",
        "init",
        w.repo,
        "--root-key",
        w.key("root1"),
        "--root-key",
        w.key("root2"),
        "--root-key",
        w.key("root3"),
        "--threshold",
        "2",
        "--release-key",
        w.key("rel1"),
        "--release-key",
        w.key("rel2"),
        "--release-threshold",
        "2",
    )
    assert r.code == 0, r.err
    w.target.parent.mkdir(parents=True)
    r = run(
        "init",
        "--state-dir",
        w.state,
        "--trust",
        w.repo / "root.msgpack",
        "--component",
        f"app={w.target}",
    )
    assert r.code == 0, r.err
    return w


@pytest.fixture(scope="session")
def dist_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline installer artifact of this checkout, for this CPU and CPython,
    built once per session for the integration tests that need it (the first
    build fills build/dist-cache from the index; tests/integration/_dist.py)."""
    from _dist import (  # tests/integration/ is on the path once one of its tests is
        ArtifactBuildError,
        base_interpreter,
        build_artifact,
        this_arch,
    )

    if this_arch() is None:
        pytest.skip("the artifacts are for x86_64 and aarch64 only")
    if not base_interpreter().exists():
        pytest.skip(f"no base interpreter at {base_interpreter()}")
    try:
        return build_artifact(tmp_path_factory.mktemp("artifact"))
    except ArtifactBuildError as exc:
        pytest.fail(str(exc))
