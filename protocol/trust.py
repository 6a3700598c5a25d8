"""The trust core: roots, roles, signatures, rotation, release verification.

Model (after TUF, trimmed to what an offline fleet needs):

* A **root** document lists Ed25519 keys and two roles, ``root`` and
  ``release``, each a set of key ids with a threshold. A node pins one root
  (``root.msgpack``, installed by the operator) and trusts nothing else.
* A **signed envelope** is ``{"signed": <canonical payload bytes>,
  "signatures": [{"keyid", "sig"}]}``. Each signature covers a context string,
  the document type and the payload bytes, so a signature on a manifest can
  never be replayed as a signature on a root.
* **Rotation**: root N+1 is accepted only if its version is exactly N+1 and it
  is signed by a threshold of root N's root keys *and* a threshold of its own.
  A stolen single old key cannot rotate; a lost old root cannot be skipped.
* A **release manifest** arriving from outside (bundle, peer) is accepted only
  if a threshold of the *current* root's release keys signed it, it is not
  expired on the node's clock, and it names the component it is offered for.
  The serial check (strictly higher than any serial accepted before for the
  component) is ``check_serial``; the node's state holds the high-water mark.
* A release **already held** (stored, installed, kept) was verified when it
  arrived, under the root trusted then; a later rotation that replaces the
  release key does not undo that. ``TrustChain`` keeps every root accepted
  (the record of what was verified under what, as TUF clients keep the
  metadata they verified) and re-verifies a held release under the newest
  root whose release role signs it -- unless a root of the chain *revokes* a
  key it counts on: a root may list compromised key ids in ``revoked``, and
  nothing signed by them is used again, whenever it arrived.
* A **bundle's root chain** starts from the pinned root: a root it carries at
  a version the node already holds must be that very root (else the bundle is
  from another repository), then N+1, N+2, ... rotate (``TrustedRoot.walk``).

Rules, one check each, one error each (``TrustedRoot`` loads only through them):
  1. envelope decodes canonically ........................ CodecError
  2. a signature from a listed key fails ................. BadSignatureError
  3. signatures only from keys the role does not list .... UnknownKeyError
  4. fewer valid signatures than the threshold ........... ThresholdError
  5. root version is not exactly current+1 ............... RollbackError
  6. expiry < now ........................................ ExpiredError
  7. component differs from the one expected ............. MixAndMatchError
  8. serial <= high-water mark ........................... RollbackError
  9. a carried root at a pinned version differs from it .. MixAndMatchError
     (and a root for another repository name cannot follow)
 10. a held release counts on a key a root revoked ....... RevokedKeyError
 11. a root's roles list a key it revokes ................ SchemaError
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import (
    BadSignatureError,
    CodecError,
    ExpiredError,
    MixAndMatchError,
    RevokedKeyError,
    RollbackError,
    SchemaError,
    ThresholdError,
    UnknownKeyError,
    VerificationError,
)
from p2pupd.protocol.manifest import Manifest

SIG_CONTEXT = b"p2pupd signature v1\x00"
ROOT_TYPE = "root"
RELEASE_TYPE = "release"
ROLES = ("root", "release")


def key_id(public_raw: bytes) -> str:
    """Return the key id (hex sha256 over a type tag and the raw public key)."""
    return ids.sha256(b"ed25519\x00" + public_raw).hex()


def signing_message(doc_type: str, payload: bytes) -> bytes:
    """Return the exact bytes a signature covers."""
    return SIG_CONTEXT + doc_type.encode() + b"\x00" + payload


@dataclass(frozen=True)
class Role:
    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True)
class Root:
    """A root document: keys and the roles that use them."""

    version: int
    keys: Mapping[str, bytes]
    roles: Mapping[str, Role]
    expires: int | None = None
    name: str = "p2pupd"
    # Key ids this root declares compromised (rule 10). Encoded only when
    # non-empty, so roots without revocations keep their exact bytes.
    revoked: tuple[str, ...] = ()

    def to_value(self) -> dict[str, Any]:
        v = {
            "_type": ROOT_TYPE,
            "spec": 1,
            "name": self.name,
            "version": self.version,
            "expires": self.expires,
            "keys": {k: {"type": "ed25519", "public": v} for k, v in self.keys.items()},
            "roles": {
                r: {"keyids": sorted(role.keyids), "threshold": role.threshold}
                for r, role in self.roles.items()
            },
        }
        if self.revoked:
            v["revoked"] = sorted(self.revoked)
        return v

    def encode(self) -> bytes:
        return encoding.encode(self.to_value())

    @classmethod
    def from_value(cls, v: Any) -> Root:
        """Build a root from a decoded value; ``SchemaError`` on a bad shape."""
        if not isinstance(v, dict) or v.get("_type") != ROOT_TYPE or v.get("spec") != 1:
            raise SchemaError("document is not a p2pupd root")
        version = v.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SchemaError("root version must be a positive integer")
        expires = v.get("expires")
        if expires is not None and (not isinstance(expires, int) or isinstance(expires, bool)):
            raise SchemaError("root expires must be an integer or nil")
        name = v.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise SchemaError("root name must be text")
        keys_v = v.get("keys")
        if not isinstance(keys_v, dict) or len(keys_v) > limits.MAX_KEYS_PER_ROLE * 2:
            raise SchemaError("root keys must be a bounded map")
        keys: dict[str, bytes] = {}
        for kid, kv in keys_v.items():
            if not isinstance(kv, dict) or kv.get("type") != "ed25519":
                raise SchemaError("only ed25519 keys are supported")
            pub = kv.get("public")
            if not isinstance(pub, bytes) or len(pub) != 32 or key_id(pub) != kid:
                raise SchemaError(f"key {kid!r:.20} does not match its id")
            keys[kid] = pub
        roles_v = v.get("roles")
        if not isinstance(roles_v, dict) or set(roles_v) != set(ROLES):
            raise SchemaError("root must define exactly the roles 'root' and 'release'")
        roles: dict[str, Role] = {}
        for rname, rv in roles_v.items():
            kids = rv.get("keyids") if isinstance(rv, dict) else None
            thr = rv.get("threshold") if isinstance(rv, dict) else None
            if not isinstance(kids, list) or not all(
                isinstance(k, str) and k in keys for k in kids
            ):
                raise SchemaError(f"role {rname} lists unknown keys")
            if len(set(kids)) != len(kids) or len(kids) > limits.MAX_KEYS_PER_ROLE:
                raise SchemaError(f"role {rname} lists keys twice or too many")
            if not isinstance(thr, int) or isinstance(thr, bool) or not 1 <= thr <= len(kids):
                raise SchemaError(f"role {rname} threshold must be 1..{len(kids)}")
            roles[rname] = Role(tuple(kids), thr)
        revoked_v = v.get("revoked", [])
        if (
            not isinstance(revoked_v, list)
            or len(revoked_v) > limits.MAX_REVOKED_KEYS
            or not all(isinstance(k, str) and len(k) == 64 for k in revoked_v)
        ):
            raise SchemaError("root revoked must be a bounded list of key ids")
        revoked = tuple(revoked_v)
        for rname, role in roles.items():
            if set(role.keyids) & set(revoked):
                raise SchemaError(f"role {rname} lists a key the root revokes")
        return cls(
            version=version, keys=keys, roles=roles, expires=expires, name=name, revoked=revoked
        )


@dataclass(frozen=True)
class Envelope:
    """Payload bytes and the signatures over them."""

    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]

    def encode(self) -> bytes:
        return encoding.encode(
            {
                "signed": self.payload,
                "signatures": [{"keyid": k, "sig": s} for k, s in self.signatures],
            }
        )

    @classmethod
    def decode(cls, data: bytes, max_bytes: int) -> Envelope:
        """Decode an envelope; ``CodecError``/``SchemaError`` on malformed bytes.

        Only the envelope's own fields are built (``limits.ENVELOPE_BUDGET``:
        ~330 values), never anything inside the payload, so a hostile
        envelope costs its bytes and one copy of its payload; the payload is
        decoded by the caller once a signature over its raw bytes verified.
        """
        v = encoding.decode(data, budget=limits.ENVELOPE_BUDGET.capped(max_bytes))
        if not isinstance(v, dict) or set(v) != {"signed", "signatures"}:
            raise SchemaError("not a signed envelope")
        payload, sigs = v["signed"], v["signatures"]
        if not isinstance(payload, bytes) or not isinstance(sigs, list):
            raise SchemaError("malformed envelope")
        if len(sigs) > limits.MAX_SIGNATURES:
            raise SchemaError("too many signatures")
        out: list[tuple[str, bytes]] = []
        for s in sigs:
            if (
                not isinstance(s, dict)
                or set(s) != {"keyid", "sig"}
                or not isinstance(s["keyid"], str)
                or not isinstance(s["sig"], bytes)
                or len(s["sig"]) != 64
            ):
                raise SchemaError("malformed signature entry")
            out.append((s["keyid"], s["sig"]))
        return cls(payload, tuple(out))

    def payload_digest(self) -> bytes:
        """The identity of the signed document, independent of who signed it."""
        return ids.sha256(self.payload)


def sign(doc_type: str, payload: bytes, keys: Iterable[Ed25519PrivateKey]) -> Envelope:
    """Return an envelope over ``payload`` signed by each of ``keys``."""
    sigs = []
    msg = signing_message(doc_type, payload)
    for k in keys:
        raw = k.public_key().public_bytes_raw()
        sigs.append((key_id(raw), k.sign(msg)))
    sigs.sort()
    return Envelope(payload, tuple(sigs))


def check_signatures(
    doc_type: str, env: Envelope, keys: Mapping[str, bytes], role: Role, what: str
) -> None:
    """Raise unless a threshold of ``role``'s keys validly signed ``env``."""
    msg = signing_message(doc_type, env.payload)
    valid: set[str] = set()
    bad: list[str] = []
    unknown: list[str] = []
    for kid, sig in env.signatures:
        if kid not in role.keyids:
            unknown.append(kid)
            continue
        try:
            Ed25519PublicKey.from_public_bytes(keys[kid]).verify(sig, msg)
        except (InvalidSignature, ValueError):
            bad.append(kid)
        else:
            valid.add(kid)
    if len(valid) >= role.threshold:
        return
    if bad:
        raise BadSignatureError(f"{what}: signature by key {bad[0][:16]} does not verify")
    if unknown and not valid:
        raise UnknownKeyError(
            f"{what}: signed by key {unknown[0][:16]} which the trusted root does not list"
        )
    raise ThresholdError(f"{what}: {len(valid)} valid signature(s), {role.threshold} required")


