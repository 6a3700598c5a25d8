"""The OCI side of the bundle format: parsers refuse anything out of bounds (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from p2pupd.protocol import bundle as oci
from p2pupd.protocol import ids
from p2pupd.protocol.errors import CodecError, FrameTooLargeError, NewerFormatError, SchemaError
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


# -- packs ---------------------------------------------------------------------------


def test_pack_round_trip_names_entries_by_their_bytes() -> None:
    blobs = [b"first", b"", b"x" * oci.PACK_BLOB_MAX_BYTES]
    data = oci.build_pack(blobs)
    entries = oci.pack_entries(data)
    assert [data[e.offset : e.offset + e.size] for e in entries] == blobs
    assert [e.digest for e in entries] == [ids.sha256(b) for b in blobs]
    assert len(data) == len(oci.PACK_MAGIC) + 1 + sum(oci.packed_bytes(len(b)) for b in blobs)


def test_pack_builder_refuses_what_a_reader_would() -> None:
    with pytest.raises(ValueError, match="not 0"):
        oci.build_pack([])
    with pytest.raises(ValueError, match="at most"):
        oci.build_pack([bytes(oci.PACK_BLOB_MAX_BYTES + 1)])
    with pytest.raises(ValueError, match="not 16385"):
        oci.build_pack([bytes(1)] * (oci.MAX_PACK_ENTRIES + 1))
    with pytest.raises(ValueError, match="at most"):  # 257 entries of 16 KiB: over 4 MiB
        oci.build_pack([bytes(oci.PACK_BLOB_MAX_BYTES)] * 257)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "magic"),
        (b"P2PX\x01\x01a", "magic"),
        (oci.PACK_MAGIC, "truncated"),
        (oci.PACK_MAGIC + b"\x02\x01", "truncated"),  # second size missing
        (oci.PACK_MAGIC + b"\x01\x02a", "add up to 2 bytes, the pack holds 1"),
        (oci.PACK_MAGIC + b"\x01\x01ab", "add up to 1 bytes, the pack holds 2"),
        (oci.PACK_MAGIC + b"\x00", "0 entries"),
        (oci.PACK_MAGIC + b"\x81\x80\x01", "16385 entries"),
        (oci.PACK_MAGIC + b"\x01\x81\x80\x01", "16385 bytes exceeds"),
        (oci.PACK_MAGIC + b"\x01\x80\x80\x80\x80\x00", "malformed"),  # a 5-byte varint
    ],
)
def test_pack_parser_bounds(data: bytes, words: str) -> None:
    with pytest.raises(SchemaError, match=words):
        oci.parse_pack(data)


def test_pack_parser_refuses_oversized_packs_and_twins() -> None:
    with pytest.raises(SchemaError, match="exceeds limit"):
        oci.parse_pack(oci.PACK_MAGIC + bytes(oci.MAX_PACK_BYTES))
    with pytest.raises(SchemaError, match="twice"):
        oci.pack_entries(oci.build_pack([b"same", b"same"]))


def test_release_artifact_pack_layers() -> None:
    rel = desc(1, oci.RELEASE_MEDIA_TYPE)
    ok = oci.parse_artifact(artifact(oci.RELEASE_ARTIFACT, rel, desc(2, oci.PACK_MEDIA_TYPE)))
    assert ok.layers[1].media_type == oci.PACK_MEDIA_TYPE
    for size in (0, oci.MAX_PACK_BYTES + 1):
        with pytest.raises(SchemaError, match="out of bounds"):
            oci.parse_artifact(
                artifact(oci.RELEASE_ARTIFACT, rel, desc(2, oci.PACK_MEDIA_TYPE, size=size))
            )
    with pytest.raises(SchemaError, match="start with"):
        oci.parse_artifact(artifact(oci.RELEASE_ARTIFACT, desc(2, oci.PACK_MEDIA_TYPE)))


def test_pack_entries_must_be_blobs_of_the_signed_manifest() -> None:
    env = oci.Descriptor(oci.RELEASE_MEDIA_TYPE, d(9), 100)
    pack = oci.Descriptor(oci.PACK_MEDIA_TYPE, d(30), 50)
    art = oci.Artifact(oci.RELEASE_ARTIFACT, (env, pack), {})

    def check(*entries: tuple[bytes, int], extra: tuple[oci.Descriptor, ...] = ()) -> object:
        a = oci.Artifact(oci.RELEASE_ARTIFACT, (*art.layers, *extra), {})
        listed = [oci.PackEntry(dg, 0, n) for dg, n in entries]
        return oci.check_release_layers(a, MAN, {pack.digest: listed})

    assert check((d(4), 7), (d(5), 3)) == {d(4): 7, d(5): 3}
    with pytest.raises(SchemaError, match=r"pack entry \w+ is not part of the signed release"):
        check((d(8), 7))
    with pytest.raises(SchemaError, match="claims 8 bytes"):
        check((d(4), 8))
    with pytest.raises(SchemaError, match="twice"):
        check((d(4), 7), extra=(oci.Descriptor(oci.ZCHUNK_MEDIA_TYPE, d(4), 7),))
    with pytest.raises(SchemaError, match="was not read"):
        oci.check_release_layers(art, MAN, {})


def test_zstd_release_patch_layer() -> None:
    ann = {
        oci.ANNOTATION_PATCH_BASE: "sha256:" + "11" * 32,
        oci.ANNOTATION_PATCH_RESULT: "sha256:" + "22" * 32,
        oci.ANNOTATION_PATCH_RESULT_SIZE: "1000",
    }
    layer = oci.Descriptor(oci.RELEASE_ZPATCH_MEDIA_TYPE, d(9), 100, ann)
    art = oci.Artifact(oci.RELEASE_ARTIFACT, (layer,), {oci.ANNOTATION_COMPONENT: "app"})
    got = oci.release_patch(oci.parse_artifact(oci.build_artifact(art)))
    assert got is not None and got.media_type == oci.RELEASE_ZPATCH_MEDIA_TYPE
    assert got.result_size == 1000


# -- the format version -------------------------------------------------------------


def marked(fmt: str, writer: str | None = None) -> bytes:
    ann = {oci.ANNOTATION_FORMAT: fmt, **({oci.ANNOTATION_WRITER: writer} if writer else {})}
    return json.dumps({"schemaVersion": 2, "manifests": [desc(1)], "annotations": ann}).encode()


def test_index_carries_its_format_and_writer() -> None:
    idx = json.loads(oci.build_index([], (1, 0), "p2pupd 9.9"))
    assert idx["annotations"] == {oci.ANNOTATION_FORMAT: "1.0", oci.ANNOTATION_WRITER: "p2pupd 9.9"}


def test_a_newer_major_format_is_refused_first_naming_who_wrote_it() -> None:
    # Refused before anything else is looked at: a newer bundle may hold anything
    # (here an index entry of a media type this reader does not know).
    doc = json.loads(marked("3.0", "p2pupd 3.1"))
    doc["manifests"] = [desc(1, mt="application/vnd.p2pupd.future")]
    with pytest.raises(NewerFormatError) as err:
        oci.parse_index(json.dumps(doc).encode())
    assert str(err.value).startswith(
        "bundle format 3.0 (written by 'p2pupd 3.1') is newer than this p2pupd reads "
        "(formats up to 2.x)"
    )
    assert "\n" not in str(err.value)


def test_a_newer_minor_format_and_an_unmarked_index_are_read() -> None:
    assert [x.digest for x in oci.parse_index(marked("1.7"))] == [d(1)]
    assert oci.check_format({}) == (1, 0)  # written before the marker existed
    assert oci.check_format({oci.ANNOTATION_FORMAT: "1.3"}) == (1, 3)


@pytest.mark.parametrize("bad", ["1", "x.0", "01.0", "1.0.0", "-1.0", "1.00", "99999.0", ""])
def test_a_malformed_format_marker_is_malformed_input(bad: str) -> None:
    with pytest.raises(SchemaError, match="bundle format"):
        oci.parse_index(marked(bad))


def test_writer_puts_the_oldest_format_that_carries_the_content() -> None:
    layers = (oci.Descriptor(oci.RELEASE_MEDIA_TYPE, d(9), 100),)
    plain = oci.Artifact(oci.RELEASE_ARTIFACT, layers, {})
    assert oci.format_needed([plain]) == (1, 0)
    # A feature registers the format that introduced it; the writer then needs it.
    future = oci.Artifact(oci.RELEASE_ARTIFACT, (*layers, oci.Descriptor("x/new", d(1), 5)), {})
    with pytest.raises(ValueError, match="no bundle format defines 'x/new'"):
        oci.format_needed([future])
    oci.FORMAT_OF["x/new"] = (3, 0)
    try:
        assert oci.format_needed([plain, future]) == (3, 0)
        assert oci.format_needed([plain]) == (1, 0)
    finally:
        del oci.FORMAT_OF["x/new"]
