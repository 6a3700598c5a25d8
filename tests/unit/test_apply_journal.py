"""The apply journal: records survive as a prefix, a torn or corrupt tail is ignored,
the open transaction is found, and compaction never drops an open one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pupd.daemon.apply import transaction as journal_module
from p2pupd.daemon.apply.transaction import Journal


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
