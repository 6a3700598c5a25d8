"""Fuzz targets: every decoder that sees unverified bytes, each with a budget per input.

Seeds are honest documents (a signed root, a release envelope, a request and a
site request, bsdiff and zstd patches, a pack, OCI JSON); hypothesis feeds
each decoder mutations of them, random bytes and hostile shapes (headers
declaring huge containers, deep nesting, dense JSON) and checks the three
rules of ``_fuzz``: typed errors only, peak memory within the stated budget for
that input, and the per-example deadline. The canonical msgpack decoder is also
checked against msgpack-python followed by re-encoding (the decoder it
replaced): both accept exactly the same documents, as the same values.
"""

from __future__ import annotations

import json
import os
from typing import Any

import bsdiff4
import msgpack
from _fuzz import SLACK, decode_cost, fuzz, hostile_msgpack, within_budget
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from p2pupd.daemon.bundles.verify import apply_dict_patch
from p2pupd.daemon.stage.delta import apply_patch
from p2pupd.protocol import bundle as oci
from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.deltaplan import parse_patch_header
from p2pupd.protocol.errors import CodecError, ProtocolError
from p2pupd.protocol.manifest import ChunkRef, FileEntry, Manifest
from p2pupd.protocol.patchcodec import encode_dict_patch, encode_patch
from p2pupd.protocol.request import (
    ComponentHave,
    HeldRelease,
    Request,
    sign_request,
    sign_site_request,
    verify_any_request,
)
from p2pupd.protocol.trust import (
    RELEASE_TYPE,
    ROOT_TYPE,
    Envelope,
    Role,
    Root,
    TrustedRoot,
    key_id,
    sign,
)

KiB, MiB = limits.KiB, limits.MiB


# -- seeds: honest documents ------------------------------------------------------


def _key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)


def _pub(i: int) -> bytes:
    return _key(i).public_key().public_bytes_raw()


_ROOT = Root(
    1,
    {key_id(_pub(i)): _pub(i) for i in (1, 2)},
    {"root": Role((key_id(_pub(1)),), 1), "release": Role((key_id(_pub(2)),), 1)},
)
ROOT = sign(ROOT_TYPE, _ROOT.encode(), [_key(1)]).encode()
_FILE = ids.sha256(b"f")
MANIFEST = Manifest(
    "app", "1.0", 3, 0, (FileEntry("bin/f", 0o755, 5, _FILE, 0, (ChunkRef(_FILE, 5),)),)
)
RELEASE = sign(RELEASE_TYPE, MANIFEST.encode(), [_key(2)]).encode()


def _request(i: int) -> bytes:
    req = Request(
        node_id=bytes([i]) * 16,
        node_key=_pub(10 + i),
        repository="p2pupd",
        root_version=1,
        root_digest=ids.sha256(b"root"),
        platform="linux-x86_64",
        created=1,
        components=(ComponentHave("app", 1, 1),),
        releases=(HeldRelease("app", 1, ids.sha256(b"r"), True, True),),
        extra_blobs=(ids.sha256(b"x"), ids.sha256(b"y")),
    )
    return sign_request(req, _key(10 + i))


REQUEST = _request(1)
SITE_REQUEST = sign_site_request(REQUEST, [_request(2)], _key(11))

_OLD = os.urandom(3000)
_NEW = _OLD[:1000] + b"changed" + _OLD[1500:] + os.urandom(200)
PATCH = encode_patch(_OLD, _NEW)
DICT_PATCH = encode_dict_patch(RELEASE, RELEASE[:-10] + b"0123456789")
PACK = oci.build_pack([b"alpha", b"beta", b"x" * 300, bytes(range(256))])

_LAYER = oci.Descriptor(oci.CHUNK_MEDIA_TYPE, ids.sha256(b"c"), 5)
_FIRST = oci.Descriptor(oci.RELEASE_MEDIA_TYPE, ids.sha256(RELEASE), len(RELEASE))
ARTIFACT = oci.build_artifact(
    oci.Artifact(oci.RELEASE_ARTIFACT, (_FIRST, _LAYER), {oci.ANNOTATION_COMPONENT: "app"})
)
INDEX = oci.build_index(
    [
        oci.Descriptor(
            oci.MANIFEST_MEDIA_TYPE,
            ids.sha256(ARTIFACT),
            len(ARTIFACT),
            {oci.ANNOTATION_COMPONENT: "app", oci.ANNOTATION_REF_NAME: "app-3"},
        )
    ]
)


# -- input strategies --------------------------------------------------------------

