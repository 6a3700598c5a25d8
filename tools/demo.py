"""``p2pupd demo``: the whole product on this machine, in one command.

A publisher creates keys and a repository and publishes v1 and v2 of a sample
appliance component (v2 changes a little of a 4 MiB image and a few files;
publish computes binary deltas). Three nodes, each with its own state dir and
target, get v1. Then three real ``p2pupd daemon`` processes start on
127.0.0.1 and find each other by mDNS (static peers if this host cannot loop
multicast back); a delta-only bundle of v2 — the USB stick — is imported into
node 1, and the others discover, fetch and apply it -- in waves: v2 carries a
rollout policy (a canary first, then the rest once it committed), so the
daemons also gossip signed reports of what they run. A table shows who ended
on which version, how many bytes each received and from whom, then the site
as one node sees it (``p2pupd fleet``). Every process and temp dir is removed
at the end (``--keep`` keeps the dir).

``--offline`` shows the sneakernet path alone, with no daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pupd.daemon import api
from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.tools.commands.base import EXIT_ERROR, EXIT_OK, Adder
from p2pupd.tools.publisher.deltas import source_for_node_at
from p2pupd.tools.publisher.export import ReleaseSource, write_bundle
from p2pupd.tools.publisher.keys import generate
from p2pupd.tools.publisher.publish import build_manifest, sign_and_write
from p2pupd.tools.publisher.repo import Repo

NODES = ("node1", "node2", "node3")
CONVERGE_SECONDS = 60.0
ROLLOUT = "waves=1,100% soak=0 halt-after=1"  # a canary, then everyone
# Rollout timings for three daemons on one machine (a site uses the defaults).
DEMO_CONFIG = "[rollout]\nsettle = 2\nreport_interval = 30\n"
LISTEN_RE = re.compile(r"event=listening addr=127\.0\.0\.1:(\d+)")


def sample_tree(root: Path, version: int, image_mib: int = 4) -> None:
    """Write a small appliance-like tree; v2 changes a little of it."""
    rnd = random.Random(7)
    image = bytearray(rnd.randbytes(image_mib * 1024 * 1024))
    if version >= 2:
        for _ in range(20):
            pos = rnd.randrange(len(image) - 64)
            image[pos : pos + 64] = rnd.randbytes(64)
    for d in ("bin", "lib", "etc", "var/log"):
        (root / d).mkdir(parents=True)
    (root / "bin" / "appliance").write_bytes(b"#!/bin/sh\necho appliance v%d\n" % version)
    os.chmod(root / "bin" / "appliance", 0o755)
    (root / "lib" / "firmware.img").write_bytes(bytes(image))
    for i in range(50):
        (root / "lib" / f"module{i:02}.so").write_bytes(rnd.randbytes(2000))
    (root / "etc" / "appliance.conf").write_text(f"version={version}\nmode=production\n")
    if version >= 2:
        (root / "etc" / "feature-flags").write_text("fast-path=on\n")
    os.symlink("appliance.conf", root / "etc" / "current.conf")


@dataclass
class Publisher:
    base: Path
    repo: Repo

    @classmethod
    def create(cls, base: Path) -> Publisher:
        keys = base / "keys"
        keys.mkdir()
        generate(keys / "root.key")
        generate(keys / "release.key")
        repo = Repo(base / "repo")
        repo.init([keys / "root.key"], 1, [keys / "release.key"], name="demo")
        return cls(base, repo)

    def publish(
        self, version: int, image_mib: int, rollout: RolloutPolicy | None = None
    ) -> tuple[str, int]:
        src = self.base / f"src-v{version}"
        sample_tree(src, version, image_mib)
        man = build_manifest(
            self.repo, "appliance", f"{version}.0", src, int(time.time()), rollout=rollout
        )
        sign_and_write(self.repo, man)
        return man.version, man.total_size()

    def bundle(self, name: str, sources: list[ReleaseSource]) -> tuple[Path, int]:
        dest = self.base / name
        rep = write_bundle(dest, self.repo.roots(), sources, self.repo.store)
        return dest, rep.bytes

    def full_source(self) -> ReleaseSource:
        serial = self.repo.serials("appliance")[-1]
        man, env = self.repo.release("appliance", serial)
        return ReleaseSource(man, env, man.blob_sizes())


def multicast_loops_back() -> bool:
    """True if a multicast datagram sent on 127.0.0.1 is received on this host."""
    group = "239.255.77.78"
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        ):
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rx.bind(("", 0))
            mreq = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            tx.sendto(b"p2pupd", (group, rx.getsockname()[1]))
            rx.settimeout(1.0)
            return rx.recv(16) == b"p2pupd"
    except OSError:
        return False


class Daemon:
    """One ``p2pupd daemon`` process of the demo."""

    def __init__(self, name: str, state: Path, extra: list[str]) -> None:
        self.name = name
        self.state = state
        self.log = state.parent / "daemon.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "p2pupd.tools.cli", "daemon", "--state-dir", str(state),
                 "--listen", "127.0.0.1:0", "--log-level", "info", *extra],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.port = int(self.wait_for(LISTEN_RE).group(1))
        self.wait_for(re.compile(r"event=ready"))

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.log.read_text(errors="replace"))
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-5:])
        raise DemoError(f"{self.name}: no {pattern.pattern!r} in its log:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class DemoError(Exception):
    pass


@contextlib.contextmanager
def running(daemons: list[Daemon]) -> Iterator[list[Daemon]]:
    try:
        yield daemons
    finally:
        for d in daemons:
            d.stop()


def run_cluster(base: Path, image_mib: int, quiet: bool) -> dict[str, Any]:
    say = (lambda *_a: None) if quiet else print
    t0 = time.monotonic()
    pub = Publisher.create(base)
    v1, _ = pub.publish(1, image_mib)
    stick1, _ = pub.bundle("usb-v1", [pub.full_source()])
    v2, size2 = pub.publish(2, image_mib, RolloutPolicy.parse(ROLLOUT))
    say(f"publisher: signed appliance {v1} and {v2} ({size2 / 1e6:.1f} MB each; v2 with deltas)")
    say(f"           {v2} rolls out as: {ROLLOUT}")
    config = base / "daemon.toml"
    config.write_text(DEMO_CONFIG)
    cluster = f"demo-{secrets.token_hex(4)}"
    targets: dict[str, Path] = {}
    states: dict[str, Path] = {}
    for name in NODES:
        states[name] = base / name / "state"
        targets[name] = base / name / "appliance"
        targets[name].parent.mkdir(parents=True, exist_ok=True)
        api.init_node(
            states[name], pub.repo.root_path, {"appliance": targets[name]}, cluster=cluster
        )
        api.import_dir(states[name], stick1, apply_after=True)
    say(f"nodes:     {', '.join(NODES)} run appliance {v1}")

    stick2, stick_bytes = pub.bundle("usb-v2", [source_for_node_at(pub.repo, "appliance", v1)])
    say(
        f"usb stick: delta-only bundle of {v2}: {stick_bytes / 1e3:.1f} kB (full release {size2 / 1e6:.1f} MB)"
    )

    mdns = multicast_loops_back()
    daemons: list[Daemon] = []
    with running(daemons):
        for i, name in enumerate(NODES):
            if mdns:
                extra = ["--mdns-interface", "127.0.0.1"]
            else:
                extra = ["--no-mdns", *[f"--peer=127.0.0.1:{d.port}" for d in daemons[:i]]]
            extra += ["--config", str(config)]
            daemons.append(Daemon(name, states[name], extra))
        how = "mDNS on 127.0.0.1" if mdns else "static peers (multicast does not loop back here)"
        say(f"daemons:   3 started, discovering each other by {how}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            meshed = [len(api.peers(states[n])["connected"]) >= len(NODES) - 1 for n in NODES]
            if all(meshed):
                break
            time.sleep(0.2)
        else:
            raise DemoError("the daemons did not all find each other within 20 s")
        t_import = time.monotonic()
        api.import_dir(states["node1"], stick2, apply_after=True)
        say(
            f"import:    the stick goes into node1 at t={t_import - t0:.1f}s; watching the others..."
        )
        done: dict[str, float] = {}
        deadline = time.monotonic() + CONVERGE_SECONDS
        while len(done) < len(NODES) and time.monotonic() < deadline:
            for n in NODES:
                if (
                    n not in done
                    and api.status(states[n])["components"]["appliance"]["serial"] == 2
                ):
                    done[n] = time.monotonic() - t_import
            time.sleep(0.1)
        docs = {n: api.status(states[n]) for n in NODES}
        site = site_view(states["node3"], len(NODES))
    ids = {docs[n]["node_id"]: n for n in NODES}
    rows = []
    for n in NODES:
        comp = docs[n]["components"]["appliance"]
        received = comp.get("received") or {}
        sources = received.get("from") or {}
        src = ", ".join(f"{ids.get(k, k[:12])} {v / 1e3:.1f} kB" for k, v in sources.items())
        rows.append({
            "node": n,
            "version": comp["version"],
            "serial": comp["serial"],
            "bytes_received": int(received.get("bytes", 0)) if received.get("serial") == 2 else 0,
            "from": src if n != "node1" else "usb stick",
            "seconds": round(done[n], 2) if n in done else None,
            "identical": _same_tree(targets[n], base / "src-v2"),
        })  # fmt: skip
    site_rows = [
        {"node": ids.get(r["node_id"], r["node_id"][:12]), "platform": r["platform"],
         "version": r["components"]["appliance"]["version"],
         "state": r["components"]["appliance"]["state"],
         "heard_seconds_ago": r["heard_seconds_ago"]}
        for r in site["nodes"]
    ]  # fmt: skip
    release: dict[str, Any] = next((r for r in site["releases"] if r["serial"] == 2), {})
    return {"mdns": mdns, "stick_bytes": stick_bytes, "release_bytes": size2, "nodes": rows,
            "site": {"seen_from": "node3", "policy": ROLLOUT, "nodes": site_rows,
                     "release": release},
            "seconds_total": round(time.monotonic() - t0, 1)}  # fmt: skip


def site_view(state: Path, nodes: int, timeout: float = 15.0) -> dict[str, Any]:
    """``p2pupd fleet`` on one node, once its reports show every node on v2."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = api.fleet(state)
    while time.monotonic() < deadline:
        on_v2 = [r for r in doc["nodes"]
                 if r["components"].get("appliance", {}).get("installed") == 2]  # fmt: skip
        if len(on_v2) == nodes:
            break
        time.sleep(0.2)
        doc = api.fleet(state)
    return doc


