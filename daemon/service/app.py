"""``p2pupd daemon``: wiring the services together, supervising them, shutting down.

Theory of operation
-------------------
``run`` takes the node lock (one daemon per state directory; the CLI talks to
it over the control socket meanwhile), then starts each service with
``nursery.start`` in a fixed order, each under ``supervise`` with its own
restart policy:

    service     what                             policy
    node        recovery, gossip, fetch (core)   restart, backoff 1-30 s
    control     STATE/control.sock               restart, backoff 1-30 s
    listener    TCP accept loop                  restart, backoff 1-30 s
    dialer      static peers and mDNS finds      restart, backoff 1-30 s
    discovery   zeroconf register/browse         restart, backoff 5-300 s

A service that fails *while starting* is fatal (bad listen address, unusable
state directory): the daemon exits with one error line. After start, a
failure is logged (``event=service-failed``) and the service restarted after
its backoff; peers' faults never get this far (each connection catches its
own). Only then is readiness reported: ``event=ready`` and ``READY=1`` to
systemd (``$NOTIFY_SOCKET``, a datagram; no dependency).

SIGTERM/SIGINT: ``STOPPING=1``, ``Bye`` to every peer (bounded wait), cancel
everything; discovery unregisters, the control socket is removed, the lock is
released.

Self-update (selfupdate.py): a daemon that owns its process may be asked to
become another version of p2pupd -- the staged one for its trial run, or the
live one after a failed trial or a rollback. It stops the same way, but keeps
the node lock's descriptor for the next program and ``main`` ``exec``s it
(same pid: still systemd's main process). A daemon started that way adopts
the lock instead of taking it, and a trial run proves itself once ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from p2pupd.daemon import heap, ops
from p2pupd.daemon.apply.transaction import claim_trial
from p2pupd.daemon.bundles.siterequest import node_identity, node_public_key
from p2pupd.daemon.config import DaemonOptions
from p2pupd.daemon.errors import LockedError
from p2pupd.daemon.events import log, observe, setup_logging, short
from p2pupd.daemon.net.dialer import Dialer
from p2pupd.daemon.net.discovery import Discovery
from p2pupd.daemon.net.peers import format_endpoint
from p2pupd.daemon.net.transport import serve_listener
from p2pupd.daemon.service import selfupdate
from p2pupd.daemon.service.autoimport import serve_watch
from p2pupd.daemon.service.metrics import MetricsFeed, serve_metrics
from p2pupd.daemon.service.nodeservice import NodeService, ServiceOptions
from p2pupd.daemon.service.rollout.service import RolloutOptions
from p2pupd.daemon.service.selfupdate import Restart, TrialRun
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import now_seconds
from p2pupd.protocol.errors import P2pupdError
from p2pupd.protocol.fleet.view import ViewConfig

StartFn = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class RestartPolicy:
    restart: bool = True
    backoff_min: float = 1.0
    backoff_max: float = 30.0


DEFAULT_POLICY = RestartPolicy()
DISCOVERY_POLICY = RestartPolicy(backoff_min=5.0, backoff_max=300.0)
# A watched mount directory may not exist until a stick is inserted.
WATCH_POLICY = RestartPolicy(backoff_min=10.0, backoff_max=60.0)


def sd_notify(state: str) -> bool:
    """Tell systemd ``state`` (e.g. ``READY=1``) if it is listening; True if sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError as exc:
        log("sd-notify-failed", level=logging.WARNING, reason=exc.strerror or str(exc))
        return False
    return True


def _leaf(exc: BaseException) -> BaseException:
    """The one real error inside nested exception groups, if there is one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def supervise(
    name: str,
    start: StartFn,
    policy: RestartPolicy = DEFAULT_POLICY,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``start`` (a ``serve(task_status=...)`` service) and restart it per ``policy``.

    A failure before the first ``started()`` propagates (fatal at start-up).
    """
    started = False
    delay = policy.backoff_min
    while True:
        try:
            async with trio.open_nursery() as nursery:
                value = await nursery.start(start)
                if not started:
                    started = True
                    task_status.started(value)
                else:
                    log("service-restarted", service=name)
            log("service-stopped", service=name)
            if not policy.restart:
                return
        except Exception as exc:
            err = _leaf(exc)
            if not started:
                raise err from None
            log(
                "service-failed",
                level=logging.ERROR,
                service=name,
                error=repr(err),
                restart_in=delay if policy.restart else None,
            )
            if not policy.restart:
                return
        await trio.sleep(delay)
        delay = min(policy.backoff_max, delay * 2)


