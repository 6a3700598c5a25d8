"""The apply journal: an append-only, fsynced log of intent, one per component.

Theory of operation: before each step of an apply has an effect, a record naming
the step is appended and fsynced. Records are framed as
``len:u32 | crc32:u32 | canonical msgpack``; a torn tail (a crash mid-append)
fails its length or CRC and is ignored, so the log always reads as a prefix of
what was written. ``last_transaction`` returns the records of the newest
transaction; recovery (transaction.py) decides from them, plus an inspection of
the filesystem for the one step whose effect is a single syscall (the swap),
whether to finish or undo. A transaction ends with ``done``; the log is
truncated once it grows past a bound while no transaction is open.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

from p2pupd.daemon.errors import StorageError
from p2pupd.daemon.fsutil import fsync_dir
from p2pupd.protocol import encoding
from p2pupd.protocol.errors import CodecError

_HEADER = struct.Struct(">II")
_MAX_RECORD = 1 << 20
_COMPACT_BYTES = 1 << 20


class Journal:
    """Append-only step log of one component's applies."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` and fsync before returning (the step may then act)."""
        body = encoding.encode(record)
        frame = _HEADER.pack(len(body), zlib.crc32(body)) + body
        new = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, frame)
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise StorageError(f"cannot write journal {self.path}: {exc.strerror}") from None

    def records(self) -> list[dict[str, Any]]:
        """Return every intact record, stopping at the first torn or corrupt one."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot read journal {self.path}: {exc.strerror}") from None
        out: list[dict[str, Any]] = []
        pos = 0
        while pos + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size : pos + _HEADER.size + length]
            if length > _MAX_RECORD or len(body) != length or zlib.crc32(body) != crc:
                break
            try:
                rec = encoding.decode(body)
            except CodecError:
                break
            if isinstance(rec, dict):
                out.append(rec)
            pos += _HEADER.size + length
        return out

    def last_transaction(self) -> list[dict[str, Any]]:
        """Return the records of the newest transaction (from its ``begin``)."""
        recs = self.records()
        for i in range(len(recs) - 1, -1, -1):
            if recs[i].get("step") == "begin":
                return recs[i:]
        return []

    def open_transaction(self) -> list[dict[str, Any]] | None:
        """Return the newest transaction if it has not reached ``done``."""
        tx = self.last_transaction()
        if tx and tx[-1].get("step") != "done":
            return tx
        return None

    def compact(self) -> None:
        """Drop finished transactions once the log is large (never an open one)."""
        try:
            if self.path.stat().st_size < _COMPACT_BYTES or self.open_transaction():
                return
            self.path.unlink()
            fsync_dir(self.path.parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot compact journal {self.path}: {exc.strerror}") from None
