"""Auto-import: ``p2pupd import --watch DIR`` notices bundles appearing under a
mount directory, imports each once, reports refusals and keeps watching."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _sneaker import V1, V2, flip_bit, installed_version, parts
from conftest import World

from p2pupd.daemon import api
from p2pupd.daemon.bundles.watch import find_bundles


def arrive(bundle: Path, mount: Path, name: str) -> Path:
    """Make ``bundle`` appear under ``mount`` at once, as a mounted stick does."""
    tmp = mount.parent / f".{name}.tmp"
    shutil.copytree(bundle, tmp)
    dest = mount / name
    os.rename(tmp, dest)
    return dest


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_watcher_imports_each_bundle_once_and_survives_a_bad_one(world: World) -> None:
    world.publish("1.0", V1)
    usb1 = world.export("usb1")
    world.publish("2.0", V2)
    usb2 = world.export("usb2")
    mount = world.base / "media"
    mount.mkdir()
    stop = threading.Event()
    events: list[api.WatchEvent] = []
    t = threading.Thread(
        target=api.watch_imports,
        args=(world.state, mount),
        kwargs={"apply_after": True, "stop": stop, "interval": 0.02, "on_event": events.append},
    )
    t.start()
    try:
        (mount / "user").mkdir()
        arrive(usb1, mount / "user", "stick1")  # depth 2: /media/<user>/<stick>
        wait_for(lambda: len(events) == 1)
        assert events[0].outcome == "imported" and installed_version(world) == "1.0"

        second = arrive(usb2, mount, "stick2")  # depth 1
        wait_for(lambda: len(events) == 2)
        assert events[1].outcome == "imported" and installed_version(world) == "2.0"

        shutil.rmtree(second)  # pulled out; a damaged stick arrives: refused, watch goes on
        tampered = world.base / "tampered"
        shutil.copytree(usb2, tampered)
        flip_bit(parts(tampered).release_envelope, 50)
        arrive(tampered, mount, "stick3")
        wait_for(lambda: len(events) == 3)
        assert events[2].outcome == "refused" and "does not match" in str(events[2].detail)
        time.sleep(0.2)
        assert len(events) == 3, "a refused bundle is not retried until it changes"
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def cli(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "p2pupd.tools.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_watch_once_from_the_command_line(world: World) -> None:
    world.publish("1.0", V1)
    usb = world.export("usb")
    mount = world.base / "media"
    mount.mkdir()
    p = cli("import", "--watch", mount, "--once", "--timeout", "60", "--interval", "0.05",
            "--apply", "--state-dir", world.state)  # fmt: skip
    try:
        assert p.stdout is not None
        assert p.stdout.readline().startswith("watching")
        arrive(usb, mount, "stick")
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert "imported app 1.0" in out and "applied app 1.0" in out
    assert installed_version(world) == "1.0"


def test_watch_stops_cleanly_on_sigterm(world: World) -> None:
    mount = world.base / "media"
    mount.mkdir()
    p = cli("import", "--watch", mount, "--interval", "0.05", "--state-dir", world.state)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().startswith("watching")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert err == ""


def test_watch_once_times_out_with_one_line(world: World) -> None:
    mount = world.base / "media"
    mount.mkdir()
    r = world.run("import", "--watch", mount, "--once", "--timeout", "0.2", "--interval", "0.05",
                  "--state-dir", world.state)  # fmt: skip
    assert r.code == 1 and r.err.strip().count("\n") == 0 and "no bundle appeared" in r.err


def test_find_bundles_depth_and_links(world: World, tmp_path: Path) -> None:
    world.publish("1.0", V1)
    usb = world.export("usb")
    media = tmp_path / "media"
    (media / "user").mkdir(parents=True)
    shutil.copytree(usb, media / "user" / "stick")
    shutil.copytree(usb, media / "a" / "b" / "too-deep")
    os.symlink(media / "user" / "stick", media / "link")
    found = find_bundles(media)
    assert list(found) == [media / "user" / "stick"]
    assert list(find_bundles(media / "user" / "stick")) == [media / "user" / "stick"]
