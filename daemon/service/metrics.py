"""Metrics in the Prometheus text exposition format, the endpoint serving them, and their feed.

The registry is a plain in-process table of counters and gauges with labels;
services update it directly (no locking needed: everything runs in one trio
thread, and worker-thread callers go through ``trio.from_thread``). The
endpoint is off unless an address is configured, and is meant for a local
scraper: it serves ``GET /metrics`` and nothing else, with bounded request
reading so a stray client cannot hold memory.

``MetricsFeed`` keeps the registry in step with a running daemon. Counters
follow the event stream (``events.observe``): bans, applies, apply durations,
failed applies and operator rollbacks, refused manifests (errors) and
skipped ones (another platform's: not errors), variants carried for other
platforms, bundles imported (or refused) through the daemon, bytes of peers
whose connection closed.
Counters whose label sets are known at start (imports by outcome, bans by
reason, applies and rollbacks per configured component) start at 0. At scrape time the live peer table and the node's state add
what is current (bytes of connected peers, live serials), so a scrape never
waits for an event and the numbers stay monotonic; so does the site view
(nodes per component, version and state from their reports; per release how
many are on it, applying, failed, waiting; whether the brake or a halt holds it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from p2pupd.protocol.rollout import fleet

if TYPE_CHECKING:
    from p2pupd.daemon.service.nodeservice import NodeService

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT_S = 5.0
IMPORT_RESULTS = ("imported", "refused", "failed")
BAN_REASONS = ("signature", "hash", "protocol", "frame", "rollback", "manifest", "timeout", "other")
ROLLBACK_REASONS = ("apply-failed", "operator")
# Why a valid manifest a peer offered was left alone (no error: gossip.py).
SKIP_REASONS = ("platform", "expired", "other")
# Why a site member refused a link (daemon/service/sitegate.py), by the words of its reason.
REFUSAL_REASONS = ("handshake", "expired", "revoked", "member", "timed out", "other")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


@dataclass
class Metric:
    name: str
    kind: str  # "counter" | "gauge"
    help: str
    label_names: tuple[str, ...] = ()
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if self.kind == "counter" and amount < 0:
            raise ValueError("counters only go up")
        k = self._key(labels)
        self.values[k] = self.values.get(k, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        if self.kind != "gauge":
            raise ValueError(f"{self.name} is a counter")
        self.values[self._key(labels)] = value

    def render(self) -> Iterable[str]:
        sample = f"{self.name}_total" if self.kind == "counter" else self.name
        # Text format 0.0.4: HELP/TYPE name the metric as its samples do.
        yield f"# HELP {sample} {self.help}"
        yield f"# TYPE {sample} {self.kind}"
        for key, v in sorted(self.values.items()):
            if self.label_names:
                lbl = ",".join(
                    f'{n}="{_escape(x)}"' for n, x in zip(self.label_names, key, strict=True)
                )
                yield f"{sample}{{{lbl}}} {_fmt(v)}"
            else:
                yield f"{sample} {_fmt(v)}"


class Registry:
    """The daemon's metrics, by name."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        # Called before each render, to refresh values read from live state.
        self.collectors: list[Callable[[], None]] = []

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Metric:
        return self._add(Metric(name, "counter", help, labels))

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Metric:
        return self._add(Metric(name, "gauge", help, labels))

    def _add(self, m: Metric) -> Metric:
        if m.name in self.metrics:
            return self.metrics[m.name]
        self.metrics[m.name] = m
        return m

    def render(self) -> str:
        for collect in self.collectors:
            collect()
        lines: list[str] = []
        for m in self.metrics.values():
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


