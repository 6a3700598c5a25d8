"""Who counts in the site view when the node belongs to a site: the rollout's membership.

Theory of operation. Reports and rollout actions carry their author's site
credential (protocol/rollout). Where the node is in a site (``SiteGate``
has one pinned), a document counts only if that credential passes the
membership rules at the node's clock -- issued by a live key of this site,
unexpired, not revoked -- and names the very node id and node key that signed
the document (protocol/site/membership.py does the checking). So a member
cannot speak for an invented node, a revoked or expired node's new documents
move nothing, and another site's reports are refused even when a member
relays them. Checked credentials are remembered by digest until they expire
or the membership changes (a revocation, a rotation), when ``forget`` clears
them and the rollout re-checks every report it holds.
"""

from __future__ import annotations

from p2pupd.daemon.service.sitegate import SiteGate
from p2pupd.protocol import ids
from p2pupd.protocol.errors import CodecError, VerificationError
from p2pupd.protocol.site.membership import Credential

MAX_REMEMBERED = 20_000  # credentials: two per node of a 10,000-node site


class SiteMembers:
    """A ``protocol.rollout.site.Membership`` backed by the node's site gate."""

    def __init__(self, gate: SiteGate) -> None:
        self.gate = gate
        self._checked: dict[bytes, Credential | None] = {}

    @property
    def site_name(self) -> str | None:
        return None if self.gate.site is None else self.gate.site.name

    def forget(self) -> None:
        """The membership changed: judge every credential again."""
        self._checked.clear()

    def admits(self, node_id: bytes, node_key: bytes, credential: bytes | None, wall: int) -> bool:
        site = self.gate.site
        if site is None or credential is None:
            return False
        digest = ids.sha256(credential)
        if digest in self._checked:
            cred = self._checked[digest]
        else:
            try:
                cred = site.check_credential(credential, wall, self.gate.revocations)
            except (VerificationError, CodecError):
                cred = None
            if len(self._checked) >= MAX_REMEMBERED:
                self._checked.clear()
            self._checked[digest] = cred
        if cred is None or (cred.not_after is not None and wall > cred.not_after):
            return False
        return cred.node_id == node_id and cred.node_key == node_key
