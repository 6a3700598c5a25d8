"""A site lives through a root rotation that replaces the release key.

Two components, two in-process daemons on real TCP (127.0.0.1). The publisher
rotates its root to new root keys and a new release key, publishes one
component again and brings the stick to node A only; node B learns root v2
from A over the LAN. Afterwards every command still works on both nodes:
status and history name every version, rollback to a kept version signed
before the rotation, re-apply, and on the publisher's side export, verify and
``--from-version`` sticks. A key the new root *revokes* (compromised) is the
other case: releases it signed are refused from then on, with one line.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import trio
from _daemonkit import installed, random_tree
from _kit import Site, cli

from p2pupd.daemon import api
from p2pupd.daemon.config import DaemonOptions
from p2pupd.daemon.service import app
from p2pupd.daemon.service.nodeservice import NodeService
from p2pupd.daemon.state.node import Node
from p2pupd.tools.cli import main


def options(state: Path, *peers: tuple[str, int]) -> DaemonOptions:
    return DaemonOptions(
        state_dir=state, listen=("127.0.0.1", 0), peers=peers, mdns=False, handle_signals=False
    )


async def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


async def poll(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(pred):
            await trio.sleep(0.05)


def run(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def two_component_node(site: Site, name: str, root: int = 1) -> tuple[Path, Path, Path]:
    """A node with components app and cfg, pinned to the repository's root ``root``."""
    base = site.base / "nodes" / name
    state, app_t, cfg_t = base / "state", base / "target" / "app", base / "target" / "cfg"
    app_t.parent.mkdir(parents=True)
    cli("init", "--state-dir", state, "--trust", site.repo / "roots" / f"{root}.msgpack",
        "--component", f"app={app_t}", "--component", f"cfg={cfg_t}")  # fmt: skip
    return state, app_t, cfg_t


def rotate(site: Site, *extra: str) -> None:
    keys = site.base / "keys"
    cli("keygen", keys / "root2.key")
    cli("keygen", keys / "rel2.key")
    cli("repo", "rotate-root", site.repo, "--old-key", keys / "root.key",
        "--root-key", keys / "root2.key", "--release-key", keys / "rel2.key", *extra)  # fmt: skip


async def test_release_key_rotation_keeps_every_command_working(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(1), "app")
    site.publish("c1", random_tree(2), "cfg")
    v1 = site.bundle("v1")
    site.publish("2.0", random_tree(3), "app")
    v2 = site.bundle("v2")
    sa, _, _ = two_component_node(site, "a")
    sb, tb, cb = two_component_node(site, "b")
    for state in (sa, sb):
        cli("import", "--state-dir", state, v1, "--apply")
        cli("import", "--state-dir", state, v2, "--apply")
    assert installed(sb) == 2 and list(Node(sb).state.read_state("app").kept) == [1]

    rotate(site)
    site.publish("c2", random_tree(4), "cfg")  # signed by the new release key
    stick = site.bundle("after")
    code, _, err = run("verify", site.repo, "--trust", site.root_file)  # the whole repository
    assert code == 0, err

    async with trio.open_nursery() as nursery:
        a: NodeService = await nursery.start(app.run, options(sa))
        port = int((a.listen_endpoint or "").rsplit(":", 1)[1])
        b: NodeService = await nursery.start(app.run, options(sb, ("127.0.0.1", port)))
        await poll(lambda: len(a.conns) == len(b.conns) == 1)
        await in_thread(api.import_dir, sa, stick)
        # B learns root v2 and cfg c2 from A over TCP, and applies it.
        await poll(lambda: installed(sb, "cfg") == 2)
        assert b.node.trusted_root().version == 2

        doc = await in_thread(api.status, sb)  # routed to B's daemon
        comps = doc["components"]
        assert comps["app"]["version"] == "2.0" and comps["app"]["kept"][0]["version"] == "1.0"
        assert comps["cfg"]["version"] == "c2"
        code, out, err = await in_thread(run, "status", "--state-dir", sb)
        assert code == 0 and "2.0" in out and "c2" in out, err
        hist = await in_thread(api.history, sb, "app")
        assert [h["version"] for h in hist if h["event"] == "applied"][-1] == "2.0"

        # Back to a kept version signed before the rotation, then forward again.
        r = await in_thread(api.rollback, sb, "app")
        assert (r.version, r.serial) == ("1.0", 1)
        r = await in_thread(api.apply, sb, "app", version="2.0")
        assert (r.version, r.serial) == ("2.0", 2)
        nursery.cancel_scope.cancel()
    assert sorted(p.name for p in tb.iterdir()) == sorted(
        p.name for p in site.sources["2.0"].iterdir()
    )
    assert sorted(p.name for p in cb.iterdir()) == sorted(
        p.name for p in site.sources["c2"].iterdir()
    )

    # The publisher: a full export leaves out what predates the rotation, and says so.
    code, out, err = run("export", site.repo, tmp_path / "full", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["left_out"] == ["app serial 2"]
    assert [r["component"] for r in doc["releases"]] == ["cfg"]
    code, _, err = run("verify", tmp_path / "full", "--trust", site.root_file)
    assert code == 0, err
    # A node still at root v1 and cfg c1 takes a --from-version stick for c2.
    sc, _, _ = two_component_node(site, "c")
    cli("import", "--state-dir", sc, v1, "--apply")
    delta = tmp_path / "delta"
    cli("export", site.repo, delta, "--component", "cfg", "--from-version", "c1")
    code, _, err = run("import", "--state-dir", sc, delta, "--apply")
    assert code == 0, err
    assert installed(sc, "cfg") == 2 and Node(sc).trusted_root().version == 2
    assert installed(sc, "app") == 1  # held from before the rotation, still verifiable
    code, _, err = run("rollback", "--state-dir", sc, "cfg")
    assert code == 0, err


async def test_a_revoked_release_key_is_refused_even_for_kept_versions(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(5), "app")
    site.publish("c1", random_tree(6), "cfg")
    v1 = site.bundle("v1")
    site.publish("2.0", random_tree(7), "app")
    v2 = site.bundle("v2")
    state, target, _ = two_component_node(site, "a")
    cli("import", "--state-dir", state, v1, "--apply")
    cli("import", "--state-dir", state, v2, "--apply")
    before = sorted(p.name for p in target.iterdir())
    rotate(site, "--revoke-key", str(site.base / "keys" / "rel.key.pub"))
    site.publish("c2", random_tree(8), "cfg")
    cli("import", "--state-dir", state, site.bundle("after"), "--apply")
    assert installed(state, "cfg") == 2
    code, _, err = run("rollback", "--state-dir", state, "app")
    assert code == 3 and len(err.splitlines()) == 1, err
    assert "revokes as compromised" in err
    assert installed(state) == 2 and sorted(p.name for p in target.iterdir()) == before
    code, out, err = run("status", "--state-dir", state, "--json")
    assert code == 0, err
    assert json.loads(out)["components"]["cfg"]["version"] == "c2"