@dataclass
class DaemonMetrics:
    """The metrics p2pupd exports (names follow Prometheus conventions)."""

    registry: Registry = field(default_factory=Registry)

    def __post_init__(self) -> None:
        r = self.registry
        self.release_serial = r.gauge(
            "p2pupd_release_serial",
            "Serial of the live release per component",
            ("component", "version"),
        )
        self.bytes_received = r.counter(
            "p2pupd_peer_received_bytes", "Blob bytes received from each peer", ("peer",)
        )
        self.bytes_sent = r.counter(
            "p2pupd_peer_sent_bytes", "Blob bytes sent to each peer", ("peer",)
        )
        self.fetch_errors = r.counter(
            "p2pupd_fetch_errors", "Failed or refused blob fetches", ("peer", "reason")
        )
        self.manifest_skips = r.counter(
            "p2pupd_manifest_skips",
            "Valid manifests a peer offered that this node does not take (another platform's "
            "variant it does not carry: reason=platform); not errors",
            ("reason",),
        )
        self.variants_carried = r.counter(
            "p2pupd_variants_carried",
            "Other platforms' variants this node stored in full to serve its neighbours",
            ("component",),
        )
        self.bans = r.counter(
            "p2pupd_peer_bans", "Peers banned for bad data or protocol errors", ("reason",)
        )
        self.apply_seconds = r.gauge(
            "p2pupd_apply_duration_seconds",
            "Duration of the last apply per component",
            ("component",),
        )
        self.applies = r.counter("p2pupd_applies", "Updates applied", ("component",))
        self.rollbacks = r.counter(
            "p2pupd_rollbacks",
            "Updates rolled back (health check, operator)",
            ("component", "reason"),
        )
        self.peers = r.gauge("p2pupd_peers", "Connected peers")
        self.imports = r.counter(
            "p2pupd_imports", "Bundles imported through the daemon, by outcome", ("result",)
        )
        self.refused = r.counter(
            "p2pupd_peers_refused",
            "Peer links refused for want of a valid site credential (TLS, expiry, revocation)",
            ("reason",),
        )
        self.site_nodes = r.gauge(
            "p2pupd_site_nodes",
            "Nodes of the site by component, installed version and state, from their reports",
            ("component", "version", "state"),
        )
        self.rollout_nodes = r.gauge(
            "p2pupd_rollout_nodes",
            "Nodes per release and rollout state (on_it, applying, failed, waiting, lacking)",
            ("component", "serial", "state"),
        )
        self.rollout_held = r.gauge(
            "p2pupd_rollout_held",
            "1 while the brake (reason=brake) or an operator halt (reason=halt) holds a release",
            ("component", "serial", "reason"),
        )
        self.reports_refused = r.counter(
            "p2pupd_site_reports_refused",
            "Node reports refused (forged, another site, not a member)",
        )

    def zero(self, components: Iterable[str]) -> None:
        """Give every counter whose label sets are known in advance a 0 sample.

        Prometheus client conventions: a series that exists from the first
        scrape lets ``rate()`` and alerts see its first increment (a series
        that appears at 1 looks like no change). Per-peer series cannot be
        known before the peer is, and start at their first value.
        """
        for result in IMPORT_RESULTS:
            self.imports.inc(0, result=result)
        for reason in BAN_REASONS:
            self.bans.inc(0, reason=reason)
        for reason in REFUSAL_REASONS:
            self.refused.inc(0, reason=reason)
        for reason in SKIP_REASONS:
            self.manifest_skips.inc(0, reason=reason)
        for comp in components:
            self.applies.inc(0, component=comp)
            self.variants_carried.inc(0, component=comp)
            for reason in ROLLBACK_REASONS:
                self.rollbacks.inc(0, component=comp, reason=reason)


async def serve_metrics(
    host: str,
    port: int,
    registry: Registry,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``host:port``; reports the bound port when ready."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        try:
            buf = b""
            with trio.move_on_after(READ_TIMEOUT_S):
                while b"\r\n\r\n" not in buf and len(buf) < MAX_REQUEST_BYTES:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    buf += data
            line = buf.split(b"\r\n", 1)[0].split()
            if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                body = registry.render().encode()
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                    + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                )
                await stream.send_all(head + body)
            else:
                await stream.send_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_listeners(handle, listeners)