def _same_tree(a: Path, b: Path) -> bool:
    def walk(root: Path) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                rel = str(p.relative_to(root))
                if p.is_symlink():
                    out[rel] = "->" + os.readlink(p)
                elif p.is_file():
                    out[rel] = p.read_bytes()
                else:
                    out[rel] = "dir"
        return out

    return walk(a) == walk(b)


def print_table(doc: dict[str, Any]) -> None:
    print()
    print(f"{'NODE':<7} {'VERSION':<8} {'RECEIVED':>10}  {'FROM':<34} {'APPLIED AFTER':>13}  TREE")
    for r in doc["nodes"]:
        secs = f"{r['seconds']:.2f}s" if r["seconds"] is not None else "not yet"
        got = f"{r['bytes_received'] / 1e3:.1f} kB" if r["bytes_received"] else "-"
        tree = "= v2 source" if r["identical"] else "DIFFERS"
        print(f"{r['node']:<7} {r['version']:<8} {got:>10}  {r['from']:<34} {secs:>13}  {tree}")
    print()
    site = doc["site"]
    print()
    print(f"the site as {site['seen_from']} sees it (p2pupd fleet), rollout: {site['policy']}")
    print(f"{'NODE':<7} {'VERSION':<8} {'STATE':<10} {'PLATFORM':<16} HEARD")
    for r in site["nodes"]:
        print(f"{r['node']:<7} {r['version'] or '-':<8} {r['state']:<10} {r['platform']:<16} "
              f"{r['heard_seconds_ago']:.1f}s ago")  # fmt: skip
    rel = site["release"]
    if rel:
        print(f"release #2: {rel['on_it']}/{rel['nodes']} on it, {rel['failed']} failed, "
              f"{rel['waiting']} waiting{', braked' if rel['braked'] else ''}")  # fmt: skip
    print()
    print(f"every node on v2: {'yes' if all(r['serial'] == 2 for r in doc['nodes']) else 'NO'}; "
          f"stick {doc['stick_bytes'] / 1e3:.1f} kB for a {doc['release_bytes'] / 1e6:.1f} MB release; "
          f"total {doc['seconds_total']}s")  # fmt: skip


