"""The error taxonomy of the protocol layer.

Two roots, as in h11 and python-tuf:

* ``ProtocolError`` — a conversation went wrong. ``LocalProtocolError`` means we
  misused the API (a bug here); ``RemoteProtocolError`` means the bytes we were
  given are bad (the peer's or the medium's fault).
* ``VerificationError`` — well-formed content that trust rules refuse: bad or
  missing signatures, a rollback, an expired release, a hash that does not match.

Every decoder converts foreign exceptions (msgpack, cryptography, ValueError) into
one of these at its entry point, so callers catch a closed set.
"""

from __future__ import annotations


class P2pupdError(Exception):
    """Base of every error p2pupd raises on purpose."""


class ProtocolError(P2pupdError):
    """A conversation or an encoding went wrong."""


class LocalProtocolError(ProtocolError):
    """We misused the protocol API (a programming error on our side)."""


class RemoteProtocolError(ProtocolError):
    """Input from a peer, a bundle or a file is malformed."""


class CodecError(RemoteProtocolError):
    """Bytes are not canonical p2pupd msgpack of the expected shape."""


class FrameTooLargeError(RemoteProtocolError):
    """A frame or document exceeds its named limit."""


class SchemaError(CodecError):
    """Decoded bytes do not have the fields and types a message needs."""


class UnsafePathError(CodecError):
    """A path is absolute, escapes its root, or holds forbidden characters."""


class NewerFormatError(ProtocolError):
    """A bundle, state directory or document is of a format newer than this
    p2pupd reads: not malformed, not hostile -- this node needs a newer p2pupd
    (exit code 2 at the CLI; docs/self-update.md, "Version rules")."""


class VerificationError(P2pupdError):
    """Content is well-formed but trust rules refuse it."""


class BadSignatureError(VerificationError):
    """A signature does not verify."""


class UnknownKeyError(VerificationError):
    """A signature names a key the trusted root does not list for the role."""


class ThresholdError(VerificationError):
    """Fewer valid signatures than the role's threshold."""


class RollbackError(VerificationError):
    """A serial or root version is not newer than one already trusted."""


class ExpiredError(VerificationError):
    """Metadata is past its expiry time on the node's trusted clock."""


class HashMismatchError(VerificationError):
    """Bytes do not hash to the digest that names them."""


class RevokedKeyError(VerificationError):
    """A document counts on a key that a trusted root explicitly revoked (compromised)."""


class MixAndMatchError(VerificationError):
    """Metadata names another component, platform or repository than expected."""


class HazardousModeError(VerificationError):
    """A signed release would install a mode the node does not allow (see ``modes``)."""


class NotMemberError(VerificationError):
    """Something is only for members of a site, and this node is not one (or not any more):
    a sealed bundle for a site it holds no key of, a peer without a valid credential."""
