"""Properties of BlobStore over random contents (real files in a temp directory)."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pupd.daemon.store.blobs import BlobStore

# Each example does real fsyncs; keep the count modest so the suite stays fast.
EXAMPLES = settings(max_examples=40, deadline=None)

blobs = st.binary(max_size=4096)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlobStore]:
    # Module-scoped: hypothesis reruns the test body many times per fixture
    # instance, and these properties hold whatever else the store holds.
    yield BlobStore(tmp_path_factory.mktemp("props") / "store")


@EXAMPLES
@given(data=blobs)
def test_put_get_round_trip_and_naming(store: BlobStore, data: bytes) -> None:
    digest = store.put_bytes(data)
    assert digest == hashlib.sha256(data).digest()
    assert store.path(digest).name == digest.hex()
    assert store.get_bytes(digest) == data
    assert store.size(digest) == len(data)


@EXAMPLES
@given(data=blobs, step=st.integers(min_value=1, max_value=5000))
def test_put_stream_equals_put_bytes(store: BlobStore, data: bytes, step: int) -> None:
    digest = hashlib.sha256(data).digest()
    if store.has(digest):
        os.chmod(store.path(digest), 0o644)
        store.path(digest).unlink()
    src = io.BytesIO(data)

    class Chunked:
        def read(self, n: int, /) -> bytes:
            return src.read(min(n, step))

    assert store.put_stream(Chunked(), digest, max_bytes=len(data)) == len(data)
    assert store.get_bytes(digest) == data
    assert os.listdir(store.tmp_dir) == []


@EXAMPLES
@given(data=blobs, times=st.integers(min_value=2, max_value=4))
def test_put_is_idempotent(store: BlobStore, data: bytes, times: int) -> None:
    digests = {store.put_bytes(data) for _ in range(times)}
    digests.add(store.put_bytes(data, hashlib.sha256(data).digest()))
    assert len(digests) == 1
    (digest,) = digests
    assert store.get_bytes(digest) == data
    assert list(store.iter_digests()).count(digest) == 1


@settings(max_examples=25, deadline=None)
@given(
    contents=st.lists(st.binary(max_size=256), max_size=12, unique=True),
    keep_mask=st.lists(st.booleans(), min_size=12, max_size=12),
    extra_keep=st.lists(st.binary(min_size=32, max_size=32), max_size=3),
)
def test_gc_keeps_exactly_the_keep_set(
    contents: list[bytes], keep_mask: list[bool], extra_keep: list[bytes]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = BlobStore(Path(d))
        digests = [store.put_bytes(c) for c in contents]
        sizes = {dg: len(c) for dg, c in zip(digests, contents, strict=True)}
        keep = {dg for dg, k in zip(digests, keep_mask, strict=False) if k}
        # Digests in keep that the store never had are simply not there after gc.
        report = store.gc(keep | set(extra_keep))
        assert set(store.iter_digests()) == keep
        assert report.removed == len(digests) - len(keep)
        assert report.bytes_freed == sum(n for dg, n in sizes.items() if dg not in keep)
        assert store.fsck().clean
