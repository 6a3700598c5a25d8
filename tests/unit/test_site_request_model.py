"""Site requests: many nodes' signed requests in one file, and the union plan (pure)."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.protocol import encoding, ids
from p2pupd.protocol.errors import BadSignatureError, MixAndMatchError, P2pupdError, SchemaError
from p2pupd.protocol.request import (
    SITE_REQUEST_TYPE,
    ComponentHave,
    Request,
    check_site_includes,
    sign_request,
    sign_site_request,
    verify_any_request,
)
from p2pupd.protocol.trust import Envelope, sign

ROOT1 = ids.sha256(b"root v1")


def d(i: int) -> bytes:
    return ids.sha256(i.to_bytes(4, "big"))


def key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)


def pub(i: int) -> bytes:
    return key(i).public_key().public_bytes_raw()


def node_request(i: int, **kw: object) -> Request:
    base = Request(
        node_id=bytes([i]) * 16,
        node_key=pub(i),
        repository="p2pupd",
        root_version=1,
        root_digest=ROOT1,
        platform="linux-x86_64",
        created=1_700_000_000,
        components=(ComponentHave("app", None, 0),),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def signed(i: int, **kw: object) -> bytes:
    return sign_request(node_request(i, **kw), key(i))


def test_a_plain_request_is_a_site_of_one() -> None:
    site = verify_any_request(signed(1))
    assert [m.node_id for m in site.members] == [bytes([1]) * 16]


def test_site_request_round_trips_with_the_collector_first() -> None:
    data = sign_site_request(signed(1), [signed(2), signed(3)], key(1))
    site = verify_any_request(data)
    assert [m.node_id[0] for m in site.members] == [1, 2, 3]
    assert site.collector.node_key == pub(1)
    assert check_site_includes(site, bytes([3]) * 16, pub(3)).node_key == pub(3)


def test_a_node_outside_the_site_or_with_another_key_is_refused() -> None:
    site = verify_any_request(sign_site_request(signed(1), [signed(2)], key(1)))
    with pytest.raises(MixAndMatchError, match="not one of them"):
        check_site_includes(site, bytes([9]) * 16, pub(9))
    with pytest.raises(MixAndMatchError):
        check_site_includes(site, bytes([2]) * 16, pub(9))  # right id, wrong key
    with pytest.raises(MixAndMatchError):
        check_site_includes(site, bytes([2]) * 16, None)  # node never made a key


def test_site_request_signed_by_another_key_is_refused() -> None:
    with pytest.raises(SchemaError, match="collector"):
        sign_site_request(signed(1), [signed(2)], key(2))
    payload = encoding.encode(
        {"_type": SITE_REQUEST_TYPE, "spec": 1, "requests": [signed(1), signed(2)]}
    )
    forged = sign(SITE_REQUEST_TYPE, payload, [key(2)]).encode()  # member 2 is not the collector
    with pytest.raises(P2pupdError, match="site request"):
        verify_any_request(forged)


def test_a_tampered_member_fails_its_own_signature() -> None:
    env = Envelope.decode(signed(2), 1 << 20)
    (kid, sig), *_ = env.signatures
    bad = Envelope(env.payload, ((kid, bytes([sig[0] ^ 1]) + sig[1:]),)).encode()
    payload = encoding.encode({"_type": SITE_REQUEST_TYPE, "spec": 1, "requests": [signed(1), bad]})
    data = sign(SITE_REQUEST_TYPE, payload, [key(1)]).encode()
    with pytest.raises(BadSignatureError):
        verify_any_request(data)


def test_an_edited_site_request_fails_the_collector_signature() -> None:
    env = Envelope.decode(sign_site_request(signed(1), [signed(2)], key(1)), 1 << 20)
    payload = encoding.encode({"_type": SITE_REQUEST_TYPE, "spec": 1, "requests": [signed(1)]})
    edited = Envelope(payload, env.signatures).encode()  # member 2 dropped, old signature
    with pytest.raises(BadSignatureError):
        verify_any_request(edited)


@pytest.mark.parametrize(
    ("members", "match"),
    [
        (lambda: [signed(1), signed(1)], "twice"),
        (lambda: [signed(1), signed(2, repository="other")], "different repositories"),
    ],
)
def test_inconsistent_sites_are_refused(members, match) -> None:  # type: ignore[no-untyped-def]
    docs = members()
    with pytest.raises(SchemaError, match=match):
        sign_site_request(docs[0], docs[1:], key(1))
    payload = encoding.encode({"_type": SITE_REQUEST_TYPE, "spec": 1, "requests": docs})
    with pytest.raises(SchemaError, match=match):
        verify_any_request(sign(SITE_REQUEST_TYPE, payload, [key(1)]).encode())


@pytest.mark.parametrize(
    "value",
    [
        {"_type": SITE_REQUEST_TYPE, "spec": 2, "requests": []},
        {"_type": SITE_REQUEST_TYPE, "spec": 1, "requests": []},
        {"_type": SITE_REQUEST_TYPE, "spec": 1, "requests": ["not bytes"]},
        {"_type": SITE_REQUEST_TYPE, "spec": 1, "requests": [b"\x00garbage"]},
        {"_type": SITE_REQUEST_TYPE, "spec": 1, "requests": [], "extra": 1},
    ],
)
def test_malformed_site_requests_are_schema_or_codec_errors(value: object) -> None:
    data = sign(SITE_REQUEST_TYPE, encoding.encode(value), [key(1)]).encode()
    with pytest.raises(P2pupdError):  # a clear protocol error, never TypeError & co
        verify_any_request(data)
