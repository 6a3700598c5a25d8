"""Rollouts through real node services over memory streams, under MockClock: reports
spread, a failing canary brakes the site, waves go in order, halt and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from _daemonkit import Site, installed, link, make_service, random_tree, wait_until
from _kit import cli, make_tree
from prometheus_client.parser import text_string_to_metric_families

from p2pupd.daemon import api
from p2pupd.daemon.bundles.siterequest import node_key
from p2pupd.daemon.errors import ApplyError
from p2pupd.daemon.service.metrics import MetricsFeed
from p2pupd.daemon.service.nodeservice import NodeService
from p2pupd.daemon.service.rollout.service import RolloutOptions
from p2pupd.daemon.state.node import Node
from p2pupd.protocol.rollout.actions import ActionKind
from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.protocol.rollout.waves import place

N = 6
FAIL_ON_2 = 'test "$P2PUPD_VERSION" != 2.0'  # every node's health check refuses 2.0


def health_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "health.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def make_site(tmp_path: Path, health: str = "", nodes: int = N) -> tuple[Site, list[Path]]:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(1, files=2, size=20_000))
    extra = ["--health-cmd", str(health_script(tmp_path, health))] if health else []
    states = []
    for i in range(nodes):
        state = tmp_path / "nodes" / f"n{i}" / "state"
        target = tmp_path / "nodes" / f"n{i}" / "target" / "app"
        target.parent.mkdir(parents=True)
        cli("init", "--state-dir", state, "--trust", site.root_file,
            "--component", f"app={target}", *extra)  # fmt: skip
        api.import_dir(state, site.bundle("v1"), apply_after=True)
        states.append(state)
    return site, states


def publish(site: Site, version: str, policy: str | None, seed: int) -> Path:
    src = site.base / "src" / f"app-{version}"
    make_tree(src, random_tree(seed, files=2, size=20_000))
    args = ["publish", site.repo, "app", version, src]
    if policy:
        args += ["--rollout", policy]
    cli(*args)
    return site.bundle(f"b-{version}")


def services(states: list[Path], **rollout: Any) -> list[NodeService]:
    opts = RolloutOptions(settle=5.0, report_interval=60.0, **rollout)
    return [make_service(s, 10 + i, rollout=opts) for i, s in enumerate(states)]


async def mesh(nursery: trio.Nursery, svcs: list[NodeService]) -> None:
    for s in svcs:
        await nursery.start(s.serve)
    for i, a in enumerate(svcs):
        for b in svcs[i + 1 :]:
            link(nursery, a, b)
    await wait_until(lambda: all(len(s.conns) == N - 1 for s in svcs), 30, 0.1)


def ranked(svcs: list[NodeService], serial: int, policy: str) -> list[NodeService]:
    by_id = {s.node.config.node_id: s for s in svcs}
    order = place(RolloutPolicy.parse(policy), "app", serial, by_id).order
    return [by_id[i] for i in order]


def record(svc: NodeService, events: list[tuple[str, NodeService]]) -> None:
    """Log when ``svc``'s gate lets an apply go and when an apply of serial 3 commits."""
    go, ended = svc.rollout._auto_apply, svc.rollout.apply_ended

    def on_go(component: str, serial: int) -> None:
        events.append(("go", svc))
        go(component, serial)

    def on_ended(component: str) -> None:
        ended(component)
        if Node(svc.node.root).state.read_state(component).installed == 3:
            events.append(("committed", svc))

    svc.rollout._auto_apply = on_go  # type: ignore[method-assign]
    svc.rollout.apply_ended = on_ended  # type: ignore[method-assign]


def fleet_release(svc: NodeService, serial: int) -> dict[str, Any]:
    """The release's progress in ``svc``'s fleet view ({} while it has not heard of it)."""
    return next((r for r in svc.rollout.fleet_doc()["releases"] if r["serial"] == serial), {})


