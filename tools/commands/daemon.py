"""Daemon commands: ``p2pupd daemon`` (run it) and ``p2pupd peers`` (ask it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from p2pupd.daemon import api
from p2pupd.tools.commands.base import EXIT_OK, Adder, out, state_dir


def cmd_daemon(args: argparse.Namespace) -> int:
    # Flags win over the config file; the file wins over built-in defaults.
    cfg = api.load_config(Path(args.config), required=args.config != str(api.DEFAULT_CONFIG_PATH))
    state = (
        Path(args.state_dir)
        if args.state_dir
        else cfg.state_dir
        if cfg.state_dir is not None
        else state_dir(args)
    )
    listen = args.listen or cfg.listen or "0.0.0.0:7707"
    peers = list(cfg.peers or ()) + list(args.peer)
    mdns = False if args.no_mdns else (cfg.mdns if cfg.mdns is not None else True)
    rate = args.bandwidth_limit or cfg.bandwidth_limit
    metrics = args.metrics_listen or cfg.metrics_listen
    watch = [Path(w) for w in args.watch] or list(cfg.watch or ())
    sizes: dict[str, Any] = {k: v for k, v in api.network_sizes(cfg).items() if v is not None}
    options = api.DaemonOptions(
        state_dir=state,
        listen=api.parse_endpoint(listen),
        peers=tuple(api.parse_endpoint(p) for p in peers),
        mdns=mdns,
        mdns_interfaces=tuple(args.mdns_interface) or tuple(cfg.mdns_interfaces or ()),
        bandwidth_limit=api.parse_rate(rate) if rate else None,
        log_level=args.log_level or cfg.log_level or "info",
        gossip_interval=cfg.gossip_interval or 30.0,
        peer_timeout=cfg.peer_timeout or api.DEFAULT_PEER_TIMEOUT,
        **sizes,
        metrics_listen=api.parse_endpoint(metrics, default_port=None) if metrics else None,
        watch=tuple(watch),
        site_file=cfg.site_file,
        rollout=cfg.rollout or api.RolloutConfig(),
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
        view = doc.get("view")
        if view:
            print(f"view: {view['degree']} linked (target {view['target']}, max {view['max']}), "
                  f"{len(view['passive'])} known")  # fmt: skip
        for b in doc["banned"]:
            print(f"banned {b['who']} for {b['seconds_left']:.0f}s: {b['reason']}")
        site = doc.get("site") or {}
        if site.get("site") is None:
            print("no site: links are plain TCP, any host holding the root may join")
        else:
            state = (
                "TLS 1.3, credentials required"
                if site["tls"]
                else f"refusing all: {site['problem']}"
            )
            print(f"site {site['site']}: {state}; {site['refused']} link(s) refused")
            for r in site["recent"][-5:]:
                print(f"  refused {r['address']} {r['seconds_ago']:.0f}s ago: {r['reason']}")

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
        "--config",
        default=str(api.DEFAULT_CONFIG_PATH),
        metavar="FILE",
        help="TOML configuration (default /etc/p2pupd/config.toml, used if present)",
    )
    sp.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    sp.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="DIR",
        help="import (and apply) bundles appearing under DIR, e.g. /media/p2pupd (repeatable)",
    )
    sp.add_argument(
        "--listen",
        default=None,
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
        default=None,
        help="log verbosity (one key=value event per line on stderr)",
    )
    add("peers", cmd_peers, "show the running daemon's peers and bans", json_opt=True, state=True)