def _check_expiry(expires: int | None, now: int | None, what: str) -> None:
    if expires is not None and now is not None and expires < now:
        raise ExpiredError(
            f"{what} expired at {format_utc(expires)} (node clock says {format_utc(now)})"
        )


class TrustedRoot:
    """The node's pinned root, and the verifier of everything signed under it."""

    def __init__(self, root: Root, envelope: Envelope) -> None:
        self.root = root
        self.envelope = envelope

    @property
    def version(self) -> int:
        return self.root.version

    def encode(self) -> bytes:
        return self.envelope.encode()

    @classmethod
    def load(cls, data: bytes, now: int | None = None) -> TrustedRoot:
        """Pin a root from bytes the operator chose to trust (self-signed check)."""
        env = Envelope.decode(data, limits.MAX_ROOT_BYTES)
        root = Root.from_value(encoding.decode(env.payload, budget=limits.ROOT_BUDGET))
        check_signatures(ROOT_TYPE, env, root.keys, root.roles["root"], f"root v{root.version}")
        _check_expiry(root.expires, now, f"root v{root.version}")
        return cls(root, env)

    def rotate(self, data: bytes, now: int | None = None) -> TrustedRoot:
        """Return the trust state after accepting root N+1 from ``data``.

        Raises ``RollbackError`` unless its version is exactly N+1, and a
        signature error unless both the old and the new root keys sign it.
        """
        env = Envelope.decode(data, limits.MAX_ROOT_BYTES)
        new = Root.from_value(encoding.decode(env.payload, budget=limits.ROOT_BUDGET))
        cur = self.root.version
        if new.version != cur + 1:
            raise RollbackError(f"root v{new.version} cannot follow trusted root v{cur}")
        if new.name != self.root.name:
            raise MixAndMatchError(
                f"root for repository {new.name!r} cannot follow {self.root.name!r}"
            )
        check_signatures(
            ROOT_TYPE,
            env,
            self.root.keys,
            self.root.roles["root"],
            f"root v{new.version} (old keys)",
        )
        check_signatures(
            ROOT_TYPE, env, new.keys, new.roles["root"], f"root v{new.version} (new keys)"
        )
        _check_expiry(new.expires, now, f"root v{new.version}")
        return TrustedRoot(new, env)

    def walk(
        self, roots: Mapping[int, bytes], now: int | None, pinned: Mapping[int, bytes]
    ) -> TrustedRoot:
        """Return the trust state after the root chain ``roots`` (a bundle's, a peer's).

        Rule 9 first: every root in ``roots`` at a version in ``pinned`` (the
        roots this side already accepted, by version) must be that same root,
        else ``MixAndMatchError`` (another repository). Then rotate through
        N+1, N+2, ... while ``roots`` has them (rules 2-6 for each).
        """
        for version, data in sorted(roots.items()):
            held = pinned.get(version)
            if held is not None and _payload_of(held) != _payload_of(data):
                raise MixAndMatchError(
                    f"root v{version} is not the root v{version} trusted here: "
                    "it is from another repository"
                )
        trusted = self
        while trusted.version + 1 in roots:
            trusted = trusted.rotate(roots[trusted.version + 1], now)
        return trusted

    def verify_release(
        self, data: bytes, now: int | None, component: str | None = None
    ) -> tuple[Manifest, Envelope]:
        """Verify a signed release manifest and return it with its envelope.

        Checks signatures against the release role, expiry against ``now``
        (``None`` skips expiry: only for display tools) and, when given, that
        the manifest is for ``component``. The serial is the caller's to check
        with ``check_serial`` against its own high-water mark.
        """
        env = Envelope.decode(data, limits.MAX_MANIFEST_BYTES)
        check_signatures(
            RELEASE_TYPE, env, self.root.keys, self.root.roles["release"], "release manifest"
        )
        man = Manifest.decode(env.payload)
        if component is not None and man.component != component:
            raise MixAndMatchError(
                f"manifest is for component {man.component!r}, offered as {component!r}"
            )
        _check_expiry(man.expires, now, f"release {man.component} {man.version}")
        return man, env


