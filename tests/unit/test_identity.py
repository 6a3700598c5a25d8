"""Node ids proven on the connection: Hello keys and challenges, Proof, relays, old peers."""

from __future__ import annotations

import pytest

from p2pupd.protocol.errors import LocalProtocolError
from p2pupd.protocol.fleet import identity
from p2pupd.protocol.fleet.identity import NodeKey, node_id_of
from p2pupd.protocol.session import NEED_DATA, HandshakeError, Session, State
from p2pupd.protocol.wire import FEATURE_PROOF, Hello, Message, Ping, Proof, encode_message

CLUSTER = "site"
PROOF = frozenset({FEATURE_PROOF})


def proving(key: NodeKey, challenge: bytes, local: str, remote: str) -> Session:
    return Session(
        key.node_id, CLUSTER, 7707, PROOF,
        key=key, challenge=challenge, local_host=local, remote_host=remote,
    )  # fmt: skip


def pump(src: Session, dst: Session, data: bytes) -> list[Message]:
    dst.receive_data(data)
    out = []
    while (event := dst.next_event()) is not NEED_DATA:
        assert isinstance(event, Message)
        out.append(event)
    return out


def exchange(a: Session, b: Session) -> None:
    """Both Hellos, then both Proofs (each sent as soon as it is due)."""
    pump(a, b, a.send_hello())
    pump(b, a, b.send_hello())
    assert a.state is b.state is State.PROVING
    assert a.proof_due and b.proof_due
    pump(a, b, a.send_proof())
    pump(b, a, b.send_proof())


def test_node_id_is_the_hash_of_the_public_key() -> None:
    key = NodeKey.generate()
    assert key.node_id == node_id_of(key.public_key)
    assert len(key.node_id) == 16
    assert node_id_of(NodeKey.generate().public_key) != key.node_id


def test_both_sides_prove_their_ids_on_a_direct_connection() -> None:
    ka, kb = NodeKey.generate(), NodeKey.generate()
    a = proving(ka, b"a" * 32, "10.0.0.1", "10.0.0.2")
    b = proving(kb, b"b" * 32, "10.0.0.2", "10.0.0.1")
    exchange(a, b)
    assert a.state is b.state is State.OPEN
    assert a.proven and b.proven
    assert a.peer_hello is not None and a.peer_hello.node_id == kb.node_id


def test_nothing_but_the_proof_may_flow_while_proving() -> None:
    a = proving(NodeKey.generate(), b"a" * 32, "", "")
    b = proving(NodeKey.generate(), b"b" * 32, "", "")
    pump(a, b, a.send_hello())
    pump(b, a, b.send_hello())
    with pytest.raises(LocalProtocolError):
        a.send(Ping())
    with pytest.raises(LocalProtocolError):
        a.send(Proof(b"x" * 64, ""))  # only make_proof's own signature


def test_a_forged_proof_is_a_handshake_error() -> None:
    ka, kb = NodeKey.generate(), NodeKey.generate()
    a = proving(ka, b"a" * 32, "10.0.0.1", "10.0.0.2")
    b = proving(kb, b"b" * 32, "10.0.0.2", "10.0.0.1")
    pump(a, b, a.send_hello())
    pump(b, a, b.send_hello())
    b.receive_data(encode_message(Proof(b"\0" * 64, "10.0.0.2")))
    with pytest.raises(HandshakeError, match="does not verify"):
        b.next_event()


def test_claiming_someone_elses_id_with_another_key_is_refused() -> None:
    honest, attacker = NodeKey.generate(), NodeKey.generate()
    b = proving(NodeKey.generate(), b"b" * 32, "", "")
    lie = Hello.create(honest.node_id, CLUSTER, 1, PROOF, attacker.public_key, b"x" * 32)
    b.receive_data(encode_message(lie))
    with pytest.raises(HandshakeError, match="not the hash of its public key"):
        b.next_event()


def test_a_relayed_proof_leaves_the_peer_unproven() -> None:
    """M relays between honest H and victim V: H's signature is good but names
    the address H saw (M's), so V admits M as unproven, not as H."""
    kh, kv = NodeKey.generate(), NodeKey.generate()
    h = proving(kh, b"h" * 32, "10.0.0.8", "10.0.0.66")  # H talks to M
    v = proving(kv, b"v" * 32, "10.0.0.9", "10.0.0.66")  # V talks to M
    # M forwards every byte unchanged between the two connections.
    pump(h, v, h.send_hello())
    pump(v, h, v.send_hello())
    pump(h, v, h.send_proof())
    pump(v, h, v.send_proof())
    assert v.state is State.OPEN and h.state is State.OPEN
    assert v.peer_hello is not None and v.peer_hello.node_id == kh.node_id
    assert not v.proven  # bans and admission key to M's address, not to H
    assert not h.proven


def test_a_peer_without_the_feature_is_admitted_unproven() -> None:
    ka = NodeKey.generate()
    a = proving(ka, b"a" * 32, "10.0.0.1", "10.0.0.2")
    old = Session(b"O" * 16, CLUSTER, 7707)  # an older version: no "proof"
    pump(a, old, a.send_hello())
    pump(old, a, old.send_hello())
    assert a.state is old.state is State.OPEN
    assert not a.proof_due and not a.proven
    assert old.peer_hello is not None and old.peer_hello.features == PROOF


def test_own_challenge_sent_back_is_refused() -> None:
    ka = NodeKey.generate()
    a = proving(ka, b"a" * 32, "", "")
    mirror = Hello.create(node_id_of(NodeKey.generate().public_key), CLUSTER, 1, PROOF, b"", b"")
    a.receive_data(encode_message(mirror))
    with pytest.raises(HandshakeError, match="no key or challenge"):
        a.next_event()
    kb = NodeKey.generate()
    a2 = proving(ka, b"a" * 32, "", "")
    echo = Hello.create(kb.node_id, CLUSTER, 1, PROOF, kb.public_key, b"a" * 32)
    a2.receive_data(encode_message(echo))
    with pytest.raises(HandshakeError, match="our own challenge"):
        a2.next_event()


def test_proof_needs_a_key_that_belongs_to_the_node_id() -> None:
    key = NodeKey.generate()
    with pytest.raises(LocalProtocolError):
        Session(b"X" * 16, CLUSTER, 1, PROOF, key=key, challenge=b"c" * 32)
    with pytest.raises(LocalProtocolError):
        Session(key.node_id, CLUSTER, 1, PROOF)


def test_hosts_compare_in_one_spelling() -> None:
    assert identity.normal_host("::ffff:10.0.0.1") == "10.0.0.1"
    assert identity.normal_host("[fe80::1%eth0]") == "fe80::1"
    assert identity.normal_host("10.0.0.1") == "10.0.0.1"
