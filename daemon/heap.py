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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None
    fn: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)
    return fn


def trim() -> bool:
    """Return freed heap memory to the system; False if this C library cannot."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
