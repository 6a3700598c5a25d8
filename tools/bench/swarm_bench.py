"""Swarm distribution: one seed and N nodes in network namespaces, capped links.

Run (root, from a source checkout):
``python -m p2pupd.tools.bench.swarm_bench [--mb 64] [--nodes 12] [--rate 50mbit]``.

1. Publishes one release of ``--mb`` MiB of incompressible files.
2. *Alone*: a LAN of two namespaces (seed, one node), every host's link
   capped at ``--rate`` each way with ``tc`` (tbf). Both daemons run with
   mDNS only; once they are connected the release is imported on the seed.
   Time = the seed's ``release-complete`` (import done) to the node's
   ``applied`` (fetched, hash-checked, fsynced, swapped in).
3. *Swarm*: the same with the seed and ``--nodes`` nodes; time = the seed's
   ``release-complete`` to the last node's ``applied``.

A central server with the same capped uplink would need about N times the
single-node time (it must send the release N times); issue 15's targets for
the swarm: at most 1.5x one node alone, and the seed uploading at most 2x
the release (its first holder super-seeds: about one copy). The table also
shows how many bytes the nodes got from the seed versus from each other.

The namespace machinery is the test suite's (``tests/integration/_netns.py``
and ``_cluster.py``), loaded from the checkout this file lives in: benchmarks
run on demand from the source tree, never from an installed package.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

MiB = 1024 * 1024
CHECKOUT_TESTS = Path(__file__).resolve().parents[2] / "tests" / "integration"


def load_cluster() -> ModuleType:
    """Import ``_cluster`` (and ``_netns``) from the source checkout's tests."""
    if not (CHECKOUT_TESTS / "_cluster.py").exists():
        raise SystemExit(f"swarm_bench needs a source checkout: {CHECKOUT_TESTS} not found")
    sys.path[:0] = [str(CHECKOUT_TESTS), str(CHECKOUT_TESTS.parent)]  # _cluster, _kit
    netns = importlib.import_module("_netns")
    reason = netns.netns_unavailable()
    if reason is not None:
        raise SystemExit(f"swarm_bench: {reason}")
    return importlib.import_module("_cluster")


def stamp(node: Any, event: str, **match: str) -> float:
    """Seconds (epoch) of the first ``event`` line of ``node``'s log with these fields."""
    for fields in node.events(event):
        if all(fields.get(k) == v for k, v in match.items()):
            ts = datetime.fromisoformat(fields["ts"].replace("Z", "+00:00"))
            return ts.timestamp()
    raise SystemExit(f"{node.name}: no {event} {match} in {node.log}")


def distribute(
    cl: ModuleType, base: Path, pub: Any, bundle: Path, n: int, rate: str, timeout: float
) -> dict[str, Any]:
    """Seed + ``n`` nodes on a capped LAN; import on the seed, time until all applied."""
    cluster = cl.Cluster(base, pub, n + 1)
    try:
        seed, *nodes = cluster.nodes
        for host in cluster.lan.hosts:
            cluster.lan.shape(host, rate)
        cluster.start()
        cluster.wait_mesh(60)
        seed.check("import", bundle)
        cluster.wait_serial(1, timeout)
        t0 = stamp(seed, "release-complete", serial="1")
        done = [stamp(node, "applied", serial="1") - t0 for node in nodes]
        seed_id = seed.node_id()
        from_seed = from_peers = 0
        for node in nodes:
            for peer, count in node.app()["received"]["from"].items():
                if peer == seed_id:
                    from_seed += count
                else:
                    from_peers += count
        return {
            "nodes": n,
            "all": max(done),
            "first": min(done),
            "median": statistics.median(done),
            "from_seed": from_seed,
            "from_peers": from_peers,
        }
    finally:
        cluster.close()


def run(base: Path, mb: int, n: int, rate: str, timeout: float) -> list[list[str]]:
    cl = load_cluster()
    pub = cl.Publisher(base / "site")
    pub.publish("1.0", cl.random_files(66, mb * MiB, files=8))
    bundle = pub.bundle("v1")
    alone = distribute(cl, base / "alone", pub, bundle, 1, rate, timeout)
    swarm = distribute(cl, base / "swarm", pub, bundle, n, rate, timeout)
    total = mb * MiB
    rows = [["run", "nodes", "first", "median", "all applied", "from seed", "from peers"]]
    for name, r in (("one node alone", alone), (f"swarm of {n}", swarm)):
        rows.append(
            [
                name,
                str(r["nodes"]),
                f"{r['first']:.1f} s",
                f"{r['median']:.1f} s",
                f"{r['all']:.1f} s",
                f"{r['from_seed'] / MiB:.0f} MiB",
                f"{r['from_peers'] / MiB:.0f} MiB",
            ]
        )
    ratio = swarm["all"] / alone["all"]
    rows.append(["central server (est.)", str(n), "", "", f"{n * alone['all']:.1f} s", "", ""])
    rows.append(["swarm / alone (target <= 1.5x)", "", "", "", f"{ratio:.2f}x", "", ""])
    seed_ratio = swarm["from_seed"] / total
    rows.append(["seed upload / release (target <= 2x)", "", "", "", f"{seed_ratio:.2f}x", "", ""])
    rows.append(["release, link cap", "", "", "", f"{total / MiB:.0f} MiB", rate, ""])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=64, help="release size in MiB (default 64)")
    p.add_argument("--nodes", type=int, default=12, help="nodes besides the seed (default 12)")
    p.add_argument("--rate", default="50mbit", help="tc cap per host link, each way")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait per run")
    p.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("swarm_bench needs root (network namespaces, tc)")
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="swarm-bench-", dir=args.dir)
    try:
        rows = run(Path(tmp), args.mb, args.nodes, args.rate, args.timeout)
    finally:
        if args.keep:
            print(f"daemon logs: {tmp}/{{alone,swarm}}/n*/daemon.log")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"(bench took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
