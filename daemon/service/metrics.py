"""Metrics in the Prometheus text exposition format, and the endpoint serving them.

The registry is a plain in-process table of counters and gauges with labels;
services update it directly (no locking needed: everything runs in one trio
thread, and worker-thread callers go through ``trio.from_thread``). The
endpoint is off unless an address is configured, and is meant for a local
scraper: it serves ``GET /metrics`` and nothing else, with bounded request
reading so a stray client cannot hold memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT_S = 5.0


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
        self.imports = r.counter("p2pupd_imports", "Bundles imported", ("result",))


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
