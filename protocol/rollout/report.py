"""The signed node report: what one node runs and how its last change went.

Theory of operation
-------------------
Every node describes itself in a small document signed by its node key (the
Ed25519 key of protocol/request.py, kept in ``STATE/node.key``): node id and
public key, the repository and site it belongs to, its platform, and per
component the installed serial and since when, the last event (committed,
applying, rolled back, failed with its one-line reason and the digest of the
hook output), the serials it marked bad, the newest complete release it holds
and why it is waiting, if it is. Nodes gossip these so each holds a view of
the whole site (``table``); rollout decisions are computed from that view
(``decide``).

Ordering and replay. A report carries ``seq``, a per-node counter that only
grows: ``next_seq(last, wall_ms) = max(last + 1, wall_ms)`` -- a hybrid of a
persisted counter (monotonic even when the clock steps back) and the wall
clock in milliseconds (so a node whose counter file was lost starts above
everything it signed before, as long as its clock is sane). A receiver keeps
the highest ``seq`` seen per node, even after the report itself expired, and
a report at or below it moves nothing.

Bounds: ``MAX_REPORT_BYTES`` per document, ``MAX_REPORT_COMPONENTS``
components, one-line reasons of ``MAX_REASON_BYTES``, ``MAX_BAD_SERIALS``
remembered failures per component. ``from_value`` checks all of it and
raises ``SchemaError``; ``verify_report`` also checks the signature by the key
the report names (who may speak for the site is the table's rule, not this
module's).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import SchemaError
from p2pupd.protocol.trust import Envelope, Role, check_signatures, key_id, sign

REPORT_TYPE = "node-report"
SPEC_VERSION = 1
NODE_ID_BYTES = 16
MAX_REPORT_BYTES = 8 * limits.KiB
MAX_CREDENTIAL_BYTES = 2 * limits.KiB  # a site membership credential (an X.509 certificate)
MAX_REPORT_COMPONENTS = 16
MAX_REASON_BYTES = 120
MAX_REPORT_VERSION_BYTES = 64
MAX_BAD_SERIALS = 8
MAX_SITE_BYTES = 128
MAX_WAIT_BYTES = 48
MAX_INT = (1 << 63) - 1
# A report's payload is decoded *before* its signature can be checked (the key
# is inside), so under a budget of its own: a map of 11 fields, 16 components
# of 13 fields and up to 8 bad serials: ~400 objects.
REPORT_BUDGET = limits.DecodeBudget(
    max_bytes=MAX_REPORT_BYTES,
    max_objects=512,
    max_depth=4,
    max_len=MAX_REPORT_COMPONENTS,
    max_str=MAX_SITE_BYTES,
    max_bin=MAX_CREDENTIAL_BYTES,
    name="node report",
)


class CompState(enum.Enum):
    """The last thing that happened to a component on the node."""

    IDLE = "idle"  # nothing applied yet
    COMMITTED = "committed"  # ``serial`` is live and passed its health check
    APPLYING = "applying"  # ``serial`` is being staged, swapped or checked
    ROLLED_BACK = "rolled-back"  # the operator left ``serial`` for the previous version
    FAILED = "failed"  # ``serial`` failed its hooks or health check and was marked bad


@dataclass(frozen=True)
class ComponentReport:
    name: str
    installed: int | None = None  # serial live at the target
    version: str | None = None  # its label (trimmed to MAX_REPORT_VERSION_BYTES)
    installed_since: int = 0  # wall seconds, when ``installed`` was committed
    state: CompState = CompState.IDLE
    serial: int | None = None  # the release the state is about
    since: int = 0  # wall seconds of the last change (the state's time)
    reason: str = ""  # one line, for FAILED / ROLLED_BACK
    hook_digest: bytes | None = None  # sha256 of the failing hook's output
    auto: bool = True  # applies releases on its own (takes part in waves)
    bad: tuple[int, ...] = ()  # serials marked bad here, newest last
    holds: int | None = None  # newest release held complete
    wait: str = ""  # why ``holds`` is not applied, e.g. "wave 2", "brake", "halt"

    def failed(self, serial: int) -> bool:
        """True if this node reports ``serial`` failed or rolled back here."""
        if serial in self.bad:
            return True
        return self.serial == serial and self.state in (CompState.FAILED, CompState.ROLLED_BACK)

    def to_value(self) -> list[Any]:
        return [
            self.name,
            self.installed,
            self.version,
            self.installed_since,
            self.state.value,
            self.serial,
            self.since,
            self.reason,
            self.hook_digest,
            self.auto,
            list(self.bad),
            self.holds,
            self.wait,
        ]

    @classmethod
    def from_value(cls, v: Any) -> ComponentReport:
        if not isinstance(v, list) or len(v) != 13:
            raise SchemaError("report component entry must have 13 fields")
        name, inst, ver, inst_since, state, serial, since, reason, hook, auto, bad, holds, wait = v
        try:
            st = CompState(state)
        except ValueError:
            raise SchemaError(f"unknown component state {state!r:.20}") from None
        if not isinstance(auto, bool):
            raise SchemaError("report auto must be a bool")
        if not isinstance(bad, list) or len(bad) > MAX_BAD_SERIALS:
            raise SchemaError(f"report bad must list at most {MAX_BAD_SERIALS} serials")
        return cls(
            name=ids.check_component(name),
            installed=_opt_serial(inst),
            version=None if ver is None else _line(ver, "version", MAX_REPORT_VERSION_BYTES),
            installed_since=_int(inst_since, "installed_since"),
            state=st,
            serial=_opt_serial(serial),
            since=_int(since, "since"),
            reason=_line(reason, "reason", MAX_REASON_BYTES, empty=True),
            hook_digest=None if hook is None else ids.check_digest(hook),
            auto=auto,
            bad=tuple(_int(s, "bad serial", 1) for s in bad),
            holds=_opt_serial(holds),
            wait=_line(wait, "wait", MAX_WAIT_BYTES, empty=True),
        )


@dataclass(frozen=True)
class NodeReport:
    node_id: bytes
    node_key: bytes
    repository: str
    site: str
    platform: str
    seq: int
    created: int  # wall seconds on the reporting node
    components: tuple[ComponentReport, ...] = ()
    # The node's site membership credential, where a site exists, so a node
    # that never met it can check it is a member (``site``). Encoded only
    # when set.
    credential: bytes | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.node_key)

    def component(self, name: str) -> ComponentReport | None:
        return next((c for c in self.components if c.name == name), None)

    def to_value(self) -> dict[str, Any]:
        return {
            "_type": REPORT_TYPE,
            "spec": SPEC_VERSION,
            "node_id": self.node_id,
            "node_key": self.node_key,
            "repository": self.repository,
            "site": self.site,
            "platform": self.platform,
            "seq": self.seq,
            "created": self.created,
            "components": [c.to_value() for c in self.components],
        } | ({"credential": self.credential} if self.credential is not None else {})

    @classmethod
    def from_value(cls, v: Any) -> NodeReport:
        """Build a report from a decoded value; ``SchemaError`` on a bad shape or bound."""
        if not isinstance(v, dict) or v.get("_type") != REPORT_TYPE:
            raise SchemaError("document is not a node report")
        if v.get("spec") != SPEC_VERSION:
            raise SchemaError(f"unsupported node report spec {v.get('spec')!r:.20}")
        if set(v) - {"credential"} != set(_FIELDS):
            raise SchemaError("node report has missing or unknown fields")
        credential = v.get("credential")
        if credential is not None and (
            not isinstance(credential, bytes) or not 0 < len(credential) <= MAX_CREDENTIAL_BYTES
        ):
            raise SchemaError(f"report credential must be 1 to {MAX_CREDENTIAL_BYTES} bytes")
        node_id, node_key = v["node_id"], v["node_key"]
        if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_BYTES:
            raise SchemaError("report node_id must be 16 bytes")
        if not isinstance(node_key, bytes) or len(node_key) != 32:
            raise SchemaError("report node_key must be a 32-byte Ed25519 key")
        comps_v = v["components"]
        if not isinstance(comps_v, list) or len(comps_v) > MAX_REPORT_COMPONENTS:
            raise SchemaError(f"report lists at most {MAX_REPORT_COMPONENTS} components")
        comps = tuple(ComponentReport.from_value(c) for c in comps_v)
        names = [c.name for c in comps]
        if names != sorted(set(names)):
            raise SchemaError("report components must be sorted and unique")
        return cls(
            node_id=node_id,
            node_key=node_key,
            repository=_line(v["repository"], "repository", 128),
            site=_line(v["site"], "site", MAX_SITE_BYTES),
            platform=ids.check_platform(v["platform"]),
            seq=_int(v["seq"], "seq", 1),
            created=_int(v["created"], "created"),
            components=comps,
            credential=credential,
        )


_FIELDS = NodeReport(bytes(16), bytes(32), "r", "s", "p", 1, 0).to_value().keys()


def next_seq(last: int, wall_ms: int) -> int:
    """The next report sequence number after ``last`` (see the module docstring)."""
    return min(MAX_INT, max(last + 1, wall_ms))


def one_line(text: str, limit: int = MAX_REASON_BYTES) -> str:
    """``text`` as one printable line of at most ``limit`` UTF-8 bytes (for reasons)."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    raw = line.encode()
    if len(raw) <= limit:
        return line
    return raw[: limit - 3].decode(errors="ignore") + "..."


