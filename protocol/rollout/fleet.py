"""The site at a glance, from the reports a node holds (``p2pupd fleet``, metrics, demo).

Pure summaries as plain data: one row per node (its components, how long ago
it was heard, whether that is still *live*), and per release seen anywhere
in the site its rollout progress -- nodes on it, applying, failed, waiting
and why, and whether the brake or a halt holds it (from this node's ledger).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from p2pupd.protocol.rollout.ledger import Ledger
from p2pupd.protocol.rollout.report import ComponentReport, CompState
from p2pupd.protocol.rollout.table import ReportTable

MAX_RELEASES_SHOWN = 32


def node_rows(table: ReportTable, now: float, me: bytes) -> list[dict[str, Any]]:
    """One plain-data row per node held, this node first, then by platform and id."""
    rows = []
    for entry in table:
        r = entry.report
        rows.append(
            {
                "node_id": r.node_id.hex(),
                "self": r.node_id == me,
                "node_key": r.node_key.hex(),
                "platform": r.platform,
                "heard_seconds_ago": round(max(0.0, now - entry.received), 1),
                "live": table.is_live(entry, now),
                "seq": r.seq,
                "components": {c.name: component_doc(c) for c in r.components},
            }
        )
    rows.sort(key=lambda row: (not row["self"], row["platform"], row["node_id"]))
    return rows


def component_doc(c: ComponentReport) -> dict[str, Any]:
    return {
        "installed": c.installed,
        "version": c.version,
        "installed_since": c.installed_since,
        "state": c.state.value,
        "serial": c.serial,
        "since": c.since,
        "reason": c.reason,
        "hook_digest": c.hook_digest.hex() if c.hook_digest else None,
        "auto": c.auto,
        "bad": list(c.bad),
        "holds": c.holds,
        "wait": c.wait,
    }


def releases_seen(table: ReportTable, ledger: Ledger) -> list[tuple[str, int]]:
    """(component, serial) of every release a report or the ledger mentions, newest first."""
    seen: set[tuple[str, int]] = {(led.component, led.serial) for led in ledger.releases()}
    for entry in table:
        for c in entry.report.components:
            for s in (c.installed, c.serial, c.holds, *c.bad):
                if s is not None:
                    seen.add((c.name, s))
    return sorted(seen, key=lambda k: (k[0], -k[1]))[:MAX_RELEASES_SHOWN]


def progress(table: ReportTable, ledger: Ledger, component: str, serial: int) -> dict[str, Any]:
    """How far release (component, serial) got, counted over the nodes that run the component."""
    counts: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    failed: list[dict[str, Any]] = []
    version: str | None = None
    for entry in table:
        c = entry.report.component(component)
        if c is None:
            continue
        counts["nodes"] += 1
        if c.failed(serial):
            counts["failed"] += 1
            failed.append(
                {"node_id": entry.report.node_id.hex(), "reason": c.reason or c.state.value}
            )
        elif c.installed is not None and c.installed >= serial:
            counts["on_it" if c.installed == serial else "beyond"] += 1
            if c.installed == serial:
                version = c.version or version
        elif c.state is CompState.APPLYING and c.serial == serial:
            counts["applying"] += 1
        elif c.holds == serial:
            counts["waiting"] += 1
            waits[c.wait or "not applied"] += 1
        else:
            counts["lacking"] += 1
    led = ledger.get(component, serial)
    return {
        "component": component,
        "serial": serial,
        "version": version,
        "nodes": counts["nodes"],
        "on_it": counts["on_it"],
        "beyond": counts["beyond"],
        "applying": counts["applying"],
        "failed": counts["failed"],
        "waiting": counts["waiting"],
        "lacking": counts["lacking"],
        "waits": dict(waits),
        "failures": failed[:8],
        "braked": bool(led and led.braked),
        "halted": bool(led and led.halted),
        "skip_wave": led.skip if led and led.skip >= 0 else None,
    }


def state_counts(table: ReportTable) -> Counter[tuple[str, str, str]]:
    """(component, version, state) -> nodes, for metrics; version "" when none is installed."""
    out: Counter[tuple[str, str, str]] = Counter()
    for entry in table:
        for c in entry.report.components:
            state = c.state.value
            if c.holds is not None and c.wait:
                state = "waiting"
            out[(c.name, c.version or "", state)] += 1
    return out
