"""Publisher-side delta computation: the only place p2pupd computes deltas.

Theory of operation
-------------------
``publish`` cuts every file of the new release into chunks in the repository
store and hands each file to ``DeltaMaker``, which adds, against each of the
previous N releases (``--delta-depth``), recipes a node at that release can use instead
of chunks (formats in ``protocol.deltaplan``):

* **file** -- one whole-file patch, when old and new are both at most
  ``WHOLE_FILE_DELTA_MAX_BYTES`` (a node builds it in memory).
* **chunk** -- for larger files, the new chunks the old version lacks are
  cut into segments (runs of consecutive chunks, <= 1 MiB) and each segment
  is diffed against a base of <= 2 MiB of old chunks, found by anchors,
  a sampled similarity index, or position (segments.py). Chunks present in
  the old version are simply reused by the node.
* **zchunk** -- every chunk no previous release has, zstd-compressed: the
  literal a node pays when no delta fits (new content, nodes older than N).

A recipe is kept only if its patch is meaningfully smaller than what it
replaces (``KEEP_RATIO``). Each patch is the smallest form
``patchcodec.encode_best`` finds (hdiffpatch always, bsdiff4 on small inputs;
zstd or LZMA2). Patches are blobs in the repository store, named by hash, and
signed through the manifest's ``deltas`` list.

Time: ``publish`` hands files over as they are chunked, largest first, so the
longest diff starts while the rest of the tree is cut; jobs run on a small
thread pool (hdiffpatch, LZMA2 and zstd release the GIL) and are collected as
they finish, so one long diff never idles the other workers. Memory stays
bounded by the segment and whole-file limits, not the file or the tree: jobs
read their own inputs from the store, at most a few jobs are queued per
worker, and whole-file jobs run only while their inputs fit
``JOB_INPUT_BUDGET_BYTES`` (hdiffpatch holds ~3x its inputs).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import dataclass, field

import zstandard

from p2pupd.daemon.api import BlobStore
from p2pupd.protocol import limits
from p2pupd.protocol.deltaplan import (
    KIND_CHUNK,
    KIND_FILE,
    KIND_ZCHUNK,
    needed_blobs,
)
from p2pupd.protocol.errors import RevokedKeyError
from p2pupd.protocol.manifest import ChunkRef, Delta, FileEntry, Manifest
from p2pupd.protocol.patchcodec import (
    BSDIFF_FALLBACK_MAX_INPUT_BYTES,
    PATCH_FORMAT,
    EncodedPatch,
    encode_best,
)
from p2pupd.protocol.trust import Envelope
from p2pupd.tools.publisher.export import HeldEnvelope, ReleaseSource
from p2pupd.tools.publisher.repo import Repo, RepoError
from p2pupd.tools.publisher.segments import SimilarityIndex, plan_segments

KEEP_RATIO = 0.8  # a patch must save at least 20 % of the bytes it replaces
ZCHUNK_KEEP_RATIO = 0.9
ZCHUNK_LEVEL = 9  # ~350 MB/s on binaries, within 1 % of level 19's size
# Whole-file jobs run while the sizes of their inputs (old + new) add up to at
# most this; a diff holds about three times its inputs (the inputs, HDiffPatch's
# suffix array and match cache), so ~100 MiB of inputs peak near 300 MiB.
JOB_INPUT_BUDGET_BYTES = 96 * limits.MiB
QUEUED_JOBS_PER_WORKER = 4


def compress_chunk(data: bytes, level: int = ZCHUNK_LEVEL) -> bytes:
    """Return ``data`` as one zstd frame (with its content size), a zchunk patch."""
    return zstandard.ZstdCompressor(level=level).compress(data)


class Budget:
    """A counting semaphore over bytes: ``take(n)`` waits until ``n`` more fit.

    A request larger than the whole budget waits for an empty budget and then
    runs alone, so no job is refused.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def take(self, n: int) -> Iterator[None]:
        n = min(n, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


class Pairing:
    """Pairs each file of a new release with the file of one old release it most
    likely evolved from.

    The same path first; else a file removed in the new release whose name
    matches once digits and hex hashes are masked (``libfoo-1a2b3c.so.2`` ->
    ``libfoo-1d4e5f.so.3``), closest in size.
    """

    def __init__(self, old: Manifest, new_paths: set[str]) -> None:
        self.by_path = old.file_map()
        self.removed: dict[str, list[FileEntry]] = {}
        for o in old.files:
            if o.path not in new_paths:
                self.removed.setdefault(_name_key(o.path), []).append(o)

    def pair(self, f: FileEntry) -> FileEntry | None:
        same = self.by_path.get(f.path)
        if same is not None:
            return same
        cands = self.removed.get(_name_key(f.path), [])
        return min(cands, key=lambda o: abs(o.size - f.size), default=None)


def _name_key(path: str) -> str:
    head, _, base = path.rpartition("/")
    return head + "/" + re.sub(r"[0-9a-f]{6,}|\d+", "#", base)


@dataclass
class DeltaStats:
    """What ``DeltaMaker.compute`` did: jobs tried, recipes kept by kind, patch bytes."""

    tried: int = 0
    patch_bytes: int = 0
    seconds: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)
    codecs: dict[str, int] = field(default_factory=dict)  # "hdiffpatch+lzma2" -> recipes kept


