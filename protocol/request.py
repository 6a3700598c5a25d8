"""Request files: what a site holds, so a publisher can cut the smallest bundle for it.

Theory of operation
-------------------
``p2pupd export --request`` writes a *request*: the node's id, the components
it runs, for each the installed serial and rollback high-water mark, and the
releases it holds (serial + digest of the signed manifest; whether their files
are on disk and whether all their chunks are in the store). Chunk sets are not
listed: the publisher derives them from its own copy of those manifests, so a
request stays small however big the releases are; only store blobs that no
complete held release accounts for are listed (``extra_blobs``, capped).

Authentication. Nodes hold no publisher keys, so a node signs its request with
its own *node key* (Ed25519, made on first use, kept in the state directory);
the public key travels in the request and the signature covers everything,
including the node id. What that buys, and what it does not:

* integrity: a request damaged or edited on the stick fails its signature;
* binding: a bundle cut for a request carries that request, and a node imports
  it only if the request is its own (its node id *and* its key), so a minimal
  bundle meant for another node -- which lacks blobs that node had -- is
  refused with a clear line instead of half-importing;
* continuity: a publisher that remembers node keys (trust on first use)
  notices a request claiming a known node id under another key.

It is not a trust decision: a forged request can only make a bundle larger or
useless, never make a node accept anything, since every release is still
verified against the node's pinned root. Requests are not confidential (they
list what a site runs), and the first request from a node is taken on faith.

Site requests. A daemon can speak for its whole site: it collects the signed
request of every peer it is connected to (each signed by that peer's own node
key, so the collector cannot misstate another node's holdings) and wraps them,
its own first, in a *site request* signed by its own node key. A bundle cut
for a site request carries the union of what each member needs (each node's
own cheapest path; no blob that no member needs), so any member can import it
and then serve the rest over the LAN; a node accepts such a bundle only if it
is a member (id and key). A plain request is a site of one.

``plan_for_request`` is the publisher's side, pure: given a verified request
and a way to look up its own releases, it returns the releases and blobs the
site lacks, choosing per file the cheapest path via ``deltaplan``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.deltaplan import needed_blobs
from p2pupd.protocol.errors import MixAndMatchError, SchemaError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import Envelope, Role, check_signatures, key_id, sign

REQUEST_TYPE = "request"
SITE_REQUEST_TYPE = "site-request"
MAX_SITE_NODES = 1024
SPEC_VERSION = 1
NODE_ID_BYTES = 16
MAX_REQUEST_COMPONENTS = 1024
MAX_REQUEST_RELEASES = 16_384
MAX_EXTRA_BLOBS = 1_000_000  # 34 MB encoded: under limits.MAX_REQUEST_BYTES
# Payloads are decoded before the node-key signature can be checked (the key
# is inside), under these budgets (limits.REQUEST_BUDGET counts the values a
# request of the bounds above can hold; the test suite checks they agree).
ANY_REQUEST_BUDGET = replace(
    limits.REQUEST_BUDGET, max_bin=limits.MAX_REQUEST_BYTES, name="request or site request file"
)


@dataclass(frozen=True)
class ComponentHave:
    """A component configured on the node."""

    name: str
    installed: int | None
    high_water: int


@dataclass(frozen=True)
class HeldRelease:
    """A release the node holds: ``on_disk`` = its files can be read (installed
    or kept); ``complete`` = every chunk and hook of it is in the store."""

    component: str
    serial: int
    digest: bytes
    on_disk: bool
    complete: bool


@dataclass(frozen=True)
class Request:
    node_id: bytes
    node_key: bytes
    repository: str
    root_version: int
    root_digest: bytes  # of the pinned root's signed payload
    platform: str
    created: int
    components: tuple[ComponentHave, ...]
    releases: tuple[HeldRelease, ...] = ()
    extra_blobs: tuple[bytes, ...] = ()
    extra_truncated: bool = False
    # The X25519 seal key of the site the node is a member of (None: no site).
    # A bundle cut for the request is sealed to it (docs/security-model.md).
    site_seal: bytes | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.node_key)

    def to_value(self) -> dict[str, Any]:
        v = self._value()
        if self.site_seal is not None:  # only when set: requests without a site keep their bytes
            v["site_seal"] = self.site_seal
        return v

    def _value(self) -> dict[str, Any]:
        return {
            "_type": REQUEST_TYPE,
            "spec": SPEC_VERSION,
            "node_id": self.node_id,
            "node_key": self.node_key,
            "repository": self.repository,
            "root_version": self.root_version,
            "root_digest": self.root_digest,
            "platform": self.platform,
            "created": self.created,
            "components": [[c.name, c.installed, c.high_water] for c in self.components],
            "releases": [
                [r.component, r.serial, r.digest, r.on_disk, r.complete] for r in self.releases
            ],
            "extra_blobs": list(self.extra_blobs),
            "extra_truncated": self.extra_truncated,
        }

    @classmethod
    def from_value(cls, v: Any) -> Request:
        """Build a request from a decoded value; ``SchemaError``/``CodecError`` on a bad shape."""
        if not isinstance(v, dict) or v.get("_type") != REQUEST_TYPE:
            raise SchemaError("document is not a p2pupd request")
        if v.get("spec") != SPEC_VERSION:
            raise SchemaError(f"unsupported request spec {v.get('spec')!r:.20}")
        node_id, node_key = v.get("node_id"), v.get("node_key")
        if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_BYTES:
            raise SchemaError("request node_id must be 16 bytes")
        if not isinstance(node_key, bytes) or len(node_key) != 32:
            raise SchemaError("request node_key must be a 32-byte Ed25519 key")
        repo = v.get("repository")
        if not isinstance(repo, str) or not 0 < len(repo) <= 128:
            raise SchemaError("request repository must be text")
        comps = tuple(
            _component(x) for x in _list(v.get("components"), "components", MAX_REQUEST_COMPONENTS)
        )
        if len({c.name for c in comps}) != len(comps):
            raise SchemaError("request lists a component twice")
        extra = tuple(
            ids.check_digest(d) for d in _list(v.get("extra_blobs"), "extra_blobs", MAX_EXTRA_BLOBS)
        )
        truncated = v.get("extra_truncated")
        if not isinstance(truncated, bool):
            raise SchemaError("request extra_truncated must be a bool")
        seal = v.get("site_seal")
        if seal is not None and (not isinstance(seal, bytes) or len(seal) != 32):
            raise SchemaError("request site_seal must be a 32-byte X25519 key")
        return cls(
            node_id=node_id,
            node_key=node_key,
            repository=repo,
            root_version=_int(v.get("root_version"), "root_version", 1),
            root_digest=ids.check_digest(v.get("root_digest")),
            platform=ids.check_platform(v.get("platform")),
            created=_int(v.get("created"), "created", 0),
            components=comps,
            releases=tuple(
                _held(x) for x in _list(v.get("releases"), "releases", MAX_REQUEST_RELEASES)
            ),
            extra_blobs=extra,
            extra_truncated=truncated,
            site_seal=seal,
        )


def _list(v: Any, what: str, max_len: int) -> list[Any]:
    if not isinstance(v, list) or len(v) > max_len:
        raise SchemaError(f"request {what} must be a list of at most {max_len}")
    return v


def _int(v: Any, what: str, minimum: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v < (1 << 63):
        raise SchemaError(f"request {what} must be an integer >= {minimum}")
    return v


def _component(v: Any) -> ComponentHave:
    if not isinstance(v, list) or len(v) != 3:
        raise SchemaError("request component entry must be [name, installed, high_water]")
    name, installed, high = v
    return ComponentHave(
        ids.check_component(name),
        None if installed is None else _int(installed, "installed serial", 1),
        _int(high, "high_water", 0),
    )


def _held(v: Any) -> HeldRelease:
    if not isinstance(v, list) or len(v) != 5:
        raise SchemaError("request release entry must have 5 fields")
    comp, serial, digest, on_disk, complete = v
    if not isinstance(on_disk, bool) or not isinstance(complete, bool):
        raise SchemaError("request release flags must be bools")
    return HeldRelease(
        ids.check_component(comp),
        _int(serial, "release serial", 1),
        ids.check_digest(digest),
        on_disk,
        complete,
    )


def sign_request(req: Request, key: Ed25519PrivateKey) -> bytes:
    """Return the signed request file bytes (an envelope signed by the node key)."""
    if key.public_key().public_bytes_raw() != req.node_key:
        raise SchemaError("request must be signed by the node key it names")
    return sign(REQUEST_TYPE, encoding.encode(req.to_value()), [key]).encode()


def verify_request(data: bytes) -> tuple[Request, bytes]:
    """Decode a request file and check its signature by the node key it names.

    Returns the request and the digest of its signed payload (its identity).
    Raises ``CodecError``/``SchemaError``/``FrameTooLargeError`` for malformed
    bytes, ``BadSignatureError``/``UnknownKeyError``/``ThresholdError`` when
    the node key did not sign exactly this document.
    """
    env = Envelope.decode(data, limits.MAX_REQUEST_BYTES)
    return _verified(env, encoding.decode(env.payload, budget=limits.REQUEST_BUDGET))


def _verified(env: Envelope, value: Any) -> tuple[Request, bytes]:
    """The request in the decoded payload ``value`` of ``env``, once its node key signed it."""
    req = Request.from_value(value)
    kid = req.key_id
    check_signatures(REQUEST_TYPE, env, {kid: req.node_key}, Role((kid,), 1), "request file")
    return req, env.payload_digest()


def check_request_is_ours(req: Request, node_id: bytes, node_key: bytes | None) -> None:
    """Raise ``MixAndMatchError`` unless ``req`` was made by this node (id and key)."""
    if req.node_id != node_id or node_key is None or req.node_key != node_key:
        raise MixAndMatchError(
            f"bundle was cut for node {req.node_id.hex()[:12]} (key {req.key_id[:12]}), "
            f"this is node {node_id.hex()[:12]}; it may lack blobs this node needs"
        )


@dataclass(frozen=True)
class SiteRequest:
    """The requests of one or more nodes of a site; ``members[0]`` collected them."""

    members: tuple[Request, ...]
    digest: bytes  # of the signed payload: the identity of the whole file

    @property
    def collector(self) -> Request:
        return self.members[0]

    def member(self, node_id: bytes) -> Request | None:
        return next((r for r in self.members if r.node_id == node_id), None)


def sign_site_request(own: bytes, others: list[bytes], key: Ed25519PrivateKey) -> bytes:
    """Wrap this node's signed request ``own`` and its peers' ``others`` in a site request.

    Every inner request is verified first; ``SchemaError`` if ``own`` was not
    made with ``key``, if two requests name the same node or if the members
    trust different repositories (the site would need two publishers).
    """
    docs = [own, *others]
    site = _check_members([verify_request(d)[0] for d in docs])
    if site[0].node_key != key.public_key().public_bytes_raw():
        raise SchemaError("a site request must be signed by its collector's node key")
    payload = encoding.encode({"_type": SITE_REQUEST_TYPE, "spec": SPEC_VERSION, "requests": docs})
    return sign(SITE_REQUEST_TYPE, payload, [key]).encode()


def _check_members(members: list[Request]) -> list[Request]:
    if not 0 < len(members) <= MAX_SITE_NODES:
        raise SchemaError(f"a site request holds 1 to {MAX_SITE_NODES} node requests")
    if len({r.node_id for r in members}) != len(members):
        raise SchemaError("site request lists a node twice")
    if len({r.repository for r in members}) != 1:
        raise SchemaError("site request mixes nodes of different repositories")
    return members


def verify_any_request(data: bytes) -> SiteRequest:
    """Decode a request file or a site request file and check every signature.

    A plain request becomes a site of one. A site request must be signed by
    its first member's node key, and every member by its own. Raises the
    errors of ``verify_request`` (for the outer document and each member).
    """
    env = Envelope.decode(data, limits.MAX_REQUEST_BYTES)
    # Either kind of payload, decoded once: a request's many small values or
    # a site request's few large bins (its members are decoded one by one).
    value = encoding.decode(env.payload, budget=ANY_REQUEST_BUDGET)
    if not isinstance(value, dict) or value.get("_type") != SITE_REQUEST_TYPE:
        req, digest = _verified(env, value)
        return SiteRequest((req,), digest)
    if value.get("spec") != SPEC_VERSION or set(value) != {"_type", "spec", "requests"}:
        raise SchemaError("unsupported site request")
    docs = value["requests"]
    if not isinstance(docs, list) or not docs or len(docs) > MAX_SITE_NODES:
        raise SchemaError(f"a site request holds 1 to {MAX_SITE_NODES} node requests")
    if not all(isinstance(d, bytes) for d in docs):
        raise SchemaError("site request members must be signed request files")
    members = _check_members([verify_request(d)[0] for d in docs])
    kid = members[0].key_id
    check_signatures(
        SITE_REQUEST_TYPE, env, {kid: members[0].node_key}, Role((kid,), 1), "site request file"
    )
    return SiteRequest(tuple(members), env.payload_digest())


def check_site_includes(site: SiteRequest, node_id: bytes, node_key: bytes | None) -> Request:
    """Return this node's member request; ``MixAndMatchError`` if it is not one (id and key)."""
    req = site.member(node_id)
    if req is None or node_key is None or req.node_key != node_key:
        if len(site.members) == 1:
            check_request_is_ours(site.collector, node_id, node_key)
        raise MixAndMatchError(
            f"bundle was cut for a site of {len(site.members)} nodes collected by node "
            f"{site.collector.node_id.hex()[:12]}; this node ({node_id.hex()[:12]}) is not "
            "one of them, so it may lack blobs this node needs"
        )
    return req


