"""This node's own report, read from its component state (history, bad releases)."""

from __future__ import annotations

from pathlib import Path

from p2pupd.daemon.state.report import component_report, component_reports
from p2pupd.daemon.state.statedir import ComponentConfig, ComponentState, HistoryEntry
from p2pupd.protocol import ids
from p2pupd.protocol.rollout.report import MAX_REASON_BYTES, CompState

CFG = ComponentConfig("app", Path("/opt/app"))


def state(
    *events: tuple[int, str, int, str], installed: int | None, **kw: object
) -> ComponentState:
    history = tuple(HistoryEntry(t, e, s, f"{s}.0", d) for t, e, s, d in events)
    return ComponentState(installed=installed, history=history, **kw)  # type: ignore[arg-type]


def test_nothing_applied_yet() -> None:
    c = component_report(CFG, ComponentState())
    assert c.state is CompState.IDLE and c.installed is None and c.auto


def test_committed_since_the_apply() -> None:
    c = component_report(CFG, state((100, "applied", 1, ""), (200, "applied", 2, ""), installed=2))
    assert (c.state, c.serial, c.installed, c.installed_since, c.version) == (
        CompState.COMMITTED, 2, 2, 200, "2.0",
    )  # fmt: skip


def test_a_failed_release_with_its_reason_and_hook_digest() -> None:
    hook = "health hook failed: exit 3 (0.10s)\nstdout: disk missing"
    st = state(
        (100, "applied", 1, ""),
        (150, "hook", 2, hook),
        (151, "health-failed", 2, "health hook: exit 3\nmore"),
        installed=1,
        bad={2: "health hook: exit 3"},
    )
    c = component_report(CFG, st)
    assert c.state is CompState.FAILED and c.serial == 2 and c.installed == 1
    assert c.since == 151 and c.installed_since == 100
    assert c.reason == "health hook: exit 3 more"  # one line
    assert c.hook_digest == ids.sha256(hook.encode())  # same failure, same digest everywhere
    assert c.bad == (2,) and c.failed(2) and not c.failed(1)


def test_an_operator_rollback_names_the_release_it_left() -> None:
    st = state((100, "applied", 1, ""), (200, "applied", 2, ""), (300, "rolled-back", 1, ""),
               installed=1)  # fmt: skip
    c = component_report(CFG, st)
    assert c.state is CompState.ROLLED_BACK and c.serial == 2 and c.installed == 1
    assert c.installed_since == 300 and c.failed(2)


def test_applying_and_waiting_come_from_the_daemon() -> None:
    st = state((100, "applied", 1, ""), installed=1)
    busy = component_report(CFG, st, applying=2, now=500)
    assert (busy.state, busy.serial, busy.since) == (CompState.APPLYING, 2, 500)
    many = {f"c{i:02d}": ComponentConfig(f"c{i:02d}", Path("/x")) for i in range(20)}
    comps = component_reports(many, {}, applying={}, waits={"c01": (3, "wave 2")}, now=0)
    assert len(comps) == 16 and comps[1].holds == 3 and comps[1].wait == "wave 2"
    long = state((1, "health-failed", 2, "x" * 500), installed=None)
    assert len(component_report(CFG, long).reason.encode()) <= MAX_REASON_BYTES