class DeltaMaker:
    """Computes the deltas of a new release against ``previous`` releases.

    ``store`` must hold every chunk of ``previous`` and of the new files (the
    repository store does). Patches are written into it. ``whole_file_max``
    (default ``WHOLE_FILE_DELTA_MAX_BYTES``) is the largest file diffed whole.
    """

    def __init__(
        self,
        store: BlobStore,
        previous: Sequence[Manifest],
        workers: int | None = None,
        progress: Callable[[str], None] | None = None,
        whole_file_max: int | None = None,
        patch_format: int = PATCH_FORMAT,
    ) -> None:
        self.store = store
        self.patch_format = patch_format
        if whole_file_max is None:
            whole_file_max = limits.WHOLE_FILE_DELTA_MAX_BYTES
            if patch_format < 2:  # bsdiff4 only: ~17x its input in memory
                whole_file_max = min(whole_file_max, BSDIFF_FALLBACK_MAX_INPUT_BYTES)
        self.whole_file_max = whole_file_max
        self.previous = list(previous)
        self.workers = max(1, workers or min(4, os.cpu_count() or 1))
        self.progress = progress
        self.stats = DeltaStats()
        self._budget = Budget(JOB_INPUT_BUDGET_BYTES)
        self._lock = threading.Lock()
        self._seen: set[tuple[bytes, ...]] = set()

    def compute(
        self, files: Iterable[FileEntry], new_paths: Collection[str] | None = None
    ) -> tuple[Delta, ...]:
        """Return the deltas for ``files`` (sorted, so equal inputs sign equal bytes).

        ``files`` may be an iterator that yields each file once its chunks are
        in the store (``publish`` does): whole-file and literal jobs start as
        files arrive, segment jobs once all have (a segment may start a run
        only at a chunk that occurs once in the release). The iterator is
        always consumed. ``new_paths``, the release's paths, is needed up
        front to pair renamed files; without it ``files`` is read first.
        A sequence is taken largest file first.
        """
        t0 = time.monotonic()
        if new_paths is None or isinstance(files, Sequence):
            files = sorted(files, key=lambda f: -f.size)
            new_paths = {f.path for f in files}
        if not self.previous:
            for _f in files:
                pass
            return ()
        seen: list[FileEntry] = []
        later: list[tuple[FileEntry, FileEntry, set[bytes]]] = []
        prev_chunks = [m.chunk_digests() for m in self.previous]
        pairings = [Pairing(m, set(new_paths)) for m in self.previous]
        any_prev = set().union(*prev_chunks)
        results: list[Delta] = []
        pending: set[Future[Delta | None]] = set()

        def submit(fn: Callable[..., Delta | None], *args: object) -> None:
            self.stats.tried += 1
            pending.add(pool.submit(fn, *args))
            while len(pending) > QUEUED_JOBS_PER_WORKER * self.workers:
                # Whichever finishes first: waiting on the oldest would idle
                # the other workers behind one long diff.
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    pending.discard(fut)
                    _collect(fut)

        def _collect(fut: Future[Delta | None]) -> None:
            d = fut.result()
            if d is not None:
                results.append(d)
                self.stats.patch_bytes += d.patch_size
                self.stats.kinds[d.kind] = self.stats.kinds.get(d.kind, 0) + 1

        with ThreadPoolExecutor(self.workers, thread_name_prefix="delta") as pool:
            try:
                # Largest first (the caller's order for an iterator), so the
                # longest diffs start at once and small jobs fill the other
                # workers around them.
                for f in files:
                    seen.append(f)
                    for pairing, have in zip(pairings, prev_chunks, strict=True):
                        o = pairing.pair(f)
                        if o is None or o.sha256 == f.sha256:
                            continue
                        literal = sum(c.size for c in f.chunks if c.digest not in have)
                        if not literal:
                            continue  # a node at that release has all of f's chunks
                        if max(f.size, o.size) > self.whole_file_max:
                            later.append((f, o, have))
                        elif self._first(b"f", f.sha256, o.sha256):
                            submit(self._file_job, o, f, literal)
                    for c in f.chunks:
                        if c.digest not in any_prev and self._first(b"z", c.digest):
                            submit(self._zchunk_job, c)
                count = Counter(c.digest for f in seen for c in f.chunks)
                for f, o, have in later:
                    if self.progress:
                        self.progress(f.path)
                    for targets, bases in self._segments(f, o, count):
                        if all(c.digest in have for c in targets):
                            continue
                        size = sum(c.size for c in targets)
                        key = (targets[0].digest, b"%d" % size, *(b.digest for b in bases))
                        if self._first(b"c", *key):
                            submit(self._chunk_job, bases, targets)
                for fut in as_completed(list(pending)):
                    pending.discard(fut)
                    _collect(fut)
            finally:
                for fut in pending:
                    fut.cancel()
        self.stats.seconds = time.monotonic() - t0
        return tuple(sorted(results, key=lambda d: (d.kind, d.target, d.bases, d.patch)))

    def _first(self, *key: bytes) -> bool:
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    # -- jobs (run on the pool; each reads its own inputs) ---------------------

    def _read(self, chunks: Sequence[ChunkRef]) -> bytes:
        return b"".join(self.store.get_bytes(c.digest, verify=False) for c in chunks)

    def _keep(
        self,
        kind: str,
        target: bytes,
        size: int,
        bases: tuple[bytes, ...],
        patch: EncodedPatch | bytes,
    ) -> Delta:
        if isinstance(patch, EncodedPatch):
            how = f"{patch.codec.name.lower()}+{patch.packing.name.lower()}"
            with self._lock:
                self.stats.codecs[how] = self.stats.codecs.get(how, 0) + 1
            patch = patch.data
        return Delta(kind, target, size, bases, self.store.put_bytes(patch), len(patch))

    def _file_job(self, old: FileEntry, new: FileEntry, literal: int) -> Delta | None:
        with self._budget.take(old.size + new.size):
            patch = encode_best(
                self._read(old.chunks), self._read(new.chunks), patch_format=self.patch_format
            )
        if patch is None or len(patch.data) > KEEP_RATIO * literal:
            return None
        return self._keep(KIND_FILE, new.sha256, new.size, (old.sha256,), patch)

    def _segments(
        self, f: FileEntry, o: FileEntry, count: Counter[bytes]
    ) -> Iterator[tuple[tuple[ChunkRef, ...], tuple[ChunkRef, ...]]]:
        """Yield (new chunks, old base chunks) per segment of ``f`` against ``o``."""
        index: SimilarityIndex | None = None

        def locate(s: int, e: int) -> int | None:
            nonlocal index
            if index is None:  # built only for files that need it
                index = SimilarityIndex(o.chunks, lambda c: self._read((c,)))
            return index.locate(self._read(f.chunks[s:e]))

        for seg in plan_segments(
            o.chunks, f.chunks, may_start_run=lambda d: count[d] == 1, locate=locate
        ):
            yield f.chunks[seg.start : seg.end], tuple(o.chunks[k] for k in seg.bases)

    def _chunk_job(
        self, bases: tuple[ChunkRef, ...], targets: tuple[ChunkRef, ...]
    ) -> Delta | None:
        size = sum(c.size for c in targets)
        patch = encode_best(
            self._read(bases), self._read(targets), patch_format=self.patch_format
        )
        if patch is None or len(patch.data) > KEEP_RATIO * size:
            return None
        return self._keep(
            KIND_CHUNK, targets[0].digest, size, tuple(b.digest for b in bases), patch
        )

    def _zchunk_job(self, target: ChunkRef) -> Delta | None:
        z = compress_chunk(self._read((target,)))
        if len(z) > ZCHUNK_KEEP_RATIO * target.size:
            return None
        return self._keep(KIND_ZCHUNK, target.digest, target.size, (), z)


