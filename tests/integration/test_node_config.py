"""The node configuration an operator can read, change and repair: ``config show``,
``config set``, ``config repair``, re-running ``init``, and health commands with
shell quoting -- through the real command line, and with a real daemon running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import Run, World, state_snapshot, tree_snapshot

V1 = {"bin/tool": b"v1\n", "etc/conf": b"a=1\n"}
V2 = {"bin/tool": b"v2\n", "etc/conf": b"a=2\n"}


def config(world: World) -> dict[str, Any]:
    r = world.run("config", "show", "--json", "--state-dir", world.state)
    assert r.code == 0, r.err
    doc: dict[str, Any] = json.loads(r.out)
    return doc


def one_line_error(r: Any, code: int, *words: str) -> None:
    """``r`` failed with ``code`` and one stderr line holding every word."""
    assert r.code == code, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pupd: error: "), r.err
    for w in words:
        assert w in lines[0], (w, lines[0])


# -- show and set ------------------------------------------------------------------------


def test_show_prints_toml_that_reads_back_as_the_json_document(world: World) -> None:
    r = world.run("config", "show", "--state-dir", world.state)
    assert r.code == 0, r.err
    doc = config(world)
    assert tomllib.loads(r.out) == doc
    app = doc["components"]["app"]
    assert app == {
        "target": str(world.target.resolve()), "kind": "dir", "auto_apply": True, "retain": 2,
        "immutable": False, "health_cmd": [], "health_timeout": 30.0, "allow_hazardous_modes": False,
    }  # fmt: skip
    assert doc["hooks"]["memory_mib"] == 64 and len(bytes.fromhex(doc["node_id"])) == 16


def test_set_changes_each_setting_and_what_the_node_does(world: World, tmp_path: Path) -> None:
    cases = [
        ("components.app.auto_apply", "false", False),
        ("components.app.retain", "3", 3),
        ("components.app.immutable", "yes", True),
        ("components.app.health_cmd", 'sh -c "exit 0"', ["sh", "-c", "exit 0"]),
        ("components.app.health_timeout", "2.5", 2.5),
        ("hooks.fuel", "1_000_000", 1_000_000),
        ("hooks.memory_mib", "32", 32),
        ("hooks.seconds", "5", 5.0),
        ("platform", "linux-aarch64", "linux-aarch64"),
        ("components.app.allow_hazardous_modes", "true", True),
    ]
    for key, text, want in cases:
        r = world.run("config", "set", key, text, "--state-dir", world.state)
        assert r.code == 0, r.err
        assert r.out == f"{key} = {json.dumps(want)}\n"
    doc = config(world)
    app = doc["components"]["app"]
    assert (app["auto_apply"], app["retain"], app["immutable"]) == (False, 3, True)
    assert (app["health_cmd"], app["health_timeout"]) == (["sh", "-c", "exit 0"], 2.5)
    assert doc["hooks"] == {"fuel": 1_000_000, "memory_mib": 32, "seconds": 5.0}
    assert doc["platform"] == "linux-aarch64"
    status = json.loads(world.run("status", "--json", "--state-dir", world.state).out)
    assert status["platform"] == "linux-aarch64"
    assert status["hook_limits"] == {"fuel": 1_000_000, "memory": 32 << 20, "ms": 5000}
    # The quoted health command runs as three words: the release passes its check.
    world.run("config", "set", "platform", doc["platform"].replace("aarch64", os.uname().machine),
              "--state-dir", world.state)  # fmt: skip
    world.publish("1.0", V1)
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    assert world.app_status()["version"] == "1.0" and world.app_status()["bad"] == {}


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("components.app.auto_apply", "maybe", ["want true or false"]),
        ("components.app.retain", "-1", ["components.app.retain", "want 0..100"]),
        ("components.app.health_cmd", 'sh -c "exit 0', ["No closing quotation"]),
        ("components.app.health_cmd", "/nonexistent/check", ["is not an executable file"]),
        ("components.app.health_cmd", "no-such-program-p2pupd", ["not found on PATH"]),
        ("components.app.health_timeout", "0", ["want 0 < seconds"]),
        ("components.nope.retain", "1", ["'nope' is not configured here (have: app)"]),
        ("components.app.target", "/tmp", ["unknown or read-only setting"]),
        ("node_id", "00", ["unknown or read-only setting"]),
        ("platform", "Linux X86", ["invalid platform name"]),
        ("hooks.fuel", "lots", ["want a whole number"]),
    ],
)
def test_set_refuses_a_bad_value_in_one_line_and_changes_nothing(
    world: World, key: str, value: str, words: list[str]
) -> None:
    before = state_snapshot(world.state)
    r = world.run("config", "set", key, value, "--state-dir", world.state)
    one_line_error(r, 2, *words)
    assert state_snapshot(world.state) == before


# -- init ----------------------------------------------------------------------------------


def test_reinit_keeps_components_and_settings_it_is_not_given(world: World, run: Run) -> None:
    other = world.base / "target" / "conf"
    r = run("init", "--state-dir", world.state, "--trust", world.repo / "root.msgpack",
            "--component", f"conf={other}", "--kind", "symlink", "--no-auto-apply",
            "--health-cmd", "true", "--retain", "1")  # fmt: skip
    assert r.code == 0, r.err
    for key, value in [("components.app.auto_apply", "false"), ("components.app.retain", "4"),
                       ("components.app.health_cmd", "sh -c 'exit 0'"), ("hooks.fuel", "777")]:
        assert world.run("config", "set", key, value, "--state-dir", world.state).code == 0
    before = config(world)
    # Re-running init for app alone, with only --retain: conf and app's other settings stay.
    r = run("init", "--state-dir", world.state, "--trust", world.repo / "root.msgpack",
            "--component", f"app={world.target}", "--retain", "5")  # fmt: skip
    assert r.code == 0, r.err
    after = config(world)
    before["components"]["app"]["retain"] = 5
    assert after == before
    conf = after["components"]["conf"]
    assert (conf["kind"], conf["auto_apply"], conf["health_cmd"], conf["retain"]) == (
        "symlink", False, ["true"], 1)  # fmt: skip
    assert after["hooks"]["fuel"] == 777


@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        (["--health-cmd", 'sh -c "exit 0'], 2, ["--health-cmd", "No closing quotation"]),
        (["--health-cmd", "/nonexistent/selftest"], 2, ["is not an executable file"]),
        (["--retain", "-1"], 2, ["retain wants 0..100"]),
        (["--component", "Bad Name=/tmp/x"], 2, ["invalid component name"]),
        (["--platform", "Linux X86"], 2, ["invalid platform name"]),
    ],
)
def test_refused_init_changes_nothing(
    world: World, run: Run, extra: list[str], code: int, words: list[str]
) -> None:
    before = state_snapshot(world.state)
    r = run("init", "--state-dir", world.state, "--trust", world.repo / "root.msgpack",
            "--component", f"app={world.target}", *extra)  # fmt: skip
    one_line_error(r, code, *words)
    assert state_snapshot(world.state) == before


def test_refused_init_of_a_new_node_creates_nothing(world: World, run: Run) -> None:
    fresh = world.base / "fresh"
    r = run("init", "--state-dir", fresh, "--trust", world.repo / "root.msgpack",
            "--component", f"app={world.base / 'x'}", "--health-cmd", "no-such-program-p2pupd")  # fmt: skip
    one_line_error(r, 2, "not found on PATH")
    assert not fresh.exists()


def test_health_command_with_shell_quoting_runs_as_the_shell_would(world: World) -> None:
    """'sh -c "exit 0"' was split on blanks (sh then ran `"exit`): the release was marked
    bad. Now it is three words and passes; 'sh -c "exit 7"' fails with its own code."""
    world.reinit("--health-cmd", 'sh -c "exit 0"')
    assert config(world)["components"]["app"]["health_cmd"] == ["sh", "-c", "exit 0"]
    world.publish("1.0", V1)
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    st = world.app_status()
    assert st["version"] == "1.0" and st["bad"] == {}
    world.reinit("--health-cmd", 'sh -c "echo \\"v2 is sick\\"; exit 7"')
    world.publish("2.0", V2)
    r = world.import_(world.export("usb2"), "--apply")
    assert r.code == 1
    assert world.app_status()["bad"] == {"2": "health check exited with 7: v2 is sick"}


def test_health_command_inside_the_target_may_appear_with_the_first_release(
    world: World,
) -> None:
    selftest = world.target / "bin" / "selftest"
    world.reinit("--health-cmd", f"{selftest} --quick")  # not there yet: accepted
    assert config(world)["components"]["app"]["health_cmd"] == [str(selftest), "--quick"]
    src = world.base / "src" / "1.0"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "selftest").write_text('#!/bin/sh\n[ "$1" = --quick ]\n')
    (src / "bin" / "selftest").chmod(0o755)
    assert world.run("publish", world.repo, "app", "1.0", src).code == 0
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    assert world.app_status()["version"] == "1.0"


# -- repair ---------------------------------------------------------------------------------


def _installed_v1(world: World) -> tuple[str, dict[str, Any]]:
    world.publish("1.0", V1)
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    world.publish("2.0", V2)
    r = world.import_(world.export("usb2"), "--apply")
    assert r.code == 0, r.err
    return config(world)["node_id"], world.app_status()


def test_damaged_config_is_restored_from_its_backup_copy(world: World) -> None:
    node_id, status = _installed_v1(world)
    cfg = world.state / "config.msgpack"
    cfg.write_bytes(cfg.read_bytes()[:-7])  # a torn sector, say
    r = world.run("status", "--state-dir", world.state)
    one_line_error(r, 2, "config.msgpack is damaged", "`p2pupd config repair`")
    r = world.run("config", "repair", "--state-dir", world.state)
    assert r.code == 0, r.err
    assert "restored the configuration from config.backup.msgpack" in r.out
    assert config(world)["node_id"] == node_id
    assert world.app_status() == status
    r = world.run("config", "repair", "--state-dir", world.state)
    assert r.code == 0 and r.out.startswith("note: the configuration is sound")


def test_repair_keeps_node_id_and_high_water_marks_when_both_copies_are_damaged(
    world: World, run: Run
) -> None:
    node_id, status = _installed_v1(world)
    old_bundle = world.base / "usb1"
    cfg = world.state / "config.msgpack"
    raw = cfg.read_bytes()
    cfg.write_bytes(raw[: raw.index(b"platform")] + b"\xc1garbage")  # the node id survives
    (world.state / "config.backup.msgpack").unlink()
    states = (world.state / "state.msgpack").read_bytes()
    r = world.run("config", "repair", "--state-dir", world.state, "--platform", "linux-x86_64")
    assert r.code == 0, r.err
    assert "component app has state here (high-water serial 2) but no configuration" in r.out
    assert f"of node {node_id[:12]}" in r.out
    assert (world.state / "state.msgpack").read_bytes() == states
    doc = config(world)
    assert (doc["node_id"], doc["platform"], doc["components"]) == (node_id, "linux-x86_64", {})
    world.reinit()  # the operator adds the component again
    assert world.app_status()["version"] == status["version"] == "2.0"
    assert world.app_status()["high_water"] == 2
    # The high-water mark still refuses a replayed old stick.
    r = world.import_(old_bundle)
    assert r.code == 3 and "not newer than" in r.err


def test_repair_keeps_the_components_that_still_parse(world: World, run: Run) -> None:
    from p2pupd.protocol import encoding

    other = world.base / "target" / "conf"
    assert run("init", "--state-dir", world.state, "--trust", world.repo / "root.msgpack",
               "--component", f"conf={other}").code == 0  # fmt: skip
    node_id = config(world)["node_id"]
    cfg = world.state / "config.msgpack"
    doc = encoding.decode(cfg.read_bytes())
    doc["components"]["conf"]["kind"] = "floppy"  # written by some future version
    cfg.write_bytes(encoding.encode(doc))
    (world.state / "config.backup.msgpack").write_bytes(encoding.encode(doc))
    r = world.run("config", "repair", "--state-dir", world.state)
    assert r.code == 0, r.err
    assert "component 'conf' could not be kept (component conf: unknown target kind 'floppy')" in r.out
    after = config(world)
    assert after["node_id"] == node_id and list(after["components"]) == ["app"]


def test_repair_of_a_node_never_initialised_says_so(tmp_path: Path, run: Run) -> None:
    (tmp_path / "state").mkdir()
    r = run("config", "repair", "--state-dir", tmp_path / "state")
    one_line_error(r, 2, "has no configuration to repair (run `p2pupd init`)")


# -- with a daemon running ------------------------------------------------------------------


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pupd.tools.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def _daemon(state: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pupd.tools.cli", "daemon", "--state-dir", str(state),
             "--listen", "127.0.0.1:0", "--no-mdns"], stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = _cli("status", "--json", "--state-dir", state)
        if r.returncode == 0 and "daemon" in json.loads(r.stdout):
            return proc
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(log.read_text())


def _files(state: Path) -> dict[str, bytes]:
    """Every regular file of a state directory and its bytes (the lock file aside)."""
    return {
        str(p.relative_to(state)): p.read_bytes()
        for p in state.rglob("*")
        if p.is_file() and not p.is_socket() and p.name != "lock"
    }


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=20)


def test_with_a_daemon_running(world: World) -> None:
    """init fails and changes nothing; config set is live (auto_apply), platform waits
    for a restart; config repair makes the daemon write its configuration back."""
    world.publish("1.0", V1)
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    world.publish("2.0", V2)
    usb2 = world.export("usb2")
    log = world.base / "daemon.log"
    proc = _daemon(world.state, log)
    try:
        before = _files(world.state)
        r = world.run("init", "--state-dir", world.state, "--trust", world.repo / "root.msgpack",
                 "--component", f"other={world.base / 'other'}", "--retain", "9")  # fmt: skip
        assert r.code == 1, r.err
        assert r.err.count("\n") == 1 and "init changed nothing" in r.err
        assert _files(world.state) == before
        r = world.run("config", "set", "components.app.auto_apply", "false", "--state-dir", world.state)
        assert r.code == 0, r.err
        r = world.run("config", "set", "platform", "linux-riscv64", "--state-dir", world.state)
        assert r.code == 2 and "stop the daemon" in r.err
        r = world.run("import", usb2, "--state-dir", world.state)  # through the daemon
        assert r.code == 0, r.err
        # The daemon decides on auto-apply when the release is complete here.
        deadline = time.monotonic() + 20
        while "event=release-complete component=app version=2.0" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        assert "event=applied component=app version=2.0" not in log.read_text()
        st = json.loads(world.run("status", "--json", "--state-dir", world.state).out)
        assert st["components"]["app"]["version"] == "1.0"
        assert tree_snapshot(world.target) == tree_snapshot(world.base / "src" / "1.0")
        r = world.run("apply", "app", "--state-dir", world.state)
        assert r.code == 0 and "2.0 is live" in r.out
        cfg = world.state / "config.msgpack"
        good = cfg.read_bytes()
        cfg.write_bytes(b"\x00" * 10)
        r = world.run("config", "repair", "--state-dir", world.state)
        assert r.code == 0 and "the running daemon wrote back its configuration" in r.out
        assert cfg.read_bytes() == good
    finally:
        assert _stop(proc) == 0
    assert "Traceback" not in log.read_text()
