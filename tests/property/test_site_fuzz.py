"""Fuzz targets for every decoder of site membership and sealed bundles (``_fuzz`` rules).

Each sees bytes before any signature over them is verified -- a sealed stick
anyone holding ``site.pub`` can make, a document a peer pushed (``SiteNews``),
an enrolment request or a credential from a stranger -- so for each input:
typed errors only, peak memory within the budget the code states, the
per-example deadline. Seeds are honest documents made by the real site tool.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _fuzz import SLACK, decode_cost, fuzz, hostile_msgpack, within_budget
from hypothesis import given
from hypothesis import strategies as st

from p2pupd.protocol.site import membership as m
from p2pupd.protocol.site import sealed
from p2pupd.tools.site.authority import SiteAuthority

KEY = os.urandom(32)
NOW = 1_800_000_000


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    site = SiteAuthority.init(tmp_path_factory.mktemp("site") / "s", "plant-1", NOW)
    key = Ed25519PrivateKey.generate()
    node_id = os.urandom(16)
    req = m.EnrolRequest(node_id, key.public_key().public_bytes_raw(),
                         sealed.x25519_public(X25519PrivateKey.generate()), "p", NOW,
                         "").sign(key)  # fmt: skip
    doc, _ = site.enroll(req, NOW, None)
    rl, _, _ = site.revoke(node_id.hex()[:8], NOW)
    trusted = m.TrustedSite.load((Path(site.root) / "site.pub").read_bytes())
    return {"site": trusted, "site_doc": (Path(site.root) / "site.pub").read_bytes(),
            "request": req, "membership": doc, "revocations": rl,
            "node_id": node_id, "node_key": key.public_key().public_bytes_raw()}  # fmt: skip


def mutations(seed_key: str) -> st.SearchStrategy[bytes]:
    """Random bytes, hostile msgpack, and byte flips/truncations of an honest seed."""
    return st.one_of(
        st.binary(max_size=2048),
        hostile_msgpack,
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
    ).map(lambda x: x if isinstance(x, bytes) else (seed_key, x))  # type: ignore[return-value]


def _apply(data: object, seeds: dict[str, object]) -> bytes:
    if isinstance(data, bytes):
        return data
    key, (pos, byte, cut) = data  # type: ignore[misc]
    doc = bytearray(seeds[key])  # type: ignore[arg-type]
    if cut:
        return bytes(doc[: pos % (len(doc) + 1)])
    doc[pos % len(doc)] ^= byte or 1
    return bytes(doc)


def _budget_of(data: bytes, budget: m.limits.DecodeBudget) -> int:
    return decode_cost(budget, len(data)) + 2 * len(data) + SLACK


@pytest.mark.parametrize(
    ("seed_key", "call", "budget"),
    [
        ("site_doc", lambda s, d: m.TrustedSite.load(d), m.SITE_DOC_BUDGET),
        ("site_doc", lambda s, d: s["site"].rotate(d), m.SITE_DOC_BUDGET),
        ("request", lambda s, d: m.verify_enrol_request(d), m.ENROL_BUDGET),
        ("revocations", lambda s, d: s["site"].verify_revocations(d), m.REVOCATIONS_BUDGET),
        ("revocations", lambda s, d: s["site"].classify(d), m.REVOCATIONS_BUDGET),
        ("membership", lambda s, d: s["site"].verify_membership(d, s["node_id"], s["node_key"],
                                                                 NOW), m.MEMBERSHIP_BUDGET),
    ],
)
def test_site_documents(seeds: dict[str, object], seed_key: str, call: object,
                        budget: m.limits.DecodeBudget) -> None:  # fmt: skip
    @fuzz(15)
    @given(mutations(seed_key))
    def run(raw: object) -> None:
        data = _apply(raw, seeds)
        within_budget(lambda: call(seeds, data), _budget_of(data, budget))  # type: ignore[operator]

    run()


@fuzz(30)
@given(st.one_of(st.binary(max_size=4096), hostile_msgpack))
def test_sealed_layers(data: bytes) -> None:
    cost = decode_cost(sealed.HEADER_BUDGET, len(data)) + 4 * len(data) + SLACK
    within_budget(lambda: sealed.Header.decode(data), cost)
    within_budget(lambda: sealed.Table.decode(data), cost)
    within_budget(lambda: sealed.parse_sealed_artifact(data), 64 * len(data) + SLACK)
    within_budget(lambda: sealed.open_blob(KEY, b"blob", data, max(0, len(data) - 16)), cost)
    within_budget(lambda: m.parse_credential(data), cost)


@fuzz(30)
@given(st.binary(max_size=256), st.integers(0, 40), st.binary(max_size=64))
def test_table_with_a_valid_head_and_hostile_body(index: bytes, count: int, tail: bytes) -> None:
    """A well-formed start, then a count and entries that do not add up."""
    head = sealed.TABLE_MAGIC + len(index).to_bytes(4, "big") + index + count.to_bytes(4, "big")
    data = head + tail
    within_budget(lambda: sealed.Table.decode(data), 4 * len(data) + SLACK)


def test_table_round_trip() -> None:
    blobs = {os.urandom(32): sealed.SealedBlob(i * 1000, os.urandom(32)) for i in range(50)}
    t = sealed.Table(b'{"manifests":[]}', blobs)
    assert sealed.Table.decode(t.encode()) == t
