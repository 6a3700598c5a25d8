"""The rough edges a new operator hits in the first hour, each with its one-line
error and documented exit code: keygen into a missing directory, `apply` when the
newest release is marked bad, `export REPO` without a destination, expiry times
and `P2PUPD_NOW`, the systemd unit's restart policy, and the udev USB recipe."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Run, World

SYSTEMD = Path(__file__).resolve().parents[2] / "tools" / "systemd"
V1 = {"bin/tool": b"v1\n"}
V2 = {"bin/tool": b"v2\n"}


def one_line(r: Any, code: int, *words: str) -> str:
    assert r.code == code, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pupd: "), r.err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return str(lines[0])


# -- keygen -------------------------------------------------------------------------------


def test_keygen_creates_a_missing_key_directory_for_its_owner_only(
    tmp_path: Path, run: Run
) -> None:
    key = tmp_path / "station" / "keys" / "root.key"
    r = run("keygen", key)
    assert r.code == 0, r.err
    assert re.fullmatch(r"[0-9a-f]{64}\n", r.out)
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.with_name("root.key.pub").read_text().split()[2] == r.out.strip()
    (tmp_path / "file").write_text("not a directory")
    one_line(run("keygen", tmp_path / "file" / "k.key"), 2, "cannot create key directory")


# -- apply when the newest release is marked bad --------------------------------------------


def test_apply_says_the_newest_release_is_marked_bad_and_how_to_force_it(
    world: World, tmp_path: Path
) -> None:
    check = tmp_path / "check"
    check.write_text('#!/bin/sh\ngrep -q v2 "$P2PUPD_TARGET/bin/tool" && exit 4; exit 0\n')
    check.chmod(0o755)
    world.reinit("--health-cmd", str(check))
    world.publish("1.0", V1)
    assert world.import_(world.export("usb1"), "--apply").code == 0
    world.publish("2.0", V2)
    assert world.import_(world.export("usb2"), "--apply").code == 1  # rolled back, marked bad
    r = world.run("apply", "app", "--state-dir", world.state)
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        "app 1.0 is live (no change)",
        "note: the newest release, app 2.0 (serial 2), is marked bad here: health check "
        "exited with 4; retry it with `p2pupd apply app --version 2.0 --force`, or clear "
        "the mark with `p2pupd mark-good app 2`",
    ]
    doc = json.loads(world.run("apply", "app", "--state-dir", world.state, "--json").out)
    assert doc["newest_marked_bad"] == {
        "serial": 2, "version": "2.0", "reason": "health check exited with 4"
    }  # fmt: skip
    # mark-good clears it; a later apply tries 2.0 again.
    one_line(world.run("mark-good", "app", "1", "--state-dir", world.state), 1,
             "app serial 1 is not marked bad")  # fmt: skip
    check.write_text("#!/bin/sh\nexit 0\n")
    r = world.run("mark-good", "app", "--state-dir", world.state)
    assert r.code == 0 and r.out.startswith("app serial 2 is no longer marked bad"), r.err
    assert world.app_status()["bad"] == {}
    r = world.run("apply", "app", "--state-dir", world.state)
    assert r.out == "app 2.0 is live\n", r.err


# -- export --------------------------------------------------------------------------------


def test_export_of_a_repository_without_destination_says_what_is_missing(
    world: World, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.publish("1.0", V1)
    line = one_line(run("export", world.repo), 2)
    assert line == (
        f"p2pupd: error: export {world.repo} needs a destination: "
        f"p2pupd export {world.repo} DEST (e.g. /media/usb)"
    )
    # One path that is not a repository means "this node's store": say so when there is none.
    monkeypatch.setenv("P2PUPD_STATE_DIR", str(world.base / "no-node"))
    one_line(run("export", world.base / "usb"), 2, "one path means a bundle of this node's own "
             "store", "give both: p2pupd export REPO")  # fmt: skip
    assert not (world.base / "usb").exists()


# -- times ---------------------------------------------------------------------------------


def test_expiry_errors_print_utc_times_and_p2pupd_now_takes_either_format(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2PUPD_NOW", "2027-03-01T00:00:00Z")
    src = world.base / "src"
    src.mkdir()
    (src / "f").write_text("x")
    r = world.run("publish", world.repo, "app", "1.0", src, "--expires-days", "1")
    assert r.code == 0, r.err
    bundle = world.export("usb1")
    monkeypatch.setenv("P2PUPD_NOW", "1803902400")  # 2027-03-01T12:00:00Z: still valid
    assert world.import_(bundle).code == 0
    monkeypatch.setenv("P2PUPD_NOW", "2027-03-05")
    r = world.run("verify", bundle)
    assert one_line(r, 3) == (
        "p2pupd: refused: release app 1.0 expired at 2027-03-02T00:00:00Z "
        "(node clock says 2027-03-05T00:00:00Z)"
    )
    monkeypatch.setenv("P2PUPD_NOW", "next tuesday")
    one_line(world.run("verify", bundle), 2, "P2PUPD_NOW='next tuesday' is not a time",
             "2027-03-01T12:00:00Z")  # fmt: skip
    one_line(world.import_(bundle), 2, "P2PUPD_NOW")


# -- systemd ----------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_systemd_does_not_restart_a_node_that_needs_the_operator(tmp_path: Path) -> None:
    """A node never initialised (or with a damaged configuration) exits 2; the unit
    restarts whatever the exit status (a self-update's failed trial run must end in
    a restart of the old version: docs/self-update.md), but at most
    StartLimitBurst times in StartLimitIntervalSec, so it does not spin every 5 s
    forever."""
    unit = _unit(SYSTEMD / "p2pupd.service")
    assert unit["Restart"] == ["always"]
    assert "RestartPreventExitStatus" not in unit
    burst, interval = int(unit["StartLimitBurst"][0]), int(unit["StartLimitIntervalSec"][0])
    restart = int(unit["RestartSec"][0].rstrip("s"))
    assert 0 < burst <= 10 and burst * restart < interval  # the limit is reached
    state = tmp_path / "never-initialised"
    r = subprocess.run(
        [sys.executable, "-m", "p2pupd.tools.cli", "daemon", "--state-dir", str(state),
         "--listen", "127.0.0.1:0", "--no-mdns"], capture_output=True, text=True, timeout=60,
         check=False,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"p2pupd: error: {state} is not an initialised p2pupd state directory (run `p2pupd init`)"
    ]
    if shutil.which("systemd-analyze"):  # the unit is one systemd accepts, key by key
        v = subprocess.run(["systemd-analyze", "verify", str(SYSTEMD / "p2pupd.service")],
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        complaints = [ln for ln in (v.stdout + v.stderr).splitlines() if "/p2pupd is not" not in ln]
        assert complaints == []


# -- udev -------------------------------------------------------------------------------

_PAIR = re.compile(r'\s*([A-Z]+(?:\{[^}]*\})?)\s*(==|!=|\+=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _rules(path: Path) -> list[list[tuple[str, str, str]]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    rules = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            pairs = _PAIR.findall(line)
            assert "".join(_PAIR.sub("", line).split()) == "", f"unparsed: {line}"
            rules.append(pairs)
    return rules


def _udev(rules: list[list[tuple[str, str, str]]], event: dict[str, str]) -> list[str]:
    """Run ``event`` through the rules (the constructs the recipe uses); return RUN lines."""
    env = {k: v for k, v in event.items() if k not in ("ACTION", "SUBSYSTEM", "SUBSYSTEMS", "KERNEL")}
    runs: list[str] = []

    def get(key: str) -> str:
        return env.get(key[4:-1], "") if key.startswith("ENV{") else event.get(key, "")

    def subst(v: str) -> str:
        v = v.replace("%k", event["KERNEL"]).replace("$devnode", "/dev/" + event["KERNEL"])
        return re.sub(r"(?:%E|\$env)\{([^}]*)\}", lambda m: env.get(m.group(1), ""), v)

    for rule in rules:
        if all(fnmatch.fnmatchcase(get(k), v) == (op == "==") for k, op, v in rule
               if op in ("==", "!=")):  # fmt: skip
            for k, op, v in rule:
                if k.startswith("ENV{") and op == "=":
                    env[k[4:-1]] = subst(v)
                elif k.startswith("RUN"):
                    runs.append(subst(v))
    return runs


def test_udev_recipe_gives_each_stick_its_own_mount_point() -> None:
    """Two sticks labelled alike used to share /media/p2pupd/LABEL, and one without a
    label was mounted on /media/p2pupd itself."""
    rules = _rules(SYSTEMD / "99-p2pupd-usb.rules")
    base = {"ACTION": "add", "SUBSYSTEMS": "usb", "SUBSYSTEM": "block", "ID_FS_USAGE": "filesystem"}
    points = {}
    for kernel, label in (("sdb1", "UPDATES"), ("sdc1", "UPDATES"), ("sdd1", "")):
        runs = _udev(rules, {**base, "KERNEL": kernel, "ID_FS_LABEL": label})
        assert len(runs) == 1 and runs[0].startswith("/usr/bin/systemd-mount "), runs
        assert f" /dev/{kernel} " in runs[0] and "--options=ro,nosuid,nodev,noexec" in runs[0]
        points[kernel] = Path(runs[0].split()[-1])
    assert points == {
        "sdb1": Path("/media/p2pupd/UPDATES-sdb1"),
        "sdc1": Path("/media/p2pupd/UPDATES-sdc1"),
        "sdd1": Path("/media/p2pupd/sdd1"),
    }
    assert not _udev(rules, {**base, "KERNEL": "sde", "ID_FS_USAGE": "raid", "ID_FS_LABEL": "x"})
    gone = _udev(rules, {"ACTION": "remove", "SUBSYSTEMS": "usb", "SUBSYSTEM": "block",
                         "KERNEL": "sdb1"})  # fmt: skip
    assert gone == ["/usr/bin/systemd-umount /dev/sdb1"]
