"""Fleet simulator: N nodes, one release, the real protocol objects on a virtual clock.

Run: ``make bench BENCH="fleet --nodes 1000 --mib 16 --mbit 100"`` (or
``python -m p2pupd.tools.bench fleet ...``); ``--json`` prints one JSON object
instead of the table. What is run and what is modelled: see
``p2pupd.tools.bench.fleetsim``; the scenario: ``fleetsim.run``.

Targets (issue 15) at N=1,000, 16 MiB, 100 Mbit/s: every node informed
within 1 s; all complete within 3x the one-copy time; the seed uploads at
most 2x the release; idle traffic at most 100 B/s per node; every node
between 4 and 16 peers; a node joining the full site has half its view
within 10 s.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from p2pupd.tools.bench.fleetsim.run import FleetParams, simulate

ROWS = [
    ("informed_s", "every node informed (s)", "<= 1"),
    ("complete_s", "every node complete (s)", ""),
    ("complete_median_s", "median node complete (s)", ""),
    ("one_copy_s", "one copy over one link (s)", ""),
    ("complete_over_one_copy", "complete / one copy", "<= 3"),
    ("seed_upload_ratio", "seed upload / release", "<= 2"),
    ("max_node_upload_ratio", "max node upload / release", ""),
    ("idle_bytes_per_node_s", "idle bytes per node (B/s)", "<= 100"),
    ("idle_bytes_max_node_s", "idle bytes, busiest node (B/s)", ""),
    ("min_degree", "fewest peers of a node", ">= 4"),
    ("max_degree", "most peers of a node", "<= 16"),
    ("mean_degree", "mean peers", ""),
    ("boot_multicast_bytes_per_node", "cold boot multicast per node (B)", ""),
    ("beacons", "mDNS beacons registered", ""),
    ("join_half_view_s", "joiner: half its view (s)", "<= 10"),
    ("join_full_view_s", "joiner: full view (s)", ""),
    ("join_degree_at_10s_min", "joiner: peers after 10 s (min)", ""),
    ("events", "simulated events", ""),
    ("wall_s", "wall time (s)", ""),
]


def table(result: dict[str, Any]) -> str:
    head = (
        f"fleet of {result['nodes']} nodes, {result['release_mib']:g} MiB release, "
        f"{result['link_mbit']:g} Mbit/s links, view {result['view_target']}..{result['view_max']}"
    )
    width = max(len(label) for _, label, _ in ROWS)
    lines = [head, "-" * len(head)]
    for key, label, target in ROWS:
        value = result[key]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"{label.ljust(width)}  {shown:>12}  {target}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--mib", type=float, default=16.0, help="release size in MiB")
    p.add_argument("--mbit", type=float, default=100.0, help="link speed, each way")
    p.add_argument("--latency-ms", type=float, default=0.2, help="one-way latency")
    p.add_argument("--target", type=int, default=12, help="links a node works to keep")
    p.add_argument("--max-peers", type=int, default=16, help="links a node accepts at most")
    p.add_argument("--passive", type=int, default=64, help="passive view size")
    p.add_argument("--beacons", type=int, default=8, help="mDNS beacons a site keeps")
    p.add_argument("--boot-window", type=float, default=30.0, help="cold boot spread (s)")
    p.add_argument("--idle", type=float, default=300.0, help="idle period measured (s)")
    p.add_argument("--joiners", type=int, default=5)
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    params = FleetParams(
        nodes=args.nodes,
        mib=args.mib,
        mbit=args.mbit,
        latency_ms=args.latency_ms,
        target=args.target,
        max_active=args.max_peers,
        passive=args.passive,
        beacons=args.beacons,
        boot_window=args.boot_window,
        idle_window=args.idle,
        joiners=args.joiners,
        seed=args.seed,
    )
    say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = simulate(params, say)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
