"""Operating the daemon: systemd readiness, the metrics endpoint, the config
file, and auto-import of bundles appearing under a watched directory — each
with a real `p2pupd daemon` process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _daemonkit import Site, random_tree
from prometheus_client.parser import text_string_to_metric_families


def start(
    state: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "p2pupd.tools.cli", "daemon", "--state-dir", str(state),
             "--listen", "127.0.0.1:0", "--no-mdns", *extra],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip


def wait_log(
    log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 30
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text())
        if m:
            return m
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pupd.tools.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ready_and_stopping_are_sent_to_the_notify_socket(tmp_path: Path) -> None:
    site = Site(tmp_path)
    state, _ = site.node("a")
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        proc = start(state, tmp_path / "d.log", env={"NOTIFY_SOCKET": str(sock_path)})
        try:
            assert sock.recv(256) == b"READY=1"
            # READY means serving: the control socket answers at once.
            r = cli("status", "--json", "--state-dir", state)
            assert r.returncode == 0 and json.loads(r.stdout)["daemon"]["running"]
            proc.send_signal(signal.SIGTERM)
            assert sock.recv(256) == b"STOPPING=1"
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)  # a second, impatient SIGTERM
            assert proc.wait(timeout=20) == 0
        finally:
            stop(proc)


def test_metrics_endpoint_config_file_and_watched_directory(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(5, files=4, size=120_000))
    bundle = site.bundle("v1")
    state, target = site.node("a")
    watched = tmp_path / "media"
    watched.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[import]\nwatch = ["{watched}"]\n\n[metrics]\nlisten = "127.0.0.1:0"\n\n'
        '[log]\nlevel = "info"\n'
    )
    log = tmp_path / "d.log"
    proc = start(state, log, "--config", str(config))
    try:
        port = int(wait_log(log, r"event=metrics-listening addr=127\.0\.0\.1:(\d+)", proc).group(1))
        wait_log(log, r"event=watching", proc)
        # A stick appears under the watched directory (copied in, then settles).
        shutil.copytree(bundle, watched / "stick")
        wait_log(log, r"event=applied component=app version=1\.0 serial=1", proc, timeout=40)
        assert wait_log(log, r"event=imported path=\S+stick", proc)
        assert {p.name for p in target.iterdir()} == {p.name for p in site.sources["1.0"].iterdir()}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        serial = fams["p2pupd_release_serial"].samples
        assert [(s.labels["component"], s.value) for s in serial] == [("app", 1.0)]
        applies = [s for s in fams["p2pupd_applies"].samples if s.name.endswith("_total")]
        assert [(s.labels, s.value) for s in applies] == [({"component": "app"}, 1.0)]
        dur = fams["p2pupd_apply_duration_seconds"].samples
        assert dur and 0 < dur[0].value < 30
        assert fams["p2pupd_peers"].samples[0].value == 0
        assert "p2pupd_peer_bans" in fams and "p2pupd_rollbacks" in fams
    finally:
        assert stop(proc) == 0
    assert "Traceback" not in log.read_text()


def test_bad_config_file_is_a_usage_error(tmp_path: Path) -> None:
    site = Site(tmp_path)
    state, _ = site.node("a")
    config = tmp_path / "bad.toml"
    config.write_text("[network]\nmdsn = true\n")
    r = cli("daemon", "--state-dir", state, "--config", config)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"p2pupd: error: {config}: unknown option network.mdsn"
    ]
