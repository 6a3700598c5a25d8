"""The apply journal: records survive as a prefix, a torn or corrupt tail is ignored
and cut off before the next append, short writes are completed, a record the disk
cannot hold leaves no trace, the open transaction is found, and compaction never
drops an open one."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from p2pupd.daemon.apply import transaction as journal_module
from p2pupd.daemon.apply.transaction import Journal
from p2pupd.daemon.errors import NoSpaceError


def tx(j: Journal, name: str, *steps: str) -> None:
    j.append({"step": "begin", "tx": name})
    for s in steps:
        j.append({"step": s, "tx": name})


def test_open_transaction_is_the_newest_without_done(tmp_path: Path) -> None:
    j = Journal(tmp_path / "c.log")
    assert j.open_transaction() is None
    tx(j, "a", "staged", "swapped", "commit", "done")
    assert j.open_transaction() is None
    tx(j, "b", "staged")
    open_tx = j.open_transaction()
    assert open_tx is not None
    assert [r["step"] for r in open_tx] == ["begin", "staged"]
    assert {r["tx"] for r in open_tx} == {"b"}


@pytest.mark.parametrize("cut", [1, 3, 7, 9])
def test_torn_tail_is_ignored(tmp_path: Path, cut: int) -> None:
    j = Journal(tmp_path / "c.log")
    tx(j, "a", "staged")
    size = j.path.stat().st_size
    j.append({"step": "swapped", "tx": "a"})
    with open(j.path, "r+b") as f:  # a crash part-way through the last append
        f.truncate(size + cut)
    assert [r["step"] for r in j.records()] == ["begin", "staged"]


def test_corrupt_record_ends_the_log(tmp_path: Path) -> None:
    j = Journal(tmp_path / "c.log")
    tx(j, "a", "staged", "swapped")
    data = bytearray(j.path.read_bytes())
    data[-3] ^= 0xFF  # bit rot in the last record: its CRC no longer matches
    j.path.write_bytes(bytes(data))
    assert [r["step"] for r in j.records()] == ["begin", "staged"]


def test_compaction_keeps_an_open_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "_COMPACT_BYTES", 64)
    j = Journal(tmp_path / "c.log")
    tx(j, "a", "staged", "done")
    tx(j, "b", "staged")
    j.compact()
    assert j.path.exists()
    assert j.open_transaction() is not None
    j.append({"step": "done", "tx": "b"})
    j.compact()
    assert not j.path.exists()
    assert os.listdir(tmp_path) == []


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (or a signal) may make the kernel write part of a record: the rest
    follows, never a torn frame reported as durable."""
    real_pwrite, real_write = os.pwrite, os.write
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real_pwrite(fd, bytes(data)[:3], off))
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:3]))
    j = Journal(tmp_path / "c.log")
    tx(j, "a", "staged", "swapped")
    monkeypatch.undo()
    assert [r["step"] for r in Journal(j.path).records()] == ["begin", "staged", "swapped"]


def test_a_record_the_disk_could_not_hold_leaves_no_torn_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path / "c.log")
    tx(j, "a", "staged")
    size = j.path.stat().st_size
    calls = 0
    real_pwrite, real_write = os.pwrite, os.write

    def full(fd: int, data: bytes, *offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        part = bytes(data)[:5]  # part of the record fits
        return real_pwrite(fd, part, *offset) if offset else real_write(fd, part)

    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(NoSpaceError):
        j.append({"step": "swapped", "tx": "a"})
    monkeypatch.undo()
    assert j.path.stat().st_size == size  # cut back: the journal is as before
    j.append({"step": "undo", "tx": "a"})  # space again: the next record is seen
    assert [r["step"] for r in Journal(j.path).records()] == ["begin", "staged", "undo"]


@pytest.mark.parametrize("cut", [1, 3, 9])
def test_a_record_appended_after_a_torn_tail_is_seen(tmp_path: Path, cut: int) -> None:
    """A crash mid-append leaves a torn tail; the next process's records go after the
    last intact one, not after the torn bytes (where no reader would ever see them)."""
    j = Journal(tmp_path / "c.log")
    tx(j, "a", "staged")
    size = j.path.stat().st_size
    j.append({"step": "swapped", "tx": "a"})
    with open(j.path, "r+b") as f:
        f.truncate(size + cut)
    later = Journal(j.path)  # another process
    later.append({"step": "health", "tx": "a"})
    later.append({"step": "commit", "tx": "a"})
    assert [r["step"] for r in Journal(j.path).records()] == [
        "begin", "staged", "health", "commit",
    ]  # fmt: skip
    assert Journal(j.path).open_transaction() is not None
