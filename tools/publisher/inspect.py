"""``p2pupd show`` and ``p2pupd verify``: look into a repository or a bundle.

Both are read-only. A bundle is read as untrusted (no symlink followed, every
member bounded, names built from parsed digests). ``verify`` checks what a
node would check — the root chain, every release signature, every blob the
releases name present and hashing to its name, and no unreferenced blob —
against a root you give (``--trust``), or else the document's own root v1
(then it only proves internal consistency, and says so).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pupd.protocol import bundle as oci
from p2pupd.protocol import encoding, limits
from p2pupd.protocol.errors import CodecError, HashMismatchError, SchemaError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import Envelope, Root, TrustChain, TrustedRoot
from p2pupd.tools.publisher.repo import Repo, RepoError

READ_BLOCK = 1 << 20


@dataclass
class Contents:
    kind: str  # "repository" | "bundle"
    roots: dict[int, bytes]
    releases: list[tuple[Manifest, Envelope, bytes]]  # manifest, envelope, envelope bytes
    blob_dir: Path
    carried: dict[bytes, int] = field(default_factory=dict)  # bundle: digest -> declared size
    # Bundle releases whose envelope is a patch against one a node holds: they
    # cannot be decoded or verified without that node's copy ("app 2.0").
    patched: list[str] = field(default_factory=list)


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

    roots: dict[int, bytes] = {}
    releases = []
    patched: list[str] = []
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
                roots[Root.from_value(encoding.decode(env.payload)).version] = data
        elif art.artifact_type == oci.RELEASE_ARTIFACT:
            first = art.layers[0]
            patch = oci.release_patch(art)
            if patch is not None:
                ann = art.annotations
                base = patch.base_version or f"serial {patch.base_serial}"
                patched.append(
                    f"{ann.get(oci.ANNOTATION_COMPONENT)} {ann.get(oci.ANNOTATION_VERSION, '?')} "
                    f"(patch against {base})"
                )
                continue
            data = blob(first.digest, first.size)
            env = Envelope.decode(data, limits.MAX_MANIFEST_BYTES)
            releases.append((Manifest.decode(env.payload), env, data))
    carried[oci.empty_descriptor().digest] = len(oci.EMPTY_JSON)
    return Contents("bundle", roots, releases, blob_dir, carried, patched)


def describe(c: Contents) -> dict[str, Any]:
    """The ``show --json`` document."""
    roots = []
    for v, data in sorted(c.roots.items()):
        root = Root.from_value(
            encoding.decode(Envelope.decode(data, limits.MAX_ROOT_BYTES).payload)
        )
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
            "signatures": [k for k, _ in env.signatures],
            "digest": env.payload_digest().hex(),
        })  # fmt: skip
    return {"kind": c.kind, "roots": roots, "releases": rels, "patched_releases": c.patched}


def verify(c: Contents, trust: bytes | None, now: int | None) -> dict[str, Any]:
    """Verify everything in ``c``; raise the first refusal, else return a summary."""
    if trust is not None:
        trusted = TrustedRoot.load(trust, now)
        pinned = {trusted.version: trust}
        basis = "given root"
    else:
        if 1 not in c.roots:
            raise SchemaError("no root v1 to start from; pass --trust ROOTFILE")
        trusted = TrustedRoot.load(c.roots[1], now)
        pinned = {}
        basis = "its own root v1 (internal consistency only)"
    trusted = trusted.walk(c.roots, now, pinned)  # the same rules as ``import``
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
    return {"root_version": trusted.version, "basis": basis, "releases": len(c.releases),
            "blobs_checked": blobs,
            # verified only by a node holding the base envelope (on import)
            "patched_releases_unverified": c.patched}  # fmt: skip


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
        what = "bundle blob" if bundle else "blob"  # as ``import`` says (store/incoming.py)
        raise HashMismatchError(f"{what} {digest.hex()[:16]} does not match its sha256")


__all__ = ["CodecError", "Contents", "describe", "load", "verify"]
