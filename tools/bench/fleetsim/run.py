"""One fleet scenario: cold boot, one release from one seed, an idle period, joiners.

1. *Boot*: ``nodes`` nodes start at random times within ``boot_window``
   seconds; each finds a beacon by mDNS and joins; the fleet then runs
   ``settle`` seconds.
2. *Release*: one node imports a release of ``mib`` MiB (it is the first
   holder); the run goes on until every node holds it. ``informed``: the
   node verified the manifest; ``complete``: it holds every blob.
3. *Idle*: ``idle_window`` seconds with nothing to do: every byte any node
   sends (gossip, view pings and shuffles, keepalive probes, dials, mDNS),
   plus the multicast it receives, divided by nodes and seconds.
4. *Join*: ``joiners`` new nodes start, one a second, on the full site; how
   long each takes to reach half its view target, and the full target.

Returns a dict of figures (see ``simulate``).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2pupd.protocol import ids
from p2pupd.protocol.fleet.admission import AdmissionConfig
from p2pupd.protocol.fleet.swarm import SwarmConfig
from p2pupd.protocol.fleet.view import ViewConfig
from p2pupd.tools.bench.fleetsim.mdns import Mdns
from p2pupd.tools.bench.fleetsim.net import Loop, Net
from p2pupd.tools.bench.fleetsim.node import Release, SimNode, World

MiB = 1024 * 1024


@dataclass(frozen=True)
class FleetParams:
    nodes: int = 1000
    mib: float = 16.0
    mbit: float = 100.0
    latency_ms: float = 0.2
    blob_kib: int = 64
    target: int = 12
    max_active: int = 16
    passive: int = 64
    beacons: int = 8
    boot_window: float = 30.0
    settle: float = 60.0
    idle_window: float = 300.0
    joiners: int = 5
    release_timeout: float = 600.0
    seed: int = 1
    have_interval: float = 0.05
    per_source: int = 2
    seed_pipeline: int = 32
    max_in_flight: int = 8
    unique_bonus: int = 2
    starve_after: float = 2.0


def _release(p: FleetParams) -> Release:
    blob = p.blob_kib * 1024
    count = max(1, math.ceil(p.mib * MiB / blob))
    sizes = {ids.sha256(i.to_bytes(4, "big")): blob for i in range(count)}
    return Release(1, ids.sha256(b"manifest"), sizes, 300 + 45 * count)


def _degrees(nodes: list[SimNode]) -> dict[str, float]:
    deg = [n.view.degree for n in nodes if n.alive]
    return {"min": min(deg), "max": max(deg), "mean": round(statistics.fmean(deg), 2)}


def _reach(node: SimNode, degree: int) -> float:
    """Seconds from the node's start until it first had ``degree`` links (inf: never)."""
    times = [t - node.joined_at for t, d in node.degree_log if d >= degree]
    return min(times, default=math.inf)


