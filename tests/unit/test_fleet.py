"""A small fleet in the simulator: the algorithmic properties of issue 15, not timings.

The simulator drives the real ``Session``/wire, ``PeerView``, ``Admission``,
``Gossip`` and ``ReleaseSwarm`` (tools/bench/fleetsim); the figures at scale
come from ``make bench BENCH=fleet``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from p2pupd.tools.bench.fleetsim.run import FleetParams, simulate

PARAMS = FleetParams(
    nodes=200, mib=1.0, target=12, max_active=16, boot_window=10.0, settle=20.0,
    idle_window=60.0, joiners=2, seed=7,
)  # fmt: skip


@pytest.fixture(scope="module")
def fleet() -> dict[str, object]:
    return simulate(PARAMS)


def test_every_node_learns_of_the_release_and_completes_it(fleet: dict[str, float]) -> None:
    assert math.isfinite(fleet["informed_s"])
    assert math.isfinite(fleet["complete_s"])
    # Knowledge runs ahead of data: the last node knew long before the last finished.
    assert fleet["informed_s"] < fleet["complete_median_s"]


def test_the_seed_sends_about_one_copy(fleet: dict[str, float]) -> None:
    assert fleet["seed_upload_ratio"] <= 1.5
    assert fleet["max_node_upload_ratio"] < 6  # nobody turns into a central server


def test_degrees_stay_within_the_view_bounds(fleet: dict[str, int]) -> None:
    assert fleet["min_degree"] >= 4 and fleet["max_degree"] <= PARAMS.max_active
    assert fleet["boot_min_degree"] >= 4 and fleet["boot_max_degree"] <= PARAMS.max_active


def test_a_joiner_gets_half_its_view(fleet: dict[str, float]) -> None:
    assert fleet["join_half_view_s"] <= 10.0
    assert fleet["join_degree_at_10s_min"] >= PARAMS.target // 2


def test_mdns_only_bootstraps(fleet: dict[str, float]) -> None:
    assert fleet["beacons"] <= 3 * 8  # a handful registered, not every node
    assert fleet["idle_multicast_bytes_s"] == 0  # nobody browses once its view is full


def test_a_run_repeats_exactly_whatever_the_hash_seed() -> None:
    """Same parameters, same figures: nothing the simulation decides may hang on
    the order of a set of strings or bytes (PYTHONHASHSEED)."""
    code = (
        "import json\n"
        "from p2pupd.tools.bench.fleetsim.run import FleetParams, simulate\n"
        "r = simulate(FleetParams(nodes=60, mib=0.5, target=12, max_active=16, boot_window=10.0,"
        " settle=20.0, idle_window=30.0, joiners=1, seed=3))\n"
        "r.pop('wall_s')\n"
        "print(json.dumps(r, sort_keys=True, default=str))\n"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout
        for seed in ("1", "2")
    ]  # fmt: skip
    assert outs[0] == outs[1] and '"complete_s"' in outs[0]
