"""The daemon's small parts: supervisor restart policy, sd_notify, option parsing,
the log line format, the peer table and errors across the control socket."""

from __future__ import annotations

import itertools
import logging
import shlex
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pupd.daemon import ctl as ctlclient
from p2pupd.daemon.config import parse_endpoint, parse_rate
from p2pupd.daemon.errors import ConfigError, HealthCheckFailedError, NotFoundError
from p2pupd.daemon.events import format_event
from p2pupd.daemon.service import app
from p2pupd.daemon.store.packstore import PackStore
from p2pupd.daemon.store.spool import Spool
from p2pupd.protocol import ids
from p2pupd.protocol.errors import HashMismatchError, RollbackError, VerificationError


async def test_supervisor_restarts_a_failed_service_with_backoff(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    starts: list[float] = []

    async def flaky(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        starts.append(trio.current_time())
        task_status.started("up")
        if len(starts) < 4:
            raise OSError("boom")
        await trio.sleep_forever()

    caplog.set_level(logging.INFO, "p2pupd.daemon")
    async with trio.open_nursery() as nursery:
        assert await nursery.start(app.supervise, "flaky", flaky) == "up"
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    gaps = [round(b - a) for a, b in itertools.pairwise(starts)]
    assert gaps == [1, 2, 4]  # exponential backoff from 1 s
    assert "event=service-failed service=flaky" in caplog.text


async def test_supervisor_failure_at_start_is_fatal() -> None:
    async def broken(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise ConfigError("cannot listen")

    raised = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(app.supervise, "broken", broken)
    except* ConfigError as group:
        raised = list(group.exceptions)
    assert [str(e) for e in raised] == ["cannot listen"]


def test_sd_notify_sends_a_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert app.sd_notify("READY=1") is False  # not under systemd: nothing to do
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert app.sd_notify("READY=1")
        assert sock.recv(64) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert app.sd_notify("STOPPING=1") is False  # logged, never raised


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("node1", ("node1", 7707)),
        ("[fe80::1]:9", ("fe80::1", 9)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_endpoints_parse(text: str, want: tuple[str, int]) -> None:
    assert parse_endpoint(text) == want


@pytest.mark.parametrize("text", ["host:port", "h:70000", ":80", "[::1", "h:"])
def test_bad_endpoints_are_usage_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_endpoint(text)


def test_rates_parse() -> None:
    assert parse_rate("1000") == 1000
    assert parse_rate("5M") == 5_000_000
    assert parse_rate("2.5kB/s") == 2500
    with pytest.raises(ConfigError):
        parse_rate("fast")


def test_log_lines_split_back_into_fields() -> None:
    line = format_event("applied", {"component": "app", "version": "2.0 beta", "from_": "ab12"})
    assert line == 'event=applied component=app version="2.0 beta" from=ab12'
    assert dict(f.split("=", 1) for f in shlex.split(line))["version"] == "2.0 beta"


@pytest.mark.parametrize(
    "exc", [RollbackError("old"), HealthCheckFailedError("rolled back"), NotFoundError("none")]
)
def test_errors_keep_their_class_across_the_socket(exc: Exception) -> None:
    back = ctlclient.error_from_doc(ctlclient.error_to_doc(exc))
    assert type(back) is type(exc) and str(back) == str(exc)


def test_unknown_error_classes_fall_back_to_their_nearest_base() -> None:
    doc = {"type": "BrandNewError", "mro": ["BrandNewError", "VerificationError"], "message": "m"}
    assert type(ctlclient.error_from_doc(doc)) is VerificationError
    assert "internal error" in str(ctlclient.error_from_doc(ctlclient.error_to_doc(KeyError(1))))


def test_spooled_blobs_are_checked_then_committed_in_one_batch(tmp_path: Path) -> None:
    store = PackStore(tmp_path)
    spool = Spool(tmp_path, store)
    spool.open()
    good = [b"one" * 1000, b"two" * 1000]
    with pytest.raises(HashMismatchError):
        spool.put(b"evil", ids.sha256(b"not evil"))
    assert spool.pending_bytes == 0  # nothing written
    landed = spool.put_many([(ids.sha256(d), d) for d in good] + [(ids.sha256(b"x"), b"y")])
    assert landed == [True, True, False]
    assert not any(store.has(ids.sha256(d)) for d in good)  # not durable yet: not stored
    assert spool.pending_bytes == 6000
    assert sorted(spool.commit()) == sorted(ids.sha256(d) for d in good)
    assert all(store.get_bytes(ids.sha256(d)) == d for d in good)
    assert spool.commit() == [] and spool.pending_bytes == 0
    assert not list(store.blob_dir.iterdir())  # small blobs went into a pack
    spool.close()
