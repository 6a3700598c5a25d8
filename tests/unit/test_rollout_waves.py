"""Wave assignment: stable, uniform, no coordinator, spread across platforms."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.protocol.rollout.waves import place, position, sizes

POLICY = RolloutPolicy.parse("waves=1,10%,50%")


def node(i: int) -> bytes:
    return hashlib.sha256(b"n%d" % i).digest()[:16]


def test_sizes_are_cumulative_and_end_with_everyone() -> None:
    assert sizes(POLICY, 1) == (1, 1, 1, 1)
    assert sizes(POLICY, 7) == (1, 1, 4, 7)  # ceil(10 % of 7) = 1, ceil(50 % of 7) = 4
    assert sizes(POLICY, 100) == (1, 10, 50, 100)
    assert sizes(RolloutPolicy.parse("waves=5,10%"), 20) == (5, 5, 20)  # 10 % < 5 nodes
    for n in range(1, 300):
        s = sizes(POLICY, n)
        assert list(s) == sorted(s) and s[-1] == n and s[0] == 1


def test_placement_does_not_depend_on_the_order_nodes_are_known_in() -> None:
    ids = [node(i) for i in range(50)]
    a = place(POLICY, "app", 7, ids)
    b = place(POLICY, "app", 7, list(reversed(ids)) + ids[:5])
    assert a == b and len(a.order) == 50
    assert [a.wave(n) for n in a.order] == sorted(a.wave(n) for n in a.order)
    assert len(a.members(0)) == 1 and len(a.members(1)) == 4 and len(a.members(2)) == 20


def test_placement_is_stable_across_processes() -> None:
    """Nothing random and nothing process-local (no ``hash()``): another interpreter,
    with another hash seed, ranks the same nodes the same way."""
    ids = [node(i) for i in range(20)]
    here = [n.hex() for n in place(POLICY, "app", 3, ids).order]
    code = (
        "import hashlib;from p2pupd.protocol.rollout.policy import RolloutPolicy;"
        "from p2pupd.protocol.rollout.waves import place;"
        "ids=[hashlib.sha256(b'n%d'%i).digest()[:16] for i in range(20)];"
        "print(' '.join(n.hex() for n in place(RolloutPolicy.parse('waves=1,10%,50%'),'app',3,ids).order))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == here


def test_each_release_has_its_own_canary() -> None:
    ids = [node(i) for i in range(10)]
    canaries = {place(POLICY, "app", serial, ids).order[0] for serial in range(1, 60)}
    assert len(canaries) >= 8  # 59 releases over 10 nodes: nearly every node takes a turn


def test_canary_choice_is_uniform() -> None:
    """Over many releases every node of a site is the canary equally often
    (chi-square, 19 degrees of freedom: 43.8 is the 0.1 % critical value)."""
    n, releases = 20, 4000
    ids = [node(i) for i in range(n)]
    counts = dict.fromkeys(ids, 0)
    for serial in range(1, releases + 1):
        counts[min(ids, key=lambda x: position("app", serial, x))] += 1
    expected = releases / n
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 43.8, chi2


def test_wave_shares_are_uniform_over_positions() -> None:
    """The positions themselves are uniform: 20,000 ids into 16 buckets by first
    nibble (chi-square, 15 degrees of freedom: 37.7 at 0.1 %)."""
    buckets = [0] * 16
    for i in range(20_000):
        buckets[position("app", 9, node(i))[0] >> 4] += 1
    expected = 20_000 / 16
    assert sum((b - expected) ** 2 / expected for b in buckets) < 37.7


def test_a_node_keeps_its_wave_whoever_else_is_in_the_view() -> None:
    """A node's rank only moves by the nodes ahead of it: a node in the full
    view's wave k is never placed in a *later* wave by a view that lacks some
    other nodes (it can only be placed earlier, and then waits for every node
    it knows ahead of it)."""
    ids = [node(i) for i in range(200)]
    full = place(POLICY, "app", 4, ids)
    for k in range(0, 200, 7):
        partial_ids = ids[k:]  # views missing the first k nodes
        partial = place(POLICY, "app", 4, partial_ids)
        for n in partial_ids[::13]:
            assert partial.rank(n) <= full.rank(n)


@given(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=60, unique=True),
       st.integers(1, 1000))  # fmt: skip
def test_every_node_has_exactly_one_wave(ids: list[bytes], serial: int) -> None:
    p = place(POLICY, "app", serial, ids)
    seen = [n for w in range(len(p.bounds)) for n in p.members(w)]
    assert sorted(seen) == sorted(ids)
    for n in ids:
        w = p.wave(n)
        assert n in p.members(w)
        ahead = {m for m in ids if p.rank(m) < (p.bounds[w - 1] if w else 0)}
        assert set(p.before(w)) == ahead