class MetricsFeed:
    """Keeps a ``DaemonMetrics`` in step with one running ``NodeService``."""

    def __init__(self, core: NodeService) -> None:
        self.core = core
        self.metrics = DaemonMetrics()
        self.metrics.zero(core.node.config.components)
        self._closed_in: dict[str, float] = {}
        self._closed_out: dict[str, float] = {}
        self.metrics.registry.collectors.append(self.collect)

    def on_event(self, event: str, fields: dict[str, object]) -> None:
        m = self.metrics
        if event == "peer-banned":
            m.bans.inc(reason=_short_reason(fields.get("reason")))
        elif event == "peer-refused":
            m.refused.inc(reason=_refusal_reason(fields.get("reason")))
        elif event == "applied":
            comp = str(fields.get("component"))
            m.applies.inc(component=comp)
            seconds = fields.get("seconds")
            if isinstance(seconds, float | int):
                m.apply_seconds.set(float(seconds), component=comp)
        elif event == "apply-failed":
            m.rollbacks.inc(component=str(fields.get("component")), reason="apply-failed")
        elif event == "rolled-back":
            m.rollbacks.inc(component=str(fields.get("component")), reason="operator")
        elif event == "manifest-refused":
            m.fetch_errors.inc(peer=str(fields.get("peer", "-")), reason="manifest")
        elif event == "manifest-skipped":
            why = str(fields.get("why"))
            m.manifest_skips.inc(reason=why if why in SKIP_REASONS else "other")
        elif event == "variant-carried":
            m.variants_carried.inc(component=str(fields.get("component")))
        elif event == "blob-refused":
            m.fetch_errors.inc(peer=str(fields.get("peer", "-")), reason="blob")
        elif event == "peer-closed":
            peer = str(fields.get("peer"))
            for key, store in (("bytes_in", self._closed_in), ("bytes_out", self._closed_out)):
                v = fields.get(key)
                if isinstance(v, int):
                    store[peer] = store.get(peer, 0.0) + v
        elif event == "imported":  # a bundle, through the daemon (control socket or watch)
            m.imports.inc(result="imported")
        elif event == "import-refused":
            m.imports.inc(result="refused")
        elif event == "import-failed":
            m.imports.inc(result="failed")

    def collect(self) -> None:
        """Refresh gauges and peer byte totals from the live daemon (scrape time)."""
        m = self.metrics
        now = trio.current_time()
        connected = self.core.peers.snapshot(now).get("connected", [])
        m.peers.set(len(connected))
        rx = dict(self._closed_in)
        tx = dict(self._closed_out)
        for p in connected:
            peer = str(p["node_id"])[:12]
            rx[peer] = rx.get(peer, 0.0) + p.get("bytes_in", 0)
            tx[peer] = tx.get(peer, 0.0) + p.get("bytes_out", 0)
        for peer, v in rx.items():
            m.bytes_received.values[(peer,)] = v
        for peer, v in tx.items():
            m.bytes_sent.values[(peer,)] = v
        self._collect_site()
        m.release_serial.values.clear()
        with contextlib.suppress(Exception):  # a scrape must not fail on a busy state file
            node = self.core.node
            for name, st in node.state.read_states().items():
                if st.installed is None:
                    continue
                version = next(
                    (
                        h.version
                        for h in reversed(st.history)
                        if h.serial == st.installed and h.version
                    ),
                    str(st.installed),
                )
                m.release_serial.set(st.installed, component=name, version=version or "")

    def _collect_site(self) -> None:
        """The site view (``p2pupd fleet``) as gauges: per version and state, per release."""
        m, rollout = self.metrics, self.core.rollout
        table, ledger = rollout.table, rollout.ledger
        for metric in (m.site_nodes, m.rollout_nodes, m.rollout_held):
            metric.values.clear()
        if table is None or ledger is None:
            return
        rollout.judge_brakes()
        for (comp, version, state), n in fleet.state_counts(table).items():
            m.site_nodes.set(n, component=comp, version=version, state=state)
        for comp, serial in fleet.releases_seen(table, ledger):
            doc = fleet.progress(table, ledger, comp, serial)
            for state in ("on_it", "applying", "failed", "waiting", "lacking"):
                m.rollout_nodes.set(doc[state], component=comp, serial=str(serial), state=state)
            m.rollout_held.set(int(doc["braked"]), component=comp, serial=str(serial),
                               reason="brake")  # fmt: skip
            m.rollout_held.set(int(doc["halted"]), component=comp, serial=str(serial),
                               reason="halt")  # fmt: skip
        m.reports_refused.values[()] = float(table.refused)


def _refusal_reason(reason: object) -> str:
    text = str(reason or "").lower()
    return next((key for key in REFUSAL_REASONS[:-1] if key in text), "other")


def _short_reason(reason: object) -> str:
    text = str(reason or "unknown")
    for key in BAN_REASONS[:-1]:
        if key in text.lower():
            return key
    return "other"