# -- export for a node at a known version ---------------------------------------


def source_for_node_at(
    repo: Repo,
    component: str,
    version: str,
    notes: list[str] | None = None,
    platform: str | None = None,
) -> ReleaseSource:
    """Return the newest release of ``component`` with only the blobs a node at ``version`` needs.

    The node is assumed to hold that version's files on disk and its hooks in
    its store (a node keeps every blob of its installed release, gc included),
    and nothing else, so this is what ``needed_blobs`` picks for it: deltas
    from that version where they pay, zstd literals or chunks otherwise, and
    the hooks that changed. The node also holds that version's signed
    envelope, so the new envelope travels as a patch against it where that is
    smaller, and the roots up to the one it was signed under stay home
    (``write_bundle``). ``platform`` names the variant, for a release that has
    only platform variants (a node holds the same platform's variant, or a
    universal release); a ``version`` that is a variant release without one
    for ``platform`` is an error saying so (no node of it can be at it).

    A version label names one release only if it was published once: a label
    published again (``publish --force``) names several, and the node may hold
    any of them. Then the bundle carries what a node at *each* of them needs,
    and the whole envelope (a patch needs one base); a note in ``notes`` says
    so. (Taking the newest of them was the bug that left a republished
    release "incomplete" on every node: the newest was the release exported
    itself, so nothing was carried.) Raises ``RepoError`` if no release of
    ``component`` has that label.
    """
    serials = repo.serials(component)
    if not serials:
        raise RepoError(f"component {component!r} has no releases in {repo.path}")
    new, env = repo.release(component, serials[-1], platform)
    held: list[tuple[int, Manifest, Envelope]] = []
    others: set[str] = set()  # platforms of other variants labelled ``version``
    for serial in serials[:-1]:
        for variant in repo.platforms(component, serial):
            if variant not in (None, new.platform):
                if repo.label(component, serial) == version:
                    others.add(variant)
                continue  # another platform's: a node that takes ``new`` never holds it
            try:
                man, held_env = repo.release(component, serial, variant)
            except RevokedKeyError:
                continue  # nodes refuse it: none holds it any more
            if man.version == version:
                held.append((serial, man, held_env))
    if not held:
        if new.version == version:
            if notes is not None:
                notes.append(f"a node at {component} {version} already has its newest release")
            return ReleaseSource(new, env, {})
        if others:  # a variant release: no node of this platform can be at it
            raise RepoError(
                f"{component} {version} has no variant for {new.platform} (only "
                f"{', '.join(sorted(others))}), so no node of it is at {version}: "
                "name the platforms to carry with --platform"
            )
        raise RepoError(f"no release of {component} has version {version!r} in {repo.path}")
    blobs: dict[bytes, int] = {}
    for _serial, man, _env in held:
        hooks = {h.sha256 for h in man.hooks.values()}
        blobs.update(needed_blobs(new, [man], hooks.__contains__))
    if len(held) > 1 or new.version == version:
        if notes is not None:
            named = [s for s, _, _ in held] + ([new.serial] if new.version == version else [])
            notes.append(
                f"{component} {version} names {len(named)} releases (serials "
                f"{', '.join(map(str, named))}): the bundle serves a node at any of them"
            )
        return ReleaseSource(new, env, blobs)
    serial, _man, held_env = held[0]
    return ReleaseSource(new, env, blobs, HeldEnvelope(serial, version, held_env))
