"""heap.trim: memory a burst freed goes back to the system, not just to malloc."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh interpreter: 2,000 chunk-sized buffers, all freed but the last
# (which pins the heap's top, as a live object does in the daemon), then RSS
# before and after trim.
PROBE = """
import re
from p2pupd.daemon import heap

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

held = [bytes(bytearray(80_000)) for _ in range(2_000)]
pin = held[-1]
del held
before = rss()
ok = heap.trim()
print(ok, before, rss())
"""


def test_trim_returns_a_freed_burst_to_the_system() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    ok, before, after = out[0] == "True", int(out[1]), int(out[2])
    if not ok:
        pytest.skip("this C library has no malloc_trim")
    assert before - after > 100, (before, after)  # of ~160 MB freed, most is back


# In a fresh interpreter: bursts of eight 1 MiB buffers (a socket read's
# size), each burst freed before the next, counting the page faults of 50
# bursts after a first one; with and without ``keep``.
BURSTS = """
import resource, sys
from p2pupd.daemon import heap

kept = heap.keep() if sys.argv[1] == "keep" else True

def burst():
    held = [b"x" * (1 << 20) for _ in range(8)]
    del held

burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    burst()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", BURSTS, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_keep_reuses_freed_memory_instead_of_faulting_it_in_again() -> None:
    kept, with_keep = _faults("keep")
    if not kept:
        pytest.skip("this C library has no mallopt")
    _, without = _faults("default")
    # 50 bursts of 8 MiB are 102,400 pages: the default allocator hands the
    # heap's top back after each burst and faults it in again.
    assert without > 50_000, without
    assert with_keep < 1_000, with_keep


SETTLE = """
import gc
import p2pupd.daemon.service.app  # what the daemon's process has loaded by its main()
from p2pupd.daemon import heap

before = len(gc.get_objects())
heap.settle()
print(before, gc.get_freeze_count(), len(gc.get_objects()))
"""


def test_settle_leaves_full_collections_only_what_came_after_the_imports() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SETTLE], capture_output=True, text=True, check=True
    ).stdout.split()
    before, frozen, left = map(int, out)
    assert before > 10_000  # the daemon's modules are that many objects
    assert frozen >= before - 10 and left < 10
