"""Moving one blob larger than a frame from one peer, in ranged pieces.

(A blob that fits a frame is one ``ChunkRequest``, sent by ``fetch`` itself
and landed by its ``Lander``.) ``get_ranged`` returns ``True`` (stored, hash
checked), ``False`` (the peer sent bytes that do not match: the caller bans
it) or ``None`` (the peer lacks the blob), and raises ``TransferError`` when
the peer leaves or does not answer.

The blob (patches, hooks) is asked for in pieces of ``PIECE_BYTES``,
``RANGE_DEPTH`` at a time, from the one peer the swarm assigned it to -- so
a mismatch of the reassembled blob can be blamed on that peer -- written at
their offsets into a spool file in ``STATE/tmp`` (cleaned at start-up), then
streamed into the store by ``put_stream``, which refuses it unless the whole
hashes to its name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from functools import partial

import trio

from p2pupd.daemon.net.transport import PeerConnection
from p2pupd.daemon.offload import Offload
from p2pupd.daemon.store.blobs import BlobStore
from p2pupd.protocol import limits
from p2pupd.protocol.errors import HashMismatchError, RemoteProtocolError
from p2pupd.protocol.session import Session
from p2pupd.protocol.wire import BlobRangeData

PIECE_BYTES = 1 * limits.MiB
RANGE_DEPTH = 4


async def get_ranged(
    conn: PeerConnection, digest: bytes, size: int, store: BlobStore, offload: Offload,
    timeout: float,
) -> bool | None:  # fmt: skip
    """Fetch a blob larger than a frame in pieces from one peer into ``store``."""
    spool = store.tmp_dir / f"fetch-{digest.hex()[:16]}-{secrets.token_hex(4)}"
    fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    outcome: list[bool | None] = []  # first problem seen: None missing, False bad
    limiter = trio.Semaphore(RANGE_DEPTH)

    async def piece(offset: int, length: int) -> None:
        async with limiter:
            if outcome:
                return
            resp = await conn.request(
                partial(Session.request_blob_range, digest=digest, offset=offset, length=length),
                timeout,
            )
            if not isinstance(resp, BlobRangeData):
                outcome.append(None)
            elif len(resp.data) != length:
                outcome.append(False)
            else:
                await offload(lambda: os.pwrite(fd, resp.data, offset))

    def commit() -> None:
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)
            store.put_stream(f, digest, size)

    try:
        async with trio.open_nursery() as nursery:
            for offset in range(0, size, PIECE_BYTES):
                nursery.start_soon(piece, offset, min(PIECE_BYTES, size - offset))
        if outcome:
            return outcome[0]
        try:
            await offload(commit)
        except (HashMismatchError, RemoteProtocolError):
            return False
        return True
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(spool)
