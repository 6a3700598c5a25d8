"""p2pupd.tools: the command line and the publisher side."""
