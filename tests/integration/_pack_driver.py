"""A process the pack crash tests kill: writes blobs into a store, or collects it.

``python _pack_driver.py STATE ACTION ARGS...`` (``P2PUPD_CRASH_AT`` and
``P2PUPD_CRASH_SKIP`` pick where it SIGKILLs itself, see ``packs.CRASH_POINTS``):

    fill SEED N          spool N blobs in batches of 8, committing each batch
                         (as a fetch does), printing ``committed HEX...`` per batch
    packs SEED           three packs of 10 blobs each, one writer per pack
    gc KEEPFILE          keep exactly the digests listed (hex, one a line)
    churn SEED           fill and gc in turns until killed: prints ``committed``
                         lines, and ``drop HEX...`` before a gc drops those
"""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path

from p2pupd.daemon.store import packfile
from p2pupd.daemon.store.packs import PackWriter
from p2pupd.daemon.store.packstore import PackStore
from p2pupd.daemon.store.spool import Spool


def blob(seed: int, i: int) -> bytes:
    rng = random.Random(seed * 100_003 + i)
    return rng.randbytes(rng.randrange(1_000, 80_000))


def fill(store: PackStore, seed: int, n: int, start: int = 0) -> None:
    spool = Spool(store.root, store)
    spool.resume()
    for at in range(start, start + n, 8):
        batch = [blob(seed, i) for i in range(at, min(at + 8, start + n))]
        landed = spool.put_many([(hashlib.sha256(b).digest(), b) for b in batch])
        assert all(x is True for x in landed), landed
        done = spool.commit()
        print("committed", *(d.hex() for d in done), flush=True)
    spool.close()


def packs(store: PackStore, seed: int) -> None:
    for g in range(3):
        w = PackWriter.create(store.index)
        for i in range(10):
            b = blob(seed, g * 10 + i)
            w.append(hashlib.sha256(b).digest(), b, packfile.checksum(b))
        w.commit()
        w.close()


def churn(store: PackStore, seed: int) -> None:
    rng = random.Random(seed)
    n = 0
    while True:
        fill(store, seed, 24, n)
        n += 24
        held = sorted(store.iter_digests())
        dropped = set(rng.sample(held, len(held) // 3))
        print("drop", *(d.hex() for d in dropped), flush=True)
        store.gc(set(held) - dropped)
        print("gc-done", flush=True)


def main(argv: list[str]) -> None:
    store = PackStore(Path(argv[0]))
    action, args = argv[1], argv[2:]
    if action == "fill":
        fill(store, int(args[0]), int(args[1]))
    elif action == "packs":
        packs(store, int(args[0]))
    elif action == "gc":
        keep = {bytes.fromhex(x) for x in Path(args[0]).read_text().split()}
        store.gc(keep)
    elif action == "churn":
        churn(store, int(args[0]))
    else:
        raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
