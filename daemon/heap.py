"""Giving the memory a burst of work freed back to the system.

glibc's allocator keeps what Python frees for reuse and returns heap pages
to the kernel only from the top of the heap. A fetch holds up to its landing
budget plus a request window of chunks (about 30 MiB, fetch.py), scattered
over the heap, so without this a node that fetched one release would sit at
that high-water mark, idle, until the next one (measured: 88 MB idle after
a 200 MiB transfer against 69 MB before the landing budget).
``malloc_trim`` hands every free page back, after a fetch and after an
apply (which builds files through buffers of its own); a C library without
it (musl) makes this a no-op.

The other half is ``keep``: between those trims the daemon keeps what it
frees. glibc's defaults trim the heap's top whenever 128 KiB to a few MiB
lie free there, and serve each 1 MiB socket read from fresh ``mmap``
pages; on a busy transfer that gave the memory back and took it again
hundreds of times a second, and every page taken again is a page fault
while the kernel copies received bytes into it (measured: 10,000 faults
and 0.2-0.5 s of system time on a 200 MiB transfer, most of the receiver's
system time; 1,000-8,000 with ``keep``, mostly a new process touching
its heap for the first time).
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable

# mallopt(3) parameters (<malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Free memory at the heap's top is handed back only beyond this (or by
# ``trim``): more than a fetch's landing budget and request window together.
KEEP_BYTES = 64 * 1024 * 1024
# Blocks from this size up get their own mapping: above a socket read
# (1 MiB) and a frame, so those reuse the heap's pages.
OWN_MAPPING_BYTES = 4 * 1024 * 1024


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        # The process's own symbols, the C library's among them: no search
        # (``find_library`` runs ``ldconfig``, a child process per daemon).
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep() -> bool:
    """Keep freed memory for reuse until ``trim`` (set once, at the daemon's start);
    False if this C library has no ``mallopt``."""
    fn = getattr(_libc(), "mallopt", None)
    if fn is None:
        return False
    return bool(fn(_M_TRIM_THRESHOLD, KEEP_BYTES)) and bool(fn(_M_MMAP_THRESHOLD, OWN_MAPPING_BYTES))


def settle() -> None:
    """Take what the daemon made while starting (its modules, classes and
    functions: about 44,000 objects that live as long as it does) out of the
    cyclic collector's generations. A full collection walks every object it
    tracks while it holds the interpreter lock, so every one of them would
    stall a transfer's event loop and landers for 15-22 ms (measured) to
    find nothing. Called once, by the daemon's process (a test's process
    would keep its garbage cycles for good)."""
    gc.freeze()


def trim() -> bool:
    """Return freed heap memory to the system; False if this C library cannot."""
    fn: Callable[[int], int] | None = getattr(_libc(), "malloc_trim", None)
    if fn is None:
        return False
    fn(0)
    return True
