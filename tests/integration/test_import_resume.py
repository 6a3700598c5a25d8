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
from conftest import World, state_snapshot, tree_snapshot

from p2pupd.daemon import api
from p2pupd.protocol.ids import sha256

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


def complete_in(incoming: Path) -> list[str]:
    """Names of the blobs in ``incoming`` whose bytes match their name."""
    return sorted(p.name for p in incoming.iterdir() if sha256(p.read_bytes()).hex() == p.name)


def kill_halfway(w: World, usb: Path) -> None:
    r = cli(
        "import", usb, "--state-dir", w.state, env={"P2PUPD_IMPORT_KILL_AFTER": str(KILL_AFTER)}
    )
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)


def test_sigkill_halfway_then_rerun_copies_no_blob_twice(world: World, usb: Path) -> None:
    total = chunk_count(usb)
    assert total > 2 * KILL_AFTER
    before_state, before_blobs = state_snapshot(world.state), store_blobs(world.state)
    kill_halfway(world, usb)
    # Killed: nothing is stored or recorded yet; the complete blobs wait in incoming/.
    assert store_blobs(world.state) == before_blobs
    after = {k: v for k, v in state_snapshot(world.state).items() if not k.startswith("incoming")}
    assert after == before_state
    # Blobs are copied by parallel threads: at the kill another may be complete
    # or half-written (a torn one is re-checked and copied again by the rerun).
    incoming = complete_in(world.state / "incoming")
    assert KILL_AFTER <= len(incoming) <= KILL_AFTER + 4

    r = cli("import", usb, "--state-dir", world.state, "--apply", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["blobs_resumed"] == len(incoming)
    assert doc["blobs_copied"] == total - len(incoming)  # together: every blob exactly once
    assert doc["releases"][0]["complete"] and doc["applied"][0]["version"] == "1.0"
    assert tree_snapshot(world.target) == tree_snapshot(world.base / "src" / "1.0")
    assert not (world.state / "incoming").exists()


def test_rerun_rechecks_left_blobs_and_recopies_a_torn_one(world: World, usb: Path) -> None:
    """Blobs damaged in incoming/ (a power cut before they reached the disk) are
    not trusted: they are copied again; debris is removed."""
    total = chunk_count(usb)
    kill_halfway(world, usb)
    left = [world.state / "incoming" / n for n in complete_in(world.state / "incoming")]
    # Tear two blobs that can be torn: the 2-byte one ("small") survives a cut to 100 bytes.
    left.sort(key=lambda p: p.stat().st_size < 200)
    os.chmod(left[0], 0o644)
    left[0].write_bytes(b"\0" * left[0].stat().st_size)  # torn: right size, wrong bytes
    os.chmod(left[1], 0o644)
    left[1].write_bytes(left[1].read_bytes()[:100])  # torn: cut short
    (world.state / "incoming" / "0123.part").write_bytes(b"debris of an older version")
    r = world.import_(usb, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["blobs_resumed"] == len(left) - 2
    assert doc["blobs_copied"] == total - len(left) + 2
    assert not (world.state / "incoming").exists()
    assert all(d.hex() in store_blobs(world.state) for d in _chunk_digests(usb))


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
    n = len(list((world.state / "incoming").iterdir()))
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
