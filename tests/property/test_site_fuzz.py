"""Hostile and random input for every decoder of site membership and sealed bundles.

Each of these sees bytes before any signature over them is verified -- a
sealed stick anyone holding ``site.pub`` can make, a peer's pushed site
document, an enrolment request or a credential from a stranger -- so each
may only raise p2pupd's own typed errors (exit 3 and one line at the CLI),
never a foreign exception.
"""

from __future__ import annotations

import contextlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pupd.protocol.errors import P2pupdError
from p2pupd.protocol.site import sealed
from p2pupd.protocol.site.membership import (
    TrustedSite,
    document_type,
    parse_credential,
    verify_enrol_request,
)

KEY = os.urandom(32)


def only_typed(fn: object, data: bytes) -> None:
    with contextlib.suppress(P2pupdError):
        fn(data)  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_decoders_raise_only_typed_errors(data: bytes) -> None:
    for fn in (
        sealed.Header.decode,
        sealed.Table.decode,
        sealed.parse_sealed_artifact,
        parse_credential,
        verify_enrol_request,
        TrustedSite.load,
        document_type,
    ):
        only_typed(fn, data)
    only_typed(lambda d: sealed.open_blob(KEY, b"blob", d, max(0, len(d) - 16)), data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256), st.integers(0, 40), st.binary(max_size=64))
def test_table_with_a_valid_head_and_hostile_body(index: bytes, count: int, tail: bytes) -> None:
    """A well-formed start, then a count and entries that do not add up."""
    head = sealed.TABLE_MAGIC + len(index).to_bytes(4, "big") + index + count.to_bytes(4, "big")
    only_typed(sealed.Table.decode, head + tail)


def test_table_round_trip() -> None:
    blobs = {os.urandom(32): sealed.SealedBlob(i * 1000, os.urandom(32)) for i in range(50)}
    t = sealed.Table(b'{"manifests":[]}', blobs)
    assert sealed.Table.decode(t.encode()) == t
