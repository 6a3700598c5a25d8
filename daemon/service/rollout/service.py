"""Driving ``protocol.rollout``: this node's report, the site view, the apply gate.

Theory of operation
-------------------
The pure objects decide; this service keeps them fed and acts on them:

* **own report**: built from the component state (``state.report``) and
  signed with the node key, with a ``seq`` that only grows (persisted); sent
  again on every change (an apply starts or ends, a release starts or stops
  waiting), when the soak of a just-committed release ends (so the next wave
  sees it at once), and every ``report_interval`` seconds, stretched with the
  site's size so each node's share of the traffic stays constant.
* **site view**: reports and operator actions from peers (``rollout.gossip``) go
  through the ``ReportTable`` and the ``Ledger``; ``p2pupd rollout`` makes a
  signed action here and spreads it the same way.
* **the gate**: the lifecycle hands every release it would auto-apply to
  ``offer``; the release waits here until ``decide`` says this node may apply
  it (or a newer one replaces it), and its wait ("wave 2", "brake", "halt")
  goes into our report, so ``fleet`` shows it on every node. It is looked at
  again whenever the view changes, and every few seconds (soak and liveness
  are about time). An operator's ``p2pupd apply`` is refused while the brake
  or a halt holds the release, unless forced.
* **persistence**: the table (raw signed reports and the replay marks), the
  actions, the brake latches and our ``seq`` are saved in ``STATE/cache/
  rollout.msgpack`` (atomically, at most every ``persist_interval`` seconds
  and at shutdown), so a restarted daemon still refuses replays and still
  holds a brake; restored reports keep nodes' places but are no evidence
  until they report again, and the daemon ``settle``s before it places
  itself in a wave.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.daemon.bundles.siterequest import node_key
from p2pupd.daemon.errors import ApplyError, DaemonError
from p2pupd.daemon.events import log, short
from p2pupd.daemon.fsutil import atomic_write
from p2pupd.daemon.offload import Offload
from p2pupd.daemon.service.rollout.members import SiteMembers
from p2pupd.daemon.service.sitegate import SiteGate
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.report import component_reports
from p2pupd.daemon.state.statedir import now_seconds
from p2pupd.protocol import encoding
from p2pupd.protocol.errors import CodecError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.rollout import fleet
from p2pupd.protocol.rollout.actions import ActionKind, OperatorAction, sign_action
from p2pupd.protocol.rollout.decide import Decision, Go, Release, brake_state, decide
from p2pupd.protocol.rollout.ledger import ActionVerdict, Ledger
from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.protocol.rollout.report import NodeReport, next_seq, sign_report
from p2pupd.protocol.rollout.site import SiteRules
from p2pupd.protocol.rollout.table import GONE_SECONDS, Offer, ReportTable, Screened

STATE_FILE = "rollout.msgpack"
EVALUATE_SECONDS = 5.0
CHANGE_DELAY = 0.2  # coalesce bursts of changes into one report
# Report refresh stretch: a report of ~400 B arrives ~6 times (the push fan-out,
# spread.FANOUT) per refresh, so 24 s per known node keeps a node's share near
# 100 B/s (make bench BENCH=rollout).
SECONDS_PER_NODE = 24.0
MAX_KNOWN = 64  # releases whose brake is followed


class RolloutHeldError(ApplyError):
    """An operator asked to apply a release the site's brake or a halt holds."""


@dataclass(frozen=True)
class RolloutOptions:
    operators: tuple[bytes, ...] = ()  # public node keys that may resume / skip waves
    report_interval: float = 600.0
    settle: float = 60.0
    live: float | None = None  # default: 3 x the report interval
    gone: float = GONE_SECONDS
    persist_interval: float = 30.0


