"""What tests need to see of a node's store without its daemon: its blobs, what a
killed writer left past the pack indexes, and ways to damage it on purpose."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from p2pupd.daemon.store import packfile
from p2pupd.daemon.store.packs import PackIndex
from p2pupd.daemon.store.packstore import PackStore


def stored(state: Path) -> dict[str, bytes]:
    """{hex digest: bytes} of every blob in the node's store (packed or a file)."""
    if not (state / "blobs").is_dir():
        return {}
    store = PackStore(state)
    return {d.hex(): store.get_bytes(d, verify=False) for d in store.iter_digests()}


def stored_sizes(state: Path) -> dict[str, int]:
    """{hex digest: size} of every blob in the node's store."""
    if not (state / "blobs").is_dir():
        return {}
    store = PackStore(state)
    return {d.hex(): store.size(d) for d in store.iter_digests()}


def drop(state: Path, digests: set[bytes]) -> None:
    """Remove these blobs from the store (as a gc that did not keep them)."""
    store = PackStore(state)
    store.gc({d for d in store.iter_digests() if d not in digests})


def spooled(state: Path) -> list[bytes]:
    """Digests of the intact records past the pack indexes, in pack order: the
    blobs a killed import left, which the next writer re-hashes and keeps
    (a torn record among them is stepped over)."""
    index = PackIndex(state / "blobs" / "packs")
    out: list[bytes] = []
    for p in index.packs():
        end = os.fstat(p.fd).st_size
        for digest, _, data in packfile.read_records(p.fd, p.data_end, end):
            if hashlib.sha256(data).digest() == digest:
                out.append(digest)
    return out


def tail_records(state: Path) -> list[tuple[Path, int, int]]:
    """(pack path, offset of the bytes, size) of every record past the indexes."""
    index = PackIndex(state / "blobs" / "packs")
    out = []
    for p in index.packs():
        end = os.fstat(p.fd).st_size
        path = index.dir / (p.name + packfile.PACK_SUFFIX)
        for _, offset, data in packfile.read_records(p.fd, p.data_end, end):
            out.append((path, offset, len(data)))
    return out


def rewrite_packed(state: Path, digest: bytes, data: bytes, *, fix_checksum: bool) -> None:
    """Overwrite a packed blob's bytes in place (``data`` of the same size).

    With ``fix_checksum`` the index entry gets the new bytes' checksum, as a
    deliberate forger with write access to the state directory would do: only
    a sha256 check then tells. Without it, this is bit rot.
    """
    index = PackIndex(state / "blobs" / "packs")
    found = index.lookup(digest)
    assert found is not None, "not a packed blob"
    p, e = found
    assert len(data) == e.size
    base = index.dir / p.name
    pack = f"{base}{packfile.PACK_SUFFIX}"
    os.chmod(pack, 0o644)
    fd = os.open(pack, os.O_WRONLY)
    try:
        os.pwrite(fd, data, e.offset)
    finally:
        os.close(fd)
    if fix_checksum:
        entries = [
            packfile.Entry(x.digest, x.offset, x.size, packfile.checksum(data))
            if x.digest == digest
            else x
            for x in p.entries()
        ]
        tmp = f"{base}.idx.new"
        with open(tmp, "wb") as f:
            f.write(packfile.IDX_MAGIC + b"".join(packfile.encode_entry(x) for x in entries))
        os.replace(tmp, f"{base}{packfile.IDX_SUFFIX}")  # a new inode: readers reload it
