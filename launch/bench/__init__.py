"""Benchmarks: they print their figures and JSON; no test times anything (see docs/kvindex.md)."""