def _payload_of(data: bytes) -> bytes:
    """The signed payload of an envelope (signatures aside), or the bytes when malformed."""
    try:
        return Envelope.decode(data, limits.MAX_ROOT_BYTES).payload
    except (SchemaError, CodecError):
        return data


class TrustChain:
    """Every root accepted, oldest to current: the verifier of releases already held.

    A held release was verified under the root trusted when it arrived; it is
    re-verified (storage can rot) under the newest root of the chain whose
    release role signs it, and refused if any root of the chain revokes a key
    whose signature it counts on (rule 10). The current root alone decides what
    arrives from outside (``current.verify_release``).
    """

    def __init__(self, roots: Mapping[int, TrustedRoot]) -> None:
        if not roots:
            raise ValueError("a trust chain needs at least one root")
        self.roots = dict(sorted(roots.items()))
        self.current = self.roots[max(self.roots)]
        self.revoked: dict[str, int] = {}  # key id -> version of the first root revoking it
        for v, r in self.roots.items():
            for kid in r.root.revoked:
                self.revoked.setdefault(kid, v)

    @classmethod
    def from_history(cls, history: Mapping[int, bytes], current: TrustedRoot) -> TrustChain:
        """Build the chain from stored root envelopes (``{version: bytes}``) and the current root.

        Stored roots were verified when accepted; an unreadable one is skipped
        (releases it alone signed then fail to verify, as damaged).
        """
        roots: dict[int, TrustedRoot] = {}
        for v, data in history.items():
            if v >= current.version:
                continue
            try:
                roots[v] = TrustedRoot.load(data, None)
            except (VerificationError, CodecError):
                continue
        roots[current.version] = current
        return cls(roots)

    def verify_held(
        self, data: bytes, component: str | None = None
    ) -> tuple[Manifest, Envelope, int]:
        """Verify a release this side already holds; returns it and the root version used.

        Expiry is not judged again (it was when the release arrived). Raises the
        current root's verification error when no root of the chain signs it,
        and ``RevokedKeyError`` when a signature it counts on is by a revoked key.
        """
        first: VerificationError | None = None
        for version in sorted(self.roots, reverse=True):
            root = self.roots[version]
            try:
                man, env = root.verify_release(data, None, component)
            except (UnknownKeyError, ThresholdError, BadSignatureError) as exc:
                first = first or exc
                continue
            self._check_revoked(root, env, f"release {man.component} {man.version}")
            return man, env, version
        assert first is not None
        raise first

    def _check_revoked(self, root: TrustedRoot, env: Envelope, what: str) -> None:
        role = root.root.roles["release"]
        revoked = [kid for kid, _ in env.signatures if kid in role.keyids and kid in self.revoked]
        if not revoked:
            return
        kept = Role(tuple(k for k in role.keyids if k not in self.revoked), role.threshold)
        try:
            check_signatures(RELEASE_TYPE, env, root.root.keys, kept, what)
        except VerificationError:
            kid = revoked[0]
            raise RevokedKeyError(
                f"{what} is signed by key {kid[:16]}, which root v{self.revoked[kid]} "
                "revokes as compromised: it is not used again (import a newer release)"
            ) from None


