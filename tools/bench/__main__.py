"""``python -m p2pupd.tools.bench [NAME [ARGS...]]``: list the benchmarks, or run one.

Each benchmark prints a table; they are run on demand, never by the test suite.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "apply": "one changed file in a big tree and a 1 % changed image vs cp -a; swap window",
    "delta": "update bytes, publish time and RSS vs whole-file bsdiff4 and hdiffpatch",
    "import": "bundle import throughput vs sha256sum of the same bytes",
    "store": "gc and fsck of 100,000 chunks: one file per chunk vs packs",
    "transfer": "daemon-to-daemon loopback throughput vs socket, hash+append, sha256; idle",
    "swarm": "one seed and 12 nodes in network namespaces with tc caps (root, source tree)",
    "hooks": "WebAssembly hook start-up: cold compile vs cached",
    "fleet": "simulated site of N nodes: gossip, partial view, swarm, idle cost (virtual clock)",
    "tls": "peer-link throughput with and without TLS 1.3 (site credentials), same run",
    "rollout": "the site view at 1,000 and 10,000 nodes: report size, table memory, verify, decide",
}
MODULES = {"fleet": "fleet"}  # others are <name>_bench


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m p2pupd.tools.bench NAME [ARGS...]   (NAME --help for options)\n")
        for name, what in BENCHES.items():
            print(f"  {name:<9} {what}")
        return 0
    name = argv[0]
    if name not in BENCHES:
        print(f"unknown benchmark {name!r}; one of: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"p2pupd.tools.bench.{MODULES.get(name, name + '_bench')}")
    sys.argv = [f"{name}_bench", *argv[1:]]
    result = mod.main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