@dataclass
class Exit:
    """How ``run`` ended, for ``main``: a restart into another version, with the lock's fd."""

    restart: Restart | None = None
    lock_fd: int | None = None


async def run(
    options: DaemonOptions,
    adopted: TrialRun | None = None,
    *,
    task_status: trio.TaskStatus[NodeService] = trio.TASK_STATUS_IGNORED,
) -> Exit:
    """Run the daemon for ``options.state_dir`` until SIGTERM/SIGINT, cancellation or a
    self-update restart (returned for ``main``).

    ``adopted``: what a predecessor that ``exec``ed into this process handed
    over (selfupdate.py). Raises ``ConfigError``/``LockedError``/
    ``ListenError``/``StorageError`` when it cannot start.
    """
    node = Node(options.state_dir)
    try:
        if adopted is not None and adopted.lock_fd is not None:
            node.lock.adopt(adopted.lock_fd)
        else:
            node.lock.acquire()
    except LockedError as exc:
        raise LockedError(f"{exc}: is a p2pupd daemon already running on this state?") from None
    trial = adopted if adopted is not None and adopted.tx else None
    out = Exit()
    try:
        fields = {}
        if trial is not None:
            claim_trial(trial.tx)  # our own recovery must leave it open
            fields = await trio.to_thread.run_sync(selfupdate.trial_fields, node, trial)
        # During a trial only what the old version still reads (stateformat.py).
        reader = fields.get("state_format") if trial is not None else None
        for line in await trio.to_thread.run_sync(node.state.migrate, reader):
            log("state-migrated", detail=line)
        await trio.to_thread.run_sync(node.store.clean_tmp)
        _announce_membership(node, options)
        host, port = options.listen
        ro = options.rollout
        identity = await trio.to_thread.run_sync(node_identity, node)  # migrates an old id
        core = NodeService(
            node,
            ServiceOptions(
                bandwidth_limit=options.bandwidth_limit,
                gossip_interval=options.gossip_interval,
                hard_timeout=options.peer_timeout,
                max_peers=options.max_peers,
                per_host=options.per_host,
                view=ViewConfig(
                    target=min(options.view_target, options.view_max),
                    max_active=options.view_max,
                    max_passive=options.passive_view,
                ),
                rollout=RolloutOptions(
                    operators=ro.operators,
                    report_interval=ro.report_interval,
                    settle=ro.settle,
                    live=ro.live,
                    gone=ro.gone,
                ),
            ),
            identity=identity,
        )
        async with trio.open_nursery() as nursery:
            if options.handle_signals:
                nursery.start_soon(_on_signals, core, nursery.cancel_scope)

                def restart(r: Restart) -> None:
                    if out.restart is None:
                        out.restart = r
                        nursery.start_soon(_restarting, core, nursery.cancel_scope, r)

                # A daemon that owns its process may become another version of
                # p2pupd (selfupdate.py); an embedded one (tests) never execs.
                core.lifecycle.self_update = selfupdate.Hooks(
                    options.state_dir, lambda: len(core.conns), restart
                )
            if adopted is not None and adopted.watchdog:
                nursery.start_soon(selfupdate.reap, adopted.watchdog)

            async def on_stream(stream: trio.SocketStream, address: str) -> None:
                try:
                    remote = str(stream.socket.getpeername()[0])
                except OSError:
                    remote = address
                refusal = core.inbound(remote)
                if refusal is not None:  # before a byte is read: just close
                    log("peer-refused", level=logging.DEBUG, addr=address, reason=refusal)
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    return
                await core.run_stream(stream, outbound=False, address=address, source="incoming")

            port = await nursery.start(
                supervise,
                "listener",
                lambda task_status: serve_listener(host, port, on_stream, task_status=task_status),
            )
            core.options = dataclasses.replace(core.options, listen_port=port)
            core.overlay.listen_port = port
            core.listen_endpoint = format_endpoint(host or "0.0.0.0", port)
            log("listening", addr=core.listen_endpoint)
            dialer = Dialer(core, on_failed=core.dial_failed)
            core.overlay.dial = dialer.dial
            await nursery.start(supervise, "dialer", dialer.serve)
            await nursery.start(supervise, "node", core.serve)
            await nursery.start(supervise, "control", _control(core))
            for peer_host, peer_port in options.peers:
                core.overlay.add_static(peer_host, peer_port)
            if options.mdns:
                discovery = Discovery(
                    core,
                    port,
                    interfaces=options.mdns_interfaces,
                    listen_host=host,
                    beacons=options.mdns_beacons,
                )
                nursery.start_soon(supervise, "discovery", discovery.serve, DISCOVERY_POLICY)
            if options.metrics_listen is not None:
                await _start_metrics(nursery, core, options.metrics_listen)
            for root in options.watch:
                nursery.start_soon(supervise, f"watch:{root}", _watch(core, root), WATCH_POLICY)
            log(
                "ready",
                node=short(node.config.node_id),
                pid=os.getpid(),
                mdns="on" if options.mdns else "off",
            )
            sd_notify("READY=1")
            if trial is not None and core.lifecycle.self_update is not None:
                nursery.start_soon(
                    selfupdate.prove, core, trial, fields, core.lifecycle.self_update.restart
                )
            task_status.started(core)
    finally:
        if out.restart is not None and out.restart.keep_lock and node.lock.held:
            out.lock_fd = node.lock.hand_over()
        else:
            node.lock.release()
        claim_trial(None)
        log("stopped")
    return out


