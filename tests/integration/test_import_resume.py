"""An interrupted import resumes: complete blobs are kept, a rerun copies none twice.

The kill is real and deterministic: a ``p2pupd import`` process SIGKILLs
itself after its Nth blob (``P2PUPD_IMPORT_KILL_AFTER``, the importer's fault
injection point), and the rerun's ``--json`` report counts what it copied.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _sneaker import parts, rand, store_blobs
from _store import spooled, tail_records
from conftest import World, state_snapshot, tree_snapshot

from p2pupd.daemon import api
from p2pupd.daemon.store.packstore import PackStore

KILL_AFTER = 10
TREE = {"big/one.bin": rand(11, 1_200_000), "big/two.bin": rand(12, 600_000), "small": b"x\n"}


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pupd.tools.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def usb(world: World) -> Path:
    src = world.publish("1.0", TREE)
    assert src.is_dir()
    return world.export("usb")


def chunk_count(usb: Path) -> int:
    """Blobs the bundle carries: files of their own and packed small ones (``small``)."""
    p = parts(usb)
    assert p.packed, "the tiny file is packed: resume covers packed blobs too"
    return p.blob_count


def kill_halfway(w: World, usb: Path) -> None:
    r = cli(
        "import", usb, "--state-dir", w.state, env={"P2PUPD_IMPORT_KILL_AFTER": str(KILL_AFTER)}
    )
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)


SPOOL = ("spool", "blobs/packs/")


def test_sigkill_halfway_then_rerun_copies_no_blob_twice(world: World, usb: Path) -> None:
    total = chunk_count(usb)
    assert total > 2 * KILL_AFTER
    before_state, before_blobs = state_snapshot(world.state), store_blobs(world.state)
    kill_halfway(world, usb)
    # Killed: nothing is stored or recorded yet; the complete blobs wait past
    # a pack's index, where no entry names them.
    assert store_blobs(world.state) == before_blobs
    after = {k: v for k, v in state_snapshot(world.state).items() if not k.startswith(SPOOL)}
    assert after == {k: v for k, v in before_state.items() if not k.startswith(SPOOL)}
    # Blobs are copied by parallel threads: at the kill another may be complete
    # or half-written (a torn one is re-checked and copied again by the rerun).
    left = spooled(world.state)
    assert KILL_AFTER <= len(left) <= KILL_AFTER + 4

    r = cli("import", usb, "--state-dir", world.state, "--apply", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["blobs_resumed"] == len(left)
    assert doc["blobs_copied"] == total - len(left)  # together: every blob exactly once
    assert doc["releases"][0]["complete"] and doc["applied"][0]["version"] == "1.0"
    assert tree_snapshot(world.target) == tree_snapshot(world.base / "src" / "1.0")
    assert not (world.state / "spool").exists() and not tail_records(world.state)


def test_rerun_rechecks_left_blobs_and_recopies_a_torn_one(world: World, usb: Path) -> None:
    """A record damaged past a pack's index (a power cut before it reached the
    disk) is not trusted: that blob is copied again, the intact ones are kept."""
    total = chunk_count(usb)
    kill_halfway(world, usb)
    records = tail_records(world.state)
    intact = len(spooled(world.state))  # one more may be torn by the kill itself
    assert intact >= KILL_AFTER
    pack, offset, size = records[3]
    os.chmod(pack, 0o644)
    with open(pack, "r+b") as f:  # torn: right size, wrong bytes
        f.seek(offset)
        f.write(b"\0" * size)
    assert len(spooled(world.state)) == intact - 1
    r = world.import_(usb, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["blobs_resumed"] == intact - 1
    assert doc["blobs_copied"] == total - intact + 1
    assert not (world.state / "spool").exists() and not tail_records(world.state)
    assert all(d.hex() in store_blobs(world.state) for d in _chunk_digests(usb))
    assert PackStore(world.state).fsck(full=True).clean


def test_rerun_after_a_record_cut_short(world: World, usb: Path) -> None:
    """A pack that ends inside a record (the kill came mid-write) keeps the
    records before it; the cut one is copied again."""
    total = chunk_count(usb)
    kill_halfway(world, usb)
    pack, offset, size = tail_records(world.state)[5]
    os.truncate(pack, offset + size // 2)
    kept = len(spooled(world.state))
    assert kept >= 4  # the five before the cut, but one the kill itself may have torn
    r = world.import_(usb, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert (doc["blobs_resumed"], doc["blobs_copied"]) == (kept, total - kept)
    assert PackStore(world.state).fsck(full=True).clean


def _chunk_digests(usb: Path) -> list[bytes]:
    p = parts(usb)
    return [bytes.fromhex(c.name) for c in p.chunks] + [bytes.fromhex(h) for h in p.packed]


def test_cancel_between_blobs_keeps_complete_blobs(world: World, usb: Path) -> None:
    """The watcher's stop (SIGTERM) interrupts between blobs; a rerun resumes."""
    copied = []

    def cancel() -> bool:
        return len(copied) >= 3

    with pytest.raises(api.ImportInterruptedError):
        api.import_dir(world.state, usb, progress=copied.append, cancel=cancel)
    n = len(spooled(world.state))
    assert n >= 3
    report, _ = api.import_dir(world.state, usb)
    assert report.blobs_resumed == n and report.blobs_copied == chunk_count(usb) - n


def test_second_import_of_same_bundle_copies_nothing(world: World, usb: Path) -> None:
    assert world.import_(usb).code == 0
    r = world.import_(usb, "--json")
    doc = json.loads(r.out)
    assert (doc["blobs_copied"], doc["blobs_resumed"]) == (0, 0)
    assert doc["blobs_present"] == chunk_count(usb)
    assert doc["releases"][0]["new"] is False
