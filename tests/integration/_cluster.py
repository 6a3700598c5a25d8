"""Real ``p2pupd daemon`` processes, one per Linux network namespace.

``Publisher`` is a signing station (keys, repository, bundles) driven through
the real CLI in-process. ``Cluster`` builds a ``_netns.Lan`` of n hosts, an
initialised node (state directory and target) for each, and starts and stops
daemons in the hosts' namespaces: listening on the host's 169.254.77.x address,
mDNS bound to it, logs in ``<base>/<name>/daemon.log``. Everything the CLI is
asked (``status``, ``peers``, ``import``, ``fsck``) runs inside the node's
namespace too. Every wait is bounded and every loop counted; ``close`` stops
every daemon and removes every namespace, link and process, also after a
failure. Used by ``test_netns_cluster.py`` and ``tools/bench/swarm_bench.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _kit import Site, cli
from _netns import Host, Lan
from _store import stored_sizes

PORT = 7707
P2PUPD = (sys.executable, "-m", "p2pupd.tools.cli")
POLL_SECONDS = 0.25
READY_SECONDS = 30.0


class ClusterError(AssertionError):
    """A bounded wait ran out or a command failed (the message says which)."""


def random_files(seed: int, total_bytes: int, files: int = 4) -> dict[str, bytes]:
    """``files`` incompressible files of about ``total_bytes`` together."""
    rng = random.Random(seed)
    each = max(1, total_bytes // files)
    return {f"data/f{i}.bin": rng.randbytes(each) for i in range(files)}


def wait_until(
    pred: Callable[[], bool], timeout: float, what: str, step: float = POLL_SECONDS
) -> None:
    """Poll ``pred`` until true; ``ClusterError`` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        if pred():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(step)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")


class Publisher(Site):
    """A ``Site`` whose bundles are exported once per name, and its stored envelopes."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.bundles: dict[str, Path] = {}

    def bundle(self, name: str) -> Path:
        """Export the repository's newest releases as bundle ``name`` (once per name)."""
        if name not in self.bundles:
            self.bundles[name] = super().bundle(name)
        return self.bundles[name]

    def envelope(self, serial: int, component: str = "app") -> bytes:
        """The signed manifest envelope of ``serial`` as stored in the repository."""
        return (self.repo / "releases" / component / f"{serial}.msgpack").read_bytes()


@dataclass
class Node:
    """One node: a namespace host, a state directory, a target, a daemon log."""

    host: Host
    name: str
    state: Path
    target: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: list[int] = field(default_factory=list)  # log offsets where each run began

    @property
    def addr(self) -> str:
        return self.host.addr

    @property
    def endpoint(self) -> str:
        return f"{self.host.addr}:{PORT}"

    # ----- the daemon ------------------------------------------------------------

    def start(self, *extra: str, mdns: bool = True, ready: bool = True) -> None:
        """Start ``p2pupd daemon`` in the node's namespace; wait for ``event=ready``."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already runs"
        argv = [*P2PUPD, "daemon", "--state-dir", str(self.state), "--listen", self.endpoint]
        argv += ["--mdns-interface", self.addr] if mdns else ["--no-mdns"]
        self.starts.append(self.log.stat().st_size if self.log.exists() else 0)
        self.proc = self.host.spawn([*argv, *extra], str(self.log))
        if ready:
            self.wait_log(r"event=ready", READY_SECONDS)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the daemon and wait (bounded) for it to end; returns its code."""
        assert self.proc is not None, f"{self.name} was never started"
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM (graceful) if running; returns the exit code or None if not started."""
        if self.proc is None:
            return None
        return self.kill(signal.SIGTERM)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ----- the log ---------------------------------------------------------------

    def text(self, this_run: bool = False) -> str:
        """The daemon log (all runs, or only since the last start)."""
        if not self.log.exists():
            return ""
        data = self.log.read_bytes()
        if this_run and self.starts:
            data = data[self.starts[-1] :]
        return data.decode("utf-8", "replace")

    def events(self, name: str, this_run: bool = False) -> list[dict[str, str]]:
        """The fields of every ``event=name`` line (``key=value``; JSON-quoted values)."""
        out = []
        for line in self.text(this_run).splitlines():
            if f" event={name}" not in line:
                continue
            fields: dict[str, str] = {}
            for m in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line):
                value = m.group(2)
                fields[m.group(1)] = json.loads(value) if value.startswith('"') else value
            out.append(fields)
        return out

    def wait_log(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for ``pattern`` in this run's log; fails early if the daemon died."""
        rx = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            m = rx.search(self.text(this_run=True))
            if m:
                found.append(m)
                return True
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(f"{self.name}: daemon exited ({self.proc.returncode})")
            return False

        wait_until(seen, timeout, f"{pattern!r} in {self.name}'s log")
        return found[0]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    # ----- the CLI, in the node's namespace ------------------------------------

    def run(self, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [*P2PUPD, *map(str, args)]
        if "--state-dir" not in args:
            argv += ["--state-dir", str(self.state)]
        return self.host.run(argv, timeout=timeout)

    def check(self, *args: str | Path, timeout: float = 60) -> str:
        r = self.run(*args, timeout=timeout)
        if r.returncode != 0:
            raise ClusterError(f"{self.name}: p2pupd {' '.join(map(str, args))}: {r.stderr}")
        return r.stdout

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.check("status", "--json"))
        return doc

    def peers(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.check("peers", "--json"))
        return doc

    def app(self) -> dict[str, Any]:
        comp: dict[str, Any] = self.status()["components"]["app"]
        return comp

    def serial(self) -> int | None:
        """The installed serial of ``app`` (None before the first apply)."""
        value = self.app().get("serial")
        return value if isinstance(value, int) else None

    def connected(self) -> set[str]:
        """Node ids (hex) of the peers the running daemon is connected to."""
        return {p["node_id"] for p in self.peers()["connected"]}

    def node_id(self) -> str:
        return str(self.status()["node_id"])

    def store_blobs(self) -> dict[str, int]:
        """{hex digest: size} of every blob in the node's store."""
        return stored_sizes(self.state)


