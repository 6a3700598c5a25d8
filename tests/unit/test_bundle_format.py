"""The OCI side of the bundle format: parsers refuse anything out of bounds (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from p2pupd.protocol import bundle as oci
from p2pupd.protocol import ids
from p2pupd.protocol.errors import CodecError, FrameTooLargeError, SchemaError
from p2pupd.protocol.manifest import ChunkRef, Delta, FileEntry, HookRef, Manifest


def d(i: int) -> bytes:
    return ids.sha256(bytes([i]))


def desc(i: int, mt: str = oci.MANIFEST_MEDIA_TYPE, size: int = 10) -> dict[str, Any]:
    return {"mediaType": mt, "digest": f"sha256:{d(i).hex()}", "size": size}


def index(*mans: dict[str, Any]) -> bytes:
    return json.dumps({"schemaVersion": 2, "manifests": list(mans)}).encode()


def artifact(at: str, *layers: dict[str, Any], config: dict[str, Any] | None = None) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "artifactType": at,
            "config": config or oci.empty_descriptor().to_json(),
            "layers": list(layers),
        }
    ).encode()


MAN = Manifest(
    "app",
    "1.0",
    1,
    0,
    (FileEntry("f", 0o644, 30, d(50), 0, (ChunkRef(d(1), 10), ChunkRef(d(2), 20))),),
    hooks={"health": HookRef(d(3), 5)},
    deltas=(Delta("zchunk", d(2), 20, (), d(4), 7), Delta("chunk", d(2), 20, (d(1),), d(5), 3)),
)


def test_built_documents_parse_back() -> None:
    layers = (
        oci.Descriptor(oci.RELEASE_MEDIA_TYPE, d(9), 100),
        oci.Descriptor(oci.CHUNK_MEDIA_TYPE, d(1), 10),
    )
    art = oci.Artifact(oci.RELEASE_ARTIFACT, layers, {oci.ANNOTATION_COMPONENT: "app"})
    got = oci.parse_artifact(oci.build_artifact(art))
    assert got.layers == layers and got.annotations == art.annotations
    assert got.digests() == {d(9), d(1), oci.empty_descriptor().digest}
    idx = oci.build_index([oci.Descriptor(oci.MANIFEST_MEDIA_TYPE, d(7), 5)])
    assert [x.digest for x in oci.parse_index(idx)] == [d(7)]
    oci.parse_layout(oci.OCI_LAYOUT)


@pytest.mark.parametrize(
    "digest",
    ["sha256:../../etc/passwd", "sha256:/etc/passwd", "sha512:" + "a" * 128, "sha256:" + "A" * 64],
)
def test_digests_that_could_name_a_path_are_refused(digest: str) -> None:
    with pytest.raises(CodecError):
        oci.parse_index(index({**desc(1), "digest": digest}))


def test_index_limits() -> None:
    with pytest.raises(SchemaError, match="twice"):
        oci.parse_index(index(desc(1), desc(1)))
    with pytest.raises(SchemaError, match="at most"):
        oci.parse_index(index(*[desc(i % 250, size=i) for i in range(oci.MAX_INDEX_ENTRIES + 1)]))
    with pytest.raises(SchemaError, match="unsupported media type"):
        oci.parse_index(index(desc(1, mt="text/plain")))
    with pytest.raises(FrameTooLargeError):
        oci.parse_index(b" " * (4 * 1024 * 1024 + 1))
    with pytest.raises(SchemaError, match="size"):
        oci.parse_index(index({**desc(1), "size": -1}))
    with pytest.raises(SchemaError, match="annotations"):
        oci.parse_index(index({**desc(1), "annotations": {str(i): "x" for i in range(40)}}))


def test_artifact_shapes() -> None:
    rel = desc(1, oci.RELEASE_MEDIA_TYPE)
    with pytest.raises(SchemaError, match="empty descriptor"):
        oci.parse_artifact(artifact(oci.RELEASE_ARTIFACT, rel, config=desc(2, "application/json")))
    with pytest.raises(SchemaError, match="twice"):
        oci.parse_artifact(
            artifact(
                oci.RELEASE_ARTIFACT,
                rel,
                desc(2, oci.CHUNK_MEDIA_TYPE),
                desc(2, oci.CHUNK_MEDIA_TYPE),
            )
        )
    with pytest.raises(SchemaError, match="start with"):
        oci.parse_artifact(artifact(oci.RELEASE_ARTIFACT, desc(2, oci.CHUNK_MEDIA_TYPE)))
    with pytest.raises(SchemaError, match="unknown media type"):
        oci.parse_artifact(artifact(oci.RELEASE_ARTIFACT, rel, desc(2, "text/plain")))
    with pytest.raises(SchemaError, match="non-root"):
        oci.parse_artifact(artifact(oci.TRUST_ARTIFACT, rel))
    with pytest.raises(SchemaError, match="exactly one"):
        oci.parse_artifact(artifact(oci.REQUEST_ARTIFACT))
    with pytest.raises(SchemaError, match="unknown artifact type"):
        oci.parse_artifact(artifact("application/x-evil", rel))
    req = oci.parse_artifact(artifact(oci.REQUEST_ARTIFACT, desc(3, oci.REQUEST_MEDIA_TYPE)))
    assert req.artifact_type == oci.REQUEST_ARTIFACT


def test_release_layers_must_be_blobs_of_the_signed_manifest() -> None:
    env = oci.Descriptor(oci.RELEASE_MEDIA_TYPE, d(9), 100)

    def art(*layers: oci.Descriptor) -> oci.Artifact:
        return oci.Artifact(oci.RELEASE_ARTIFACT, (env, *layers), {})

    ok = oci.check_release_layers(art(oci.Descriptor(oci.CHUNK_MEDIA_TYPE, d(1), 10)), MAN)
    assert ok == {d(1): 10}
    with pytest.raises(SchemaError, match="not part of the signed release"):
        oci.check_release_layers(art(oci.Descriptor(oci.CHUNK_MEDIA_TYPE, d(8), 10)), MAN)
    with pytest.raises(SchemaError, match="claims 11 bytes"):
        oci.check_release_layers(art(oci.Descriptor(oci.CHUNK_MEDIA_TYPE, d(1), 11)), MAN)


def test_layer_media_types_follow_the_manifest() -> None:
    types = oci.layer_media_types(MAN)
    assert types[d(1)] == oci.CHUNK_MEDIA_TYPE
    assert types[d(3)] == oci.HOOK_MEDIA_TYPE
    assert types[d(4)] == oci.ZCHUNK_MEDIA_TYPE
    assert types[d(5)] == oci.PATCH_MEDIA_TYPE
