"""What a fetch charges its landing budget for the bytes that wait to land.

A received chunk is a view of the read that brought it (protocol/wire.py),
and a view keeps its whole read alive: the budget must count the reads, not
the views, or a peer padding small blobs with other frames would pin far
more than ``LANDING_BYTES``.
"""

from __future__ import annotations

from typing import cast

from p2pupd.daemon.service.fetch import ReleaseFetch, _Attempt
from p2pupd.protocol.fleet.swarm import ReleaseSwarm
from p2pupd.protocol.manifest import Manifest

PEER = b"\x07" * 16


def attempt() -> _Attempt:
    rf = ReleaseFetch(cast(Manifest, None), b"\x00" * 32)
    return _Attempt(rf, cast(ReleaseSwarm[bytes], None), {})


def test_views_of_one_read_charge_the_read_once_until_the_last_lands() -> None:
    run = attempt()
    read = bytes(1 << 20)
    views = [memoryview(read)[i * 1000 : i * 1000 + 100] for i in range(3)]
    for i, view in enumerate(views):
        run.report(PEER, bytes([i]) * 32, view)
    assert run.landing_bytes == len(read)  # not 300: the whole read is held
    assert run.unpin(views[0]) == 0
    assert run.unpin(views[1]) == 0
    assert run.landing_bytes - run.unpin(views[2]) == 0
    assert run.pinned == {}


def test_copies_and_views_of_different_reads_are_charged_apart() -> None:
    run = attempt()
    a, b = bytes(5000), bytes(7000)
    run.report(PEER, b"\x01" * 32, memoryview(a)[:10])
    run.report(PEER, b"\x02" * 32, memoryview(b)[10:20])
    run.report(PEER, b"\x03" * 32, b"x" * 300)
    assert run.landing_bytes == 5000 + 7000 + 300
    freed = sum(run.unpin(data) for _, _, data in run.arrived)
    assert freed == run.landing_bytes
    assert [d for _, d, _ in run.arrived] == [b"\x01" * 32, b"\x02" * 32, b"\x03" * 32]


def test_other_outcomes_charge_nothing_and_go_to_the_loop() -> None:
    run = attempt()
    run.report(PEER, b"\x01" * 32, None)
    run.report(PEER, b"\x02" * 32, False)
    assert run.landing_bytes == 0 and not run.arrived
    assert [o for _, _, o in run.results] == [None, False]