class Cluster:
    """n nodes on one bridge; see the module docstring."""

    def __init__(self, base: Path, publisher: Publisher, n: int, *, spare_hosts: int = 0) -> None:
        self.base = base
        self.publisher = publisher
        self.lan = Lan(n + spare_hosts)
        self.nodes: list[Node] = []
        try:
            for host in self.lan.hosts[:n]:
                self.nodes.append(self._init_node(host))
        except BaseException:
            self.lan.close()
            raise

    @property
    def spare(self) -> list[Host]:
        """Hosts without a node (e.g. for a hostile peer)."""
        return self.lan.hosts[len(self.nodes) :]

    def _init_node(self, host: Host) -> Node:
        name = f"n{host.index}"
        state, target = self.base / name / "state", self.base / name / "target" / "app"
        target.parent.mkdir(parents=True)
        cli("init", "--state-dir", state, "--trust", self.publisher.root_file,
            "--component", f"app={target}")  # fmt: skip
        return Node(host, name, state, target, self.base / name / "daemon.log")

    def install(self, bundle: Path, nodes: Sequence[Node] | None = None) -> None:
        """Import and apply ``bundle`` on nodes with no daemon running (inline CLI)."""
        for node in self.nodes if nodes is None else nodes:
            cli("import", bundle, "--state-dir", node.state, "--apply")

    def start(self, *extra: str, nodes: Sequence[Node] | None = None) -> None:
        """Start daemons (all spawned first, then each waited for)."""
        todo = list(self.nodes if nodes is None else nodes)
        for node in todo:
            node.start(*extra, ready=False)
        for node in todo:
            node.wait_log(r"event=ready", READY_SECONDS)

    def wait_mesh(self, timeout: float, nodes: Sequence[Node] | None = None) -> None:
        """Wait until each of ``nodes`` is connected to every other one."""
        todo = list(self.nodes if nodes is None else nodes)
        ids = {n.name: n.node_id() for n in todo}

        def meshed() -> bool:
            return all(n.connected() >= {ids[m.name] for m in todo if m is not n} for n in todo)

        wait_until(meshed, timeout, f"{[n.name for n in todo]} to connect to each other", 0.5)

    def wait_serial(self, serial: int, timeout: float, nodes: Sequence[Node] | None = None) -> None:
        """Wait until every node in ``nodes`` has ``serial`` of app installed."""
        todo = list(self.nodes if nodes is None else nodes)
        done: set[str] = set()

        def converged() -> bool:
            for n in todo:
                if n.name not in done and n.serial() == serial:
                    done.add(n.name)
            return len(done) == len(todo)

        try:
            wait_until(converged, timeout, f"serial {serial} on every node", 0.5)
        except ClusterError as exc:
            left = sorted({n.name for n in todo} - done)
            raise ClusterError(f"{exc}; still missing on {left}") from None

    def report(self, lines: int = 40) -> str:
        """The tail of every daemon log (printed when a test fails)."""
        parts = []
        for n in self.nodes:
            state = "running" if n.running else f"exit {n.proc.returncode if n.proc else '-'}"
            parts.append(f"----- {n.name} ({n.addr}, {state}) {n.log} -----\n{n.tail(lines)}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every daemon (SIGTERM, bounded), then remove the LAN (kills leftovers)."""
        try:
            for n in self.nodes:
                if n.running:
                    with contextlib.suppress(Exception):
                        n.stop()
        finally:
            self.lan.close()
