"""The control socket (a real Unix socket): the CLI's node commands reach a running
daemon in-process and behave as they do inline, with the same errors and exit codes;
and two in-process daemons move a release over real TCP on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from _daemonkit import Site, installed, random_tree

from p2pupd.daemon import api
from p2pupd.daemon.config import DaemonOptions
from p2pupd.daemon.ctl import socket_path
from p2pupd.daemon.service import app
from p2pupd.daemon.service.nodeservice import NodeService
from p2pupd.tools.cli import main


def options(state: Path, *peers: tuple[str, int]) -> DaemonOptions:
    return DaemonOptions(
        state_dir=state, listen=("127.0.0.1", 0), peers=peers, mdns=False, handle_signals=False
    )


async def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


async def poll(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(pred):
            await trio.sleep(0.05)


async def test_cli_commands_go_through_the_control_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(7))
    v1 = site.bundle("v1")
    site.publish("2.0", random_tree(8))
    bundle = site.bundle("v2")
    other = Site(tmp_path / "other")  # a repository this node does not trust
    other.publish("5.0", random_tree(9))
    foreign = other.bundle("foreign")
    state, _ = site.node("a")
    stale = socket_path(state)
    with socket.socket(socket.AF_UNIX) as s:  # a dead daemon's leftover
        s.bind(str(stale))

    async with trio.open_nursery() as nursery:
        core: NodeService = await nursery.start(app.run, options(state))
        sock = socket_path(state)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600

        assert await in_thread(main, ["import", str(v1), "--state-dir", str(state)]) == 0
        await poll(lambda: installed(state) == 1)  # auto_apply: the daemon applies it
        report, applied = await in_thread(api.import_dir, state, bundle, apply_after=True)
        assert [(r.serial, r.new) for r in report.releases if r.new] == [(2, True)]
        assert [(r.serial, r.changed) for r in applied] == [(2, True)]
        doc = await in_thread(api.status, state)
        assert doc["daemon"]["running"] and doc["daemon"]["pid"] == os.getpid()
        app_doc = doc["components"]["app"]
        assert app_doc["serial"] == 2 and app_doc["origin"] == {"serial": 2, "from": "import"}
        assert (await in_thread(api.peers, state))["connected"] == []

        # Errors keep their class, so the CLI's exit codes do not change.
        capsys.readouterr()
        assert (
            await in_thread(main, ["apply", "app", "--state-dir", str(state), "--version", "9"])
            == 1
        )
        assert "no stored release of app has version '9'" in capsys.readouterr().err
        assert await in_thread(main, ["import", str(foreign), "--state-dir", str(state)]) == 3
        err = capsys.readouterr().err
        assert err.startswith("p2pupd: refused:") and "Traceback" not in err
        assert await in_thread(main, ["rollback", "app", "--state-dir", str(state)]) == 0
        assert installed(state) == 1
        assert await in_thread(main, ["status", "--json", "--state-dir", str(state)]) == 0
        assert '"daemon"' in capsys.readouterr().out
        assert core.lifecycle.high_water("app") == 2
        nursery.cancel_scope.cancel()

    assert not socket_path(state).exists()  # removed on the way out
    with socket.socket(socket.AF_UNIX) as s:  # a crashed daemon's socket: connection refused
        s.bind(str(stale))
    doc = await in_thread(api.status, state)  # no daemon: inline again
    assert "daemon" not in doc and doc["components"]["app"]["serial"] == 1
    with pytest.raises(api.DaemonError, match="no p2pupd daemon"):
        api.peers(state)


async def test_two_daemons_move_a_release_over_tcp_loopback(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(11, files=6, size=300_000))
    bundle = site.bundle("v1")
    sa, _ = site.node("a")
    sb, tb = site.node("b")
    async with trio.open_nursery() as nursery:
        a: NodeService = await nursery.start(app.run, options(sa))
        port = int((a.listen_endpoint or "").rsplit(":", 1)[1])
        b: NodeService = await nursery.start(app.run, options(sb, ("127.0.0.1", port)))
        await poll(lambda: len(a.conns) == len(b.conns) == 1)
        await in_thread(api.import_dir, sa, bundle)
        await poll(lambda: installed(sb) == 1)
        doc = await in_thread(api.status, sb)
        received = doc["components"]["app"]["received"]
        assert received["bytes"] == sum(len(p.read_bytes()) for p in site.sources["1.0"].iterdir())
        assert list(received["from"]) == [a.node.config.node_id.hex()]
        peers = await in_thread(api.peers, sb)
        assert peers["connected"][0]["bytes_in"] >= received["bytes"]
        nursery.cancel_scope.cancel()
    assert sorted(p.name for p in tb.iterdir()) == sorted(
        p.name for p in site.sources["1.0"].iterdir()
    )
