"""Spreading reports and rollout actions through the site: ``now`` and events in, sends out.

Theory of operation
-------------------
Reports and actions ride the existing peer connections (wire feature
"report"), epidemic style, like memberlist's gossip:

* **push**: a document this node accepted for the first time (its own, or a
  peer's pushed news that was newer than what it held) is sent on to ``fanout`` random
  connected peers, other than the one it came from; this node's own report
  goes to every connected peer. A document already held is not sent on, so
  each crosses each node about ``fanout`` times, whatever the site size.
  The connected peers are the node's partial view (protocol/fleet/view.py:
  12-16 links whatever the site's size), so most nodes are not neighbours
  of a report's author and hear of it only through relays. Over random
  views of degree 12, a fan-out of 4 left ~0.2 % of 1,000 or 10,000 nodes
  without a given document (healed only by the next pull); 6 reached every
  node in every trial, at ~5.7 copies per node (tests/unit/
  test_rollout_spread.py drives it over such a view);
* **pull**: when a connection opens, and every ``sync_interval`` seconds
  (stretched with the site's size, so a node's share stays constant) to one
  random peer, a ``ReportDigest`` says what this node holds; the peer answers
  with what it holds that is newer or missing there, at most
  ``max_answer`` documents per digest (the rest follows with the next one),
  marked as a catch-up (``relay`` false: mostly old news to everyone else;
  a node joining a site of 1,000 must not push 1,000 reports back out, while
  the few reports a healed partition brings are passed on). This heals
  whatever push missed (a node that was away, a lost connection).

Bounds: each peer may push at most ``rate`` documents per second (burst
``burst``); beyond, its documents are dropped before any decoding (an honest
peer never sends that many: a site of 10,000 nodes refreshes a report each
every few hours). Every document is still checked by the table or the ledger;
nothing here trusts anything. Peers are any hashable ids.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)

MAX_DOCS_PER_NEWS = 32  # wire.MAX_NEWS_DOCS, per kind
FANOUT = 6  # relays per document accepted (see the module docstring)


@dataclass(frozen=True)
class SendNews(Generic[P]):
    """Send these signed reports and actions to ``peer`` (one ``ReportNews`` each batch)."""

    peer: P
    reports: tuple[bytes, ...] = ()
    actions: tuple[bytes, ...] = ()
    relay: bool = True  # False: an answer to a digest (a catch-up)


@dataclass(frozen=True)
class SendDigest(Generic[P]):
    """Send our ``ReportDigest`` to ``peer``."""

    peer: P


SpreadAction = SendNews[P] | SendDigest[P]


@dataclass
class _Bucket:
    tokens: float
    at: float


class Spread(Generic[P]):
    """See the module docstring."""

    def __init__(
        self,
        rng: random.Random,
        *,
        fanout: int = FANOUT,
        sync_interval: float = 600.0,
        seconds_per_node: float = 0.6,
        rate: float = 50.0,
        burst: float = 1000.0,
        max_answer: int = 1000,
    ) -> None:
        self._rng = rng
        self._fanout = fanout
        self._sync = sync_interval
        self._per_node = seconds_per_node
        self._rate = rate
        self._burst = burst
        self._max_answer = max_answer
        self._peers: dict[P, _Bucket] = {}
        self._next_sync: float | None = None
        self.dropped = 0  # documents refused by the rate limit (for metrics)

    @property
    def peers(self) -> list[P]:
        return list(self._peers)

    def peer_joined(self, peer: P, now: float) -> list[SpreadAction[P]]:
        """A connection speaking "report" opened: tell it what we hold."""
        self._peers[peer] = _Bucket(self._burst, now)
        return [SendDigest(peer)]

    def peer_left(self, peer: P) -> None:
        self._peers.pop(peer, None)

    def admit(self, peer: P, count: int, now: float) -> int:
        """How many of ``count`` documents ``peer`` pushed may be looked at (rate limit)."""
        bucket = self._peers.get(peer)
        if bucket is None:
            return 0
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
        bucket.at = now
        take = min(count, int(bucket.tokens))
        bucket.tokens -= take
        self.dropped += count - take
        return take

    def on_digest(
        self,
        peer: P,
        theirs: Mapping[bytes, int],
        known: Iterable[bytes],
        newer: Iterable[bytes],
        actions: Mapping[bytes, bytes],
    ) -> list[SpreadAction[P]]:
        """Answer a peer's digest: ``newer`` are our raw reports newer than ``theirs``
        (``ReportTable.newer_than``), ``actions`` our signed actions by digest."""
        if peer not in self._peers:
            return []
        have = set(known)
        reports = list(newer)[: self._max_answer]
        docs = [doc for d, doc in sorted(actions.items()) if d not in have]
        return self._batches(peer, reports, docs[: self._max_answer], relay=False)

    def learned(
        self, reports: list[bytes], actions: list[bytes], origin: P | None
    ) -> list[SpreadAction[P]]:
        """Documents accepted for the first time: push them on (see the module docstring).

        ``origin`` None means this node made them: every peer hears of them.
        """
        if not reports and not actions:
            return []
        peers = [p for p in self._peers if p != origin]
        if origin is not None:
            peers = self._rng.sample(peers, min(self._fanout, len(peers)))
        out: list[SpreadAction[P]] = []
        for peer in peers:
            out += self._batches(peer, reports, actions)
        return out

    def tick(self, now: float, site_size: int) -> list[SpreadAction[P]]:
        """Periodic pull: a digest to one random peer when due."""
        interval = max(self._sync, site_size * self._per_node)
        if self._next_sync is None:
            self._next_sync = now + interval * self._rng.uniform(0.5, 1.0)
        if now < self._next_sync or not self._peers:
            return []
        self._next_sync = now + interval * self._rng.uniform(0.75, 1.25)
        return [SendDigest(self._rng.choice(list(self._peers)))]

    def next_deadline(self) -> float | None:
        return self._next_sync

    def _batches(
        self, peer: P, reports: list[bytes], actions: list[bytes], *, relay: bool = True
    ) -> list[SpreadAction[P]]:
        out: list[SpreadAction[P]] = []
        n = MAX_DOCS_PER_NEWS
        for i in range(0, max(len(reports), len(actions)), n):
            batch = SendNews(peer, tuple(reports[i : i + n]), tuple(actions[i : i + n]), relay)
            out.append(batch)
        return out
