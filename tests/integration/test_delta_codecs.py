"""Both delta codecs end to end through the command line: v1 installed, v2
published with patches from bsdiff4 (small text edits) and hdiffpatch (binary
files, whole and per chunk run), imported from a delta-only bundle and applied
byte for byte. A patch made by a codec this node does not know, and an
hdiffpatch patch that is well formed but builds the wrong bytes, are refused
with one line (exit 3), and the installed version, its tree and the node's
state stay as they were."""

from __future__ import annotations

import random

import pytest
import zstandard
from conftest import World, state_snapshot, tree_snapshot

from p2pupd.protocol import limits
from p2pupd.protocol.deltaplan import (
    KIND_ZCHUNK,
    PATCH2_MAGIC,
    Codec,
    Packing,
    needed_blobs,
    parse_patch_header,
)
from p2pupd.protocol.patchcodec import EncodedPatch, encode_as
from p2pupd.protocol.varint import encode_uvarint
from p2pupd.tools.publisher import deltas
from p2pupd.tools.publisher.repo import Repo

WHOLE_FILE_LIMIT = 1 << 20  # "img" (3 MB) per chunk run; the rest whole


def binary(seed: int, size: int) -> bytes:
    r = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        if r.random() < 0.5:
            out += r.randbytes(r.randint(100, 3000))
        else:
            out += b"sym_%d\0" % r.randint(0, 9999) * r.randint(1, 30)
    return bytes(out[:size])


def edit(data: bytes, seed: int, places: int) -> bytes:
    r = random.Random(seed)
    out = bytearray(data)
    for _ in range(places):
        p = r.randrange(len(out) - 600)
        out[p : p + 300] = r.randbytes(300)
    return bytes(out)


CONF = b"".join(b"option_%d = %d\n" % (i, i * 7) for i in range(120))
IMG, LIB = binary(1, 3_000_000), binary(2, 600_000)
V1 = {"etc/app.conf": CONF, "lib/libcore.so": LIB, "img": IMG}
V2 = {
    "etc/app.conf": CONF.replace(b"option_17 = 119", b"option_17 = 120"),
    "lib/libcore.so": edit(LIB, 3, places=6),
    "img": edit(IMG, 4, places=10),
}


def codecs_of(repo: Repo, patches: set[bytes]) -> set[tuple[Codec, Packing]]:
    return {
        (h.codec, h.packing) for h in (parse_patch_header(repo.store.get_bytes(p)) for p in patches)
    }


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "WHOLE_FILE_DELTA_MAX_BYTES", WHOLE_FILE_LIMIT)


def install_v1(w: World) -> None:
    w.publish("1.0", V1)
    r = w.import_(w.export("usb1"), "--apply")
    assert r.code == 0, r.err


@pytest.mark.usefixtures("limit")
def test_bundle_mixing_both_codecs_is_applied(world: World) -> None:
    w = world
    install_v1(w)
    w.publish("2.0", V2)
    repo = Repo(w.repo)
    m1 = repo.release("app", 1)[0]
    m2 = repo.release("app", 2)[0]
    assert {d.kind for d in m2.deltas} >= {"file", "chunk"}
    # What a node at v1 receives holds patches of both codecs.
    need = needed_blobs(m2, [m1], lambda _d: False)
    patches = {d.patch for d in m2.deltas if d.kind != KIND_ZCHUNK and d.patch in need}
    used = {codec for codec, _packing in codecs_of(repo, patches)}
    assert used == {Codec.BSDIFF4, Codec.HDIFFPATCH}

    r = w.import_(w.export("usb2", "--from-version", "1.0"), "--apply")
    assert r.code == 0, r.err
    assert tree_snapshot(w.target) == tree_snapshot(w.base / "src" / "2.0")
    assert w.app_status()["version"] == "2.0"


def publish_v2_with(w: World, monkeypatch: pytest.MonkeyPatch, encoder: object) -> None:
    """Publish v2 with ``encoder`` in place of the publisher's choice of patch."""
    with monkeypatch.context() as m:
        m.setattr(deltas, "encode_best", encoder)
        w.publish("2.0", V2)


def assert_refused_and_unchanged(w: World, *words: str) -> None:
    assert w.import_(w.export("usb2", "--from-version", "1.0")).code == 0
    state0, tree0 = state_snapshot(w.state), tree_snapshot(w.target)
    r = w.run("apply", "app", "--state-dir", w.state)
    assert r.code == 3, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), r.err
    # Tree, blobs, trusted releases and component state as they were; only
    # the journal has a line more, for the aborted attempt.
    assert tree_snapshot(w.target) == tree0
    state1 = state_snapshot(w.state)
    journal = "journal/app.log"
    assert {k: v for k, v in state1.items() if k != journal} == {
        k: v for k, v in state0.items() if k != journal
    }
    assert w.app_status()["version"] == "1.0"
    assert not list(w.target.parent.glob(".app.p2pupd-stage*"))


def test_patch_from_an_unknown_codec_is_refused(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_v1(world)

    def newer_publisher(old: bytes, new: bytes, *_a: object, **_k: object) -> EncodedPatch:
        # A codec id this node has never heard of (a newer publisher's).
        head = PATCH2_MAGIC + bytes((9, Packing.ZSTD)) + encode_uvarint(len(new)) * 2
        body = zstandard.ZstdCompressor().compress(b"")
        return EncodedPatch(head + body, Codec.HDIFFPATCH, Packing.ZSTD)

    publish_v2_with(world, monkeypatch, newer_publisher)
    assert_refused_and_unchanged(world, "cannot build ", "codec 9", "upgrade")


@pytest.mark.usefixtures("limit")
def test_wrong_hdiffpatch_patch_is_a_hash_mismatch(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_v1(world)

    def wrong_bytes(old: bytes, new: bytes, *_a: object, **_k: object) -> EncodedPatch | None:
        # Well formed in every header and size, but for bytes one bit off.
        off = bytearray(new)
        off[len(off) // 2] ^= 1
        data = encode_as(old, bytes(off), Codec.HDIFFPATCH, Packing.LZMA2)
        return EncodedPatch(data, Codec.HDIFFPATCH, Packing.LZMA2)

    publish_v2_with(world, monkeypatch, wrong_bytes)
    assert_refused_and_unchanged(world, "does not match")
