"""A self-update's transaction, in-process on a real filesystem: the new version
is tried *before* the swap (docs/self-update.md, "The trial run").

``apply`` with a trial stops at ``trial`` (``HandOver``) with the old version
live and the new one staged; the trial run claims the open transaction (so its
own recovery leaves it alone) and ends it with ``finish_trial``; anyone else
who recovers it holds the lock, so the trial run is over: with ``unhealthy``
(the run's or its watchdog's verdict) the release is marked bad with that
reason, without any verdict it was cut off (an interruption, retried), with
``healthy`` but no swap it is an interruption too, with the swap done the
commit is finished. Crashes are simulated by stopping at transaction
points; the real processes are in tests/integration/test_self_update.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import World, tree_snapshot

from p2pupd.daemon import api
from p2pupd.daemon.apply import transaction
from p2pupd.daemon.apply.engine import Applier, HandOver
from p2pupd.daemon.apply.transaction import claim_trial
from p2pupd.daemon.errors import NotFoundError
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import ComponentState

V1 = {"bin/tool": b"v1\n", "lib/big": os.urandom(5000)}
V2 = {"bin/tool": b"v2\n", "lib/big": os.urandom(5000)}
TRIAL = {"deadline_ms": 123_000, "peers": 2}


@pytest.fixture
def two(world: World) -> Iterator[tuple[World, list[Path]]]:
    """A symlink-kind component with 1.0 live and 2.0 stored."""
    world.reinit("--kind", "symlink")
    srcs = [world.publish("1.0", V1), world.publish("2.0", V2)]
    assert world.import_(world.export("usb", "--history", "2")).code == 0
    api.apply(world.state, "app", version="1.0")
    yield world, srcs
    claim_trial(None)


def applier(world: World, trial: bool = True) -> Applier:
    return Applier(Node(world.state), trial=(lambda cfg: dict(TRIAL)) if trial else None)


def hand_over(world: World) -> transaction.Tx:
    with pytest.raises(HandOver) as caught:
        applier(world).apply("app", 2)
    return caught.value.tx


def st(world: World) -> ComponentState:
    return Node(world.state).state.read_state("app")


def journal(world: World) -> list[dict[str, Any]]:
    return transaction.Journal(world.state / "journal" / "app.log").last_transaction()


def test_the_trial_comes_before_the_swap_and_its_run_finishes_it(
    two: tuple[World, list[Path]],
) -> None:
    world, srcs = two
    tx = hand_over(world)
    # Handed over: the old version is live, the new one staged, the transaction open.
    assert tree_snapshot(world.target) == tree_snapshot(srcs[0])
    assert tree_snapshot(tx.src) == tree_snapshot(srcs[1])
    trial = journal(world)[-1]
    assert trial == {"step": "trial", "tx": tx.tx, **TRIAL}
    assert st(world).installed == 1

    # The trial run claims it: its own recovery (every apply starts with one)
    # leaves it open, and status shows it.
    claim_trial(tx.tx)
    assert applier(world).recover() == []
    assert applier(world).pending()["app"]["step"] == "trial"
    result = applier(world).finish_trial("app", tx.tx)
    assert (result.serial, result.previous, result.changed) == (2, 1, True)
    assert tree_snapshot(world.target) == tree_snapshot(srcs[1])
    assert (st(world).installed, st(world).kept) == (2, (1,))
    assert [r["step"] for r in journal(world)][-6:] == [
        "trial", "healthy", "swapped", "health", "commit", "done",
    ]  # fmt: skip
    with pytest.raises(NotFoundError):  # nothing left to finish
        applier(world).finish_trial("app", tx.tx)


def test_a_trial_run_that_failed_marks_the_release_bad(two: tuple[World, list[Path]]) -> None:
    world, srcs = two
    tx = hand_over(world)
    # The trial run (or its watchdog) records the verdict, then hands back.
    claim_trial(tx.tx)
    applier(world).fail_trial("app", tx.tx, "no peer came back within 60 s (it had 2)")
    claim_trial(None)
    # The old version's start holds the lock and recovers. It never left.
    lines = applier(world, trial=False).recover()
    assert lines == ["app: rolled back serial 2 (no peer came back within 60 s (it had 2))"]
    assert tree_snapshot(world.target) == tree_snapshot(srcs[0])
    assert not tx.src.exists()
    s = st(world)
    assert s.installed == 1 and s.bad[2] == "no peer came back within 60 s (it had 2)"
    assert s.history[-1].event == "health-failed"
    # Marked bad: not applied again automatically.
    with pytest.raises(api.ApplyError, match="failed here before"):
        applier(world).apply("app", 2)


def test_a_trial_run_cut_off_before_a_verdict_is_an_interruption(
    two: tuple[World, list[Path]],
) -> None:
    world, srcs = two
    for n in (1, 2, 3):
        tx = hand_over(world)
        # A power cut, or the service stopped, during the trial run: no verdict.
        applier(world, trial=False).recover()
        assert tree_snapshot(world.target) == tree_snapshot(srcs[0])
        assert not tx.src.exists()
        s = st(world)
        assert s.installed == 1 and s.interrupted == {2: n}
        assert (2 in s.bad) == (n == 3)  # retried, then given up at the third
    assert "cut off before a verdict" in st(world).bad[2]


class Stop(BaseException):
    """The process died here."""


def stop_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    real = transaction.crash_point

    def fake(p: str) -> None:
        if p == point:
            raise Stop(p)
        real(p)

    monkeypatch.setattr(transaction, "crash_point", fake)


def test_healthy_but_not_swapped_is_an_interruption_and_retried(
    two: tuple[World, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, srcs = two
    tx = hand_over(world)
    claim_trial(tx.tx)
    stop_at(monkeypatch, "healthy")
    with pytest.raises(Stop):
        applier(world).finish_trial("app", tx.tx)
    monkeypatch.undo()
    claim_trial(None)
    applier(world, trial=False).recover()
    s = st(world)
    assert s.installed == 1 and 2 not in s.bad and s.interrupted == {2: 1}
    assert tree_snapshot(world.target) == tree_snapshot(srcs[0])
    # Retried: the next apply tries it again (another trial).
    tx2 = hand_over(world)
    assert tx2.to == 2 and tx2.tx != tx.tx


def test_swapped_after_a_healthy_trial_is_committed_by_recovery(
    two: tuple[World, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, srcs = two
    tx = hand_over(world)
    claim_trial(tx.tx)
    stop_at(monkeypatch, "swapped")
    with pytest.raises(Stop):
        applier(world).finish_trial("app", tx.tx)
    monkeypatch.undo()
    claim_trial(None)
    assert applier(world, trial=False).recover() == [
        "app: finished the interrupted commit of serial 2"
    ]
    assert (st(world).installed, st(world).kept) == (2, (1,))
    assert tree_snapshot(world.target) == tree_snapshot(srcs[1])


def test_without_a_trial_and_for_rollbacks_nothing_changes(
    two: tuple[World, list[Path]],
) -> None:
    world, srcs = two
    # The CLI applies a self component like any other (no daemon to restart).
    assert applier(world, trial=False).apply("app", 2).changed
    assert tree_snapshot(world.target) == tree_snapshot(srcs[1])
    # A rollback is an operator's act, unchecked: never a trial.
    assert applier(world).rollback("app").serial == 1
    assert tree_snapshot(world.target) == tree_snapshot(srcs[0])
