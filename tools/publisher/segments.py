"""Where the publisher cuts a large file's changes, and what it diffs each piece against.

Theory of operation
-------------------
A large file is diffed piecewise so memory stays bounded: each *segment* (a
run of consecutive new chunks the old version lacks, at most
``SEGMENT_MAX_BYTES``) gets one patch against a *base* of at most
``MAX_BASE_BYTES`` of old chunks. Segments, not single chunks: one patch per
64 KiB chunk loses the diff's context and costs ~30 % more on rebuilt binaries.
(Larger segments and bases did not help: on numpy's OpenBLAS 1 MiB against
2 MiB gave 902 KB, 2 MiB against 4 MiB 1017 KB, and the whole file 727 KB;
files up to 32 MiB are therefore diffed whole.)

Bases are found in three ways, best first:

1. *Anchors.* Content-defined chunks realign after an edit, so a run of
   changed new chunks sits between two chunks both versions share; the old
   chunks between the same anchors are what the run was edited from. When
   the run is one segment and that old gap fits, it is the base.
2. *Similarity.* Otherwise (long runs, rebuilt binaries where nearly every
   chunk changed) a sampled index of the old file -- tiny content-defined
   sub-chunks (~256 bytes) by hash -- votes: each sub-chunk of the segment
   found in the old file votes, by its length, for the old chunk holding it;
   the base is grown around the weighted median vote. The index keeps one
   sub-chunk in ``stride`` so it stays under ~1 M entries for any file.
3. *Position.* With no votes (fresh content), the old chunks at the same
   relative position, within the anchors' gap when there is one.

A segment longer than one chunk starts only at a chunk that occurs once in
the release (``may_start_run``), so a node can place it without ambiguity
(see ``protocol.deltaplan``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from pyfastcdc import FastCDC

from p2pupd.protocol import limits
from p2pupd.protocol.manifest import ChunkRef

SEGMENT_MAX_BYTES = 1 * limits.MiB
MAX_BASE_BYTES = 2 * limits.MiB
INDEX_MAX_ENTRIES = 1 << 20
_SUB_AVG = 256
_SUB = FastCDC(avg_size=_SUB_AVG, min_size=_SUB_AVG // 4, max_size=_SUB_AVG * 4, seed=0)

# (first new chunk, one past the last) -> the old chunk to centre a base on, or None
Locate = Callable[[int, int], int | None]


@dataclass(frozen=True)
class Segment:
    start: int  # index of the first new chunk
    end: int  # one past the last
    bases: tuple[int, ...]  # consecutive old chunk indices
    how: str  # "anchors", "similar" or "position"


def match_chunks(old: Sequence[ChunkRef], new: Sequence[ChunkRef]) -> list[int | None]:
    """Return, per new chunk, the index of the same chunk in ``old`` or None.

    Repeated chunks (zero blocks) match the next occurrence after the previous
    match, so matches stay in order and anchors bracket the right gap.
    """
    pos: dict[bytes, list[int]] = {}
    for i, c in enumerate(old):
        pos.setdefault(c.digest, []).append(i)
    out: list[int | None] = []
    last = -1
    for c in new:
        lst = pos.get(c.digest)
        if not lst:
            out.append(None)
            continue
        k = bisect_right(lst, last)
        last = lst[k] if k < len(lst) else lst[0]
        out.append(last)
    return out


def plan_segments(
    old: Sequence[ChunkRef],
    new: Sequence[ChunkRef],
    *,
    may_start_run: Callable[[bytes], bool] = lambda _d: True,
    locate: Locate | None = None,
    seg_max: int = SEGMENT_MAX_BYTES,
    base_max: int = MAX_BASE_BYTES,
) -> list[Segment]:
    """Return the segments covering every new chunk ``old`` lacks (see module doc).

    Each base is a non-empty run of consecutive old indices of at most
    ``base_max`` bytes (or one chunk, if that alone is larger).
    """
    if not old:
        return []
    match = match_chunks(old, new)
    old_off = [0, *accumulate(c.size for c in old)]
    new_off = [0, *accumulate(c.size for c in new)]
    out: list[Segment] = []
    i, n = 0, len(new)
    while i < n:
        if match[i] is not None:
            i += 1
            continue
        j = i
        while j < n and match[j] is None:
            j += 1
        prev, nxt = match[i - 1] if i else None, match[j] if j < n else None
        lo = prev + 1 if prev is not None else 0
        hi = nxt if nxt is not None else len(old)
        pieces = list(_split(new, i, j, may_start_run, seg_max))
        for s, e in pieces:
            if len(pieces) == 1 and lo < hi and old_off[hi] - old_off[lo] <= base_max:
                out.append(Segment(s, e, tuple(range(lo, hi)), "anchors"))
                continue
            center = locate(s, e) if locate is not None else None
            if center is not None:
                out.append(Segment(s, e, _grow(old, center, 0, len(old), base_max), "similar"))
                continue
            a, b = (lo, hi) if lo < hi else (0, len(old))
            ns, ne = (new_off[i], new_off[j]) if lo < hi else (0, new_off[n])
            mid = (new_off[s] + new_off[e]) // 2 - ns
            y = old_off[a] + mid * (old_off[b] - old_off[a]) // max(1, ne - ns)
            center = min(max(bisect_right(old_off, y) - 1, a), b - 1)
            out.append(Segment(s, e, _grow(old, center, a, b, base_max), "position"))
        i = j
    return out


def _split(
    new: Sequence[ChunkRef], i: int, j: int, may_start_run: Callable[[bytes], bool], seg_max: int
) -> Iterable[tuple[int, int]]:
    s = i
    while s < j:
        e, size = s + 1, new[s].size
        if may_start_run(new[s].digest):
            while e < j and size + new[e].size <= seg_max:
                size += new[e].size
                e += 1
        yield s, e
        s = e


def _grow(
    old: Sequence[ChunkRef], center: int, lo: int, hi: int, max_bytes: int
) -> tuple[int, ...]:
    """Return consecutive indices around ``center`` within [lo, hi), up to ``max_bytes``."""
    a = b = center
    total = old[center].size
    while True:
        grew = False
        if b + 1 < hi and total + old[b + 1].size <= max_bytes:
            b += 1
            total += old[b].size
            grew = True
        if a - 1 >= lo and total + old[a - 1].size <= max_bytes:
            a -= 1
            total += old[a].size
            grew = True
        if not grew:
            return tuple(range(a, b + 1))


class SimilarityIndex:
    """Sampled sub-chunk hashes of one old file -> the old chunk holding them."""

    def __init__(self, old: Sequence[ChunkRef], read: Callable[[ChunkRef], bytes]) -> None:
        total = sum(c.size for c in old)
        self.stride = max(1, total // _SUB_AVG // INDEX_MAX_ENTRIES + 1)
        self.where: dict[int, int] = {}
        for k, c in enumerate(old):
            for h, _n in self._subs(read(c)):
                self.where.setdefault(h, k)

    def _subs(self, data: bytes) -> Iterable[tuple[int, int]]:
        for ch in _SUB.cut_buf(data):
            h = hash(bytes(ch.data))
            if h % self.stride == 0:
                yield h, ch.length

    def locate(self, data: bytes) -> int | None:
        """Return the old chunk at the weighted median of ``data``'s votes, or None."""
        votes: Counter[int] = Counter()
        for h, n in self._subs(data):
            k = self.where.get(h)
            if k is not None:
                votes[k] += n
        if not votes:
            return None
        half, acc = sum(votes.values()) / 2, 0
        for k in sorted(votes):
            acc += votes[k]
            if acc >= half:
                return k
        return None  # unreachable: the votes add up to more than half
