"""p2pupd.protocol: the sans-IO core.

Bytes and `now` in, values and actions out. Nothing in this package opens a file,
a socket or a thread, reads a clock, or imports trio, zeroconf or wasmtime; the
daemon and the tools supply all of that. A test walks the imports to keep it so.
"""

# The wire protocol's version (``Hello.protocol_version``, mDNS TXT ``proto``).
# Every addition to the wire is a Hello *feature*, negotiated per connection
# and never required, so this number changes only for a change that cannot be
# one -- and nodes of p2pupd 0.1.0 accept no peer of another version, so it
# stays 1 while such nodes may still run. A node speaks every version from
# MIN_PROTOCOL_VERSION to PROTOCOL_VERSION; two nodes talk at the lower of
# their two versions (the newer one speaks down), and only a peer below our
# MIN_PROTOCOL_VERSION is refused (``session.negotiate_version``).
# See docs/protocol.md, "Versions and mixed sites".
PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
