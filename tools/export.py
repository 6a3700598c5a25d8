"""Bundle export: write releases and their blobs as an OCI image layout.

The bundle holds the whole root chain (so a node pinned to any older root can
walk forward), the newest release of each chosen component, and the blobs those
releases need. Blobs go in first and ``index.json`` last, each written with
temp + fsync + rename, so a stick pulled out mid-export holds either no index
(refused as incomplete) or a complete bundle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from p2pupd.daemon.api import BlobStore, atomic_write
from p2pupd.protocol import bundle as oci
from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import Envelope, Root

from .repo import RepoError


@dataclass
class ExportReport:
    releases: list[tuple[str, str, int]] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class ReleaseSource:
    """One release to export: its envelope, manifest, and which blobs to carry."""

    manifest: Manifest
    envelope: Envelope
    blobs: dict[bytes, int]


def write_bundle(
    dest: Path,
    roots: dict[int, bytes],
    releases: Iterable[ReleaseSource],
    source: BlobStore,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write a bundle into ``dest`` (created if needed). See module doc."""
    report = ExportReport()
    out = BlobStore(dest)
    index: list[oci.Descriptor] = []

    def put_doc(data: bytes) -> oci.Descriptor:
        dg = out.put_bytes(data)
        return oci.Descriptor("", dg, len(data), {})

    root_layers = []
    for v in sorted(roots):
        d = put_doc(roots[v])
        Root.from_value(encoding.decode(Envelope.decode(roots[v], limits.MAX_ROOT_BYTES).payload))
        root_layers.append(
            oci.Descriptor(
                oci.ROOT_MEDIA_TYPE, d.digest, d.size, {oci.ANNOTATION_ROOT_VERSION: str(v)}
            )
        )
    art = oci.build_artifact(oci.Artifact(oci.TRUST_ARTIFACT, tuple(root_layers), {}))
    index.append(_manifest_desc(put_doc(art), {"org.opencontainers.image.ref.name": "trust"}))

    for rel in releases:
        man = rel.manifest
        env_bytes = rel.envelope.encode()
        env_d = put_doc(env_bytes)
        layers = [oci.Descriptor(oci.RELEASE_MEDIA_TYPE, env_d.digest, env_d.size, {})]
        hooks = {h.sha256 for h in man.hooks.values()}
        patches = {d.patch for d in man.deltas}
        for dg, size in sorted(rel.blobs.items()):
            if not out.has(dg):
                try:
                    with source.open(dg) as f:
                        n = out.put_stream(f, dg, size)
                except FileNotFoundError:
                    raise RepoError(
                        f"blob {ids.hexd(dg)[:16]} of {man.component} is missing"
                    ) from None
                report.blobs += 1
                report.bytes += n
                if progress:
                    progress(n)
            mt = (
                oci.HOOK_MEDIA_TYPE
                if dg in hooks
                else oci.PATCH_MEDIA_TYPE
                if dg in patches
                else oci.CHUNK_MEDIA_TYPE
            )
            layers.append(oci.Descriptor(mt, dg, size, {}))
        ann = {
            oci.ANNOTATION_COMPONENT: man.component,
            oci.ANNOTATION_VERSION: man.version,
            oci.ANNOTATION_SERIAL: str(man.serial),
        }
        art = oci.build_artifact(oci.Artifact(oci.RELEASE_ARTIFACT, tuple(layers), ann))
        index.append(
            _manifest_desc(
                put_doc(art),
                {**ann, "org.opencontainers.image.ref.name": f"{man.component}-{man.serial}"},
            )
        )
        report.releases.append((man.component, man.version, man.serial))

    out.clean_tmp()
    with contextlib.suppress(OSError):
        (dest / "tmp").rmdir()  # the writer's scratch dir is not part of the layout
    atomic_write(dest / "oci-layout", oci.OCI_LAYOUT)
    atomic_write(dest / "index.json", oci.build_index(index))
    return report


def _manifest_desc(d: oci.Descriptor, ann: dict[str, str]) -> oci.Descriptor:
    return oci.Descriptor(oci.MANIFEST_MEDIA_TYPE, d.digest, d.size, ann)