class RolloutService:
    """See the module docstring. One per ``NodeService``."""

    def __init__(
        self,
        node: Node,
        *,
        offload: Offload,
        options: RolloutOptions,
        auto_apply: Callable[[str, int], None],
        spread: Callable[[list[bytes], list[bytes]], None],
        gate: SiteGate | None = None,
    ) -> None:
        """``auto_apply(c, s)`` starts an apply the gate allowed; ``spread(reports,
        actions)`` sends documents this node made to its peers; ``gate`` is the
        node's site membership (where there is one, only members count)."""
        self.node = node
        self.gate = gate
        self.members: SiteMembers | None = None
        self.offload = offload
        self.options = options
        self._auto_apply = auto_apply
        self._spread = spread
        self.table: ReportTable | None = None
        self.ledger: Ledger | None = None
        self.pending: dict[str, tuple[Manifest, Decision | None]] = {}
        # Policies of the releases held here, so the brake is judged (and
        # latched) for each of them, also where this node will not apply it.
        self.known: dict[tuple[str, int], RolloutPolicy | None] = {}
        self._going: dict[str, Manifest] = {}  # let go by the gate, apply not started yet
        self.applying: dict[str, int] = {}
        self._soak_due: dict[str, tuple[int, int]] = {}  # component -> (serial, wall due)
        self._waves: dict[tuple[str, int], int] = {}  # wave we applied a release in
        self._seq = 0
        self._key: Ed25519PrivateKey | None = None
        self._started = 0.0
        self._last_report = -1e18
        self._changed = trio.Event()
        self._dirty = False

    # ----- running ---------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the saved view, report, and keep the gate and our report current."""
        now = trio.current_time()  # read here: _load runs in a worker thread
        await self.offload(lambda: self._load(now))
        self._started = trio.current_time()
        try:
            task_status.started()
            await self._report()
            last_save = trio.current_time()
            gap = CHANGE_DELAY
            while True:
                with trio.move_on_after(self._wait_seconds()):
                    await self._changed.wait()
                    await trio.sleep(gap)
                self._changed = trio.Event()
                now = trio.current_time()
                assert self.table is not None
                self._stretch()
                if self.table.expire(now):
                    self._dirty = True
                started = time.perf_counter()
                self.evaluate()
                # Judging the gate costs O(site): at 10,000 nodes ~0.1 s. While
                # reports pour in, look again only after 5x that (<= 20 % of a CPU).
                gap = max(CHANGE_DELAY, 5 * (time.perf_counter() - started))
                if self._report_due(now):
                    await self._report()
                if self._dirty and now - last_save >= self.options.persist_interval:
                    await self.offload(self._save)
                    last_save = now
        finally:
            with contextlib.suppress(DaemonError, OSError):
                self._save()

    def changed(self) -> None:
        """Something moved (a report, an action, an apply): look at the gate and report."""
        self._changed.set()

    def _wait_seconds(self) -> float:
        return EVALUATE_SECONDS if self.pending or self._soak_due else 30.0

    # ----- the site view -------------------------------------------------------------

    def rules(self) -> SiteRules:
        assert self.table is not None
        return self.table.rules

    def offer_report(self, raw: bytes, now: float) -> Offer:
        """A peer's report (through ``rollout.gossip``); folds accepted failures into the ledger."""
        assert self.table is not None
        return self._took(self.table.offer(raw, now, now_seconds()))

    async def offer_reports(self, raws: list[bytes]) -> list[Offer]:
        """``offer_report`` for many, with their signatures checked in a worker
        thread (one hop for all; ~0.1 ms each, which a node catching up on
        10,000 reports must not spend on the event loop). Same order, same verdicts."""
        assert self.table is not None
        screened = [self.table.screen(raw) for raw in raws]
        todo = [s for s in screened if isinstance(s, Screened)]
        bad = await self.offload(lambda: [s.check() for s in todo]) if todo else []
        verdicts = iter(bad)
        now, wall = trio.current_time(), now_seconds()
        table = self.table
        return [
            s if isinstance(s, Offer) else self._took(table.admit(s, now, wall, next(verdicts)))
            for s in screened
        ]

    def _took(self, offer: Offer) -> Offer:
        assert self.ledger is not None
        if offer.accepted and offer.report is not None:
            self.ledger.observe(offer.report)
            self._dirty = True
            self.changed()
        return offer

    def offer_action(self, raw: bytes) -> ActionVerdict:
        assert self.ledger is not None
        verdict, reason, action = self.ledger.act(raw, now_seconds())
        if verdict is ActionVerdict.ACCEPTED and action is not None:
            log(
                "rollout-action", kind=action.kind.value, component=action.component,
                serial=action.serial, by=short(action.issuer), reason=action.reason or None,
            )  # fmt: skip
            self._dirty = True
            self.changed()
        elif verdict is ActionVerdict.REFUSED:
            log("rollout-action-refused", level=logging.WARNING, reason=reason)
        return verdict

    # ----- the gate ------------------------------------------------------------------

    def know(self, man: Manifest) -> None:
        """A release is held here (complete): follow its brake, whoever applies it."""
        self.known[(man.component, man.serial)] = man.rollout
        while len(self.known) > MAX_KNOWN:
            del self.known[min(self.known, key=lambda k: k[1])]

    def offer(self, man: Manifest) -> None:
        """The lifecycle would apply ``man`` now: let the gate decide when."""
        self.know(man)
        held = self.pending.get(man.component)
        if held is None or held[0].serial <= man.serial:
            self.pending[man.component] = (man, None)
        self.evaluate()

    def decision(self, man: Manifest) -> Decision:
        """The gate's verdict on ``man`` now (also for ``status`` and ``fleet``)."""
        assert self.table is not None and self.ledger is not None
        now = trio.current_time()
        settled = now - self._started >= self.options.settle
        cfg = self.node.config
        return decide(
            Release(man.component, man.serial, man.rollout), cfg.node_id, cfg.platform,
            self.table, self.ledger, now, settled=settled,
        )  # fmt: skip

    def check_manual(self, man: Manifest) -> None:
        """Raise ``RolloutHeldError`` if the brake or a halt holds ``man`` (``apply`` without --force)."""
        if self.table is None or self.ledger is None:
            return
        d = self.decision(man)
        if d.go in (Go.BRAKE, Go.HALTED):
            raise RolloutHeldError(
                f"{man.component} {man.version} is held by the site's rollout ({d.reason}); "
                "use --force to apply it here anyway"
            )

    def judge_brakes(self) -> None:
        """Fold the reports' failures into the ledger of every release held; trip latches."""
        if self.table is None or self.ledger is None:
            return
        for (comp, serial), policy in self.known.items():
            brake_state(Release(comp, serial, policy), self.table, self.ledger)

    def evaluate(self) -> None:
        """Look at every waiting release again; start the applies the gate allows."""
        if self.table is None or self.ledger is None:
            return
        self.judge_brakes()
        for comp, (man, before) in list(self.pending.items()):
            d = self.decision(man)
            if d.allowed:
                del self.pending[comp]
                self._going[comp] = man
                if d.wave is not None:
                    self._waves[(comp, man.serial)] = d.wave
                log("rollout-go", component=comp, serial=man.serial, reason=d.reason)
                self._auto_apply(comp, man.serial)
                continue
            self.pending[comp] = (man, d)
            if before is None or before.wait_text() != d.wait_text():
                log("rollout-wait", component=comp, serial=man.serial, reason=d.reason)
                self._last_report = -1e18  # our wait changed: report it now

    def held_back(self, component: str, serial: int) -> None:
        """An apply the gate let go met a halt or the brake just before it started:
        the release waits at the gate again (instead of being forgotten)."""
        man = self._going.pop(component, None)
        if man is not None and man.serial == serial:
            self.offer(man)

    def apply_started(self, component: str, serial: int) -> None:
        self.applying[component] = serial
        self._last_report = -1e18
        self.changed()

    def apply_ended(self, component: str) -> None:
        """An apply (or rollback) finished, either way: report the new state."""
        self._going.pop(component, None)
        serial = self.applying.pop(component, None)
        if serial is not None:
            wave = self._waves.pop((component, serial), None)
            with contextlib.suppress(DaemonError):
                man = self.node.manifest(component, serial)
                if man.rollout is not None and wave is not None:
                    due = now_seconds() + man.rollout.soak_of(wave) + 1
                    self._soak_due[component] = (serial, due)
        pending = self.pending.get(component)
        if pending is not None and serial is not None and pending[0].serial <= serial:
            del self.pending[component]
        self._last_report = -1e18
        self.changed()

    # ----- operator actions --------------------------------------------------------------

    async def act(
        self, kind: ActionKind, component: str, serial: int, reason: str, wave: int | None
    ) -> dict[str, Any]:
        """Make, sign, apply and spread an operator action; returns what it did."""
        assert self.table is not None and self.ledger is not None
        led = self.ledger.track(component, serial)
        ack_failures, ack_halts = 0, tuple[bytes, ...]()
        if kind is ActionKind.RESUME:
            self.ledger.sync(led, self.table)
            ack_failures, ack_halts = len(led.failed), tuple(sorted(led.halts))
        if kind is ActionKind.SKIP_WAVE and wave is None:
            wave = self._current_wave(component, serial)
        cfg = self.node.config
        key = await self.offload(lambda: node_key(self.node.state))
        credential = await self.offload(self._credential)
        action = OperatorAction(
            kind, component, serial, cfg.node_id, key.public_key().public_bytes_raw(),
            self.rules().repository, self.rules().site, now_seconds(), reason, wave,
            ack_failures, ack_halts, credential,
        )  # fmt: skip
        raw = sign_action(action, key)
        self.offer_action(raw)
        self._spread([], [raw])
        return {
            "action": kind.value, "component": component, "serial": serial, "wave": wave,
            "ack_failures": ack_failures, "ack_halts": len(ack_halts),
            "operator": self.node_key_public() in self.options.operators,
        }  # fmt: skip

    def _current_wave(self, component: str, serial: int) -> int:
        """The wave this node's view is waiting on for a release (for skip-wave without one)."""
        held = self.pending.get(component)
        d = held[1] if held is not None and held[0].serial == serial else None
        return d.wave - 1 if d is not None and d.wave else 0

    def node_key_public(self) -> bytes:
        return self.rules().own_key

    # ----- our report -------------------------------------------------------------------

    def refresh_interval(self) -> float:
        """Seconds between refreshes of our report: stretched with the site's size."""
        assert self.table is not None
        return max(self.options.report_interval, SECONDS_PER_NODE * len(self.table))

    def _stretch(self) -> None:
        """Keep evidence alive across refreshes as the site grows (live = 3 refreshes)."""
        assert self.table is not None
        live = max(self.options.live or 0.0, 3 * self.refresh_interval())
        self.table.live_seconds = live
        self.table.gone_seconds = max(self.options.gone, 2 * live)

    def _report_due(self, now: float) -> bool:
        assert self.table is not None
        interval = self.refresh_interval()
        wall = now_seconds()
        for comp, (_serial, due) in list(self._soak_due.items()):
            if wall >= due:
                del self._soak_due[comp]
                return True
        return now - self._last_report >= interval

    async def _report(self) -> None:
        raw = await self.offload(self._build_report)
        now = trio.current_time()
        self._last_report = now
        self.offer_report(raw, now)
        self._spread([raw], [])

    def _build_report(self) -> bytes:
        """Sign our report (blocking: reads the state file, may create the node key)."""
        node, cfg = self.node, self.node.config
        wall = now_seconds()
        waits = {
            c: (man.serial, d.wait_text() if d is not None else "settling")
            for c, (man, d) in self.pending.items()
        }
        comps = component_reports(
            cfg.components, node.state.read_states(),
            applying=dict(self.applying), waits=waits, now=wall,
        )  # fmt: skip
        self._seq = next_seq(self._seq, wall * 1000)
        key = self._key or node_key(node.state)
        self._key = key
        rules = self.rules()
        report = NodeReport(
            cfg.node_id, rules.own_key, rules.repository, rules.site, cfg.platform,
            self._seq, wall, comps, self._credential(),
        )  # fmt: skip
        self._dirty = True
        return sign_report(report, key)

    # ----- the site at a glance -----------------------------------------------------------

    def fleet_doc(self) -> dict[str, Any]:
        """The ``p2pupd fleet --json`` document (see protocol/rollout/fleet.py)."""
        assert self.table is not None and self.ledger is not None
        now = trio.current_time()
        cfg = self.node.config
        releases = []
        self.judge_brakes()  # of every release held, before showing them
        for comp, serial in fleet.releases_seen(self.table, self.ledger):
            doc = fleet.progress(self.table, self.ledger, comp, serial)
            held = self.pending.get(comp)
            if held is not None and held[0].serial == serial:
                d = held[1] or self.decision(held[0])
                doc["here"] = {"go": d.go.value, "wave": d.wave, "reason": d.reason}
            releases.append(doc)
        return {
            "node_id": cfg.node_id.hex(),
            "site": self.rules().site,
            "repository": self.rules().repository,
            "membership": not self.rules().open,
            "settled": now - self._started >= self.options.settle,
            "refused": self.table.refused,
            "nodes": fleet.node_rows(self.table, now, cfg.node_id),
            "releases": releases,
        }

    def component_doc(self, component: str) -> dict[str, Any] | None:
        """The rollout part of one component of ``status --json``, or None."""
        held = self.pending.get(component)
        if held is None:
            return None
        man, d = held
        d = d or self.decision(man)
        return {"serial": man.serial, "version": man.version, "go": d.go.value,
                "wave": d.wave, "waves": d.waves, "reason": d.reason}  # fmt: skip

    # ----- persistence --------------------------------------------------------------------

    def _site_rules(self) -> SiteRules:
        """Whose documents count (``protocol.rollout.site``): members of the node's site
        where it has one (the site's name is the site), else anyone of its cluster."""
        node = self.node
        if self._key is None:
            self._key = node_key(node.state)
        self.members = None
        if self.gate is not None and self.gate.enabled:
            self.members = SiteMembers(self.gate)
        site = (self.members.site_name if self.members else None) or node.config.cluster
        return SiteRules(
            node.trusted_root().root.name, site, self._key.public_key().public_bytes_raw(),
            self.members, frozenset(self.options.operators),
        )  # fmt: skip

    def membership_changed(self) -> None:
        """The node's site, credential or revocation list changed: judge every report
        again (a revoked node's report leaves the view) and report anew."""
        if self.table is None or self.ledger is None:
            return
        rules = self._site_rules()
        self.table.rules = self.ledger.rules = rules
        gone = self.table.recheck(now_seconds())
        if gone:
            log("rollout-reports-dropped", nodes=len(gone), reason="membership changed")
        self._last_report = -1e18
        self._dirty = True
        self.changed()

    def _credential(self) -> bytes | None:
        """This node's site credential, carried in its reports and actions (blocking)."""
        if self.members is None:
            return None
        try:
            return self.node.membership.credential_bytes()
        except DaemonError:
            return None

    def _load(self, now: float) -> None:
        """Open the site rules and the saved view as of trio time ``now`` (blocking)."""
        node = self.node
        rules = self._site_rules()
        live = self.options.live or 3 * self.options.report_interval
        self.table = ReportTable(
            rules, live_seconds=live, gone_seconds=max(live, self.options.gone)
        )
        self.ledger = Ledger(rules)
        path = node.state.cache_dir / STATE_FILE
        try:
            saved = encoding.decode(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, CodecError) as exc:
            log("rollout-state-unreadable", level=logging.WARNING, reason=str(exc))
            return
        if not isinstance(saved, dict):
            return
        seq = saved.get("seq")
        self._seq = seq if isinstance(seq, int) and seq > 0 else 0
        with contextlib.suppress(CodecError):
            self.table.restore(saved.get("table"), now, now_seconds())
        for raw in saved.get("actions", []) if isinstance(saved.get("actions"), list) else []:
            if isinstance(raw, bytes):
                self.ledger.act(raw, now_seconds())
        for item in saved.get("latches", []) if isinstance(saved.get("latches"), list) else []:
            if isinstance(item, list) and len(item) == 4 and isinstance(item[3], list):
                comp, serial, tripped, failed = item
                if isinstance(comp, str) and isinstance(serial, int) and isinstance(tripped, int):
                    led = self.ledger.track(comp, serial)
                    led.tripped_at = max(led.tripped_at, tripped)
                    for f in failed:
                        if isinstance(f, list) and len(f) == 2 and isinstance(f[0], bytes):
                            led.note_failure(f[0], str(f[1]))

    def _save(self) -> None:
        if self.table is None or self.ledger is None:
            return
        doc = {
            "seq": self._seq,
            "table": self.table.to_value(),
            "actions": self.ledger.docs(),
            "latches": [
                [led.component, led.serial, led.tripped_at, [[n, r] for n, r in led.failed.items()]]
                for led in self.ledger.releases()
                if led.failed or led.tripped_at
            ],
        }
        atomic_write(self.node.state.cache_dir / STATE_FILE, encoding.encode(doc), mode=0o600)
        self._dirty = False
