"""The stat cache's storage: one file of columns per version, read and written only
when used or changed; the earlier single-file format is still read; damage is a miss."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgpack
import pytest

from p2pupd.daemon.stage import statcache
from p2pupd.daemon.stage.statcache import Entry, Shape, StatCache, stat_key


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def files_in(root: Path, count: int) -> dict[str, Entry]:
    """``count`` real files under ``root`` and their records, as staging would make them."""
    out: dict[str, Entry] = {}
    for i in range(count):
        p = root / f"d{i % 3}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        data = f"file {i}".encode()
        p.write_bytes(data)
        out[f"d{i % 3}/f{i}"] = (*stat_key(os.lstat(p)), sha(data))
    return out


def test_versions_round_trip_and_only_changed_ones_are_rewritten(tmp_path: Path) -> None:
    v1, v2 = files_in(tmp_path / "v1", 5), files_in(tmp_path / "v2", 4)
    cache = StatCache(tmp_path / "app.stats")
    cache.replace_version(1, dict(v1))
    cache.replace_version(2, dict(v2))
    cache.save()
    files = sorted(p.name for p in (tmp_path / "app.stats.d").iterdir())
    assert files == ["v1", "v2"]
    before = os.stat(tmp_path / "app.stats.d" / "v1")

    again = StatCache(tmp_path / "app.stats")
    assert sorted(again.serials()) == [1, 2]
    assert dict(again.entries(1)) == v1 and dict(again.entries(2)) == v2
    rel = "d0/f0"
    again.put(2, rel, (1, 2, 3, 4, 5), sha(b"other"))
    again.save()
    assert os.stat(tmp_path / "app.stats.d" / "v1").st_ino == before.st_ino  # untouched
    third = StatCache(tmp_path / "app.stats")
    assert third.get(2, rel) == (1, 2, 3, 4, 5, sha(b"other"))
    assert third.trusted(1, rel, tmp_path / "v1" / rel, v1[rel][5]) is not None


def test_dropped_and_taken_versions_lose_their_files(tmp_path: Path) -> None:
    cache = StatCache(tmp_path / "app.stats")
    for s in (1, 2, 3):
        cache.replace_version(s, files_in(tmp_path / f"v{s}", 2))
    cache.save()
    (tmp_path / "app.stats.d" / ".v9.123.tmp").write_bytes(b"a save cut short")
    cache = StatCache(tmp_path / "app.stats")
    taken = cache.take(1)
    assert len(taken) == 2 and 1 not in cache.serials()
    cache.retain([3])
    cache.save()
    assert sorted(p.name for p in (tmp_path / "app.stats.d").iterdir()) == ["v3"]


def test_the_earlier_single_file_format_is_read_then_replaced(tmp_path: Path) -> None:
    v1 = files_in(tmp_path / "v1", 3)
    legacy = tmp_path / "app.stats"
    legacy.write_bytes(msgpack.packb({1: v1, 2: {"x": [1, 2]}}, use_bin_type=True))
    cache = StatCache(legacy)
    rel = "d1/f1"
    # Still trusted without reading: a format change costs no re-hash.
    assert cache.trusted(1, rel, tmp_path / "v1" / rel, v1[rel][5]) is not None
    assert dict(cache.entries(1)) == v1
    assert dict(cache.entries(2)) == {}  # a malformed record is left out
    cache.save()
    assert not legacy.exists()
    assert dict(StatCache(legacy).entries(1)) == v1


@pytest.mark.parametrize(
    "damage",
    [
        b"",
        b"\x93garbage",
        # two paths for one sha256; then a format not known
        msgpack.packb((statcache.FORMAT, "a\0b", b"\0" * 32, b"\0" * 48, b"\0" * 32)),
        msgpack.packb((99, "a", b"\0" * 32, b"\0" * 24, b"\0" * 16)),
    ],
)
def test_a_damaged_version_file_is_a_miss_for_that_version_only(
    tmp_path: Path, damage: bytes
) -> None:
    cache = StatCache(tmp_path / "app.stats")
    cache.replace_version(1, files_in(tmp_path / "v1", 2))
    cache.replace_version(2, files_in(tmp_path / "v2", 2))
    cache.save()
    (tmp_path / "app.stats.d" / "v2").write_bytes(damage)
    cache = StatCache(tmp_path / "app.stats")
    assert dict(cache.entries(2)) == {}
    assert cache.candidates(2, [sha(b"file 0")]) is None  # unknown: the caller reads its manifest
    assert len(cache.entries(1)) == 2


def test_candidates_are_found_in_the_stored_column_in_stored_order(tmp_path: Path) -> None:
    entries = files_in(tmp_path / "v1", 6)
    dup = entries["d0/f0"][5]
    entries["d2/f5"] = (*entries["d2/f5"][:5], dup)  # two files with the same content
    # A digest whose bytes straddle two stored digests must not be taken for one.
    straddle = entries["d1/f1"][5][16:] + entries["d2/f2"][5][:16]
    cache = StatCache(tmp_path / "app.stats")
    cache.replace_version(1, entries)
    cache.save()
    cache = StatCache(tmp_path / "app.stats")
    got = cache.candidates(1, [dup, straddle])
    assert got is not None
    assert [rel for rel, _ in got] == [r for r in entries if entries[r][5] == dup]
    assert all(e == entries[rel] for rel, e in got)
    many = [sha(str(i).encode()) for i in range(100)] + [dup]  # the decoded path
    got_many = cache.candidates(1, many)
    assert got_many is not None and sorted(rel for rel, _ in got_many) == ["d0/f0", "d2/f5"]
    assert cache.candidates(7, [dup]) is None


def test_a_version_that_cannot_be_stored_is_left_out(tmp_path: Path) -> None:
    cache = StatCache(tmp_path / "app.stats")
    cache.replace_version(1, {"a": (1, 2, 3, 1 << 64, 5, sha(b"a"))})  # inode beyond 64 bits
    cache.replace_version(2, files_in(tmp_path / "v2", 1))
    cache.replace_version(3, {"a\0b": (1, 2, 3, 4, 5, sha(b"a"))})  # would split in two
    cache.save()
    again = StatCache(tmp_path / "app.stats")
    assert again.serials() == [2]


def test_a_shape_is_kept_with_its_records_and_only_while_they_are_complete(
    tmp_path: Path,
) -> None:
    entries = files_in(tmp_path / "v1", 3)
    shape = Shape({"d0": (1, 2, 3, 4), "d1": (5, 6, 7, 1 << 63)}, ("d2/link",), len(entries))
    cache = StatCache(tmp_path / "app.stats")
    cache.replace_version(1, dict(entries), shape)
    cache.replace_version(2, files_in(tmp_path / "v2", 1))  # no shape: a file target's
    cache.save()
    cache = StatCache(tmp_path / "app.stats")
    assert cache.shape(1) == shape and cache.shape(2) is None
    cache.put(1, "d0/f0", (9, 9, 9, 9, 9), sha(b"touched"))  # a record changes, not the tree
    cache.save()
    cache = StatCache(tmp_path / "app.stats")
    assert cache.shape(1) == shape
    cache.put(1, "d9/new", (9, 9, 9, 9, 9), sha(b"new"))  # records the shape did not count
    assert cache.shape(1) is None


def test_a_malformed_shape_trusts_no_directory(tmp_path: Path) -> None:
    cache = StatCache(tmp_path / "app.stats")
    cache.replace_version(1, files_in(tmp_path / "v1", 2), Shape({}, (), 2))
    cache.save()
    file = tmp_path / "app.stats.d" / "v1"
    fields = list(msgpack.unpackb(file.read_bytes()))
    fields[-1] = [{"d0": [1, 2, "x", 4]}, [], 2]
    file.write_bytes(msgpack.packb(fields, use_bin_type=True))
    cache = StatCache(tmp_path / "app.stats")
    assert cache.shape(1) is None
    assert len(cache.entries(1)) == 2  # the file records are still good
