"""Patches in the forms nodes accept.

``encode_patch``: bsdiff4 patches (``daemon.delta.apply_patch``), the one
encoder for file and chunk deltas (``tools/publisher/deltas.py``) and for release
envelopes carried as patches in bundles (``tools/publisher/export.py``). The container is
laid out in ``protocol.deltaplan``.

``encode_dict_patch``: a zstd frame of the new bytes compressed with the old as
a raw-content dictionary, the other form a bundle may carry a release envelope
in (``daemon.metadata`` decodes it). An envelope is mostly 32-byte digests:
bsdiff can only express a new digest as a byte difference from the old one in
its place, while zstd may also copy it from earlier in the *new* envelope --
the digest of an edited file recurs as its chunk's digest and as the target of
its deltas -- so on the delta benchmark's tree of small files it is ~20 % smaller.
"""

from __future__ import annotations

import bsdiff4
import zstandard

from p2pupd.protocol import limits
from p2pupd.protocol.deltaplan import encode_patch_header

PATCH_LEVEL = 19  # patch bodies are mostly zeros: level 19 is still fast on them
CLASSIC_MIN_BYTES = 256 * limits.KiB  # below this bz2's table overhead never pays


def encode_patch(old: bytes, new: bytes, level: int = PATCH_LEVEL) -> bytes:
    """Return a bsdiff4 patch from ``old`` to ``new``: the smaller of p2pupd's
    zstd container and a classic BSDIFF40 file.

    zstd wins on small patches (bz2's tables cost ~450 bytes per patch); bz2's
    block sorting wins on large, sparse diff blocks (a relinked binary: the
    diff is mostly zeros with scattered address changes), by up to 20 %.
    """
    control, diff, extra = bsdiff4.core.diff(old, new)
    body = zstandard.ZstdCompressor(level=level).compress(control + diff + extra)
    ours = encode_patch_header(len(new), len(control), len(diff)) + body
    if len(new) < CLASSIC_MIN_BYTES:
        return ours
    out = _Sink()
    bsdiff4.format.write_patch(out, len(new), control, diff, extra)
    classic = b"".join(out.parts)
    return classic if len(classic) < len(ours) else ours


class _Sink:
    """The write end bsdiff4's classic writer needs, in memory (protocol/ does no I/O)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)


DICT_PATCH_MAX_WINDOW_LOG = 27  # 128 MiB: an old and a new envelope of 64 MiB each


def encode_dict_patch(old: bytes, new: bytes, level: int = PATCH_LEVEL) -> bytes:
    """Return ``new`` as one zstd frame using ``old`` as a raw-content dictionary.

    The frame declares its content size and no dictionary id; the window
    covers old and new together, so any of ``old`` stays reachable.
    """
    window_log = min(DICT_PATCH_MAX_WINDOW_LOG, max(10, (len(old) + len(new)).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(new),
        dict_size=len(old),
        window_log=window_log,
        write_content_size=True,
        write_checksum=False,
        write_dict_id=False,
    )
    d = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(new)
