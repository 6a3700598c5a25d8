"""The offline vertical slice end to end, through real `p2pupd` processes:
keygen -> repo init -> publish v1, v2 -> export -> init -> import --apply ->
status --json shows v2 and the target equals v2 byte for byte -> rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_tree, tree_snapshot


def p2pupd(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pupd.tools.cli", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def ok(*args: str | Path) -> str:
    r = p2pupd(*args)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "" or "Traceback" not in r.stderr
    return r.stdout


def test_offline_slice_end_to_end(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    kid = ok("keygen", keys / "root.key").strip()
    assert len(kid) == 64
    assert (keys / "root.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "root.key.pub").read_text().split()[2] == kid
    ok("keygen", keys / "release.key")
    repo = tmp_path / "repo"
    ok("repo", "init", repo, "--root-key", keys / "root.key", "--release-key", keys / "release.key")
    assert (repo / "root.msgpack").is_file()

    big = os.urandom(700_000)
    v1 = make_tree(
        tmp_path / "v1",
        {
            "bin/tool": b"#!/bin/sh\necho v1\n",
            "etc/conf": b"a=1\n",
            "data/big.bin": big,
            "gone.txt": b"removed in v2\n",
        },
        links={"current-conf": "etc/conf", "abs-link": "/usr/lib/libc.so"},
        empty_dirs=("var/empty",),
    )
    os.chmod(v1 / "bin/tool", 0o755)
    os.chmod(v1 / "etc/conf", 0o600)
    v2 = make_tree(
        tmp_path / "v2",
        {
            "bin/tool": b"#!/bin/sh\necho v2\n",
            "etc/conf": b"a=2\n",
            "data/big.bin": big[:1000] + b"patched" + big[1000:],
            "renamed/conf.bak": b"a=1\n",
        },
        links={"current-conf": "renamed/conf.bak"},
        empty_dirs=("var/empty", "var/new-empty"),
    )
    os.chmod(v2 / "bin/tool", 0o750)
    out = json.loads(ok("publish", repo, "app", "1.0", v1, "--json"))
    assert out["serial"] == 1
    out = json.loads(ok("publish", repo, "app", "2.0", v2, "--json"))
    assert out["serial"] == 2

    usb = tmp_path / "usb"
    ok("export", repo, usb, "--history", "2")
    assert json.loads((usb / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((usb / "index.json").read_text())
    assert index["schemaVersion"] == 2 and len(index["manifests"]) == 3

    state = tmp_path / "state"
    target = tmp_path / "srv" / "app"
    target.parent.mkdir()
    ok(
        "init",
        "--state-dir",
        state,
        "--trust",
        repo / "root.msgpack",
        "--component",
        f"app={target}",
    )
    ok("import", usb, "--state-dir", state, "--apply")

    st = json.loads(ok("status", "--state-dir", state, "--json"))
    assert st["components"]["app"]["version"] == "2.0"
    assert st["components"]["app"]["serial"] == 2
    assert tree_snapshot(target) == tree_snapshot(v2)
    assert not (target / "gone.txt").exists()
    assert os.readlink(target / "current-conf") == "renamed/conf.bak"
    assert (target / "bin/tool").stat().st_mode & 0o777 == 0o750
    assert (target / "bin/tool").stat().st_mtime == int((v2 / "bin/tool").stat().st_mtime)

    ok("rollback", "app", "--state-dir", state)
    assert tree_snapshot(target) == tree_snapshot(v1)
    st = json.loads(ok("status", "--state-dir", state, "--json"))
    assert st["components"]["app"]["version"] == "1.0"
    hist = json.loads(ok("history", "app", "--state-dir", state, "--json"))
    assert [h["event"] for h in hist["history"]][-2:] == ["applied", "rolled-back"]

    ok("apply", "app", "--state-dir", state, "--version", "2.0")
    assert tree_snapshot(target) == tree_snapshot(v2)


def test_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    r = p2pupd("apply")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = p2pupd("status", "--state-dir", tmp_path / "nope")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"p2pupd: error: {tmp_path / 'nope'} is not an initialised p2pupd state directory "
        "(run `p2pupd init`)"
    ]


def test_state_dir_from_environment(tmp_path: Path) -> None:
    r = p2pupd("status", env={"P2PUPD_STATE_DIR": str(tmp_path / "env-state")})
    assert r.returncode == 2
    assert str(tmp_path / "env-state") in r.stderr


def test_missing_bundle_is_operational_error(tmp_path: Path) -> None:
    keys = tmp_path / "k"
    keys.mkdir()
    ok("keygen", keys / "r")
    ok("repo", "init", tmp_path / "repo", "--root-key", keys / "r", "--release-key", keys / "r")
    ok(
        "init",
        "--state-dir",
        tmp_path / "s",
        "--trust",
        tmp_path / "repo/root.msgpack",
        "--component",
        f"app={tmp_path / 't'}",
    )
    r = p2pupd("import", tmp_path / "no-such-stick", "--state-dir", tmp_path / "s")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "cannot read bundle" in r.stderr


def test_version_prints_the_installed_distribution_version() -> None:
    from importlib import metadata

    r = p2pupd("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"p2pupd {metadata.version('p2pupd')}\n"
