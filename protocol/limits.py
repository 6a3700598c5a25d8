"""Named limits, with units, in one place.

Every size read from the network or a bundle is checked against one of these
before memory is allocated for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Content-defined chunking (FastCDC 2020 parameters; changing them changes
# every chunk id, so they are part of the format).
CHUNK_MIN_BYTES = 16 * KiB
CHUNK_AVG_BYTES = 64 * KiB
CHUNK_MAX_BYTES = 256 * KiB

# Metadata documents.
MAX_ROOT_BYTES = 256 * KiB
MAX_MANIFEST_BYTES = 64 * MiB
MAX_INDEX_BYTES = 4 * MiB
MAX_REQUEST_BYTES = 64 * MiB
MAX_KEYS_PER_ROLE = 64
MAX_REVOKED_KEYS = 256  # key ids a root may declare compromised
MAX_SIGNATURES = 64
MAX_FILES_PER_MANIFEST = 1_000_000
# Files, symlinks and directories of one release together.
MAX_ENTRIES_PER_MANIFEST = 1_000_000
# Path components of one entry. The apply path walks trees with loops, never
# recursion, so depth costs no stack; the bound keeps a release's paths (1-byte
# names and their slashes: 2,047 bytes) clear of PATH_MAX (4,096) once joined
# to where the node keeps the target.
MAX_TREE_DEPTH = 1024
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_SYMLINK_TARGET_BYTES = 4096
MAX_FILE_BYTES = 1 << 40  # 1 TiB
MAX_COMPONENT_NAME_BYTES = 64
MAX_VERSION_LABEL_BYTES = 128
MAX_HOOK_BYTES = 64 * MiB

# Blobs (chunks, patches, hooks, metadata) in a store or bundle.
MAX_BLOB_BYTES = 1 * GiB
MAX_BUNDLE_MEMBERS = 10_000_000

# msgpack decoding: the largest container or string a decoder will allocate.
MAX_CONTAINER_LEN = MAX_FILES_PER_MANIFEST
MAX_STR_BYTES = 64 * KiB
MAX_BIN_BYTES = MAX_HOOK_BYTES
MAX_NESTING_DEPTH = 16


@dataclass(frozen=True)
class DecodeBudget:
    """What one msgpack decode may spend, checked while it runs (``encoding.decode``).

    Memory: the decoder keeps the input, copies each str/bin out of it once and
    builds at most ``max_objects`` Python objects (a scalar, an array, a map, a
    map key: one each), none of them preallocated from a declared length. A
    built object costs at most ``DECODED_OBJECT_BYTES`` beyond its content
    (measured worst case ~90: an empty dict or a one-element list with the GC
    header and list growth), so a decode never holds more than ``memory_bytes``.
    Time is linear in the input: each byte is looked at once.
    """

    max_bytes: int  # input bytes
    max_objects: int  # values built, map keys included
    max_depth: int  # containers nested inside one another (a scalar has depth 0)
    max_len: int  # entries of one array or map
    max_str: int  # bytes of one str
    max_bin: int  # bytes of one bin
    name: str = "document"  # what is decoded, for error messages

    @property
    def memory_bytes(self) -> int:
        """The most memory one decode under this budget may hold (input included)."""
        return 2 * self.max_bytes + self.max_objects * DECODED_OBJECT_BYTES

    def capped(self, max_bytes: int) -> DecodeBudget:
        """This budget with at most ``max_bytes`` of input (and no longer a bin)."""
        n = min(self.max_bytes, max_bytes)
        return replace(self, max_bytes=n, max_bin=min(self.max_bin, n))


DECODED_OBJECT_BYTES = 128  # bytes; upper bound of one decoded object (see DecodeBudget)

# Our own documents in the state directory and the publisher's repository
# (config, state, journal): the generic limits above.
LOCAL_DOCUMENT_BUDGET = DecodeBudget(
    max_bytes=MAX_MANIFEST_BYTES,
    max_objects=16_000_000,
    max_depth=MAX_NESTING_DEPTH,
    max_len=MAX_CONTAINER_LEN,
    max_str=MAX_STR_BYTES,
    max_bin=MAX_BIN_BYTES,
    name="document",
)

# A signed envelope before any signature is checked: a map of "signatures" (at
# most MAX_SIGNATURES maps of a 64-character key id and a 64-byte signature)
# and "signed", the payload bin. Nothing else is built, so a hostile envelope
# costs its own bytes, one copy of its payload and ~330 objects: the payload is
# decoded only after its signature verifies (or, for self-signed documents,
# under its own small budget below).
ENVELOPE_MAX_OBJECTS = 6 + 5 * MAX_SIGNATURES
ENVELOPE_BUDGET = DecodeBudget(
    max_bytes=MAX_MANIFEST_BYTES,
    max_objects=ENVELOPE_MAX_OBJECTS,
    max_depth=3,
    max_len=MAX_SIGNATURES,
    max_str=64,
    max_bin=MAX_MANIFEST_BYTES,
    name="signed envelope",
)

# A root payload (self-signed when pinned, else checked against the old root's
# keys): at most 2 x MAX_KEYS_PER_ROLE keys of 6 objects, two roles.
ROOT_BUDGET = DecodeBudget(
    max_bytes=MAX_ROOT_BYTES,
    max_objects=4096,
    max_depth=4,
    max_len=2 * MAX_KEYS_PER_ROLE,
    max_str=1 * KiB,
    max_bin=64,
    name="root document",
)

# A release manifest, decoded only after a threshold of release keys signed it.
# An ordinary 64 MiB manifest (a million files) is about 6 M objects.
MANIFEST_BUDGET = DecodeBudget(
    max_bytes=MAX_MANIFEST_BYTES,
    max_objects=16_000_000,
    max_depth=6,
    max_len=MAX_CONTAINER_LEN,
    max_str=MAX_STR_BYTES,
    max_bin=MAX_BIN_BYTES,
    name="release manifest",
)

# A request file's payload, decoded *before* its (self-made) node-key
# signature can be checked, since the key is inside: up to 1 M extra blob
# digests, 16 Ki held releases of 6 objects, 1 Ki components of 4.
REQUEST_MAX_OBJECTS = 1_000_000 + 6 * 16_384 + 4 * 1024 + 64
REQUEST_BUDGET = DecodeBudget(
    max_bytes=MAX_REQUEST_BYTES,
    max_objects=REQUEST_MAX_OBJECTS,
    max_depth=3,
    max_len=1_000_000,
    max_str=1 * KiB,
    max_bin=64,
    name="request file",
)
# A site request's payload: the signed request files of at most 1024 nodes.
SITE_REQUEST_BUDGET = DecodeBudget(
    max_bytes=MAX_REQUEST_BYTES,
    max_objects=1024 + 16,
    max_depth=2,
    max_len=1024,
    max_str=64,
    max_bin=MAX_REQUEST_BYTES,
    name="site request file",
)

# Wire protocol.
MAX_FRAME_BYTES = 4 * MiB
MAX_IN_FLIGHT_PER_PEER = 16
# One frame from a peer (no frame is signed): the largest honest ones are a
# Have of 32 Ki digests and an Announce of 4096 entries of 4 fields.
# Depth 4 leaves a later protocol version room to append a nested Hello field.
FRAME_BUDGET = DecodeBudget(
    max_bytes=MAX_FRAME_BYTES,
    max_objects=40_000,
    max_depth=4,
    max_len=32 * KiB,
    max_str=4 * KiB,
    max_bin=MAX_FRAME_BYTES,
    name="frame",
)

# Files up to this size get whole-file deltas; larger ones per-chunk deltas,
# which a node builds a few MiB at a time. A node builds a whole-file delta in
# memory (base, patch, unpacked body and result together: ~3-4x the file, at
# most ~256 MiB at this limit), and the publisher's diff holds ~3x old + new
# (hdiffpatch; bsdiff4, ~17x, is used on small inputs only). 32 MiB keeps
# rebuilt libraries of 16-32 MiB whole: diffed in pieces, one of 25 MiB cost
# ~25 % more (a piece loses matches and its packing's context across pieces).
WHOLE_FILE_DELTA_MAX_BYTES = 32 * MiB

# Hooks.
HOOK_DEFAULT_FUEL = 2_000_000_000
HOOK_DEFAULT_MEMORY_BYTES = 64 * MiB
HOOK_DEFAULT_SECONDS = 30.0
HOOK_MAX_OUTPUT_BYTES = 64 * KiB


@dataclass(frozen=True)
class JsonBudget:
    """What parsing one JSON document of a bundle (OCI metadata, unsigned) may spend.

    ``values_allowed`` bounds the values *and* object keys the document can
    hold: at most ``max_values``, and at most one per ``bytes_per_value`` bytes
    of it. It is checked before ``json.loads`` from a count of the bytes that
    must precede every value but the first (``[``, ``{``, ``,``, ``:``) -- an
    upper bound, cheap to take at C speed while the bytes are read -- so a
    document of many tiny values (``[{},{},...]``) is refused before a single
    object is built, and no document costs more than an honest one of its size
    (a parsed value costs at most ``JSON_VALUE_BYTES``, measured ~72, beyond
    its content; the parser holds the bytes and one str copy of them).
    """

    max_bytes: int
    max_values: int
    name: str
    # Honest OCI metadata spends at least ~12 bytes of text per value (a layer
    # descriptor ~16, an annotation ~13): a document denser than this (plus a
    # small allowance) is made of tiny values to cost memory, and is refused.
    bytes_per_value: int = 12
    slack_values: int = 1024

    def values_allowed(self, size: int) -> int:
        """The most values a document of ``size`` bytes may hold."""
        return min(self.max_values, size // self.bytes_per_value + self.slack_values)

    @property
    def memory_bytes(self) -> int:
        """The most memory one parse under this budget may hold (input included)."""
        return 3 * self.max_bytes + self.values_allowed(self.max_bytes) * JSON_VALUE_BYTES


JSON_VALUE_BYTES = 128  # bytes; upper bound of one parsed JSON value (measured ~72)

# The bundle's OCI metadata. An index entry is ~20 values (a descriptor with
# its annotations); a plain layer descriptor 7, one with release-patch
# annotations ~20. An artifact of 64 MiB lists ~500,000 layers (~30 GiB of
# full-size chunks outside packs).
OCI_LAYOUT_JSON_BUDGET = JsonBudget(4 * KiB, 16, "oci-layout")
INDEX_JSON_BUDGET = JsonBudget(MAX_INDEX_BYTES, 32 * 4096 + 64, "index.json")
ARTIFACT_JSON_BUDGET = JsonBudget(64 * MiB, 4 * 1024 * 1024, "artifact manifest")
