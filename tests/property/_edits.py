"""Random old/new byte pairs for the delta properties: semi-compressible old
bytes and edit scripts (replace, insert, delete) to make the new ones from."""

from __future__ import annotations

import random

from hypothesis import strategies as st

# An edit script: (kind, position as a fraction, length, seed).
Script = list[tuple[str, float, int, int]]


def edit_scripts(max_len: int, max_edits: int) -> st.SearchStrategy[Script]:
    """Up to ``max_edits`` edits of 1..``max_len`` bytes each."""
    return st.lists(
        st.tuples(
            st.sampled_from(["replace", "insert", "delete"]),
            st.floats(0, 1),
            st.integers(1, max_len),
            st.integers(0, 2**16),
        ),
        max_size=max_edits,
    )


def base_bytes(
    seed: int, size: int, *, runs: tuple[int, int] = (50, 2000), word: bytes = b"word %d ",
    repeat: int = 40,
) -> bytes:  # fmt: skip
    """Semi-compressible bytes: random runs (``runs`` long) mixed with repeated text."""
    r = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        if r.random() < 0.5:
            out += r.randbytes(r.randint(*runs))
        else:
            out += word % r.randint(0, 99) * r.randint(1, repeat)
    return bytes(out[:size])


def mutate(old: bytes, script: Script) -> bytes:
    """``old`` with the edits of ``script`` applied in order."""
    new = bytearray(old)
    for kind, frac, n, seed in script:
        p = int(frac * len(new))
        data = random.Random(seed).randbytes(n)
        if kind == "replace":
            new[p : p + n] = data[: max(0, len(new) - p)]
        elif kind == "insert":
            new[p:p] = data
        else:
            del new[p : p + n]
    return bytes(new)
