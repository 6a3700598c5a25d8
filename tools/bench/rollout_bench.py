"""The site view at scale: what 1,000 and 10,000 node reports cost one node.

Run: ``make bench BENCH=rollout`` (``--nodes 1000,10000``). For each site size
it builds signed reports of that many nodes (one component, a release being
rolled out in waves ``1,10%,50%``) and prints, on one node:

* report bytes (the signed document) and the table's memory (tracemalloc);
* offers/s: new reports verified and taken into the table (signature check
  included), and replays/s: older reports refused (no signature check);
* decide: one ``decide`` of the apply gate over the whole view (ms), the
  first time and again (wave positions are cached per release);
* digest: the ``ReportDigest`` a node sends a peer on connect (bytes);
* idle: the report traffic one node receives per second with the daemon's
  refresh period stretched with the site (``SECONDS_PER_NODE``), each report
  arriving about ``FANOUT`` times (the push fan-out over the partial view).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.daemon.service.rollout.service import SECONDS_PER_NODE
from p2pupd.protocol import encoding
from p2pupd.protocol.fleet.identity import node_id_of
from p2pupd.protocol.rollout.decide import Release, decide
from p2pupd.protocol.rollout.ledger import Ledger
from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.protocol.rollout.report import (
    ComponentReport,
    CompState,
    NodeReport,
    sign_report,
    verify_report,
)
from p2pupd.protocol.rollout.site import SiteRules
from p2pupd.protocol.rollout.spread import FANOUT
from p2pupd.protocol.rollout.table import ReportTable
from p2pupd.protocol.wire import ReportDigest, encode_message

POLICY = RolloutPolicy.parse("waves=1,10%,50% soak=10m halt-after=1")


def reports(n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        key = Ed25519PrivateKey.generate()  # each node's own: an id is its key's hash
        public = key.public_key().public_bytes_raw()
        node_id = node_id_of(public)
        comp = ComponentReport(
            "app", 4, "4.0.1", 1_700_000_000, CompState.COMMITTED, 4, 1_700_000_000,
            holds=5, wait="wave 2",
        )  # fmt: skip
        rep = NodeReport(node_id, public, "p2pupd", "default", "linux-x86_64", 10, 1_700_000_100,
                         (comp,))  # fmt: skip
        out.append(sign_report(rep, key))
    return out


def measure(n: int) -> dict[str, float]:
    docs = reports(n)
    me = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    rules = SiteRules("p2pupd", "default", me)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    table = ReportTable(rules, capacity=max(n, 10_000))
    t0 = time.perf_counter()
    for doc in docs:
        assert table.offer(doc, 0.0, 0).accepted
    t_offer = time.perf_counter() - t0
    mem = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    t0 = time.perf_counter()
    for doc in docs:
        table.offer(doc, 1.0, 0)
    t_replay = time.perf_counter() - t0
    ledger = Ledger(rules)
    me_id = verify_report(docs[-1]).node_id
    t0 = time.perf_counter()
    d = decide(Release("app", 5, POLICY), me_id, "linux-x86_64", table, ledger, 1.0, settled=True)
    t_decide = time.perf_counter() - t0
    assert d.go.value in ("wait", "apply")
    t0 = time.perf_counter()
    decide(Release("app", 5, POLICY), me_id, "linux-x86_64", table, ledger, 1.0, settled=True)
    t_again = time.perf_counter() - t0
    digest = ReportDigest(tuple(sorted(table.summary().items())))
    size = sum(len(x) for x in docs) / n
    refresh = max(600.0, SECONDS_PER_NODE * n)
    return {
        "nodes": n,
        "report_bytes": size,
        "table_mib": mem / 2**20,
        "offers_per_s": n / t_offer,
        "replays_per_s": n / t_replay,
        "decide_ms": t_decide * 1000,
        "again_ms": t_again * 1000,
        "digest_kib": len(encode_message(digest)) / 1024,
        "idle_bytes_per_s": n * size * FANOUT / refresh,
        "saved_kib": len(encoding.encode(table.to_value())) / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1000,10000", help="site sizes, comma-separated")
    args = ap.parse_args()
    cols = ("nodes", "report B", "table MiB", "offers/s", "replays/s", "decide ms",
            "again ms", "digest KiB", "saved KiB", "idle B/s")  # fmt: skip
    print(" ".join(f"{c:>11}" for c in cols))
    for n in (int(x) for x in args.nodes.split(",")):
        r = measure(n)
        print(
            f"{r['nodes']:>11,} {r['report_bytes']:>11.0f} {r['table_mib']:>11.1f} "
            f"{r['offers_per_s']:>11,.0f} {r['replays_per_s']:>11,.0f} {r['decide_ms']:>11.1f} "
            f"{r['again_ms']:>11.1f} "
            f"{r['digest_kib']:>11.0f} {r['saved_kib']:>11.0f} {r['idle_bytes_per_s']:>11.0f}"
        )
    return 0