def run_offline(base: Path) -> None:
    pub = Publisher.create(base)
    target = base / "site" / "appliance"
    target.parent.mkdir()
    state = base / "site" / "state"
    api.init_node(state, pub.repo.root_path, {"appliance": target})
    for v in (1, 2):
        version, _ = pub.publish(v, 4)
        src = pub.full_source() if v == 1 else source_for_node_at(pub.repo, "appliance", "1.0")
        stick, nbytes = pub.bundle(f"usb-v{v}", [src])
        report, _ = api.import_dir(state, stick, apply_after=True)
        print(
            f"import --apply {version}: stick {nbytes / 1e3:.1f} kB, copied {report.bytes_copied / 1e3:.1f} kB"
        )
    st = api.status(state)["components"]["appliance"]
    print(
        f"live: appliance {st['version']}; kept: {', '.join(k['version'] for k in st['kept']) or '-'}"
    )
    r = api.rollback(state, "appliance")
    print(f"rollback: appliance {r.version} live again")


def cmd_demo(args: argparse.Namespace) -> int:
    base = Path(tempfile.mkdtemp(prefix="p2pupd-demo-"))
    code = EXIT_OK
    try:
        if args.offline:
            run_offline(base)
        else:
            doc = run_cluster(base, args.image_mib, quiet=args.json)
            if args.json:
                print(json.dumps(doc, indent=2))
            else:
                print_table(doc)
            if not all(r["serial"] == 2 and r["identical"] for r in doc["nodes"]):
                code = EXIT_ERROR
    except DemoError as exc:
        print(f"p2pupd: demo failed: {exc}", file=sys.stderr)
        code = EXIT_ERROR
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return code


def register(add: Adder) -> None:
    sp = add(
        "demo",
        cmd_demo,
        "run three daemons on this machine: publish, discover, gossip, fetch deltas, apply",
        json_opt=True,
    )
    sp.add_argument("--offline", action="store_true", help="show the USB path alone (no daemons)")
    sp.add_argument("--image-mib", type=int, default=4, help="size of the sample image (default 4)")
    sp.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
