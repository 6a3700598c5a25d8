"""The control socket's wire format and its blocking client (used by ``api``).

Protocol: the CLI connects to ``STATE/control.sock`` (a Unix stream socket,
mode 0600, so only the daemon's user can drive it), sends one request and
reads one response, each a 4-byte big-endian length and a msgpack map:

    request   {"op": "status" | "peers" | "import" | "apply" | "rollback" | "ping"
                     | "config-show" | "config-set" | "config-repair" | "mark-good",
               "args": {...}}
    response  {"ok": true, "result": ...}
           |  {"ok": false, "error": {"type": "RollbackError", "mro": [...], "message": "..."}}

``import`` takes ``src`` (absolute path) and ``apply``; ``apply`` takes
``component`` and optionally ``serial``, ``version``, ``force``;
``rollback`` takes ``component``; ``config-show``, ``config-set`` (``key``,
``value``) and ``config-repair`` read, change or rewrite the node
configuration; ``mark-good`` takes ``component`` and ``serial`` or ``version``. Errors are re-raised on the client side as
the same ``P2pupdError`` class (or its nearest known base), so the CLI's exit
codes do not depend on whether a daemon ran the command.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
from pathlib import Path
from typing import Any

import msgpack

from p2pupd.daemon.apply.engine import ApplyResult
from p2pupd.daemon.bundles.importer import ImportedRelease, ImportReport
from p2pupd.daemon.errors import DaemonError
from p2pupd.protocol import errors as protocol_errors
from p2pupd.protocol.errors import P2pupdError

SOCKET_NAME = "control.sock"
HEADER_BYTES = 4
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ControlError(DaemonError):
    """The control socket could not be used, or a message on it was malformed."""


def socket_path(state_dir: Path) -> Path:
    """Where the daemon of ``state_dir`` listens."""
    return Path(state_dir) / SOCKET_NAME


def pack(value: Any) -> bytes:
    """One framed control message."""
    body: bytes = msgpack.packb(value, use_bin_type=True)
    if len(body) > MAX_MESSAGE_BYTES:
        raise ControlError(f"control message of {len(body)} bytes is too large")
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def unpack(body: bytes) -> dict[str, Any]:
    """Decode one message body; ``ControlError`` unless it is a map."""
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ControlError(f"malformed control message: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise ControlError("control message is not a map")
    return value


def frame_length(header: bytes) -> int:
    """The body length in a frame header; ``ControlError`` if out of range."""
    n = int.from_bytes(header, "big")
    if not 0 < n <= MAX_MESSAGE_BYTES:
        raise ControlError(f"control message length {n} out of range")
    return n


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        block = sock.recv(min(n - got, 1 << 20))
        if not block:
            raise ControlError("the daemon closed the control connection mid-answer")
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def call(state_dir: Path, op: str, args: dict[str, Any] | None = None) -> tuple[bool, Any]:
    """Send ``op`` to the daemon of ``state_dir``.

    Returns ``(False, None)`` when no daemon listens there (no socket, or a
    stale one), else ``(True, result)``. Raises the daemon's error for a
    refused operation and ``ControlError`` when the socket misbehaves.
    """
    path = socket_path(state_dir)
    if not path.exists():
        return False, None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False, None  # stale socket of a daemon that died
        except OSError as exc:
            if exc.errno == errno.EACCES:
                raise ControlError(
                    f"permission denied on {path}: run as the daemon's user (root?)"
                ) from None
            raise ControlError(f"cannot reach the daemon at {path}: {exc.strerror}") from None
        try:
            sock.sendall(pack({"op": op, "args": args or {}}))
            reply = unpack(_recv_exact(sock, frame_length(_recv_exact(sock, HEADER_BYTES))))
        except OSError as exc:
            raise ControlError(f"control socket failed: {exc.strerror or exc}") from None
    if reply.get("ok") is True:
        return True, reply.get("result")
    raise error_from_doc(reply.get("error"))


# ----- errors and results across the socket ---------------------------------------


def error_to_doc(exc: BaseException) -> dict[str, Any]:
    """An error as plain data: class name, its P2pupdError bases, message."""
    if not isinstance(exc, P2pupdError):
        return {
            "type": "DaemonError",
            "mro": ["DaemonError"],
            "message": f"internal error: {exc!r}",
        }
    mro = [c.__name__ for c in type(exc).__mro__ if issubclass(c, P2pupdError)]
    return {"type": type(exc).__name__, "mro": mro, "message": str(exc)}


def _known_errors() -> dict[str, type[P2pupdError]]:
    out: dict[str, type[P2pupdError]] = {}
    todo: list[type[P2pupdError]] = [P2pupdError]
    while todo:
        cls = todo.pop()
        out.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return out


def error_from_doc(doc: Any) -> P2pupdError:
    """The local exception for a daemon's error document (nearest known class)."""
    assert protocol_errors  # imported so every protocol error class is registered
    if not isinstance(doc, dict):
        return ControlError("the daemon sent a malformed error")
    message = str(doc.get("message", "unknown error"))
    known = _known_errors()
    for name in [doc.get("type"), *doc.get("mro", [])]:
        cls = known.get(str(name))
        if cls is not None:
            try:
                return cls(message)
            except TypeError:
                continue
    return DaemonError(message)


def _known_fields(cls: type[Any], doc: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in doc.items() if k in names}


def report_to_doc(report: ImportReport) -> dict[str, Any]:
    return dataclasses.asdict(report)


def report_from_doc(doc: dict[str, Any]) -> ImportReport:
    """Rebuild an ``ImportReport`` (fields it does not know are ignored)."""
    releases = [
        ImportedRelease(**_known_fields(ImportedRelease, r)) for r in doc.get("releases", [])
    ]
    return ImportReport(**{**_known_fields(ImportReport, doc), "releases": releases})


def result_to_doc(result: ApplyResult) -> dict[str, Any]:
    """An ``ApplyResult``'s plain fields (the stage report stays behind)."""
    return {
        f.name: getattr(result, f.name)
        for f in dataclasses.fields(result)
        if isinstance(getattr(result, f.name), str | int | bool | type(None))
    }


def result_from_doc(doc: dict[str, Any]) -> ApplyResult:
    """Rebuild an ``ApplyResult`` from ``result_to_doc``."""
    return ApplyResult(**_known_fields(ApplyResult, doc))
