"""The daemon's control socket: how ``p2pupd status/import/apply/rollback/peers`` reach it.

(And ``export --request``, which the daemon answers for the whole site.)

Theory of operation. While a daemon runs it holds the node lock, so the CLI
cannot act on the state directory itself; ``api`` finds ``STATE/control.sock``
and sends the operation here instead (wire format: ``ctlclient``). Each
connection carries one request and one response. Operations run through the
same ``NodeService`` methods the daemon uses itself, so an import over the
socket is verified, stored, announced to peers and (per policy) applied
exactly like a release that arrived from the network.

The socket is created inside the state directory (mode 0700) and chmod 0600
at once, and removed on exit; a leftover from a crashed daemon is replaced
(the node lock, held by now, proves no other daemon owns it). A malformed or
slow client gets an error or is dropped; it can never stop the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import trio

from p2pupd.daemon import ops
from p2pupd.daemon.ctl import (
    HEADER_BYTES,
    ControlError,
    error_to_doc,
    frame_length,
    pack,
    report_to_doc,
    result_to_doc,
    socket_path,
    unpack,
)
from p2pupd.daemon.events import log
from p2pupd.daemon.service.nodeservice import NodeService
from p2pupd.protocol.errors import P2pupdError

READ_TIMEOUT = 10.0


async def serve(
    core: NodeService, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on ``STATE/control.sock`` until cancelled; reports the path when ready."""
    path = socket_path(core.node.root)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # stale: we hold the node lock, so no live daemon owns it
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot create control socket {path}: {exc.strerror or exc}") from None
    try:
        task_status.started(path)
        await trio.serve_listeners(partial(_handle, core), [trio.SocketListener(sock)])
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def _handle(core: NodeService, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            with trio.fail_after(READ_TIMEOUT):
                req = unpack(await _read(stream, frame_length(await _read(stream, HEADER_BYTES))))
        except (ControlError, trio.TooSlowError, trio.BrokenResourceError, OSError):
            return
        op = req.get("op")
        raw = req.get("args")
        args: dict[str, Any] = raw if isinstance(raw, dict) else {}
        try:
            reply: dict[str, Any] = {"ok": True, "result": await dispatch(core, str(op), args)}
        except P2pupdError as exc:
            reply = {"ok": False, "error": error_to_doc(exc)}
        except Exception as exc:  # a bug must reach the operator as one line, not kill us
            log("control-crash", level=logging.ERROR, op=op, error=repr(exc))
            reply = {"ok": False, "error": error_to_doc(exc)}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(pack(reply))


async def _read(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        block = await stream.receive_some(n - len(buf))
        if not block:
            raise ControlError("client closed the connection")
        buf += block
    return bytes(buf)


async def _site_op(core: NodeService, op: str, args: dict[str, Any]) -> Any:
    """Membership operations: run under the state mutex like every other writer."""
    async with core.mutex:
        if op == "enrol-request":
            return {"data": await core.offload(partial(ops.enrol_request, core.node))}
        data = args.get("data")
        if not isinstance(data, bytes):
            raise ControlError(f"control request {op!r} needs bytes 'data'")
        if op == "site-join":
            doc = await core.offload(partial(ops.site_join, core.node, data))
        else:
            doc = await core.offload(partial(ops.site_update, core.node, data))
    # A new credential, site key or revocation list: rebuild TLS, cut off who it ends,
    # and pass a new list or site document on to the other members.
    await core.offload(core.gate.reload)
    core.membership_changed()
    if op == "site-update" and doc.get("changed"):
        core.spread_site_news(data)
    return doc


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(f"control request needs a string {key!r}")
    return value


async def dispatch(core: NodeService, op: str, args: dict[str, Any]) -> Any:
    """Run one control operation; returns its plain-data result."""
    if op == "ping":
        return {"node_id": core.node.config.node_id.hex(), "pid": os.getpid()}
    if op == "status":
        def read_status() -> dict[str, Any]:
            recovered, pending = ops.recover_if_free(core.node)
            return ops.status(core.node, recovered=recovered, pending=pending)

        doc = await core.offload(read_status)
        for name, comp in doc["components"].items():
            comp.update(core.lifecycle.component_doc(name))
        doc["daemon"] = core.daemon_doc()
        return doc
    if op == "peers":
        return core.peers_doc()
    if op == "import":
        src = Path(_str(args, "src"))
        report, results = await core.lifecycle.import_dir(
            src, bool(args.get("apply", False)), bool(args.get("allow_other_node", False))
        )
        return {"report": report_to_doc(report), "applied": [result_to_doc(r) for r in results]}
    if op == "apply":
        serial = args.get("serial")
        version = args.get("version")
        result = await core.lifecycle.apply_release(
            _str(args, "component"),
            serial if isinstance(serial, int) else None,
            version=version if isinstance(version, str) else None,
            force=bool(args.get("force", False)),
        )
        return result_to_doc(result)
    if op == "request":
        return await core.site_requests.collect(bool(args.get("site", True)))
    if op in ("enrol-request", "site-join", "site-update"):
        return await _site_op(core, op, args)
    if op == "rollback":
        return result_to_doc(await core.lifecycle.rollback(_str(args, "component")))
    if op == "config-show":
        return ops.config_doc(core.node)
    if op == "config-set":
        key, value = _str(args, "key"), args.get("value")
        if not isinstance(value, str):
            raise ControlError("control request needs a string 'value'")
        async with core.lifecycle.mutex:
            doc = await core.offload(
                lambda: ops.config_set(core.node, key, value, daemon_running=True)
            )
        log("config-set", key=key, value=value)
        return doc
    if op == "config-repair":
        # Our configuration was read and checked at start: write it back whole.
        async with core.lifecycle.mutex:
            await core.offload(lambda: core.node.state.write_config(core.node.config))
        return {"repaired": True, "config": ops.config_doc(core.node),
                "notes": ["the running daemon wrote back its configuration"]}  # fmt: skip
    if op == "mark-good":
        serial, version = args.get("serial"), args.get("version")
        async with core.lifecycle.mutex:
            done = await core.offload(lambda: ops.mark_good(
                core.node, _str(args, "component"), serial if isinstance(serial, int) else None,
                version if isinstance(version, str) else None,
            ))  # fmt: skip
        return {"serial": done}
    raise ControlError(f"unknown control operation {op!r}")