def _announce_membership(node: Node, options: DaemonOptions) -> None:
    """Pin the configured site (if none is pinned) and say whether this node is in one.

    A node without a site keeps the open behaviour -- anyone with the root
    may join its swarm -- and says so, at start and in ``status``.
    """
    if options.site_file is not None:
        ops.pin_site(node, options.site_file)
    doc = node.membership.status_doc(
        node.config.node_id, node_public_key(node.state), now_seconds()
    )
    if not doc["configured"]:
        log("no-site", level=logging.WARNING, detail=doc["problem"])
    elif doc["member"]:  # a node that is not (the site gate says why, and refuses every link)
        log("site-member", site=doc["name"], expires=(doc["credential"] or {}).get("expires"))


async def _start_metrics(nursery: trio.Nursery, core: NodeService, listen: tuple[str, int]) -> None:
    """Serve Prometheus metrics on ``listen`` (off unless configured)."""
    feed = MetricsFeed(core)
    observe(feed.on_event)
    host, port = listen

    async def serve(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_metrics(host, port, feed.metrics.registry, task_status=task_status)

    bound = await nursery.start(supervise, "metrics", serve)
    log("metrics-listening", addr=format_endpoint(host, bound))


def _watch(core: NodeService, root: Path) -> StartFn:
    async def serve(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_watch(core, root, task_status=task_status)

    return serve


def _control(core: NodeService) -> StartFn:
    from p2pupd.daemon.service import (
        control,  # control imports api, which imports this module lazily
    )

    async def serve(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the control socket (imports ``control`` only when the daemon runs)."""
        await control.serve(core, task_status=task_status)

    return serve


async def _restarting(core: NodeService, scope: trio.CancelScope, r: Restart) -> None:
    """Stop every service for a self-update restart, as for SIGTERM but without STOPPING=1."""
    await trio.sleep(0.2)  # let the control reply that caused it go out first
    log("restarting", launcher=str(r.launcher), reason=r.reason)
    with trio.move_on_after(3):
        await core.close_all(f"restarting: {r.reason}")
    scope.cancel()


async def _on_signals(core: NodeService, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log("stopping", signal=signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            with trio.move_on_after(3):
                await core.close_all("shutting down")
            scope.cancel()
            break
    # The services are unwinding now; a repeated SIGTERM (an impatient
    # supervisor) must not kill the process half-way through its shutdown.
    # systemd still has SIGKILL after TimeoutStopSec.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


SWITCH_INTERVAL = 0.001  # seconds; see main


def main(options: DaemonOptions) -> int:
    """Run the daemon in this process (the ``p2pupd daemon`` command); returns 0, or
    ``exec``s another version of p2pupd (a self-update) with this process's arguments."""
    setup_logging(options.log_level)
    adopted = selfupdate.adopted()
    # A worker thread coming back from hashing or writing (both release the
    # GIL) waits for the event loop's thread to yield it, up to the switch
    # interval: 5 ms by default, which left the landers (fetch.py) waiting
    # more than working. At 1 ms a 200 MiB single-peer transfer took a
    # median 0.645 s against 0.707 s (5 runs each, tools/bench/transfer_bench.py).
    sys.setswitchinterval(SWITCH_INTERVAL)
    heap.keep()  # freed memory is reused, not faulted in again; see heap.py
    heap.settle()  # full collections walk only what came after the imports
    out = Exit()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            out = trio.run(functools.partial(run, options, adopted))
    except BaseExceptionGroup as group:  # trio's nurseries wrap even a single error
        leaf = _leaf(group)
        if isinstance(leaf, P2pupdError):
            raise leaf from None  # one line and an exit code at the CLI
        raise
    if out.restart is not None:
        return selfupdate.exec_restart(out.restart, out.lock_fd, sys.argv[1:])
    return 0
