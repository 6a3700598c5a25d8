"""Component-state transitions: the one writer of ``STATE/state.msgpack``.

Theory of operation. A component's ``ComponentState`` (statedir.py) says what
is live, what is kept, the rollback high-water mark, which releases failed
here and why, and its history. It changes only through the named transitions
below; each reads the current state, changes the fields its row names and
appends its history event, in one atomic write. The caller holds the node's
state lock (a command) or the daemon's state mutex, so read-modify-write never
interleaves. ``tests/unit/test_layering.py`` fails if anything else writes it.

  transition        fields it changes                         history event
  ----------------  ----------------------------------------  ----------------
  accepted          high_water, high_digest (if newer)        imported/received
  no_variant        -- (recorded once per serial)             no-variant
  keep_dropped      kept (the serials leave it)               --
  refused           bad[serial], last_error                   refused
  committed         installed, kept (<= retain), bad, last    applied/rolled-back
                    _error, interrupted (the serial's cleared)  (the tx's event)
  undone (verdict)  bad[serial], last_error                   health-failed
  undone (cut off)  interrupted[serial] += 1 (bad at the       interrupted
                    INTERRUPTIONS_BEFORE_BAD-th), last_error
  hook_ran          --                                        hook
  marked_good       bad, interrupted (the serial's cleared)   --

A cut-off transaction is not a verdict on its release: it is retried, and
only an apply cut off ``INTERRUPTIONS_BEFORE_BAD`` times in a row is marked
bad (a release whose apply always kills the node must not loop for ever). A
failed check (hook or health) marks the release bad at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import ComponentState, HistoryEntry, now_seconds
from p2pupd.protocol.manifest import Manifest

INTERRUPTIONS_BEFORE_BAD = 3


def _write(node: Node, component: str, st: ComponentState) -> None:
    node.state.update_state(component, st)


def _event(event: str, serial: int, version: str | None, detail: str) -> HistoryEntry:
    return HistoryEntry(now_seconds(), event, serial, version, detail)


def accepted(node: Node, man: Manifest, digest: bytes, event: str, detail: str) -> None:
    """A verified, stored release: raise the high-water mark and record how it came."""
    st = node.state.read_state(man.component)
    if man.serial > st.high_water:
        st = replace(st, high_water=man.serial, high_digest=digest)
    _write(node, man.component, st.with_event(_event(event, man.serial, man.version, detail)))


def no_variant(node: Node, component: str, serial: int, version: str, why: str) -> None:
    """A release came with no variant for this node's platform (recorded once per serial)."""
    st = node.state.read_state(component)
    if not any(h.event == "no-variant" and h.serial == serial for h in st.history):
        _write(node, component, st.with_event(_event("no-variant", serial, version, why)))


def keep_dropped(node: Node, component: str, serials: Iterable[int]) -> ComponentState:
    """Kept versions about to be rebuilt or recycled stop being kept (before any change).

    Returns the new state.
    """
    drop = set(serials)
    st = node.state.read_state(component)
    st = replace(st, kept=tuple(s for s in st.kept if s not in drop))
    _write(node, component, st)
    return st


def refused(node: Node, component: str, man: Manifest, reason: str) -> None:
    """The release's pre-apply hook refused it: mark it bad here."""
    st = node.state.read_state(component)
    st = replace(
        st, bad={**st.bad, man.serial: reason}, last_error=f"{man.version} refused: {reason}"
    )
    _write(node, component, st.with_event(_event("refused", man.serial, man.version, reason)))


def committed(
    node: Node,
    component: str,
    *,
    to: int,
    frm: int | None,
    retain: int,
    event: str,
    version: str | None,
    detail: str,
) -> bool:
    """``to`` is live and committed; ``frm`` becomes the newest kept version.

    Idempotent (recovery may commit again): returns False when already recorded.
    """
    st = node.state.read_state(component)
    if st.installed == to:
        return False
    kept = [s for s in st.kept if s not in (to, frm)]
    if frm is not None:
        kept.insert(0, frm)
    st = replace(
        st,
        installed=to,
        kept=tuple(kept[:retain]),
        bad={s: r for s, r in st.bad.items() if s != to},
        interrupted={s: n for s, n in st.interrupted.items() if s != to},
        last_error=None,
    )
    _write(node, component, st.with_event(_event(event, to, version, detail)))
    return True


def undone(
    node: Node,
    component: str,
    *,
    serial: int,
    version: str | None,
    reason: str,
    verdict: bool,
    counts: bool,
) -> None:
    """The old version is live again after ``serial`` was swapped in.

    ``verdict``: one of the release's checks failed, so it is bad here.
    Otherwise the transaction was cut off; when ``counts`` (an apply that was
    checked before it began), the interruption is counted and the
    ``INTERRUPTIONS_BEFORE_BAD``-th marks the release bad.
    """
    st = node.state.read_state(component)
    bad, interrupted = dict(st.bad), dict(st.interrupted)
    detail = reason
    label = version or str(serial)
    if verdict:
        event, bad[serial] = "health-failed", reason
        last = f"{label} rolled back: {reason}"
    else:
        event, last = "interrupted", f"{label} not applied: {reason}"
        if counts:
            n = interrupted[serial] = interrupted.get(serial, 0) + 1
            detail = f"{reason} ({n} of {INTERRUPTIONS_BEFORE_BAD})"
            if n >= INTERRUPTIONS_BEFORE_BAD:
                bad[serial] = f"{reason}, {n} times"
                last += f"; {n} times, no longer retried automatically"
            else:
                last += "; it will be retried"
    st = replace(st, bad=bad, interrupted=interrupted, last_error=last)
    _write(node, component, st.with_event(_event(event, serial, version, detail)))


def hook_ran(node: Node, component: str, man: Manifest, detail: str) -> None:
    """Record a hook's verdict and the tails of its output."""
    st = node.state.read_state(component)
    _write(node, component, st.with_event(_event("hook", man.serial, man.version, detail)))


def marked_good(node: Node, component: str, serial: int) -> None:
    """The operator says ``serial`` may be applied again (automatically too)."""
    st = node.state.read_state(component)
    bad = {s: r for s, r in st.bad.items() if s != serial}
    interrupted = {s: n for s, n in st.interrupted.items() if s != serial}
    _write(node, component, replace(st, bad=bad, interrupted=interrupted))
