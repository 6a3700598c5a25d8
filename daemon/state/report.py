"""This node's own report: its component states as a signed ``protocol.rollout`` report.

The component state (``state.msgpack``) already holds what a report says; this
module only reads it. Per component: the installed serial and since when (the
history entry that made it live), the last event -- ``applied`` is committed,
``health-failed``/``refused`` are failed (reason and the digest of the failing
hook's output, from the history), ``rolled-back`` is the operator leaving the
release that was live -- the serials marked bad, and what the daemon adds:
an apply in progress, the newest release held and why it waits.
"""

from __future__ import annotations

from collections.abc import Mapping

from p2pupd.daemon.state.statedir import ComponentConfig, ComponentState, HistoryEntry
from p2pupd.protocol import ids
from p2pupd.protocol.rollout.report import (
    MAX_BAD_SERIALS,
    MAX_REPORT_COMPONENTS,
    MAX_REPORT_VERSION_BYTES,
    ComponentReport,
    CompState,
    one_line,
)

_FAILED = ("health-failed", "refused")


def component_report(
    cfg: ComponentConfig,
    st: ComponentState,
    *,
    applying: int | None = None,
    holds: int | None = None,
    wait: str = "",
    now: int = 0,
) -> ComponentReport:
    """The report entry of one component (see the module docstring)."""
    installed_since = 0
    live: int | None = None
    last: tuple[CompState, int | None, int, str] | None = None
    for h in st.history:
        if h.event in ("applied", "rolled-back", "recovered") and h.serial is not None:
            previous, live = live, h.serial
            if h.serial == st.installed:
                installed_since = h.time
            if h.event == "rolled-back":
                last = (CompState.ROLLED_BACK, previous, h.time, h.detail)
            else:
                last = (CompState.COMMITTED, h.serial, h.time, "")
        elif h.event in _FAILED and h.serial is not None:
            last = (CompState.FAILED, h.serial, h.time, h.detail)
    version = _version_of(st, st.installed)
    state, serial, since, reason = last or (
        (CompState.COMMITTED, st.installed, installed_since, "")
        if st.installed is not None
        else (CompState.IDLE, None, 0, "")
    )
    hook = None
    if state is CompState.FAILED and serial is not None:
        reason = reason or st.bad.get(serial, "")
        hook = _hook_digest(st.history, serial, reason)
    if applying is not None:
        state, serial, since, reason, hook = CompState.APPLYING, applying, now, "", None
    bad = tuple(sorted(st.bad))[-MAX_BAD_SERIALS:]
    return ComponentReport(
        name=cfg.name,
        installed=st.installed,
        version=None if version is None else one_line(version, MAX_REPORT_VERSION_BYTES),
        installed_since=installed_since,
        state=state,
        serial=serial,
        since=since,
        reason=one_line(reason),
        hook_digest=hook,
        auto=cfg.auto_apply,
        bad=bad,
        holds=holds,
        wait=wait,
    )


def component_reports(
    configs: Mapping[str, ComponentConfig],
    states: Mapping[str, ComponentState],
    *,
    applying: Mapping[str, int],
    waits: Mapping[str, tuple[int, str]],
    now: int,
) -> tuple[ComponentReport, ...]:
    """Every configured component's entry, sorted by name (at most the report's limit)."""
    out = []
    for name in sorted(configs)[:MAX_REPORT_COMPONENTS]:
        held = waits.get(name)
        out.append(
            component_report(
                configs[name],
                states.get(name, ComponentState()),
                applying=applying.get(name),
                holds=held[0] if held else None,
                wait=held[1] if held else "",
                now=now,
            )
        )
    return tuple(out)


def _version_of(st: ComponentState, serial: int | None) -> str | None:
    if serial is None:
        return None
    return next((h.version for h in reversed(st.history) if h.serial == serial and h.version), None)


def _hook_digest(history: tuple[HistoryEntry, ...], serial: int, reason: str) -> bytes:
    """sha256 of the failing hook's recorded output, else of the failure reason.

    Nodes that failed the same way show the same digest in ``fleet``.
    """
    for h in reversed(history):
        if h.event == "hook" and h.serial == serial and " hook failed:" in h.detail:
            return ids.sha256(h.detail.encode())
    return ids.sha256(reason.encode())
