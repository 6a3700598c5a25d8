"""p2pupd.protocol: the sans-IO core.

Bytes and `now` in, values and actions out. Nothing in this package opens a file,
a socket or a thread, reads a clock, or imports trio, zeroconf or wasmtime; the
daemon and the tools supply all of that. A test walks the imports to keep it so.
"""

PROTOCOL_VERSION = 1
