"""Identifiers: content digests, key ids, component names and safe relative paths.

A digest is the 32 raw bytes of SHA-256; its text form is 64 lowercase hex
characters. Paths inside a release are relative, '/'-separated, normalised and
confined: every check that keeps a hostile name (``../x``, ``/etc``, NUL,
newline) out of a target tree lives here, and both publish and import call it.
"""

from __future__ import annotations

import hashlib
import re

from p2pupd.protocol import limits
from p2pupd.protocol.errors import CodecError, HashMismatchError, UnsafePathError

DIGEST_BYTES = 32
HEX_RE = re.compile(r"[0-9a-f]{64}")
COMPONENT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
PLATFORM_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# A release key: a component, or a component and a platform variant of it
# (protocol/fleet/variants.py). '@' is in neither name, so it parses one way.
RELEASE_KEY_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}(@[a-z0-9][a-z0-9_-]{0,31})?")
MAX_RELEASE_KEY_BYTES = 64 + 1 + 32


def sha256(data: bytes | memoryview) -> bytes:
    """Return the raw SHA-256 digest of ``data``."""
    return hashlib.sha256(data).digest()


def hexd(digest: bytes) -> str:
    """Return the text form of a raw digest."""
    return digest.hex()


def parse_hex_digest(text: str) -> bytes:
    """Parse a 64-char lowercase hex digest; ``CodecError`` otherwise."""
    if not isinstance(text, str) or not HEX_RE.fullmatch(text):
        raise CodecError(f"not a sha256 hex digest: {text!r:.80}")
    return bytes.fromhex(text)


def check_digest(value: object) -> bytes:
    """Return ``value`` if it is a raw 32-byte digest; ``CodecError`` otherwise."""
    if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
        raise CodecError("digest must be 32 raw bytes")
    return value


def verify_digest(data: bytes, expected: bytes, what: str = "blob") -> None:
    """Raise ``HashMismatchError`` unless ``data`` hashes to ``expected``."""
    if sha256(data) != expected:
        raise HashMismatchError(f"{what} does not match its sha256 {expected.hex()[:16]}…")


def check_component(name: object) -> str:
    """Return ``name`` if it is a valid component name."""
    if not isinstance(name, str) or not COMPONENT_RE.fullmatch(name):
        raise CodecError(f"invalid component name {name!r:.80} (want [a-z0-9._-], 1-64 chars)")
    return name


def check_platform(name: object) -> str:
    """Return ``name`` if it is a valid platform name (e.g. ``linux-x86_64``)."""
    if not isinstance(name, str) or not PLATFORM_RE.fullmatch(name):
        raise CodecError(f"invalid platform name {name!r:.80}")
    return name


def check_version_label(label: object) -> str:
    """Return ``label`` if it is printable text of bounded length."""
    if (
        not isinstance(label, str)
        or not label
        or len(label.encode()) > limits.MAX_VERSION_LABEL_BYTES
        or not label.isprintable()
        or label != label.strip()
    ):
        raise CodecError(f"invalid version label {label!r:.80}")
    return label


def check_relpath(path: object) -> str:
    """Return ``path`` if it is a safe, normalised relative path.

    Refused: empty, absolute, ``.``/``..`` components, empty components (``a//b``,
    trailing ``/``), backslashes, NUL, control characters (newline included),
    names over 255 bytes and paths over 4096 bytes. Raises ``UnsafePathError``.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError("empty or non-text path")
    shown = repr(path)[:100]
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"path is not valid UTF-8: {shown}") from None
    if len(raw) > limits.MAX_PATH_BYTES:
        raise UnsafePathError(f"path too long: {shown}")
    if path.startswith("/"):
        raise UnsafePathError(f"absolute path refused: {shown}")
    if "\\" in path:
        raise UnsafePathError(f"backslash in path refused: {shown}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise UnsafePathError(f"control character in path refused: {shown}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePathError(f"path component {part!r} refused: {shown}")
        if len(part.encode()) > limits.MAX_NAME_BYTES:
            raise UnsafePathError(f"name too long: {shown}")
    return path


def check_symlink_target(target: object) -> str:
    """Return ``target`` if it is a bounded symlink target without NUL/control chars.

    Targets may point anywhere (real trees link to ``/usr/lib/...``): staging
    never follows a link, and the manifest check forbids any entry beneath a
    symlink, so a link cannot redirect where p2pupd writes.
    """
    if not isinstance(target, str) or not target:
        raise UnsafePathError("empty symlink target")
    shown = repr(target)[:100]
    if len(target.encode("utf-8", "surrogatepass")) > limits.MAX_SYMLINK_TARGET_BYTES:
        raise UnsafePathError(f"symlink target too long: {shown}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        raise UnsafePathError(f"control character in symlink target: {shown}")
    return target
