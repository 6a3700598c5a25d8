"""Daemon commands: ``p2pupd daemon`` (run it) and ``p2pupd peers`` (ask it)."""

from __future__ import annotations

import argparse

from p2pupd.daemon import api

from .clibase import EXIT_OK, Adder, out, state_dir


def cmd_daemon(args: argparse.Namespace) -> int:
    options = api.DaemonOptions(
        state_dir=state_dir(args),
        listen=api.parse_endpoint(args.listen),
        peers=tuple(api.parse_endpoint(p) for p in args.peer),
        mdns=not args.no_mdns,
        mdns_interfaces=tuple(args.mdns_interface),
        bandwidth_limit=api.parse_rate(args.bandwidth_limit) if args.bandwidth_limit else None,
        log_level=args.log_level,
    )
    return api.run_daemon(options)


def cmd_peers(args: argparse.Namespace) -> int:
    doc = api.peers(state_dir(args))

    def human() -> None:
        print(f"node {doc['node_id'][:12]}  listening on {doc['listen']}")
        print(f"{'PEER':<14} {'ADDRESS':<24} {'DIR':<4} {'IN':>12} {'OUT':>12}  LAST SEEN")
        for p in doc["connected"]:
            print(
                f"{p['node_id'][:12]:<14} {p['address']:<24} {p['direction']:<4} "
                f"{p['bytes_in']:>12} {p['bytes_out']:>12}  {p['last_seen_seconds_ago']:.0f}s ago"
            )
        for b in doc["banned"]:
            print(f"banned {b['who']} for {b['seconds_left']:.0f}s: {b['reason']}")

    out(args, doc, human)
    return EXIT_OK


def register(add: Adder) -> None:
    sp = add(
        "daemon",
        cmd_daemon,
        "run the node daemon: discover peers, gossip releases, fetch and apply them",
        state=True,
    )
    sp.add_argument(
        "--listen",
        default="0.0.0.0:7707",
        metavar="HOST:PORT",
        help="TCP address for peers (default 0.0.0.0:7707; port 0 picks a free one)",
    )
    sp.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a static peer to keep connected to (repeatable; for routed networks)",
    )
    sp.add_argument("--no-mdns", action="store_true", help="do not use mDNS discovery")
    sp.add_argument(
        "--mdns-interface",
        action="append",
        default=[],
        metavar="IP",
        help="run mDNS only on the interface with this address (repeatable)",
    )
    sp.add_argument(
        "--bandwidth-limit",
        metavar="BYTES/S",
        help="cap peer traffic each way, e.g. 5000000 or 5M (default: none)",
    )
    sp.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log verbosity (one key=value event per line on stderr)",
    )
    add("peers", cmd_peers, "show the running daemon's peers and bans", json_opt=True, state=True)
