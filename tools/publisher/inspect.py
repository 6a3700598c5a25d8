"""``p2pupd show`` and ``p2pupd verify``: look into a repository or a bundle.

Both are read-only. A bundle is read as untrusted (no symlink followed, every
member bounded, names built from parsed digests, JSON and msgpack decoded
within their ``limits`` budgets, a release payload decoded only once it
verified under the bundle's own roots, when it has them). ``verify`` checks what a
node would check — the root chain, every release signature and expiry, every
blob the releases name present and hashing to its name, and no unreferenced
blob — against a root you give (``--trust``), a node's pinned root
(``--state-dir``), or else the document's own root v1 (then it only proves
internal consistency, and says so).

A bundle cut for a node at a known version (``export --from-version``,
``--for``) may carry a release's signed envelope as a patch against the one
that node holds. Such a release can be read only with that base: a *basis*
(``Basis``: a node's state directory, or the publisher's repository) supplies
it, and the rebuilt envelope is then shown and verified like a whole one.
Without one, ``show`` lists the release by its (unsigned) annotations and
says what it needs, and ``verify`` fails (exit 1, ``UnverifiedError``) after
checking everything else: it never reports a pass for a release it did not
check.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pupd.daemon import api
from p2pupd.protocol import bundle as oci
from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import (
    CodecError,
    HashMismatchError,
    NotMemberError,
    P2pupdError,
    SchemaError,
)
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.site import sealed
from p2pupd.protocol.trust import Envelope, Root, TrustChain, TrustedRoot
from p2pupd.tools.publisher.repo import Repo, RepoError

READ_BLOCK = 1 << 20


class UnverifiedError(RepoError):
    """Part of a bundle could not be checked (a release patch without its base): exit 1."""


@dataclass(frozen=True)
class PatchedRelease:
    """A release carried as a patch against an envelope the receiving node holds."""

    component: str  # from the artifact's annotations: unsigned until rebuilt
    version: str
    patch: oci.ReleasePatch
    blob: bytes  # the patch, hash-checked against its descriptor

    @property
    def label(self) -> str:
        return f"{_shown(self.component)} {_shown(self.version)}"

    @property
    def base_label(self) -> str:
        p = self.patch
        if p.base_version is not None:
            return f"{_shown(self.component)} {_shown(p.base_version)}"
        if p.base_serial is not None:
            return f"{_shown(self.component)} serial {p.base_serial}"
        return f"the {_shown(self.component)} release {p.base.hex()[:16]}"


@dataclass(frozen=True)
class Basis:
    """What a receiving node holds: the envelopes a release patch may name, its roots.

    ``pinned`` is the node's current root (``None`` for a repository, which
    pins nothing); ``roots`` every root it accepted, by version.
    """

    name: str
    envelopes: Callable[[str], Iterable[bytes]]  # component -> stored envelopes
    roots: dict[int, bytes]
    pinned: bytes | None = None


@dataclass
class Contents:
    kind: str  # "repository" | "bundle"
    roots: dict[int, bytes]
    releases: list[tuple[Manifest, Envelope, bytes]]  # manifest, envelope, envelope bytes
    blob_dir: Path
    carried: dict[bytes, int] = field(default_factory=dict)  # bundle: digest -> declared size
    # Bundle releases whose envelope is a patch against one a node holds, not
    # (yet) rebuilt: ``resolve`` rebuilds those its basis holds the base of.
    patched: list[PatchedRelease] = field(default_factory=list)
    rebuilt: dict[bytes, str] = field(default_factory=dict)  # payload digest -> base label


def _read_member(path: Path, max_bytes: int) -> bytes:
    """Read a regular file without following a symlink; SchemaError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SchemaError(f"missing {path.name}") from None
    except OSError as exc:
        if exc.errno in (40, 20):
            raise SchemaError(f"{path} is a symlink or not a file") from None
        raise RepoError(f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SchemaError(f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise SchemaError(f"{path} is {st.st_size} bytes, limit {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)
    finally:
        os.close(fd)


def load(path: Path) -> Contents:
    """Read a repository or a bundle at ``path`` (no trust decision yet)."""
    if (path / "oci-layout").exists() or (path / "index.json").exists():
        return _load_bundle(path)
    repo = Repo(path)
    if not repo.exists():
        raise RepoError(f"{path} is neither a p2pupd repository nor a bundle")
    releases = []
    for comp in repo.components():
        for serial in repo.serials(comp):
            for platform in repo.platforms(comp, serial):
                data = repo.release_bytes(comp, serial, platform)
                env = Envelope.decode(data, limits.MAX_MANIFEST_BYTES)
                releases.append((Manifest.decode(env.payload), env, data))
    return Contents("repository", repo.roots(), releases, path / "blobs" / "sha256")


def _load_bundle(path: Path) -> Contents:
    oci.parse_layout(_read_member(path / "oci-layout", 4096))
    index = oci.parse_index(_read_member(path / "index.json", limits.MAX_INDEX_BYTES))
    blob_dir = path / "blobs" / "sha256"

    def blob(digest: bytes, size: int) -> bytes:
        data = _read_member(blob_dir / digest.hex(), size)
        if len(data) != size or hashlib.sha256(data).digest() != digest:
            raise HashMismatchError(  # the words ``import`` uses (bundles/reader.py)
                f"bundle blob {digest.hex()[:16]} does not match its sha256 (damaged or tampered)"
            )
        return data

    if sealed.is_sealed(index):
        header, _, _ = sealed.parse_sealed_artifact(blob(index[0].digest, index[0].size))
        recipients = sealed.Header.decode(blob(header.digest, header.size)).recipients
        raise NotMemberError(
            f"{path} is a sealed bundle for site(s) "
            f"{', '.join(r.recipient[:16] for r in recipients)}: only a member node can open "
            "it (`p2pupd import` there)"
        )

    roots: dict[int, bytes] = {}
    envelopes: list[bytes] = []
    patched: list[PatchedRelease] = []
    carried: dict[bytes, int] = {}
    for d in index:
        carried[d.digest] = d.size
        art = oci.parse_artifact(blob(d.digest, d.size))
        for layer in art.layers:
            carried[layer.digest] = layer.size
        if art.artifact_type == oci.TRUST_ARTIFACT:
            for layer in art.layers:
                data = blob(layer.digest, layer.size)
                env = Envelope.decode(data, limits.MAX_ROOT_BYTES)
                roots[_root(env).version] = data
        elif art.artifact_type == oci.RELEASE_ARTIFACT:
            first = art.layers[0]
            patch = oci.release_patch(art)
            if patch is not None:
                ann = art.annotations
                patched.append(PatchedRelease(
                    ann.get(oci.ANNOTATION_COMPONENT, "?"), ann.get(oci.ANNOTATION_VERSION, "?"),
                    patch, blob(first.digest, first.size),
                ))  # fmt: skip
                continue
            envelopes.append(blob(first.digest, first.size))
    own = _own_chain(roots)
    releases = [_release(data, own) for data in envelopes]
    carried[oci.empty_descriptor().digest] = len(oci.EMPTY_JSON)
    return Contents("bundle", roots, releases, blob_dir, carried, patched)


def _root(env: Envelope) -> Root:
    """The root an (unverified) root envelope holds, decoded within ``limits.ROOT_BUDGET``."""
    return Root.from_value(encoding.decode(env.payload, budget=limits.ROOT_BUDGET))


def _own_chain(roots: dict[int, bytes]) -> TrustedRoot | None:
    """The bundle's own root v1 rotated as far as its roots go, or None without a v1."""
    if 1 not in roots:
        return None
    return TrustedRoot.load(roots[1]).walk(roots, None, {})


def _release(data: bytes, own: TrustedRoot | None) -> tuple[Manifest, Envelope, bytes]:
    """Decode a bundle's release envelope for display.

    With the bundle's own root chain the payload is decoded only once its
    signatures verify under it (a release no root of the bundle signed is
    refused before it costs anything); without one -- a bundle carrying no
    root v1 -- within ``limits.MANIFEST_BUDGET``.
    """
    if own is not None:
        man, env = own.verify_release(data, None)
        return man, env, data
    env = Envelope.decode(data, limits.MAX_MANIFEST_BYTES)
    return Manifest.decode(env.payload), env, data


def resolve(c: Contents, basis: Basis) -> None:
    """Rebuild the patched releases of ``c`` whose base ``basis`` holds (in place).

    A rebuilt envelope joins ``c.releases`` (still unverified: ``verify``
    judges it like any other); the rest stay in ``c.patched``. Raises
    ``HashMismatchError`` for a patch that does not make the envelope it names.
    """
    left: list[PatchedRelease] = []
    for p in c.patched:
        base = next(
            (e for e in basis.envelopes(p.component) if ids.sha256(e) == p.patch.base), None
        )
        if base is None:
            left.append(p)
            continue
        data = api.rebuild_envelope(base, p.blob, p.patch, p.label)
        man, env, _ = _release(data, _own_chain(c.roots))
        c.releases.append((man, env, data))
        c.rebuilt[env.payload_digest()] = p.base_label
    c.patched = left


def node_basis(state_dir: Path) -> Basis:
    """What the node at ``state_dir`` holds (read-only; no lock taken)."""
    node = api.open_node(state_dir)

    def envelopes(component: str) -> Iterator[bytes]:
        for serial in reversed(node.releases.serials(component)):
            with contextlib.suppress(P2pupdError):
                yield node.releases.get_bytes(component, serial)

    return Basis(f"node {state_dir}", envelopes, node.trust_store.history(),
                 node.trusted_root().encode())  # fmt: skip


def repo_basis(path: Path) -> Basis:
    """What the publisher's repository at ``path`` holds: every release it published."""
    repo = Repo(path)
    repo.require()

    def envelopes(component: str) -> Iterator[bytes]:
        for serial in reversed(repo.serials(component)):
            for platform in repo.platforms(component, serial):
                with contextlib.suppress(P2pupdError):
                    yield repo.release_bytes(component, serial, platform)

    return Basis(f"repository {path}", envelopes, repo.roots())


def _shown(text: str) -> str:
    """An unsigned annotation as it may appear in a one-line message."""
    return text if text.isprintable() and len(text) <= 64 else repr(text[:64])


def describe(c: Contents) -> dict[str, Any]:
    """The ``show --json`` document."""
    roots = []
    for v, data in sorted(c.roots.items()):
        root = _root(Envelope.decode(data, limits.MAX_ROOT_BYTES))
        roots.append({
            "version": v,
            "name": root.name,
            "expires": root.expires,
            "roles": {r: {"threshold": role.threshold, "keyids": list(role.keyids)}
                      for r, role in root.roles.items()},
        })  # fmt: skip
    rels = []
    for man, env, _ in sorted(c.releases, key=lambda r: (r[0].component, r[0].serial)):
        rels.append({
            "component": man.component,
            "version": man.version,
            "serial": man.serial,
            "platform": man.platform,
            "created": man.created,
            "expires": man.expires,
            "files": len(man.files),
            "bytes": man.total_size(),
            "chunks": len(man.chunk_digests()),
            "deltas": len(man.deltas),
            "hooks": sorted(man.hooks),
            "rollout": man.rollout.text() if man.rollout else None,
            "signatures": [k for k, _ in env.signatures],
            "digest": env.payload_digest().hex(),
            "patch_against": c.rebuilt.get(env.payload_digest()),
        })  # fmt: skip
    unread = [{"component": p.component, "version": p.version, "patch_against": p.base_label}
              for p in c.patched]  # fmt: skip
    return {"kind": c.kind, "roots": roots, "releases": rels, "patched_releases": unread}


def verify(
    c: Contents, trust: bytes | None, now: int | None, held: Basis | None = None
) -> dict[str, Any]:
    """Verify everything in ``c``; raise the first refusal, else return a summary.

    ``held`` (a node's or the repository's holdings, see ``resolve``) also
    supplies roots a bundle leaves out and, for a node, the root to start
    from. Raises ``UnverifiedError`` last if a patched release stays unread.
    """
    pinned = dict(held.roots) if held is not None else {}
    if trust is not None:
        trusted = TrustedRoot.load(trust, now)
        pinned[trusted.version] = trust
        basis = "given root"
    elif held is not None and held.pinned is not None:
        trusted = TrustedRoot.load(held.pinned, now)
        basis = f"the pinned root of {held.name}"
    else:
        first = c.roots.get(1) or pinned.get(1)
        if first is None:
            raise SchemaError(
                "no root v1 to start from (a bundle cut for a node leaves out the roots it "
                "trusts); pass --trust ROOTFILE, --state-dir or --repo"
            )
        trusted = TrustedRoot.load(first, now)
        whose = "its own" if 1 in c.roots else f"{held.name if held else 'the'}'s"
        basis = f"{whose} root v1 (internal consistency only)"
    # The same rules as ``import``; roots the bundle leaves out come from ``held``.
    trusted = trusted.walk({**pinned, **c.roots}, now, pinned)
    blobs = 0
    needed: dict[bytes, int] = {}
    # A bundle's releases arrive at a node: they must verify under the newest
    # root, unexpired, as ``import`` judges them. A repository's are the
    # publisher's own, held like a node's: each under the root it was signed
    # under, unless a later root revokes its key.
    chain = TrustChain.from_history(c.roots, trusted) if c.kind == "repository" else None
    for man, _, data in c.releases:
        if chain is not None:
            chain.verify_held(data, man.component)
        else:
            trusted.verify_release(data, now, man.component)
        needed.update(man.blob_sizes())
    if c.kind == "repository":
        for dg, size in needed.items():
            _check_blob(c.blob_dir / dg.hex(), dg, size, bundle=False)
            blobs += 1
    else:
        for dg, size in c.carried.items():
            _check_blob(c.blob_dir / dg.hex(), dg, size, bundle=True)
            blobs += 1
        try:
            names = os.listdir(c.blob_dir)
        except OSError as exc:
            raise RepoError(f"cannot list {c.blob_dir}: {exc.strerror}") from None
        extra = sorted(n for n in names if not n.startswith(".") and _digest_of(n) not in c.carried)
        if extra:
            raise SchemaError(
                f"bundle holds {len(extra)} unreferenced blob(s), e.g. {extra[0][:16]}"
            )
    if c.patched:
        where = "" if held is None else f" ({held.name} does not hold it)"
        what = "; ".join(f"{p.label} is a patch against {p.base_label}" for p in c.patched)
        raise UnverifiedError(
            f"not verified: {what}{where}; roots and {blobs} blob(s) were checked, but a "
            "release needs its base: --state-dir of a node that holds it, or --repo REPO"
        )
    return {"root_version": trusted.version, "basis": basis, "releases": len(c.releases),
            "blobs_checked": blobs, "patched_releases": len(c.rebuilt)}  # fmt: skip


def _digest_of(name: str) -> bytes | None:
    try:
        return bytes.fromhex(name) if len(name) == 64 else None
    except ValueError:
        return None


def _check_blob(path: Path, digest: bytes, size: int, *, bundle: bool) -> None:
    h = hashlib.sha256()
    n = 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SchemaError(f"blob {digest.hex()[:16]} is missing") from None
    except OSError as exc:
        raise SchemaError(f"blob {digest.hex()[:16]} cannot be read: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SchemaError(f"blob {digest.hex()[:16]} is not a regular file")
        while block := os.read(fd, READ_BLOCK):
            n += len(block)
            if n > size:
                break
            h.update(block)
    finally:
        os.close(fd)
    if n != size or h.digest() != digest:
        what = "bundle blob" if bundle else "blob"  # as ``import`` says (store/spool.py)
        raise HashMismatchError(f"{what} {digest.hex()[:16]} does not match its sha256")


__all__ = ["Basis", "CodecError", "Contents", "describe", "load", "resolve", "verify"]
