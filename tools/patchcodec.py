"""bsdiff4 patches in the form nodes accept (``daemon.delta.apply_patch``).

One encoder for every patch the publisher side writes: file and chunk deltas
(``tools/delta.py``) and release envelopes carried as patches in bundles
(``tools/export.py``). The container is laid out in ``protocol.deltaplan``.
"""

from __future__ import annotations

import io

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
    out = io.BytesIO()
    bsdiff4.format.write_patch(out, len(new), control, diff, extra)
    classic = out.getvalue()
    return classic if len(classic) < len(ours) else ours
