"""Ed25519 key files for publishers.

A private key file holds the raw 32-byte seed as a PEM (PKCS#8) document,
mode 0600; ``KEYFILE.pub`` holds the raw public key as hex with its key id.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.protocol.errors import P2pupdError
from p2pupd.protocol.trust import key_id


class KeyFileError(P2pupdError):
    """A key file is missing, unreadable or not an Ed25519 key (exit code 2)."""


def generate(path: Path, force: bool = False) -> str:
    """Write a new private key to ``path`` (0600) and ``path.pub``; return its key id.

    A missing parent directory is created, mode 0700 (``keygen keys/root.key``
    on a fresh signing station).
    """
    if path.exists() and not force:
        raise KeyFileError(f"{path} exists; refusing to overwrite a key (use --force)")
    _make_key_dir(path.parent)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes_raw()
    kid = key_id(pub)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, 0o600)
        Path(str(path) + ".pub").write_text(f"ed25519 {pub.hex()} {kid}\n")
    except OSError as exc:
        raise KeyFileError(f"cannot write key {path}: {exc.strerror}") from None
    return kid


def _make_key_dir(d: Path) -> None:
    """Create ``d`` (and missing ancestors) if absent; ``d`` itself only its owner may read."""
    if d.is_dir():
        return
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        d.mkdir(mode=0o700)
        os.chmod(d, 0o700)  # whatever the umask
    except FileExistsError:
        if not d.is_dir():
            raise KeyFileError(f"cannot create key directory {d}: a file has that name") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key directory {d}: {exc.strerror}") from None


def load_private(path: Path) -> Ed25519PrivateKey:
    """Load a private key file written by ``generate``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def load_public(path: Path) -> bytes:
    """Return the raw public key from a private key file or its ``.pub``."""
    if path.suffix == ".pub":
        try:
            parts = path.read_text().split()
        except OSError as exc:
            raise KeyFileError(f"cannot read key {path}: {exc.strerror}") from None
        try:
            if parts[0] != "ed25519" or len(bytes.fromhex(parts[1])) != 32:
                raise ValueError
            return bytes.fromhex(parts[1])
        except (IndexError, ValueError):
            raise KeyFileError(f"{path} is not an ed25519 public key file") from None
    return load_private(path).public_key().public_bytes_raw()
