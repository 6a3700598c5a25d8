"""p2pupd.daemon: the I/O shell around p2pupd.protocol — store, apply, import, network."""
