"""The site view: the newest signed report of every node, bounded, replay-proof.

Theory of operation
-------------------
A ``ReportTable`` holds at most ``capacity`` (10,000) reports, one per node
id, each with the time it was received on the caller's monotonic clock.
``offer`` is the only way in (or its two halves around the signature check,
``screen`` and ``admit``, for a caller that checks signatures in another
thread), and applies these rules in order (the first that fails decides, and
nothing changes):

1. the document decodes and is signed by the node key it names (``report``;
   a document not newer than its node's mark is OLDER before its signature
   is even checked: it could move nothing anyway);
2. it names this repository and site (``SiteRules`` rule 1);
3. the key that signed it speaks for the node id it names -- the id is the
   key's hash on an open site, a member's credential binds them in a site --
   and, in a site, that node is a member (rule 2);
4. its ``seq`` is above the highest ever seen from that node: an equal or
   older report -- a replay, or an old copy still travelling -- is OLDER and
   moves nothing.

The highest ``seq`` per node (its *mark*) outlives the report: when a node
stops reporting, its report is dropped after ``gone_seconds`` but its mark is
kept (up to ``2 * capacity`` marks, the least recently heard dropped first),
so a replay of its old reports is still refused after it went away.

Two ages matter to a rollout: a report is *live* while it is younger than
``live_seconds`` -- only live reports are evidence that a node is healthy on a
release -- and *known* until ``gone_seconds`` -- a known node keeps its place
in the wave ranking, so a node that falls silent (crashed, partitioned) holds
back the waves after it rather than vanishing from them.

When the table is full, a report from a new node evicts the report heard
least recently (a site beyond 10,000 nodes is beyond the design, and on an
open site this is where a flood of invented node ids ends up).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from p2pupd.protocol.errors import RemoteProtocolError, SchemaError, VerificationError
from p2pupd.protocol.rollout.report import NodeReport, check_report_signature, decode_report
from p2pupd.protocol.rollout.site import SiteRules
from p2pupd.protocol.trust import Envelope

CAPACITY = 10_000
LIVE_SECONDS = 30 * 60.0
GONE_SECONDS = 6 * 3600.0


class Verdict(enum.Enum):
    NEW = "new"  # first report of this node held
    NEWER = "newer"  # replaced an older report of this node
    OLDER = "older"  # not newer than what was seen: moves nothing
    REFUSED = "refused"  # malformed, forged, another site, not its key, not a member


@dataclass(frozen=True)
class Offer:
    verdict: Verdict
    reason: str = ""
    report: NodeReport | None = None
    previous: NodeReport | None = None

    @property
    def accepted(self) -> bool:
        return self.verdict in (Verdict.NEW, Verdict.NEWER)


@dataclass(frozen=True)
class Entry:
    report: NodeReport
    raw: bytes
    received: float


@dataclass(frozen=True)
class Screened:
    """A report that decoded and may be newer: its signature is still to check."""

    raw: bytes
    report: NodeReport
    env: Envelope

    def check(self) -> str | None:
        """Why the signature does not hold, or None. Pure: safe in any thread."""
        try:
            check_report_signature(self.report, self.env)
        except VerificationError as exc:
            return str(exc)
        return None


@dataclass
class _Mark:
    seq: int
    key: bytes
    seen: float


class ReportTable:
    """See the module docstring."""

    def __init__(
        self,
        rules: SiteRules,
        *,
        capacity: int = CAPACITY,
        live_seconds: float = LIVE_SECONDS,
        gone_seconds: float = GONE_SECONDS,
    ) -> None:
        if not 0 < live_seconds <= gone_seconds:
            raise ValueError("need 0 < live_seconds <= gone_seconds")
        self.rules = rules
        self.capacity = capacity
        self.live_seconds = live_seconds
        self.gone_seconds = gone_seconds
        self._entries: dict[bytes, Entry] = {}
        self._marks: dict[bytes, _Mark] = {}
        self.refused = 0  # counters for metrics
        self.older = 0

    # ----- queries ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def get(self, node_id: bytes) -> Entry | None:
        return self._entries.get(node_id)

    def is_live(self, entry: Entry, now: float) -> bool:
        """True while ``entry`` is evidence (younger than ``live_seconds``)."""
        return now - entry.received <= self.live_seconds

    def seq_of(self, node_id: bytes) -> int:
        """The highest seq seen from ``node_id`` (0 if none)."""
        mark = self._marks.get(node_id)
        return mark.seq if mark is not None else 0

    def summary(self) -> dict[bytes, int]:
        """node id -> seq of every report held (what a peer needs to see what it lacks)."""
        return {n: e.report.seq for n, e in self._entries.items()}

    def newer_than(self, summary: dict[bytes, int]) -> list[bytes]:
        """Raw reports held that are newer than (or absent from) a peer's ``summary``."""
        return [e.raw for n, e in self._entries.items() if e.report.seq > summary.get(n, 0)]

    # ----- changes ----------------------------------------------------------

    def offer(self, raw: bytes, now: float, wall: int) -> Offer:
        """Apply the rules of the module docstring to a signed report; never raises for it."""
        screened = self.screen(raw)
        if isinstance(screened, Offer):
            return screened
        return self.admit(screened, now, wall, screened.check())

    def screen(self, raw: bytes) -> Offer | Screened:
        """The part of ``offer`` before the signature check: the verdict when it
        is already decided (malformed, not newer), else what is left to check.

        ``offer`` is ``screen``, ``Screened.check``, ``admit``; a caller with
        many reports checks their signatures elsewhere (a worker thread: the
        check is pure and takes no lock) and admits them in order afterwards.
        """
        try:
            report, env = decode_report(raw)
        except RemoteProtocolError as exc:
            return self._refuse(f"bad report: {exc}")
        mark = self._marks.get(report.node_id)
        if mark is not None and report.seq <= mark.seq and report.node_key == mark.key:
            # Rule 4 before the signature: not newer moves nothing whoever made
            # it, so replays and echoes of gossip cost no signature check.
            self.older += 1
            return Offer(Verdict.OLDER, "not newer than the report seen", report)
        return Screened(raw, report, env)

    def admit(self, screened: Screened, now: float, wall: int, bad_signature: str | None) -> Offer:
        """Rules 2-4 for a screened report whose signature check said ``bad_signature``
        (None: it holds). The table may have moved since ``screen``: rule 4 is
        judged again against the mark as it is now."""
        if bad_signature is not None:
            return self._refuse(f"bad report: {bad_signature}")
        report, raw = screened.report, screened.raw
        rules = self.rules
        if not rules.same_site(report.repository, report.site):
            return self._refuse(
                f"report of node {report.node_id.hex()[:12]} is for site "
                f"{report.site!r:.40} of {report.repository!r:.40}"
            )
        if not rules.admits(report.node_id, report.node_key, report.credential, wall):
            return self._refuse(f"node {report.node_id.hex()[:12]} {rules.refusal}")
        mark = self._marks.get(report.node_id)
        if mark is not None and report.seq <= mark.seq:
            self.older += 1
            return Offer(Verdict.OLDER, "not newer than the report seen", report)
        previous = self._entries.pop(report.node_id, None)
        if previous is None and len(self._entries) >= self.capacity:
            oldest = min(self._entries.values(), key=lambda e: e.received)
            del self._entries[oldest.report.node_id]
        self._entries[report.node_id] = Entry(report, raw, now)
        self._mark(report, now)
        verdict = Verdict.NEW if previous is None else Verdict.NEWER
        return Offer(verdict, "", report, previous.report if previous else None)

    def recheck(self, wall: int) -> list[bytes]:
        """Drop the reports whose authors rules 2-3 no longer admit (the site rules
        changed: a revocation, a credential expired, the node joined a site);
        returns their node ids. Their marks stay: their old reports stay refused."""
        rules = self.rules
        gone = [
            n
            for n, e in self._entries.items()
            if not rules.same_site(e.report.repository, e.report.site)
            or not rules.admits(e.report.node_id, e.report.node_key, e.report.credential, wall)
        ]
        for n in gone:
            del self._entries[n]
        return gone

    def expire(self, now: float) -> list[bytes]:
        """Drop reports not refreshed for ``gone_seconds``; returns their node ids."""
        gone = [n for n, e in self._entries.items() if now - e.received > self.gone_seconds]
        for n in gone:
            del self._entries[n]
        return gone

    # ----- persistence ---------------------------------------------------------

    def to_value(self) -> dict[str, Any]:
        """The table as a canonical-msgpack value (raw reports and marks)."""
        return {
            "reports": [e.raw for e in self._entries.values()],
            "marks": [[n, m.seq, m.key] for n, m in self._marks.items()],
        }

    def restore(self, value: Any, now: float, wall: int) -> int:
        """Load what ``to_value`` saved; returns the reports taken back.

        Marks come back as they were; every report passes ``offer`` again (the
        site rules may have changed) and counts as heard just over ``live_seconds`` ago:
        it keeps the node's place in the ranking but is no evidence of health
        until the node reports again.
        """
        if not isinstance(value, dict):
            raise SchemaError("saved report table must be a map")
        marks, reports = value.get("marks", []), value.get("reports", [])
        if not isinstance(marks, list) or not isinstance(reports, list):
            raise SchemaError("saved report table is damaged")
        taken = 0
        for raw in reports[: self.capacity]:
            if (
                isinstance(raw, bytes)
                and self.offer(raw, now - self.live_seconds - 1, wall).accepted
            ):
                taken += 1
        for m in marks[: 2 * self.capacity]:
            if not (
                isinstance(m, list)
                and len(m) == 3
                and isinstance(m[0], bytes)
                and isinstance(m[1], int)
                and isinstance(m[2], bytes)
            ):
                continue
            held = self._marks.get(m[0])
            if held is None and len(self._marks) < 2 * self.capacity:
                self._marks[m[0]] = _Mark(m[1], m[2], now - self.gone_seconds)
            elif held is not None and m[1] > held.seq:
                held.seq = m[1]
        return taken

    # ----- internals -------------------------------------------------------------

    def _refuse(self, reason: str) -> Offer:
        self.refused += 1
        return Offer(Verdict.REFUSED, reason)

    def _mark(self, report: NodeReport, now: float) -> None:
        mark = self._marks.get(report.node_id)
        if mark is None and len(self._marks) >= 2 * self.capacity:
            idle = [n for n in self._marks if n not in self._entries]
            victim = min(idle or self._marks, key=lambda n: self._marks[n].seen)
            del self._marks[victim]
        self._marks[report.node_id] = _Mark(report.seq, report.node_key, now)
