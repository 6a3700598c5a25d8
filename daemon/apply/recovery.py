"""The recovery decision: one table from (what the journal reached, what the target shows)
to what recovery does. Pure: no I/O; transaction.py reads the journal and the
target, asks ``decide``, and carries the action out.

Theory of operation. A transaction's records are appended and fsynced *before*
their step acts (transaction.py), and the swap is one system call whose effect
is visible at the target: the ``staged`` record holds the identity of the new
version and of the one it replaces (an inode number, or a link's text). So
recovery needs two facts, and this table is the whole rule:

* the furthest of ``begin``, ``staged``, ``undo``, ``commit`` the open
  transaction reached (``Phase``);
* which identity the target has now (``Seen``): the old one, the new one,
  neither (someone changed it), or unknown (no ``staged`` record: the swap
  cannot have happened, since it comes after that record is durable).

``commit`` is the point of no return: once it is durable the new version
stays. Before it, a new version found live without a recorded verdict was cut
off mid-transaction (a crash, a power cut): it is put back, and the
interruption is counted against the release. That is not a verdict on the
release, so it is retried; only the ``INTERRUPTIONS_BEFORE_BAD``-th (state/components.py)
interruption marks it bad (as boot counting does in A/B updaters: a release
that takes the machine down with it must not be retried for ever). A failed
health check is a verdict: a recorded ``undo`` marks the release bad at once.

A self-update (docs/self-update.md) tries the new version *before* the swap:
after ``staged`` it journals ``trial`` and restarts the daemon into the
staged version, which journals ``healthy`` once it has proved itself, then
swaps and commits -- or ``unhealthy`` with its reason; the old version's
watchdog journals ``unhealthy`` too when the trial run dies or hangs. Its
process holds the node lock throughout, so whoever recovers such a
transaction knows its trial run is over. ``unhealthy`` is a verdict: the
release is marked bad, and the old version, never swapped out, stays. A
trial with neither was cut off (a power cut, the service stopped): an
interruption, counted like one between swap and commit. ``healthy`` means
the new version proved itself: if the swap happened the commit is
finished, else the attempt counts as an interruption and is retried. docs/apply.md shows this table; a test checks that the two agree.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any


class Phase(enum.Enum):
    """The furthest decisive record of an open transaction."""

    BEGUN = "`begin`, no `staged`"
    STAGED = "`staged` (maybe `swapped`, `health`), no verdict"
    TRIAL = "`trial` (self-update: the new version's trial run), no verdict"
    UNPROVEN = "`unhealthy` (self-update: the trial run failed)"
    PROVEN = "`healthy` (self-update: the trial run proved it), no `commit`"
    UNDOING = "`undo`"
    COMMITTING = "`commit`"


class Seen(enum.Enum):
    """What the target holds now, compared with the identities ``staged`` recorded."""

    UNKNOWN = "not recorded"
    OLD = "old"
    NEW = "new"
    NEITHER = "neither"


class Action(enum.Enum):
    """What recovery does; each is idempotent, so a crash during recovery is recovered too."""

    ABORT = (
        "abort: the swap never happened (or was not ours); discard the stage, what is live stays"
    )
    UNDO_INTERRUPTED = (
        "put the old version back; count the interruption (history: `interrupted`); "
        "the release is retried, and marked bad at the third interruption"
    )
    FINISH_UNDO = "finish the undo: old version back, the recorded failure marks the release bad"
    TRIAL_FAILED = (
        "the trial run failed: the old version stays (or goes back), the release is "
        "marked bad"
    )
    FINISH_COMMIT = "finish the commit (state, kept version, cleanup); the new version stays"


RECOVERY: dict[tuple[Phase, Seen], Action] = {
    (Phase.BEGUN, Seen.UNKNOWN): Action.ABORT,
    (Phase.STAGED, Seen.OLD): Action.ABORT,
    (Phase.STAGED, Seen.NEITHER): Action.ABORT,
    (Phase.STAGED, Seen.NEW): Action.UNDO_INTERRUPTED,
    (Phase.TRIAL, Seen.OLD): Action.UNDO_INTERRUPTED,
    (Phase.TRIAL, Seen.NEW): Action.UNDO_INTERRUPTED,
    (Phase.TRIAL, Seen.NEITHER): Action.ABORT,
    (Phase.UNPROVEN, Seen.OLD): Action.TRIAL_FAILED,
    (Phase.UNPROVEN, Seen.NEW): Action.TRIAL_FAILED,
    (Phase.UNPROVEN, Seen.NEITHER): Action.ABORT,
    (Phase.PROVEN, Seen.OLD): Action.UNDO_INTERRUPTED,
    (Phase.PROVEN, Seen.NEW): Action.FINISH_COMMIT,
    (Phase.PROVEN, Seen.NEITHER): Action.ABORT,
    (Phase.UNDOING, Seen.OLD): Action.FINISH_UNDO,
    (Phase.UNDOING, Seen.NEW): Action.FINISH_UNDO,
    (Phase.UNDOING, Seen.NEITHER): Action.FINISH_UNDO,
    (Phase.COMMITTING, Seen.OLD): Action.FINISH_COMMIT,
    (Phase.COMMITTING, Seen.NEW): Action.FINISH_COMMIT,
    (Phase.COMMITTING, Seen.NEITHER): Action.FINISH_COMMIT,
}


def phase_of(records: Iterable[dict[str, Any]]) -> Phase:
    """The furthest decisive step among an open transaction's records."""
    steps = {r.get("step") for r in records}
    if "commit" in steps:
        return Phase.COMMITTING
    if "undo" in steps:
        return Phase.UNDOING
    if "healthy" in steps:
        return Phase.PROVEN
    if "unhealthy" in steps:
        return Phase.UNPROVEN
    if "trial" in steps:
        return Phase.TRIAL
    if "staged" in steps:
        return Phase.STAGED
    return Phase.BEGUN


def seen(phase: Phase, live: object, new_id: object, old_id: object) -> Seen:
    """Compare the identity ``live`` at the target with those recorded at ``staged``."""
    if phase is Phase.BEGUN:
        return Seen.UNKNOWN
    if live == new_id:
        return Seen.NEW
    if live == old_id:
        return Seen.OLD
    return Seen.NEITHER


def decide(records: list[dict[str, Any]], live: object, new_id: object, old_id: object) -> Action:
    """The action for an open transaction (``records``) given the target's identity ``live``."""
    phase = phase_of(records)
    return RECOVERY[phase, seen(phase, live, new_id, old_id)]


def markdown_table() -> str:
    """The table as docs/apply.md shows it (one row per entry, in table order)."""
    rows = ["| the journal reached | the target holds | recovery |", "|---|---|---|"]
    rows += [f"| {p.value} | {s.value} | {a.value} |" for (p, s), a in RECOVERY.items()]
    return "\n".join(rows) + "\n"