def sign_report(report: NodeReport, key: Ed25519PrivateKey) -> bytes:
    """Return the signed report (an envelope by the node key it names).

    Raises ``SchemaError`` if ``key`` is not that key or the result exceeds
    ``MAX_REPORT_BYTES`` (the caller trims reasons and components first).
    """
    if key.public_key().public_bytes_raw() != report.node_key:
        raise SchemaError("a node report must be signed by the node key it names")
    data = sign(REPORT_TYPE, encoding.encode(report.to_value()), [key]).encode()
    if len(data) > MAX_REPORT_BYTES:
        raise SchemaError(f"node report of {len(data)} bytes exceeds {MAX_REPORT_BYTES}")
    return data


def decode_report(data: bytes) -> tuple[NodeReport, Envelope]:
    """Decode a signed report without checking its signature (``verify_report`` does).

    Raises ``FrameTooLargeError``/``CodecError``/``SchemaError``.
    """
    env = Envelope.decode(data, MAX_REPORT_BYTES)
    return NodeReport.from_value(encoding.decode(env.payload, budget=REPORT_BUDGET)), env


def check_report_signature(report: NodeReport, env: Envelope) -> None:
    """Raise a ``VerificationError`` unless the node key ``report`` names signed ``env``."""
    kid = report.key_id
    check_signatures(REPORT_TYPE, env, {kid: report.node_key}, Role((kid,), 1), "node report")


def verify_report(data: bytes) -> NodeReport:
    """Decode a signed report and check it is signed by the node key it names.

    Raises ``FrameTooLargeError``/``CodecError``/``SchemaError`` for malformed
    bytes and ``BadSignatureError``/``UnknownKeyError``/``ThresholdError`` for
    a signature that does not hold.
    """
    report, env = decode_report(data)
    check_report_signature(report, env)
    return report


def _int(v: Any, what: str, lo: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= MAX_INT:
        raise SchemaError(f"report {what} must be an integer >= {lo}")
    return v


def _opt_serial(v: Any) -> int | None:
    return None if v is None else _int(v, "serial", 1)


def _line(v: Any, what: str, most: int, *, empty: bool = False) -> str:
    if (
        not isinstance(v, str)
        or (not v and not empty)
        or not v.isprintable()  # before encode(): refuses lone surrogates
        or len(v.encode()) > most
    ):
        raise SchemaError(f"report {what} must be one printable line of <= {most} bytes")
    return v
