"""Named limits, with units, in one place.

Every size read from the network or a bundle is checked against one of these
before memory is allocated for it.
"""

from __future__ import annotations

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

# Wire protocol.
MAX_FRAME_BYTES = 4 * MiB
MAX_IN_FLIGHT_PER_PEER = 16

# Whole-file bsdiff is used below this size; larger files get per-chunk deltas
# so that publisher memory stays bounded (bsdiff needs ~17x the input size).
WHOLE_FILE_DELTA_MAX_BYTES = 16 * MiB

# Hooks.
HOOK_DEFAULT_FUEL = 2_000_000_000
HOOK_DEFAULT_MEMORY_BYTES = 64 * MiB
HOOK_DEFAULT_SECONDS = 30.0
HOOK_MAX_OUTPUT_BYTES = 64 * KiB
