"""Operator actions on a rollout: halt, resume, skip-wave, signed and gossiped.

Theory of operation
-------------------
``p2pupd rollout halt|resume|skip-wave RELEASE`` on any node makes an
``OperatorAction`` signed by that node's key; the daemon gossips it like a
report and every node folds it into its ledger (``decide.Ledger``). Who may
make which action is ``site.SiteRules``' rule 3.

An action is a *fact*, identified by the digest of its signed payload; a
ledger holds each at most once, so a replayed action moves nothing it did not
move the first time. Actions never depend on clocks or counters to order
themselves (a member could inflate either); they say what they supersede:

* ``halt`` stops the release on every node, whatever the wave;
* ``resume`` names the halts it lifts (``ack_halts``, by digest: a halt made
  after it, or one its author had not seen, still holds) and the failures it
  accepts (``ack_failures``: the brake pulls again when more nodes than that
  fail beyond the budget), so a resume made for one failure can never excuse
  the next;
* ``skip-wave`` with ``wave=k`` waives the evidence of waves ``0..k``: nodes
  of wave ``k+1`` go without waiting for them (for a dead canary, or a wave
  that cannot soak). It does not lift a brake.

Bounds: ``MAX_ACTION_BYTES``, ``MAX_ACK_HALTS`` digests per resume.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import SchemaError
from p2pupd.protocol.rollout.policy import MAX_WAVES
from p2pupd.protocol.rollout.report import (
    MAX_CREDENTIAL_BYTES,
    MAX_INT,
    MAX_REASON_BYTES,
    MAX_SITE_BYTES,
    NODE_ID_BYTES,
)
from p2pupd.protocol.trust import Envelope, Role, check_signatures, key_id, sign

ACTION_TYPE = "rollout-action"
SPEC_VERSION = 1
MAX_ACTION_BYTES = 6 * limits.KiB
MAX_ACK_HALTS = 64
# An action's payload is decoded before its signature can be checked (the
# issuer's key is inside): ~15 fields and up to 64 acknowledged halts.
ACTION_BUDGET = limits.DecodeBudget(
    max_bytes=MAX_ACTION_BYTES,
    max_objects=128,
    max_depth=2,
    max_len=MAX_ACK_HALTS,
    max_str=MAX_SITE_BYTES,
    max_bin=MAX_CREDENTIAL_BYTES,
    name="rollout action",
)


class ActionKind(enum.Enum):
    HALT = "halt"
    RESUME = "resume"
    SKIP_WAVE = "skip-wave"


@dataclass(frozen=True)
class OperatorAction:
    kind: ActionKind
    component: str
    serial: int
    issuer: bytes  # node id of the node it was made on
    issuer_key: bytes  # that node's public node key (it signs)
    repository: str
    site: str
    created: int  # wall seconds on the issuer, for display only
    reason: str = ""
    wave: int | None = None  # skip-wave: the last wave waived
    ack_failures: int = 0  # resume: failures it accepts
    ack_halts: tuple[bytes, ...] = ()  # resume: digests of the halts it lifts
    credential: bytes | None = None  # the issuer's site credential (encoded only when set)

    def to_value(self) -> dict[str, Any]:
        return {
            "_type": ACTION_TYPE,
            "spec": SPEC_VERSION,
            "kind": self.kind.value,
            "component": self.component,
            "serial": self.serial,
            "issuer": self.issuer,
            "issuer_key": self.issuer_key,
            "repository": self.repository,
            "site": self.site,
            "created": self.created,
            "reason": self.reason,
            "wave": self.wave,
            "ack_failures": self.ack_failures,
            "ack_halts": sorted(self.ack_halts),
        } | ({"credential": self.credential} if self.credential is not None else {})

    @classmethod
    def from_value(cls, v: Any) -> OperatorAction:
        """Build an action from a decoded value; ``SchemaError`` on a bad shape or bound."""
        if not isinstance(v, dict) or v.get("_type") != ACTION_TYPE:
            raise SchemaError("document is not a rollout action")
        if v.get("spec") != SPEC_VERSION or set(v) - {"credential"} != set(_FIELDS):
            raise SchemaError("unsupported rollout action")
        credential = v.get("credential")
        if credential is not None and (
            not isinstance(credential, bytes) or not 0 < len(credential) <= MAX_CREDENTIAL_BYTES
        ):
            raise SchemaError(f"action credential must be 1 to {MAX_CREDENTIAL_BYTES} bytes")
        try:
            kind = ActionKind(v["kind"])
        except ValueError:
            raise SchemaError(f"unknown rollout action {v['kind']!r:.20}") from None
        issuer, key = v["issuer"], v["issuer_key"]
        if not isinstance(issuer, bytes) or len(issuer) != NODE_ID_BYTES:
            raise SchemaError("action issuer must be a 16-byte node id")
        if not isinstance(key, bytes) or len(key) != 32:
            raise SchemaError("action issuer_key must be a 32-byte Ed25519 key")
        halts = v["ack_halts"]
        if not isinstance(halts, list) or len(halts) > MAX_ACK_HALTS:
            raise SchemaError(f"action ack_halts must list at most {MAX_ACK_HALTS} digests")
        wave = v["wave"]
        action = cls(
            kind=kind,
            component=ids.check_component(v["component"]),
            serial=_int(v["serial"], "serial", 1),
            issuer=issuer,
            issuer_key=key,
            repository=_text(v["repository"], "repository", 128),
            site=_text(v["site"], "site", MAX_SITE_BYTES),
            created=_int(v["created"], "created", 0),
            reason=_text(v["reason"], "reason", MAX_REASON_BYTES, empty=True),
            wave=None if wave is None else _int(wave, "wave", 0, MAX_WAVES - 1),
            ack_failures=_int(v["ack_failures"], "ack_failures", 0),
            ack_halts=tuple(ids.check_digest(h) for h in halts),
            credential=credential,
        )
        if sorted(action.ack_halts) != halts or len(set(halts)) != len(halts):
            raise SchemaError("action ack_halts must be sorted and unique")
        if (kind is ActionKind.SKIP_WAVE) != (wave is not None):
            raise SchemaError("a wave number belongs to skip-wave, and only there")
        if kind is not ActionKind.RESUME and (action.ack_failures or action.ack_halts):
            raise SchemaError("only a resume acknowledges failures and halts")
        return action


_FIELDS = OperatorAction(ActionKind.HALT, "c", 1, bytes(16), bytes(32), "r", "s", 0).to_value()


def sign_action(action: OperatorAction, key: Ed25519PrivateKey) -> bytes:
    """Return the signed action; ``SchemaError`` unless ``key`` is the issuer's key."""
    if key.public_key().public_bytes_raw() != action.issuer_key:
        raise SchemaError("a rollout action must be signed by the issuer's node key")
    # Round-trip through from_value so every bound holds for what we send.
    OperatorAction.from_value(encoding.decode(encoding.encode(action.to_value())))
    return sign(ACTION_TYPE, encoding.encode(action.to_value()), [key]).encode()


def verify_action(data: bytes) -> tuple[OperatorAction, bytes]:
    """Decode a signed action, check the issuer's signature; returns it and its digest.

    Raises ``CodecError``/``SchemaError``/``FrameTooLargeError`` for malformed
    bytes and a ``VerificationError`` when the issuer's key did not sign it.
    """
    env = Envelope.decode(data, MAX_ACTION_BYTES)
    action = OperatorAction.from_value(encoding.decode(env.payload, budget=ACTION_BUDGET))
    kid = key_id(action.issuer_key)
    check_signatures(ACTION_TYPE, env, {kid: action.issuer_key}, Role((kid,), 1), "rollout action")
    return action, env.payload_digest()


def _int(v: Any, what: str, lo: int, hi: int = MAX_INT) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SchemaError(f"action {what} must be an integer in [{lo}, {hi}]")
    return v


def _text(v: Any, what: str, most: int, *, empty: bool = False) -> str:
    if (
        not isinstance(v, str)
        or (not v and not empty)
        or not v.isprintable()
        or len(v.encode()) > most
    ):
        raise SchemaError(f"action {what} must be one printable line of <= {most} bytes")
    return v
