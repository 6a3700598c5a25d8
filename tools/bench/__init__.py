"""Benchmarks: run on demand, each prints a table. Never part of the test suite."""
