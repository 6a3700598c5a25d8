"""Pure helpers for the rollout tests: simulated nodes that sign reports and actions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.protocol.fleet.identity import node_id_of
from p2pupd.protocol.rollout.actions import ActionKind, OperatorAction, sign_action
from p2pupd.protocol.rollout.report import ComponentReport, CompState, NodeReport, sign_report
from p2pupd.protocol.rollout.site import SiteRules

REPO = "p2pupd"
SITE = "default"
COMP = "app"


def key_for(n: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"key%d" % n).digest())


@dataclass
class SimNode:
    """One node of a simulated site: its id, key, platform and report counter."""

    n: int
    platform: str = "linux-x86_64"
    repository: str = REPO
    site: str = SITE
    seq: int = 0
    key: Ed25519PrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.key = key_for(self.n)

    @property
    def node_id(self) -> bytes:
        return node_id_of(self.public)  # the swarm's binding (protocol/fleet/identity.py)

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes_raw()

    def report(
        self,
        *comps: ComponentReport,
        created: int = 1000,
        seq: int | None = None,
        credential: bytes | None = None,
    ) -> bytes:
        """A signed report; ``seq`` defaults to one more than the last."""
        self.seq = self.seq + 1 if seq is None else seq
        rep = NodeReport(
            self.node_id,
            self.public,
            self.repository,
            self.site,
            self.platform,
            self.seq,
            created,
            tuple(sorted(comps, key=lambda c: c.name)) or (ComponentReport(COMP),),
            credential,
        )
        return sign_report(rep, self.key)

    def action(self, kind: ActionKind, serial: int, **kw: object) -> bytes:
        act = OperatorAction(
            kind, COMP, serial, self.node_id, self.public, self.repository, self.site, 1000,
            **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        return sign_action(act, self.key)


def committed(serial: int, since: int = 0, **kw: object) -> ComponentReport:
    return ComponentReport(
        COMP, serial, f"v{serial}", since, CompState.COMMITTED, serial, since,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def running(serial: int | None, **kw: object) -> ComponentReport:
    """A node on ``serial`` (or nothing) that has not applied anything newer."""
    return ComponentReport(
        COMP, serial, None if serial is None else f"v{serial}", 0,
        CompState.COMMITTED if serial else CompState.IDLE, serial, 0,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def failed(
    serial: int, installed: int | None, reason: str = "health check failed"
) -> ComponentReport:
    return ComponentReport(
        COMP, installed, None, 0, CompState.FAILED, serial, 5, reason, hashlib.sha256(b"out").digest(),
        bad=(serial,),
    )  # fmt: skip


def rules(me: SimNode, *, operators: tuple[SimNode, ...] = (), members: object = None) -> SiteRules:
    return SiteRules(
        REPO, SITE, me.public, members,  # type: ignore[arg-type]
        frozenset(o.public for o in operators),
    )  # fmt: skip


class Members:
    """A membership of the node ids given (keys as the SimNodes have them)."""

    def __init__(self, *nodes: SimNode) -> None:
        self.keys = {n.node_id: n.public for n in nodes}

    def admits(self, node_id: bytes, node_key: bytes, credential: bytes | None, wall: int) -> bool:
        # A credential, here, is the member's node id (the real one is an X.509
        # certificate the membership checks); the key must be the enrolled one.
        return self.keys.get(node_id) == node_key and credential in (None, node_id)
