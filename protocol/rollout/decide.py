"""The apply gate of a rollout: may this node apply this release now, and if not, why.

Theory of operation
-------------------
``decide`` is computed by every node, for itself, from three things only: the
signed release (its ``RolloutPolicy``), the reports it holds (``table``) and
its ledger of failures and operator actions (``ledger``). There is no
coordinator and no message that says "go". In order:

1. **Halt.** A halt no resume lifted stops the release, policy or not.
2. **No policy**: apply (as before rollouts existed).
3. **Brake.** Every failure the reports show (and every one ever seen: the
   ledger is sticky) is counted against the failure budget; once exceeded the
   brake latches until an operator resume acknowledges those failures.
4. **Settling.** Until the node has listened to the site for ``settle``
   seconds (the caller says: a fresh daemon holds few reports), it does not
   place itself.
5. **Wave.** The node ranks the nodes it knows of its platform that take
   part (``waves``); wave 0 -- and every wave up to one past the last
   ``skip-wave`` -- may apply. A later wave applies when every node ranked
   before it (in the waves not waived) is *done*: its live report shows the
   release (or a newer one) committed for at least its wave's soak, measured
   on the reporting node's own clock (``created - installed_since``: no two
   clocks are compared), or it failed and the failure is within the budget.

Safety properties (tests in tests/unit/test_rollout_*.py):

* **A node never applies a release while the brake or a halt holds, whatever
  its wave**: steps 1 and 3 come before any wave is looked at, and the latch
  moves only on a resume from an operator key (``site``), never on reports.
* **A partitioned node applies nothing it cannot justify from the reports it
  holds**: a node in wave k > 0 needs a live, signed report of every node it
  knows before it. Nodes stay *known* for hours after they fall silent
  (``table.GONE_SECONDS``) but their reports stop being *live* evidence after
  ``LIVE_SECONDS``, so a cut-off node waits rather than guessing. What a
  partial view can do is place a node earlier than the full view would (it
  does not know some nodes ranked before it); it then still waits for every
  node it does know. A node that never heard of any other is a site of one,
  and is its own canary.
* **Reports from outside the site, forged or replayed, move nothing**: the
  table takes only reports signed by their node's key, of this repository
  and site, from members where a membership exists, and strictly newer than
  anything that node sent before (``table``); the ledger's facts only grow,
  so an old report cannot un-fail a node nor an old resume lift a new brake.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from p2pupd.protocol.rollout.ledger import Ledger, ReleaseLedger
from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.protocol.rollout.report import CompState
from p2pupd.protocol.rollout.table import ReportTable
from p2pupd.protocol.rollout.waves import Placement, place

MAX_NAMED = 3  # waiting nodes named in a reason


class Go(enum.Enum):
    APPLY = "apply"
    WAIT = "wait"  # earlier waves not yet committed and soaked
    SETTLING = "settling"  # not listened to the site long enough to place itself
    HALTED = "halted"  # an operator halted the release
    BRAKE = "brake"  # failures exceeded the budget


@dataclass(frozen=True)
class Release:
    component: str
    serial: int
    policy: RolloutPolicy | None = None


@dataclass(frozen=True)
class Decision:
    go: Go
    reason: str
    wave: int | None = None
    waves: int = 0
    waiting: tuple[bytes, ...] = ()  # node ids of earlier waves not done yet

    @property
    def allowed(self) -> bool:
        return self.go is Go.APPLY

    def wait_text(self) -> str:
        """A short word for reports and tables: "", "halt", "brake", "settling", "wave 2"."""
        if self.go is Go.APPLY:
            return ""
        if self.go is Go.WAIT:
            return f"wave {self.wave}"
        return {Go.HALTED: "halt", Go.BRAKE: "brake", Go.SETTLING: "settling"}[self.go]


def participants(table: ReportTable, component: str, platform: str, me: bytes) -> set[bytes]:
    """Node ids known to run ``component`` on ``platform`` and apply on their own (and ``me``)."""
    out = {me}
    for entry in table:
        r = entry.report
        comp = r.component(component)
        if comp is not None and comp.auto and r.platform == platform:
            out.add(r.node_id)
    return out


def brake_state(release: Release, table: ReportTable, ledger: Ledger) -> ReleaseLedger:
    """The release's ledger after folding in the table's failures and evaluating the budget."""
    led = ledger.track(release.component, release.serial)
    tried = ledger.sync(led, table)
    led.evaluate(release.policy, tried)
    return led


def decide(
    release: Release,
    me: bytes,
    platform: str,
    table: ReportTable,
    ledger: Ledger,
    now: float,
    *,
    settled: bool,
) -> Decision:
    """May ``me`` apply ``release`` now? See the module docstring for the rules."""
    led = brake_state(release, table, ledger)
    policy = release.policy
    waves = len(policy.waves) if policy is not None else 0
    if led.halted:
        halt = led.live_halts()[0]
        why = f": {halt.reason}" if halt.reason else ""
        return Decision(
            Go.HALTED, f"halted by an operator on node {halt.issuer.hex()[:12]}{why}", None, waves
        )
    if policy is None:
        return Decision(Go.APPLY, "no rollout policy: applies on arrival")
    if led.braked:
        return Decision(Go.BRAKE, _brake_reason(led, policy), None, waves)
    if not settled:
        return Decision(
            Go.SETTLING, "gathering the site's reports before taking a wave", None, waves
        )
    if len(led.positions) > 2 * table.capacity:
        led.positions.clear()
    placement = place(
        policy, release.component, release.serial,
        participants(table, release.component, platform, me), led.positions,
    )  # fmt: skip
    wave = placement.wave(me)
    if wave <= led.skip + 1:
        why = "canary" if wave == 0 else "earlier waves waived by skip-wave"
        return Decision(Go.APPLY, f"wave {wave} of {waves} ({why})", wave, waves)
    waiting = _not_done(release, policy, placement, wave, led, table, now)
    if waiting:
        named = ", ".join(f"{n.hex()[:12]} ({why})" for n, why in waiting[:MAX_NAMED])
        more = f" and {len(waiting) - MAX_NAMED} more" if len(waiting) > MAX_NAMED else ""
        return Decision(
            Go.WAIT,
            f"wave {wave} of {waves}: waiting for {len(waiting)} node(s) of earlier waves: "
            f"{named}{more}",
            wave,
            waves,
            tuple(n for n, _ in waiting),
        )
    return Decision(
        Go.APPLY, f"wave {wave} of {waves}: earlier waves committed and soaked", wave, waves
    )


def _not_done(
    release: Release,
    policy: RolloutPolicy,
    placement: Placement,
    wave: int,
    led: ReleaseLedger,
    table: ReportTable,
    now: float,
) -> list[tuple[bytes, str]]:
    """The nodes ranked before ``wave`` (waves not waived) that are not done, with why."""
    out: list[tuple[bytes, str]] = []
    for node in placement.before(wave, led.skip):
        if node in led.failed:
            continue  # counted against the budget, which holds: not waited for
        entry = table.get(node)
        comp = entry.report.component(release.component) if entry is not None else None
        if entry is None or comp is None:
            out.append((node, "no report"))
            continue
        if comp.installed is not None and comp.installed > release.serial:
            continue
        if not table.is_live(entry, now):
            out.append((node, "silent"))
        elif comp.installed != release.serial:
            busy = comp.state is CompState.APPLYING and comp.serial == release.serial
            out.append((node, "applying" if busy else comp.wait or "not applied yet"))
        else:
            soak = policy.soak_of(placement.wave(node))
            ran = entry.report.created - comp.installed_since
            if ran < soak:
                out.append((node, f"soaking, {soak - max(ran, 0)} s left"))
    return out


def _brake_reason(led: ReleaseLedger, policy: RolloutPolicy) -> str:
    budget = (
        f"halt after {policy.halt_after}" if policy.halt_after is not None
        else f"halt at {policy.halt_ratio / 100:g}%" if policy.halt_ratio is not None
        else "halt after 1"
    )  # fmt: skip
    node, why = next(iter(led.failed.items()))
    return f"brake: {len(led.failed)} node(s) failed ({budget}); node {node.hex()[:12]}: {why}"
