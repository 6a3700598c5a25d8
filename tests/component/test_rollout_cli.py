"""The rollout commands' edges, in-process: publish --rollout, show, usage errors,
and the site commands without a daemon (one clear line each)."""

from __future__ import annotations

import json
from pathlib import Path

from _kit import Site, make_tree
from conftest import Run


def test_publish_with_a_policy_and_show_it(tmp_path: Path, run: Run) -> None:
    site = Site(tmp_path)
    src = make_tree(tmp_path / "src", {"a.bin": b"a" * 100})
    r = run("publish", site.repo, "app", "1.0", src, "--rollout", "canary=1 waves=25% soak=10m")
    assert r.code == 0, r.err
    assert "rollout waves=1,25%,100% soak=10m" in r.out
    shown = json.loads(run("show", site.repo, "--json").out)
    assert shown["releases"][0]["rollout"] == "waves=1,25%,100% soak=10m"
    assert "rollout: waves=1,25%,100% soak=10m" in run("show", site.repo).out
    bad = run("publish", site.repo, "app", "2.0", src, "--rollout", "waves=50%,10%")
    assert bad.code == 2 and "must grow" in bad.err and "Traceback" not in bad.err
    assert json.loads(run("show", site.repo, "--json").out)["releases"][-1]["serial"] == 1


def test_site_commands_need_a_daemon(tmp_path: Path, run: Run) -> None:
    site = Site(tmp_path)
    state, _ = site.node("n")
    r = run("fleet", "--state-dir", state)
    assert r.code == 1 and "no p2pupd daemon is running" in r.err
    r = run("rollout", "halt", "app", "--state-dir", state)
    assert r.code == 1 and "no p2pupd daemon is running" in r.err
    r = run("rollout", "halt", "app", "--wave", "1", "--state-dir", state)
    assert r.code == 2 and "--wave goes with skip-wave only" in r.err
    r = run("rollout", "pause", "app", "--state-dir", state)
    assert r.code == 2
