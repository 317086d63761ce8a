"""Benchmarks that write BENCHMARKS.md: run `python benchmarks/run.py [--quick] [--only NAME]` (or `make bench`)."""