def check_serial(man: Manifest, high_water: int, held_digest: bytes | None, digest: bytes) -> bool:
    """Apply the rollback rule; return True if ``man`` is new, False if already held.

    A serial below the high-water mark, or equal to it with different content,
    raises ``RollbackError`` (a replay, a freeze or an equivocating publisher).
    """
    if man.serial > high_water:
        return True
    if man.serial == high_water and held_digest == digest:
        return False
    raise RollbackError(
        f"release {man.component} serial {man.serial} is not newer than trusted serial {high_water}"
    )


# -- instants in messages ----------------------------------------------------------------
#
# Expiry errors must show instants an operator can read ("expired at
# 2027-03-01T12:00:00Z", not "expired at 1803902400"), but protocol/ has no
# clock and no ``datetime`` (tests/unit/test_layering.py). The date comes from
# Howard Hinnant's ``civil_from_days`` (proleptic Gregorian calendar, exact for
# every integer day; Python's floor division makes it hold before 1970 too).

SECONDS_PER_DAY = 86_400
_DAYS_PER_ERA = 146_097  # 400 Gregorian years
_EPOCH_SHIFT = 719_468  # days from 0000-03-01 to 1970-01-01


def civil_from_days(days: int) -> tuple[int, int, int]:
    """Return (year, month, day) of the day ``days`` after 1970-01-01."""
    z = days + _EPOCH_SHIFT
    era = z // _DAYS_PER_ERA
    doe = z - era * _DAYS_PER_ERA  # day of era, 0..146096
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365  # year of era, 0..399
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)  # day of the year from March 1st
    mp = (5 * doy + 2) // 153  # month from March, 0..11
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def format_utc(seconds: int) -> str:
    """``seconds`` since 1970-01-01T00:00:00Z as ``YYYY-MM-DDTHH:MM:SSZ``."""
    days, rest = divmod(int(seconds), SECONDS_PER_DAY)
    year, month, day = civil_from_days(days)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"