# -- the publisher's side -------------------------------------------------------

# (component, serial) -> (manifest, payload digest), or None if unknown there.
LookupRelease = Callable[[str, int], tuple[Manifest, bytes] | None]


@dataclass(frozen=True)
class PlannedRelease:
    manifest: Manifest
    blobs: dict[bytes, int]


@dataclass
class BundlePlan:
    releases: list[PlannedRelease] = field(default_factory=list)
    roots: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def held_by(req: Request, lookup: LookupRelease) -> tuple[dict[str, list[Manifest]], set[bytes]]:
    """Return (manifests on disk per component, blobs in the node's store) as far
    as the source knows them. Held releases it does not know add nothing."""
    on_disk: dict[str, list[Manifest]] = {}
    have: set[bytes] = set(req.extra_blobs)
    for r in req.releases:
        found = lookup(r.component, r.serial)
        if found is None or found[1] != r.digest:
            continue
        man = found[0]
        if r.on_disk:
            on_disk.setdefault(r.component, []).append(man)
        if r.complete:
            have |= man.chunk_digests()
            have |= {h.sha256 for h in man.hooks.values()}
    return on_disk, have


def plan_for_request(
    req: Request,
    repository: str,
    serials: Callable[[str], list[int]],
    lookup: LookupRelease,
    root_digests: Mapping[int, bytes],
    *,
    use_deltas: bool = True,
) -> BundlePlan:
    """Plan the smallest bundle that brings ``req``'s node to the newest releases.

    For each component the node runs, the newest release for its platform is
    carried if the node lacks it (or lacks some of its blobs), with only the
    blobs ``deltaplan.needed_blobs`` says the node must receive. Roots newer
    than the node's are carried (``root_digests``: the source's root payload
    digests by version). ``use_deltas=False`` plans from chunks only
    (for a source that holds no patches). Raises ``MixAndMatchError`` if the
    node trusts another repository; a component the source lacks is noted.
    """
    if req.repository != repository or root_digests.get(req.root_version) != req.root_digest:
        raise MixAndMatchError(
            f"request is from a node that trusts another repository's root "
            f"({req.repository!r:.60} v{req.root_version}), not {repository!r:.60}'s"
        )
    plan = BundlePlan(roots=sorted(v for v in root_digests if v > req.root_version))
    on_disk, have = held_by(req, lookup)
    held = {(r.component, r.serial): r for r in req.releases}
    for comp in req.components:
        newest: Manifest | None = None
        for s in sorted(serials(comp.name), reverse=True):
            found = lookup(comp.name, s)
            if found is not None and found[0].platform in (None, req.platform):
                newest = found[0]
                break
        if newest is None:
            plan.notes.append(f"{comp.name}: no release for platform {req.platform} here")
            continue
        if newest.serial < comp.high_water:
            plan.notes.append(
                f"{comp.name}: newest here is serial {newest.serial}, "
                f"the site already trusts serial {comp.high_water}"
            )
            continue
        h = held.get((comp.name, newest.serial))
        if h is not None and (h.on_disk or h.complete):
            plan.notes.append(f"{comp.name}: up to date at {newest.version}")
            continue
        man = newest if use_deltas else replace(newest, deltas=())
        blobs = needed_blobs(man, on_disk.get(comp.name, []), have.__contains__)
        plan.releases.append(PlannedRelease(newest, blobs))
    return plan
