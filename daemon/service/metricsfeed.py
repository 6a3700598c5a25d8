"""Feeding the daemon's metrics: counters from its events, gauges from its state.

Counters follow the event stream (``events.observe``): bans, applies, apply
durations, failed applies and operator rollbacks, refused manifests, bytes of
peers whose connection closed. At scrape time the live peer table and the
node's state add what is current (bytes of connected peers, live serials), so
a scrape never waits for an event and the numbers stay monotonic.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import trio

from p2pupd.daemon.service.metrics import DaemonMetrics

if TYPE_CHECKING:
    from p2pupd.daemon.service.nodeservice import NodeService


class MetricsFeed:
    """Keeps a ``DaemonMetrics`` in step with one running ``NodeService``."""

    def __init__(self, core: NodeService) -> None:
        self.core = core
        self.metrics = DaemonMetrics()
        self._closed_in: dict[str, float] = {}
        self._closed_out: dict[str, float] = {}
        self.metrics.registry.collectors.append(self.collect)

    def on_event(self, event: str, fields: dict[str, object]) -> None:
        m = self.metrics
        if event == "peer-banned":
            m.bans.inc(reason=_short_reason(fields.get("reason")))
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
        elif event == "blob-refused":
            m.fetch_errors.inc(peer=str(fields.get("peer", "-")), reason="blob")
        elif event == "peer-closed":
            peer = str(fields.get("peer"))
            for key, store in (("bytes_in", self._closed_in), ("bytes_out", self._closed_out)):
                v = fields.get(key)
                if isinstance(v, int):
                    store[peer] = store.get(peer, 0.0) + v
        elif event == "manifest-accepted" and fields.get("from") == "import":
            m.imports.inc(result="imported")

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


def _short_reason(reason: object) -> str:
    text = str(reason or "unknown")
    for key in ("signature", "hash", "protocol", "frame", "rollback", "manifest", "timeout"):
        if key in text.lower():
            return key
    return "other"