# Bytes that make msgpack and our headers interesting: big container and
# str/bin headers, ext and float codes, the never-used 0xc1, extremes.
_INTERESTING = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xC1, 0xC4, 0xC6, 0xCA, 0xCB, 0xD4,
                0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """One of ``seeds`` with a few bit flips, insertions, deletions, cuts and splices."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == 3:
            del data[pos:]
        elif data:
            data[pos] = draw(st.sampled_from(_INTERESTING))
    return bytes(data)


def inputs(*seeds: bytes) -> st.SearchStrategy[bytes]:
    return mutated(list(seeds)) | st.binary(max_size=512) | hostile_msgpack


def json_cost(budget: limits.JsonBudget, n: int) -> int:
    return 3 * n + budget.values_allowed(n) * limits.JSON_VALUE_BYTES + SLACK


# -- msgpack ---------------------------------------------------------------------


def _old_decode(data: bytes) -> Any:
    """The decoder this one replaced: msgpack-python, a type walk, a re-encoding."""
    value = msgpack.unpackb(
        data, raw=False, strict_map_key=True, max_str_len=limits.MAX_STR_BYTES,
        max_bin_len=limits.MAX_BIN_BYTES, max_array_len=limits.MAX_CONTAINER_LEN,
        max_map_len=limits.MAX_CONTAINER_LEN, max_ext_len=0,
    )  # fmt: skip

    def walk(v: Any) -> None:
        if isinstance(v, float):
            raise ValueError("float")
        for child in v.values() if isinstance(v, dict) else v if isinstance(v, list) else ():
            walk(child)

    walk(value)
    if encoding.encode(value) != data:
        raise ValueError("not canonical")
    return value


scalars = (
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.text(max_size=20) | st.binary(max_size=20)
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
    max_leaves=30,
)


@fuzz(60)
@given(st.one_of(values.map(encoding.encode).flatmap(lambda b: mutated([b])), inputs(ROOT)))
def test_canonical_decoder_accepts_what_msgpack_and_reencoding_accepted(data: bytes) -> None:
    try:
        old: Any = _old_decode(data)
    except Exception:
        old = CodecError
    try:
        new: Any = encoding.decode(data)
    except ProtocolError:
        new = CodecError
    assert new == old or (new is CodecError and _depth(old) > limits.MAX_NESTING_DEPTH - 1)


def _depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    return 0


BUDGETS = [
    limits.ENVELOPE_BUDGET,
    limits.ROOT_BUDGET,
    limits.FRAME_BUDGET,
    limits.REQUEST_BUDGET,
    limits.DecodeBudget(4 * KiB, 50, 3, 8, 16, 64, "tiny"),
]


@fuzz(30)
@given(st.sampled_from(BUDGETS), inputs(ROOT, RELEASE, REQUEST))
def test_decoding_any_bytes_stays_within_its_budget(
    budget: limits.DecodeBudget, data: bytes
) -> None:
    within_budget(lambda: encoding.decode(data, budget=budget), decode_cost(budget, len(data)))


@fuzz(30)
@given(inputs(ROOT, RELEASE, REQUEST, SITE_REQUEST))
def test_envelope(data: bytes) -> None:
    cost = 3 * len(data) + limits.ENVELOPE_MAX_OBJECTS * limits.DECODED_OBJECT_BYTES + SLACK
    within_budget(lambda: Envelope.decode(data, limits.MAX_MANIFEST_BYTES), cost)


@fuzz(30)
@given(inputs(ROOT))
def test_root(data: bytes) -> None:
    within_budget(
        lambda: TrustedRoot.load(data), 3 * len(data) + decode_cost(limits.ROOT_BUDGET, len(data))
    )


@fuzz(30)
@given(inputs(RELEASE))
def test_release_envelope_against_a_root(data: bytes) -> None:
    trusted = TrustedRoot.load(ROOT)
    # Decoded only once the signature over the raw payload verified.
    within_budget(lambda: trusted.verify_release(data, None), 4 * len(data) + SLACK + 64 * KiB)


@fuzz(30)
@given(inputs(REQUEST, SITE_REQUEST))
def test_request_files(data: bytes) -> None:
    within_budget(
        lambda: verify_any_request(data),
        3 * len(data) + decode_cost(limits.REQUEST_BUDGET, len(data)),
    )


# -- patches ----------------------------------------------------------------------


@fuzz(40)
@given(inputs(PATCH, bsdiff4.diff(_OLD, _NEW)))
def test_patches(data: bytes) -> None:
    """A patch decompresses to at most 3x its target, whatever its header says."""
    target = len(_NEW)
    within_budget(lambda: apply_patch(_OLD, data, target), 2 * len(data) + 5 * target + SLACK)


@fuzz(30)
@given(st.binary(max_size=40) | mutated([PATCH[:24]]))
def test_patch_headers(data: bytes) -> None:
    within_budget(lambda: parse_patch_header(data), SLACK)


@fuzz(30)
@given(inputs(DICT_PATCH), st.integers(1, 2 * len(RELEASE)))
def test_dictionary_patches(data: bytes, size: int) -> None:
    within_budget(lambda: apply_dict_patch(RELEASE, data, size), 2 * len(data) + size + SLACK)


# -- packs and OCI JSON ----------------------------------------------------------------


@fuzz(30)
@given(inputs(PACK), st.booleans())
def test_packs(data: bytes, against_a_manifest: bool) -> None:
    named = {ids.sha256(b"alpha"): 5, ids.sha256(b"beta"): 4} if against_a_manifest else None
    within_budget(lambda: oci.pack_entries(data, named), 3 * len(data) + SLACK)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**20) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=12), c, max_size=5),
    max_leaves=40,
)
json_docs = (
    json_values.map(lambda v: json.dumps(v).encode())
    | st.integers(1, 3000).map(lambda n: b'{"layers":[' + b",".join([b"{}"] * n) + b"]}")
    | st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)
    | mutated([ARTIFACT, INDEX, oci.OCI_LAYOUT])
)
PARSERS = {
    "index": (oci.parse_index, limits.INDEX_JSON_BUDGET),
    "artifact": (oci.parse_artifact, limits.ARTIFACT_JSON_BUDGET),
    "layout": (oci.parse_layout, limits.OCI_LAYOUT_JSON_BUDGET),
}


@fuzz(40)
@given(st.sampled_from(sorted(PARSERS)), json_docs)
def test_oci_json(name: str, data: bytes) -> None:
    parse, budget = PARSERS[name]
    within_budget(lambda: parse(data), json_cost(budget, len(data)))
