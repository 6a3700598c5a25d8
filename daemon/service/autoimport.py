"""The daemon's auto-import service: bundles appearing under watched directories
(USB sticks mounted by udev/systemd-mount) are imported through the daemon, so
they spread to peers at once and are applied per each component's policy.

The polling watcher (watch.py) is synchronous; it runs in a worker thread and
hands each bundle back to the trio thread, where the import goes through the
same path as ``p2pupd import`` sent over the control socket.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pupd.daemon.bundles.watch import WatchEvent, watch
from p2pupd.daemon.events import log  # "watching"; each import logs itself (import_dir)
from p2pupd.protocol.errors import P2pupdError, RemoteProtocolError, VerificationError

if TYPE_CHECKING:
    from p2pupd.daemon.service.nodeservice import NodeService

POLL_SECONDS = 2.0


async def serve_watch(
    core: NodeService,
    root: Path,
    *,
    interval: float = POLL_SECONDS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Watch ``root`` until cancelled, importing (and applying) each new bundle."""
    stop = threading.Event()
    token = trio.lowlevel.current_trio_token()

    def handle(path: Path) -> WatchEvent:
        try:
            result: Any = trio.from_thread.run(
                core.lifecycle.import_dir, path, True, trio_token=token
            )
        except (VerificationError, RemoteProtocolError) as exc:  # logged by import_dir
            return WatchEvent(path, "refused", exc)
        except P2pupdError as exc:
            return WatchEvent(path, "error", exc)
        return WatchEvent(path, "imported", result)

    log("watching", path=str(root))
    task_status.started()
    try:
        await trio.to_thread.run_sync(
            lambda: watch(root, handle, stop=stop, interval=interval), abandon_on_cancel=True
        )
    finally:
        stop.set()
