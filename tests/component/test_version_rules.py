"""The version rules a mixed site relies on, through the real CLI on real files.

State directory (state/stateformat.py): a new one is marked with this code's
format; an unmarked one (p2pupd 0.1.0) is read as it is and migrated by the
first command that holds the lock; one of a newer format whose writer says
older readers stay correct is read; one that says they do not is refused with
one line and exit code 2 before anything is read or written. Bundle format
(protocol/bundle.py): the exporter marks what it writes with the oldest
format that carries it; a stick of a newer major format is refused on import
with one line, exit code 2, nothing stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import World, state_snapshot

from p2pupd.daemon.state import stateformat
from p2pupd.protocol import bundle as oci


def marker(world: World) -> stateformat.Marker:
    return stateformat.read_marker(world.state)


def test_a_new_state_dir_is_marked_with_this_format(world: World) -> None:
    lines = (world.state / "format").read_text().splitlines()
    assert lines[0] == str(stateformat.STATE_FORMAT) == "2"
    # Packs: a p2pupd without them would not see its small blobs.
    assert lines[1] == "oldest-reader 2"
    assert lines[2].startswith("written-by p2pupd ")
    assert marker(world).oldest_reader == 2


def test_an_unmarked_state_dir_is_read_then_migrated_by_a_locked_command(world: World) -> None:
    world.publish("1.0", {"a": b"one"})
    assert world.import_(world.export("s1"), "--apply").code == 0
    (world.state / "format").unlink()  # as p2pupd 0.1.0 left it: format 1
    # Reading commands read it as it is and change nothing.
    before = state_snapshot(world.state)
    assert world.app_status()["version"] == "1.0"
    assert state_snapshot(world.state) == before
    # A command that holds the lock migrates it; everything else is as it was.
    assert world.run("gc", "--state-dir", world.state).code == 0
    assert marker(world).format == 2
    assert world.app_status()["version"] == "1.0"


def test_a_newer_format_is_read_only_if_its_writer_says_we_may(world: World) -> None:
    fmt = world.state / "format"
    fmt.write_text("5\noldest-reader 2\nwritten-by p2pupd 7.0\nsome-new-key x\n")
    assert world.app_status()["version"] is None  # additive changes: readable
    assert world.run("gc", "--state-dir", world.state).code == 0
    assert fmt.read_text().startswith("5\n")  # never "migrated" backwards

    # A number alone (as development builds wrote format 2) reads as that format.
    fmt.write_text("2\n")
    assert marker(world) == stateformat.Marker(2, 2)

    fmt.write_text("5\noldest-reader 3\nwritten-by p2pupd 7.0\n")
    before = state_snapshot(world.state)
    for argv in (("status",), ("gc",), ("import", world.base / "nowhere"), ("apply", "app")):
        r = world.run(*argv, "--state-dir", world.state)
        assert r.code == 2, (argv, r.err)
        assert r.err.count("\n") == 1, r.err
        assert r.err == (
            f"p2pupd: error: state directory {world.state} is of format 5 (written by "
            f"p2pupd 7.0), which this {stateformat.this_version()} does not understand (it "
            "reads formats up to 2): run a p2pupd at least as new as the one that wrote it\n"
        )
    assert state_snapshot(world.state) == before


def test_a_damaged_marker_is_refused_with_its_repair(world: World) -> None:
    (world.state / "format").write_text("two\n")
    r = world.run("status", "--state-dir", world.state)
    assert r.code == 2 and r.err.count("\n") == 1
    assert "is not a p2pupd state format marker" in r.err and "write the number 2" in r.err


def test_a_trial_leaves_migrations_an_older_reader_cannot_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[int] = []
    later = (
        stateformat.Migration(2, 1, lambda root: steps.append(2)),
        stateformat.Migration(3, 1, lambda root: steps.append(3)),
        stateformat.Migration(4, 4, lambda root: steps.append(4)),  # breaks older readers
    )
    # (Format 2 itself breaks readers of 1: packs. These are made up for the rule.)
    monkeypatch.setattr(stateformat, "MIGRATIONS", later)
    monkeypatch.setattr(stateformat, "STATE_FORMAT", 4)
    assert stateformat.migrate(tmp_path, upto_reader=2) == [
        "state directory migrated to format 2",
        "state directory migrated to format 3",
    ]
    assert stateformat.read_marker(tmp_path) == stateformat.Marker(3, 1, stateformat.this_version())
    assert stateformat.migrate(tmp_path) == ["state directory migrated to format 4"]
    assert steps == [2, 3, 4]
    assert stateformat.read_marker(tmp_path).oldest_reader == 4
    assert stateformat.migrate(tmp_path) == []  # idempotent


def test_export_marks_the_oldest_format_and_import_refuses_a_newer_major(world: World) -> None:
    world.publish("1.0", {"a": b"one"})
    stick = world.export("s1")
    idx = json.loads((stick / "index.json").read_text())
    assert idx["annotations"][oci.ANNOTATION_FORMAT] == "1.0"
    assert idx["annotations"][oci.ANNOTATION_WRITER].startswith("p2pupd ")

    idx["annotations"] = {oci.ANNOTATION_FORMAT: "3.0", oci.ANNOTATION_WRITER: "p2pupd 9.0"}
    (stick / "index.json").write_text(json.dumps(idx))
    before = state_snapshot(world.state)
    r = world.import_(stick)
    assert r.code == 2
    assert r.err == (
        "p2pupd: error: bundle format 3.0 (written by 'p2pupd 9.0') is newer than this "
        "p2pupd reads (formats up to 2.x): update p2pupd on this node first, or have the "
        "bundle cut without the newer features\n"
    )
    assert state_snapshot(world.state) == before