def simulate(p: FleetParams, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the scenario of the module docstring; returns its figures."""
    wall = time.monotonic()
    rng = random.Random(p.seed)
    loop = Loop()
    rate = p.mbit * 1e6 / 8
    net = Net(loop, rate, rate, p.latency_ms / 1000)
    world = World(
        loop,
        net,
        Mdns(loop, net, rng, p.beacons),
        ViewConfig(target=p.target, max_active=p.max_active, max_passive=p.passive),
        AdmissionConfig(max_peers=p.max_active + 8),
        SwarmConfig(
            have_interval=p.have_interval,
            per_source=p.per_source,
            seed_pipeline=p.seed_pipeline,
            max_in_flight=p.max_in_flight,
            unique_bonus=p.unique_bonus,
            starve_after=p.starve_after,
        ),
    )
    nodes = [SimNode(world, i, rng.randrange(1 << 30)) for i in range(p.nodes)]
    log = say or (lambda _: None)

    # 1. boot
    for node in nodes:
        loop.at(rng.uniform(0, p.boot_window), node.start)
    loop.run(p.boot_window + p.settle)
    boot_mcast = net.multicast_total
    boot = _degrees(nodes)
    log(f"booted {p.nodes} nodes: degree {boot}, {len(world.mdns.registered)} beacons, "
        f"{loop.events} events, {time.monotonic() - wall:.0f} s")  # fmt: skip

    # 2. release
    rel = _release(p)
    world.releases[rel.serial] = rel
    seed = nodes[0]
    data_before = list(net.data_out)
    t0 = loop.now
    seed.learn(rel.serial, first_holder=True)

    def all_done() -> bool:
        return all(rel.serial in n.complete_at for n in nodes)

    loop.run(t0 + p.release_timeout, stop=all_done)
    informed = [n.informed_at.get(rel.serial, math.inf) - t0 for n in nodes]
    complete = [n.complete_at.get(rel.serial, math.inf) - t0 for n in nodes[1:]]
    size = sum(rel.sizes.values())
    uploads = [(net.data_out[i] - data_before[i]) / size for i in range(p.nodes)]
    log(f"release: informed {max(informed):.3f} s, complete {max(complete):.3f} s, "
        f"{time.monotonic() - wall:.0f} s")  # fmt: skip

    # 3. idle
    loop.run(loop.now + 10.0)
    before_out, before_mcast, t_idle = list(net.bytes_out), net.multicast_total, loop.now
    for conn in list(world.conns):
        conn.touch(loop.now, world.tcp_keepidle, lambda *_: None)  # start the count here
    loop.run(t_idle + p.idle_window)
    for conn in list(world.conns):
        conn.idle_until(loop.now, world.tcp_keepidle, world.keepalive_count)
    mcast = net.multicast_total - before_mcast
    per_node = [(net.bytes_out[i] - before_out[i] + mcast) / p.idle_window for i in range(p.nodes)]
    steady = _degrees(nodes)
    log(f"idle: {statistics.fmean(per_node):.1f} B/s per node, degree {steady}, "
        f"{time.monotonic() - wall:.0f} s")  # fmt: skip

    # 4. joiners
    joiners = []
    t_join = loop.now
    for k in range(p.joiners):
        node = SimNode(world, p.nodes + k, rng.randrange(1 << 30))
        loop.at(t_join + k, node.start)
        joiners.append(node)
    loop.run(t_join + p.joiners + 30.0)
    half = max(1, p.target // 2)
    join_half, join_full, at_10 = [], [], []
    for node in joiners:
        join_half.append(_reach(node, half))
        join_full.append(_reach(node, p.target))
        at_10.append(max((d for t, d in node.degree_log if t - node.joined_at <= 10.0), default=0))

    one_copy = size * 8 / (p.mbit * 1e6)
    return {
        "nodes": p.nodes,
        "release_mib": p.mib,
        "link_mbit": p.mbit,
        "view_target": p.target,
        "view_max": p.max_active,
        "informed_s": round(max(informed), 4),
        "informed_median_s": round(statistics.median(informed), 4),
        "complete_s": round(max(complete), 3),
        "complete_median_s": round(statistics.median(complete), 3),
        "one_copy_s": round(one_copy, 3),
        "complete_over_one_copy": round(max(complete) / one_copy, 2),
        "seed_upload_ratio": round(uploads[0], 3),
        "max_node_upload_ratio": round(max(uploads), 3),
        "idle_bytes_per_node_s": round(statistics.fmean(per_node), 1),
        "idle_bytes_max_node_s": round(max(per_node), 1),
        "idle_multicast_bytes_s": round(mcast / p.idle_window, 1),
        "max_degree": steady["max"],
        "min_degree": steady["min"],
        "mean_degree": steady["mean"],
        "boot_min_degree": boot["min"],
        "boot_max_degree": boot["max"],
        "boot_multicast_bytes_per_node": round(boot_mcast),
        "beacons": len(world.mdns.registered),
        "join_half_view_s": round(max(join_half, default=0.0), 3),
        "join_full_view_s": round(max(join_full, default=0.0), 3),
        "join_degree_at_10s_min": min(at_10) if at_10 else 0,
        "events": loop.events,
        "wall_s": round(time.monotonic() - wall, 1),
    }
