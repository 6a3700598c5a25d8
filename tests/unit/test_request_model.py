"""The request file model and the publisher's plan for it (pure, no I/O)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from p2pupd.protocol import encoding, ids
from p2pupd.protocol.errors import (
    BadSignatureError,
    CodecError,
    MixAndMatchError,
    P2pupdError,
    SchemaError,
    UnknownKeyError,
)
from p2pupd.protocol.manifest import ChunkRef, Delta, FileEntry, Manifest
from p2pupd.protocol.request import (
    REQUEST_TYPE,
    BundlePlan,
    ComponentHave,
    HeldRelease,
    Request,
    check_request_is_ours,
    plan_for_request,
    sign_request,
    verify_request,
)
from p2pupd.protocol.trust import sign

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = KEY.public_key().public_bytes_raw()
ROOT1 = ids.sha256(b"root v1")
NODE = bytes(16)


def d(i: int) -> bytes:
    return ids.sha256(i.to_bytes(4, "big"))


def request(**kw: object) -> Request:
    base = Request(
        node_id=NODE,
        node_key=PUB,
        repository="p2pupd",
        root_version=1,
        root_digest=ROOT1,
        platform="linux-x86_64",
        created=1_700_000_000,
        components=(ComponentHave("app", 1, 1),),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def manifest(
    serial: int, chunks: list[int], deltas: tuple[Delta, ...] = (), **kw: object
) -> Manifest:
    refs = tuple(ChunkRef(d(c), 1000) for c in chunks)
    f = FileEntry("data.bin", 0o644, 1000 * len(refs), d(1000 + serial), 0, refs)
    return Manifest("app", f"{serial}.0", serial, 0, (f,), deltas=deltas, **kw)  # type: ignore[arg-type]


def test_request_round_trips_and_verifies() -> None:
    req = request(releases=(HeldRelease("app", 1, d(9), True, False),), extra_blobs=(d(7),))
    data = sign_request(req, KEY)
    got, digest = verify_request(data)
    assert got == req and digest == ids.sha256(encoding.encode(req.to_value()))


def test_edited_request_fails_its_signature() -> None:
    data = bytearray(sign_request(request(), KEY))
    i = data.index(b"p2pupd")
    data[i] ^= 0x20
    with pytest.raises(BadSignatureError):
        verify_request(bytes(data))


def test_request_signed_by_another_key_than_it_names() -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SchemaError):
        sign_request(request(), other)
    forged = sign(REQUEST_TYPE, encoding.encode(request().to_value()), [other]).encode()
    with pytest.raises(UnknownKeyError):
        verify_request(forged)


@pytest.mark.parametrize(
    ("field", "value"),
    [("node_id", b"short"), ("node_key", b"k"), ("repository", ""), ("platform", "BAD/x")],
)
def test_request_fields_are_checked(field: str, value: object) -> None:
    v = request().to_value()
    v[field] = value
    with pytest.raises(CodecError):
        Request.from_value(v)


def test_component_listed_twice_is_refused() -> None:
    v = request(components=(ComponentHave("app", 1, 1), ComponentHave("app", 2, 2))).to_value()
    with pytest.raises(SchemaError):
        Request.from_value(v)


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(P2pupdError):
        verify_request(data)


junk = (
    st.none()
    | st.booleans()
    | st.integers(-2, 1 << 64)
    | st.text(max_size=8)
    | st.binary(max_size=40)
)


@given(
    st.dictionaries(
        st.sampled_from(sorted(request().to_value())), junk | st.lists(junk, max_size=3)
    )
)
def test_wrong_fields_in_a_signed_request_raise_only_typed_errors(
    fields: dict[str, object],
) -> None:
    v = {**request().to_value(), **fields}
    with contextlib.suppress(P2pupdError):
        Request.from_value(v)


def test_request_is_ours_only_with_our_id_and_key() -> None:
    req = request()
    check_request_is_ours(req, NODE, PUB)
    for node_id, key in ((b"\1" * 16, PUB), (NODE, None), (NODE, bytes(32))):
        with pytest.raises(MixAndMatchError):
            check_request_is_ours(req, node_id, key)


# -- the plan -------------------------------------------------------------------------

V1 = manifest(1, [1, 2, 3])
V2 = manifest(2, [1, 2, 4], deltas=(Delta("chunk", d(4), 1000, (d(3),), d(99), 50),))
RELEASES = {1: V1, 2: V2}


def plan(req: Request, roots: dict[int, bytes] | None = None, **kw: bool) -> BundlePlan:
    def lookup(c: str, s: int) -> tuple[Manifest, bytes] | None:
        m = RELEASES.get(s) if c == "app" else None
        return None if m is None else (m, ids.sha256(m.encode()))

    return plan_for_request(
        req,
        "p2pupd",
        lambda c: sorted(RELEASES) if c == "app" else [],
        lookup,
        roots or {1: ROOT1},
        **kw,
    )


def held(serial: int, on_disk: bool, complete: bool) -> HeldRelease:
    return HeldRelease("app", serial, ids.sha256(RELEASES[serial].encode()), on_disk, complete)


def test_plan_uses_a_delta_against_the_version_on_disk() -> None:
    p = plan(request(releases=(held(1, True, False),)))
    [rel] = p.releases
    assert rel.manifest.serial == 2 and rel.blobs == {d(99): 50}


def test_plan_without_deltas_sends_only_chunks_the_node_lacks() -> None:
    p = plan(request(releases=(held(1, True, False),)), use_deltas=False)
    assert p.releases[0].blobs == {d(4): 1000}


def test_plan_counts_complete_store_releases_and_extras() -> None:
    req = request(
        components=(ComponentHave("app", None, 1),),
        releases=(held(1, False, True),),
        extra_blobs=(d(4),),
    )
    p = plan(req)
    assert p.releases[0].blobs == {}


def test_plan_for_a_node_holding_nothing_sends_everything() -> None:
    p = plan(request(components=(ComponentHave("app", None, 0),)))
    assert set(p.releases[0].blobs) == {d(1), d(2), d(4)}


def test_plan_skips_what_the_node_has() -> None:
    p = plan(request(components=(ComponentHave("app", 2, 2),), releases=(held(2, True, False),)))
    assert p.releases == [] and "up to date" in p.notes[0]


def test_plan_ignores_held_releases_the_source_does_not_know() -> None:
    forged = HeldRelease("app", 1, d(12345), True, True)  # same serial, other content
    p = plan(request(releases=(forged,)))
    assert set(p.releases[0].blobs) == {d(1), d(2), d(4)}


def test_plan_refuses_a_node_of_another_repository() -> None:
    with pytest.raises(MixAndMatchError):
        plan(request(root_digest=d(5)))
    with pytest.raises(MixAndMatchError):
        plan(request(repository="other"))


def test_plan_carries_only_newer_roots() -> None:
    p = plan(request(), roots={1: ROOT1, 2: d(2), 3: d(3)})
    assert p.roots == [2, 3]


def test_plan_respects_the_node_platform() -> None:
    RELEASES[3] = manifest(3, [5], platform="linux-aarch64")
    try:
        p = plan(request(releases=(held(1, True, False),)))
        assert p.releases[0].manifest.serial == 2
    finally:
        del RELEASES[3]
