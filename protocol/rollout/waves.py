"""Which wave a node is in: ranked by a hash of the release and its node id.

Theory of operation
-------------------
For release (component, serial) every node gets a *position*: SHA-256 over a
context string, the component, the serial and the node id. Within one
platform, nodes are ranked by position; wave ``i`` holds the ranks below its
cumulative size ``policy.waves[i].size(n)``, where ``n`` is the number of
nodes of that platform taking part. So:

* **no coordinator**: any node computes every node's wave from the ids alone;
* **stable**: the same node, release and site always give the same wave (a
  restart changes nothing: nothing random, nothing stored);
* **uniform**: positions are uniform and independent per release, so every
  node is equally likely to be a canary, and a different node is the canary
  of the next release;
* **spread across platforms**: each platform is ranked on its own, so each
  gets its own canary and its share of every wave (platform variants are
  different builds: a canary on one platform says little of another).

``n`` and the ranks come from the reports a node holds (``table``). A node that
knows fewer nodes than exist may place itself in an earlier wave than a node
with the full view would; what keeps that safe is that it still needs, in its
own view, every node ranked before it to be committed and soaked (``decide``),
and that nodes stay in the view well after they stop reporting (only their
*evidence* goes stale). See ``decide`` for the whole argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from p2pupd.protocol import ids
from p2pupd.protocol.rollout.policy import RolloutPolicy

POSITION_CONTEXT = b"p2pupd rollout wave v1\x00"


def position(component: str, serial: int, node_id: bytes) -> bytes:
    """The node's sort key for this release (32 bytes, uniform)."""
    return ids.sha256(
        POSITION_CONTEXT + component.encode() + b"\x00" + serial.to_bytes(8, "big") + node_id
    )


def sizes(policy: RolloutPolicy, nodes: int) -> tuple[int, ...]:
    """Cumulative size of each wave for a platform of ``nodes`` nodes (last = ``nodes``)."""
    out: list[int] = []
    prev = 0
    for wave in policy.waves:
        prev = max(prev, wave.size(nodes))
        out.append(prev)
    if out:
        out[-1] = nodes
    return tuple(out)


def wave_of_rank(rank: int, bounds: tuple[int, ...]) -> int:
    """The first wave whose cumulative size is above ``rank``."""
    for i, size in enumerate(bounds):
        if rank < size:
            return i
    return len(bounds) - 1


@dataclass(frozen=True)
class Placement:
    """Where every node of one platform stands for a release."""

    order: tuple[bytes, ...]  # node ids, by position
    bounds: tuple[int, ...]  # cumulative wave sizes
    ranks: Mapping[bytes, int] = field(default_factory=dict, compare=False, repr=False)

    def rank(self, node_id: bytes) -> int:
        """``node_id``'s rank (``KeyError`` if it is not one of the ranked nodes)."""
        return self.ranks[node_id] if self.ranks else self.order.index(node_id)

    def wave(self, node_id: bytes) -> int:
        return wave_of_rank(self.rank(node_id), self.bounds)

    def members(self, wave: int) -> tuple[bytes, ...]:
        """The node ids of wave ``wave`` (not the earlier ones)."""
        lo = self.bounds[wave - 1] if wave > 0 else 0
        return self.order[lo : self.bounds[wave]]

    def before(self, wave: int, after: int = -1) -> tuple[bytes, ...]:
        """Node ids of waves ``after+1 .. wave-1``: those a node of ``wave`` waits for."""
        lo = self.bounds[after] if after >= 0 else 0
        hi = self.bounds[wave - 1] if wave > 0 else 0
        return self.order[lo:hi] if hi > lo else ()


def place(
    policy: RolloutPolicy,
    component: str,
    serial: int,
    node_ids: Iterable[bytes],
    cache: dict[bytes, bytes] | None = None,
) -> Placement:
    """Rank ``node_ids`` (one platform's, duplicates ignored) for this release.

    ``cache`` (node id -> position, for this one release) saves the hashing
    when the same release is placed again and again.
    """
    unique = set(node_ids)
    known = cache if cache is not None else {}

    def key(n: bytes) -> bytes:
        pos = known.get(n)
        if pos is None:
            pos = known[n] = position(component, serial, n)
        return pos

    order = tuple(sorted(unique, key=key))
    return Placement(order, sizes(policy, len(order)), {n: i for i, n in enumerate(order)})
