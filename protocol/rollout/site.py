"""Who speaks for the site: the one place that says whose reports and actions count.

Theory of operation
-------------------
Reports and operator actions are signed by node keys (protocol/request.py).
A signature proves which key made a document, not that the key belongs to
this site. ``SiteRules`` decides that, in three rules:

1. **Same site.** A document names the repository (the pinned root's name) and
   the site (the cluster id, or the site identity once a site membership
   exists); another repository's or site's document moves nothing.
2. **A key speaks only for its own node id, and in a site only a member's
   does.** The binding is the swarm's (protocol/fleet/identity.py): a node
   id is ``node_id_of`` its node key, so on an *open* site (no membership)
   a document counts only if the id it names is the hash of the key that
   signed it -- any node key of the cluster may report, but only about the
   one node that key is, and nobody can speak for another node's id without
   its private key. Where a site membership is configured (``membership``),
   the site credential is the binding instead (it names the node id and the
   node key, exactly as on a TLS link: a node enrolled under an older
   version's random id keeps that id), and the credential must be valid and
   unrevoked at the node's clock; documents carry their author's credential,
   so a node can check authors it never met.
3. **Steering needs an operator key.** ``halt`` may come from any member: a
   forged halt only stops a release from being applied -- every node keeps the
   version it runs, which is the state a brake exists to keep -- so the worst
   it does is deny service until an operator resumes. ``resume`` and
   ``skip-wave`` are different: a forged one would send a release the fleet
   has seen fail (or not yet proven on a canary) to every node. They count
   only when signed by a key in ``operators`` -- the node keys the site's
   installer pinned in each node's configuration, as it pins the root (and,
   where a membership exists, only if that node is also a member). A node
   always honours the actions made on itself: its own operator has root on it.

A compromised member key can still lie in its own report (claim to be
healthy, or failed); it cannot speak for other nodes, and a member's lie of
failure is again only a halt. Keys of ``operators`` deserve the care of the
site key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from p2pupd.protocol.fleet.identity import node_id_of


class Membership(Protocol):
    """A site membership (credentials signed by the site key)."""

    def admits(self, node_id: bytes, node_key: bytes, credential: bytes | None, wall: int) -> bool:
        """True if ``node_key`` holds a valid, unrevoked credential for ``node_id`` now.

        ``credential`` is the one the document carried; a membership may also
        know the node's credential from elsewhere (its TLS handshake).
        """
        ...


@dataclass(frozen=True)
class SiteRules:
    """See the module docstring."""

    repository: str
    site: str
    own_key: bytes  # this node's public node key: its own actions always count
    membership: Membership | None = None
    operators: frozenset[bytes] = field(default_factory=frozenset)  # public node keys

    @property
    def open(self) -> bool:
        """True without a site membership (any node key counts; see rule 2)."""
        return self.membership is None

    @property
    def refusal(self) -> str:
        """Why rule 2 refused a document's author (for log lines)."""
        if self.membership is None:
            return "is not the node id of the key that signed it"
        return "is not a member of this site"

    def same_site(self, repository: str, site: str) -> bool:
        """Rule 1."""
        return repository == self.repository and site == self.site

    def admits(self, node_id: bytes, node_key: bytes, credential: bytes | None, wall: int) -> bool:
        """Rule 2: may this node's report or halt count?"""
        if node_key == self.own_key:  # this node's own documents, relayed back to it
            return True
        if self.membership is None:
            return node_id == node_id_of(node_key)
        return self.membership.admits(node_id, node_key, credential, wall)

    def may_steer(
        self, node_id: bytes, node_key: bytes, credential: bytes | None, wall: int
    ) -> bool:
        """Rule 3: may this key resume a release or skip a wave?"""
        if node_key == self.own_key:
            return True
        return node_key in self.operators and self.admits(node_id, node_key, credential, wall)
