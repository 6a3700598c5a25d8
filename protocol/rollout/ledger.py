"""What a node remembers about each release's rollout: failures, halts, resumes, skips.

Theory of operation
-------------------
Reports come and go (newest wins, silent nodes expire); the facts a brake
rests on must not. A ``ReleaseLedger`` keeps, per release (component,
serial):

* ``failed``: every node whose report ever said the release failed or was
  rolled back there -- *sticky*: a later report, an expired one or a replayed
  older one never removes a failure; only a resume acknowledges failures;
* ``tripped_at``: the latch of the automatic brake -- the highest failure
  count at which the policy's budget was found exceeded. The brake holds
  while resumes acknowledged fewer failures than that (``ack_failures``),
  so it only ever moves on a resume, and a resume made for one failure can
  never excuse a second;
* halts by digest, and the halt digests resumes lifted; the release is halted
  while any halt held is not lifted;
* ``skip``: the highest wave ``skip-wave`` waived.

Every change is a max or a union of facts, so applying the same reports and
actions in any order, any number of times, gives the same ledger: replays are
no-ops and two nodes that saw the same things agree. ``Ledger`` holds the
ledgers of up to ``MAX_RELEASES`` releases; when full it drops the least
consequential (neither braked nor halted, lowest serial) first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from p2pupd.protocol.errors import RemoteProtocolError, VerificationError
from p2pupd.protocol.rollout.actions import ActionKind, OperatorAction, verify_action
from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.protocol.rollout.report import NodeReport
from p2pupd.protocol.rollout.site import SiteRules
from p2pupd.protocol.rollout.table import ReportTable

MAX_RELEASES = 64
MAX_FAILED = 10_000
MAX_DOCS_PER_KIND = 32  # halts, resumes, skips kept (to forward) per release
MAX_ACKED_HALTS = 1024

Key = tuple[str, int]  # (component, serial)


class ActionVerdict(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # held already: moves nothing
    REFUSED = "refused"


@dataclass
class ReleaseLedger:
    component: str
    serial: int
    failed: dict[bytes, str] = field(default_factory=dict)  # node id -> reason
    tripped_at: int = 0
    ack_failures: int = 0
    halts: dict[bytes, OperatorAction] = field(default_factory=dict)
    acked_halts: set[bytes] = field(default_factory=set)
    skip: int = -1
    docs: dict[bytes, bytes] = field(default_factory=dict)  # action digest -> signed doc
    # Wave positions of this release by node id (``waves.place``'s cache).
    positions: dict[bytes, bytes] = field(default_factory=dict, repr=False)

    @property
    def halted(self) -> bool:
        return any(d not in self.acked_halts for d in self.halts)

    @property
    def braked(self) -> bool:
        """The automatic brake: tripped at more failures than resumes acknowledged."""
        return self.tripped_at > self.ack_failures

    def live_halts(self) -> list[OperatorAction]:
        return [a for d, a in sorted(self.halts.items()) if d not in self.acked_halts]

    def note_failure(self, node_id: bytes, reason: str) -> bool:
        """Record that ``node_id`` failed this release; True if it is news."""
        if node_id in self.failed or len(self.failed) >= MAX_FAILED:
            return False
        self.failed[node_id] = reason
        return True

    def evaluate(self, policy: RolloutPolicy | None, attempted: int) -> bool:
        """Trip the latch if the unacknowledged failures exceed the budget; returns ``braked``."""
        unacked = len(self.failed) - self.ack_failures
        if policy is not None and policy.exceeded(unacked, attempted):
            self.tripped_at = max(self.tripped_at, len(self.failed))
        return self.braked


class Ledger:
    """The ledgers of the releases a node follows; see the module docstring."""

    def __init__(self, rules: SiteRules, capacity: int = MAX_RELEASES) -> None:
        self.rules = rules
        self.capacity = capacity
        self._releases: dict[Key, ReleaseLedger] = {}

    def get(self, component: str, serial: int) -> ReleaseLedger | None:
        return self._releases.get((component, serial))

    def releases(self) -> list[ReleaseLedger]:
        return [self._releases[k] for k in sorted(self._releases)]

    def track(self, component: str, serial: int) -> ReleaseLedger:
        """The ledger of this release, made (and seeded by ``sync``) on first use."""
        key = (component, serial)
        led = self._releases.get(key)
        if led is None:
            if len(self._releases) >= self.capacity:
                self._evict()
            led = self._releases[key] = ReleaseLedger(component, serial)
        return led

    def forget(self, component: str, below: int) -> None:
        """Drop the ledgers of ``component``'s serials under ``below`` (superseded)."""
        for key in [k for k in self._releases if k[0] == component and k[1] < below]:
            del self._releases[key]

    def observe(self, report: NodeReport) -> list[Key]:
        """Record the failures an accepted report shows for tracked releases; returns those changed."""
        changed: list[Key] = []
        for comp in report.components:
            for key, led in self._releases.items():
                if key[0] == comp.name and comp.failed(key[1]):
                    why = comp.reason if comp.serial == key[1] else "marked bad"
                    if led.note_failure(report.node_id, why or comp.state.value):
                        changed.append(key)
        return changed

    def sync(self, led: ReleaseLedger, table: ReportTable) -> int:
        """Fold every failure the table shows into ``led``; returns how many nodes tried it.

        A node *tried* the release if it failed it or runs it (or a newer serial).
        """
        tried = 0
        for entry in table:
            comp = entry.report.component(led.component)
            if comp is None:
                continue
            if comp.failed(led.serial):
                led.note_failure(entry.report.node_id, comp.reason or comp.state.value)
            elif comp.installed is not None and comp.installed >= led.serial:
                tried += 1
        return tried + len(led.failed)

    def act(self, data: bytes, wall: int) -> tuple[ActionVerdict, str, OperatorAction | None]:
        """Fold a signed operator action in; returns (verdict, reason, action). Never raises."""
        try:
            action, digest = verify_action(data)
        except (RemoteProtocolError, VerificationError) as exc:
            return ActionVerdict.REFUSED, f"bad rollout action: {exc}", None
        rules = self.rules
        if not rules.same_site(action.repository, action.site):
            return ActionVerdict.REFUSED, "rollout action for another site", action
        issuer = action.issuer.hex()[:12]
        if not rules.admits(action.issuer, action.issuer_key, action.credential, wall):
            return (
                ActionVerdict.REFUSED,
                f"{action.kind.value}: node {issuer} {rules.refusal}",
                action,
            )
        if action.kind is not ActionKind.HALT and not rules.may_steer(
            action.issuer, action.issuer_key, action.credential, wall
        ):
            return (
                ActionVerdict.REFUSED,
                f"{action.kind.value} signed by node {issuer}, "
                "whose key is not a rollout operator key here",
                action,
            )
        led = self.track(action.component, action.serial)
        if digest in led.docs or digest in led.halts:
            return ActionVerdict.DUPLICATE, "", action
        if action.kind is ActionKind.HALT:
            if len(led.halts) >= MAX_DOCS_PER_KIND:
                acked = [d for d in led.halts if d in led.acked_halts]
                if not acked:  # already halted by every halt held: this one adds nothing
                    return ActionVerdict.DUPLICATE, "release already halted", action
                del led.halts[acked[0]]
                led.docs.pop(acked[0], None)
            led.halts[digest] = action
        elif action.kind is ActionKind.RESUME:
            led.ack_failures = max(led.ack_failures, action.ack_failures)
            room = MAX_ACKED_HALTS - len(led.acked_halts)
            led.acked_halts.update(action.ack_halts[: max(room, 0)])
        else:
            assert action.wave is not None
            led.skip = max(led.skip, action.wave)
        self._keep(led, digest, data)
        return ActionVerdict.ACCEPTED, "", action

    def docs(self) -> list[bytes]:
        """Every signed action held (to forward to peers and to persist)."""
        return [d for led in self.releases() for d in led.docs.values()]

    # ----- internals ---------------------------------------------------------------

    def _keep(self, led: ReleaseLedger, digest: bytes, data: bytes) -> None:
        led.docs[digest] = data
        # Halts are bounded on their own and must stay forwardable; the oldest
        # resume or skip goes first (its effect stays in the aggregates).
        others = [d for d in led.docs if d not in led.halts]
        while len(led.docs) > 3 * MAX_DOCS_PER_KIND and others:
            del led.docs[others.pop(0)]

    def _evict(self) -> None:
        def weight(key: Key) -> tuple[bool, int]:
            led = self._releases[key]
            return (led.braked or led.halted, key[1])

        del self._releases[min(self._releases, key=weight)]
