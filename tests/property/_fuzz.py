"""Shared pieces of the fuzz targets: how long they run, and the per-input budget.

Every decoder that sees unverified bytes has a fuzz target (hypothesis) that
feeds it random, mutated and hostile-shaped input and checks, for each input:

* only the decoder's typed errors escape (``RemoteProtocolError``,
  ``VerificationError``): never a msgpack, zstd, json, struct or Python error;
* the peak memory it allocated (``tracemalloc``) stays within the budget the
  code states for an input of that size (``limits``: ``DecodeBudget``,
  ``JsonBudget``, the patch bounds);
* it takes at most ``DEADLINE`` (hypothesis's per-example deadline).

``make test`` runs each target for a few dozen examples (a few seconds in
all); ``make fuzz`` multiplies that by ``P2PUPD_FUZZ_SCALE`` (default there:
200) for a long run.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from p2pupd.protocol import limits
from p2pupd.protocol.errors import RemoteProtocolError, VerificationError

SCALE = int(os.environ.get("P2PUPD_FUZZ_SCALE", "1"))
DEADLINE = timedelta(seconds=2)
ALLOWED: tuple[type[BaseException], ...] = (RemoteProtocolError, VerificationError)
SLACK = 256 * limits.KiB  # the interpreter's own churn while a decoder runs

# msgpack pieces a hostile peer or stick strings together: headers of huge
# containers, strs and bins that are not there, deep nesting, floats, ext.
_HOSTILE_PIECES = [
    b"\x9f", b"\x8f", b"\x80", b"\x90", b"\xa1a", b"\xc0", b"\x81\xa1a", b"\x91",
    b"\xdc\xff\xff", b"\xdd\x00\x10\x00\x00", b"\xde\x00\x20", b"\xdf\x7f\xff\xff\xff",
    b"\xc6\x7f\xff\xff\xff", b"\xdb\x00\x01\x00\x00", b"\xcb" + bytes(8), b"\xd4\x01\x00",
]  # fmt: skip
hostile_msgpack = st.lists(st.sampled_from(_HOSTILE_PIECES), max_size=200).map(b"".join)


def decode_cost(budget: limits.DecodeBudget, n: int) -> int:
    """What decoding ``n`` bytes under ``budget`` may allocate: the bytes, their
    str/bin copies, and at most one object per input byte up to the budget."""
    return 2 * n + min(budget.max_objects, n) * limits.DECODED_OBJECT_BYTES + SLACK


def fuzz(examples: int) -> Callable[[Any], Any]:
    """Hypothesis settings of a fuzz target: ``examples`` x ``SCALE``, per-example deadline."""
    return settings(
        max_examples=examples * SCALE,
        deadline=DEADLINE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def within_budget(
    fn: Callable[[], object],
    memory_bytes: int,
    allowed: tuple[type[BaseException], ...] = ALLOWED,
) -> BaseException | None:
    """Run ``fn``; return the typed error it raised (None if it returned).

    Fails if it raises anything else, or if the memory it allocated at its
    peak exceeds ``memory_bytes``.
    """
    tracemalloc.start()
    error: BaseException | None = None
    try:
        fn()
    except allowed as exc:
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= memory_bytes, f"allocated {peak} bytes at the peak, budget {memory_bytes}"
    return error