async def test_a_failing_canary_brakes_the_site_and_the_next_release_goes_in_waves(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    site, states = make_site(tmp_path, health=FAIL_ON_2)
    policy = "waves=1,50% soak=0 halt-after=1"
    bad = publish(site, "2.0", policy, seed=2)
    svcs = services(states)
    async with trio.open_nursery() as nursery:
        await mesh(nursery, svcs)
        # Every node hears every other one's report before anything moves.
        await wait_until(lambda: all(len(s.rollout.table or ()) == N for s in svcs), 120)
        canary = ranked(svcs, 2, policy)[0]
        await svcs[3].lifecycle.import_dir(bad, apply_after=False)
        await wait_until(lambda: all(fleet_release(s, 2).get("braked") for s in svcs), timeout=600)
        await trio.sleep(120)  # time for a wrong apply to show
        assert [installed(s) for s in states] == [1] * N
        canary_state = Node(canary.node.root).state.read_state("app")
        assert 2 in canary_state.bad  # the canary tried, failed, rolled back
        for s in svcs:
            if s is not canary:
                assert 2 not in Node(s.node.root).state.read_state("app").bad  # never tried
            rel = fleet_release(s, 2)
            assert rel["failed"] == 1 and rel["failures"][0]["node_id"] == canary.node_id.hex()
            comp = s.lifecycle.component_doc("app")["rollout"]
            if s is not canary:
                assert comp["go"] == "brake" and "health check" in comp["reason"]
        # The same view as Prometheus metrics, on any node.
        feed = MetricsFeed(svcs[0])
        fams = {f.name: f for f in text_string_to_metric_families(feed.metrics.registry.render())}
        held = {
            (x.labels["serial"], x.labels["reason"]): x.value
            for x in fams["p2pupd_rollout_held"].samples
        }
        assert held[("2", "brake")] == 1 and held[("1", "brake")] == 0
        by_state = {
            (x.labels["version"], x.labels["state"]): x.value
            for x in fams["p2pupd_site_nodes"].samples
        }
        assert by_state[("1.0", "failed")] == 1  # the canary, back on 1.0
        assert by_state[("1.0", "waiting")] == N - 1  # the others, held at the gate
        # An operator's apply by hand is refused while the brake holds.
        other = ranked(svcs, 2, policy)[1]
        with pytest.raises(ApplyError, match="held by the site's rollout"):
            await other.lifecycle.apply_release("app", 2)

        # The publisher's next release (good) rolls out wave by wave to all.
        good = publish(site, "3.0", policy, seed=3)
        order = ranked(svcs, 3, policy)
        events: list[tuple[str, NodeService]] = []  # in the order they happen
        for svc in svcs:
            record(svc, events)
        await svcs[0].lifecycle.import_dir(good, apply_after=False)
        await wait_until(lambda: all(installed(s) == 3 for s in states), timeout=900)
        # waves of 6 nodes: (1, 3, 6): no node of a wave goes before every node of
        # the waves before it committed
        bounds = (1, 3, 6)
        for k in (1, 2):
            earlier = order[: bounds[k - 1]]
            committed = max(events.index(("committed", s)) for s in earlier)
            first_go = min(events.index(("go", s)) for s in order[bounds[k - 1] : bounds[k]])
            assert first_go > committed, (k, events)
        nursery.cancel_scope.cancel()


async def test_halt_and_resume(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    site, states = make_site(tmp_path)
    policy = "waves=1,50% soak=0"
    v2 = publish(site, "2.0", policy, seed=2)
    # Every node trusts node 5's key to resume (the installer's `[rollout] operators`).
    pub = node_key(Node(states[5]).state).public_key().public_bytes_raw()
    svcs = services(states, operators=(pub,))
    operator = svcs[5]
    async with trio.open_nursery() as nursery:
        await mesh(nursery, svcs)
        await wait_until(lambda: all(len(s.rollout.table or ()) == N for s in svcs), 120)
        # Halt before the release arrives anywhere: it is held on every node.
        await svcs[1].rollout.act(ActionKind.HALT, "app", 2, "bad batch of disks", None)
        await svcs[2].lifecycle.import_dir(v2, apply_after=False)
        await wait_until(
            lambda: all(
                (s.lifecycle.component_doc("app")["rollout"] or {}).get("go") == "halted"
                for s in svcs
            ),
            timeout=600,
        )
        await trio.sleep(60)
        assert [installed(s) for s in states] == [1] * N
        assert all(fleet_release(s, 2).get("halted") for s in svcs)
        # A resume from a node whose key is not an operator's moves only that node.
        await svcs[4].rollout.act(ActionKind.RESUME, "app", 2, "", None)
        await trio.sleep(30)
        assert all(fleet_release(s, 2).get("halted") for s in svcs if s is not svcs[4])
        # The operator's resume goes everywhere: the waves run to the end.
        await operator.rollout.act(ActionKind.RESUME, "app", 2, "disks replaced", None)
        await wait_until(lambda: all(installed(s) == 2 for s in states), timeout=900)
        assert not any(fleet_release(s, 2).get("halted") for s in svcs)
        nursery.cancel_scope.cancel()


async def test_a_restarted_node_still_holds_the_brake_and_refuses_replays(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    site, states = make_site(tmp_path, health=FAIL_ON_2)
    policy = "waves=1,50% soak=0 halt-after=1"
    bad = publish(site, "2.0", policy, seed=2)
    svcs = services(states)
    async with trio.open_nursery() as nursery:
        await mesh(nursery, svcs)
        await wait_until(lambda: all(len(s.rollout.table or ()) == N for s in svcs), 120)
        await svcs[0].lifecycle.import_dir(bad, apply_after=False)
        await wait_until(lambda: all(fleet_release(s, 2).get("braked") for s in svcs), 600)
        canary = ranked(svcs, 2, policy)[0]
        watcher = next(s for s in svcs if s is not canary)
        entry = watcher.rollout.table.get(canary.node_id)  # type: ignore[union-attr]
        assert entry is not None
        old_seq = entry.report.seq
        nursery.cancel_scope.cancel()  # every daemon stops (and saves its view)
    # The watcher comes back alone: no peer has told it anything yet.
    again = make_service(watcher.node.root, 99, rollout=RolloutOptions(settle=5.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(again.serve)
        await trio.sleep(10)
        assert again.rollout.table is not None and again.rollout.ledger is not None
        assert fleet_release(again, 2)["braked"]  # from the view it saved
        assert again.lifecycle.component_doc("app")["rollout"]["go"] == "brake"
        assert installed(again.node.root) == 1
        assert again.rollout.table.seq_of(canary.node_id) >= old_seq  # the replay marks too
        restored = again.rollout.table.get(canary.node_id)
        assert restored is not None and not again.rollout.table.is_live(
            restored, trio.current_time()
        )
        nursery.cancel_scope.cancel()


async def test_a_halt_between_go_and_apply_puts_the_release_back_at_the_gate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    site, states = make_site(tmp_path)
    v2 = publish(site, "2.0", "waves=1 soak=0", seed=2)
    svc = services(states[:1])[0]
    let_go: list[int] = []
    svc.rollout._auto_apply = lambda c, s: let_go.append(s)  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.serve)
        await svc.lifecycle.import_dir(v2, apply_after=False)
        await wait_until(lambda: let_go == [2], 60)  # a site of one: its own canary
        await svc.rollout.act(ActionKind.HALT, "app", 2, "wait", None)
        await svc.lifecycle.auto_apply("app", 2)  # the apply the gate let go, too late
        assert installed(states[0]) == 1
        assert svc.lifecycle.component_doc("app")["rollout"]["go"] == "halted"
        await svc.rollout.act(ActionKind.RESUME, "app", 2, "", None)
        await wait_until(lambda: let_go == [2, 2], 60)  # let go again, not forgotten
        nursery.cancel_scope.cancel()


async def test_a_partitioned_node_applies_nothing_it_cannot_justify(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock is stepped by hand (P2PUPD_NOW): soak is measured on it."""
    wall = 1_900_000_000
    monkeypatch.setenv("P2PUPD_NOW", str(wall))
    site, states = make_site(tmp_path)
    policy = "waves=1,50% soak=60s"
    v2 = publish(site, "2.0", policy, seed=2)
    svcs = services(states)
    order = ranked(svcs, 2, policy)  # waves of 6: (1, 3, 6)
    cut = order[-1]  # a node of the last wave
    async with trio.open_nursery() as nursery:
        await mesh(nursery, svcs)
        await wait_until(lambda: all(len(s.rollout.table or ()) == N for s in svcs), 120)
        await order[0].lifecycle.import_dir(v2, apply_after=False)
        await wait_until(lambda: "app" in cut.rollout.pending, 120)  # it holds the release
        await wait_until(lambda: installed(order[0].node.root) == 2, 60)  # the canary went
        for conn in list(cut.conns.values()):  # the partition
            conn.close("cable pulled")
        await wait_until(lambda: not cut.conns, 30, 0.1)
        for step in (1, 2):  # the rest of the site soaks and moves on, wave by wave
            monkeypatch.setenv("P2PUPD_NOW", str(wall + 62 * step))
            await trio.sleep(30)
        others = [s for s in svcs if s is not cut]
        await wait_until(lambda: all(installed(s.node.root) == 2 for s in others), 300)
        await trio.sleep(300)
        assert installed(cut.node.root) == 1  # it never saw the canary soak: it waits
        doc = cut.lifecycle.component_doc("app")["rollout"]
        assert doc["go"] == "wait" and ("soaking" in doc["reason"] or "silent" in doc["reason"])
        for other in others:  # the partition heals
            link(nursery, cut, other)
        await wait_until(lambda: installed(cut.node.root) == 2, 300)
        nursery.cancel_scope.cancel()
