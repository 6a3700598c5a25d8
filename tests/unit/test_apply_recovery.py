"""The recovery decision is one table in code (daemon/apply/recovery.py), total over
every situation recovery can meet, and docs/apply.md shows exactly that table."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from p2pupd.daemon.apply.recovery import (
    RECOVERY,
    Action,
    Phase,
    Seen,
    decide,
    markdown_table,
    phase_of,
    seen,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "apply.md"


def recs(*steps: str) -> list[dict[str, str]]:
    return [{"step": s} for s in ("begin", *steps)]


def test_every_situation_has_exactly_one_action() -> None:
    reachable = {(Phase.BEGUN, Seen.UNKNOWN)} | set(
        itertools.product(
            (Phase.STAGED, Phase.TRIAL, Phase.UNPROVEN, Phase.PROVEN, Phase.UNDOING),
            (Seen.OLD, Seen.NEW, Seen.NEITHER),
        )
    ) | {(Phase.COMMITTING, s) for s in (Seen.OLD, Seen.NEW, Seen.NEITHER)}
    assert set(RECOVERY) == reachable


@pytest.mark.parametrize(
    ("steps", "live", "action"),
    [
        ((), "new", Action.ABORT),  # no staged record: identities unknown, swap not done
        (("pre-apply",), None, Action.ABORT),
        (("staged",), "old", Action.ABORT),
        (("staged", "swapped", "health"), "old", Action.ABORT),
        (("staged", "swapped"), "new", Action.UNDO_INTERRUPTED),
        (("staged", "swapped", "health"), "other", Action.ABORT),
        (("staged", "swapped", "health", "undo"), "new", Action.FINISH_UNDO),
        (("staged", "swapped", "health", "undo", "recorded"), "old", Action.FINISH_UNDO),
        (("staged", "swapped", "commit"), "new", Action.FINISH_COMMIT),
        (("staged", "swapped", "health", "commit"), "old", Action.FINISH_COMMIT),
        # Self-update: the trial run comes before the swap (docs/self-update.md).
        (("staged", "trial"), "old", Action.UNDO_INTERRUPTED),  # cut off: no verdict
        (("staged", "trial", "unhealthy"), "old", Action.TRIAL_FAILED),
        (("staged", "trial"), "other", Action.ABORT),
        (("staged", "trial", "healthy"), "old", Action.UNDO_INTERRUPTED),  # retried
        (("staged", "trial", "healthy", "swapped"), "new", Action.FINISH_COMMIT),
        (("staged", "trial", "healthy", "swapped", "health", "commit"), "new", Action.FINISH_COMMIT),
    ],
)
def test_decide(steps: tuple[str, ...], live: str | None, action: Action) -> None:
    assert decide(recs(*steps), live, "new", "old") is action


def test_phase_and_seen() -> None:
    assert phase_of(recs("staged", "swapped", "undo", "recorded")) is Phase.UNDOING
    assert seen(Phase.BEGUN, "new", "new", "old") is Seen.UNKNOWN
    assert seen(Phase.STAGED, None, 7, None) is Seen.OLD  # first install: nothing was there


def test_docs_show_the_table_the_code_has() -> None:
    text = DOC.read_text()
    start = text.index("<!-- recovery table")
    start = text.index("\n", start) + 1
    end = text.index("<!-- end of recovery table -->")
    assert text[start:end] == markdown_table()
