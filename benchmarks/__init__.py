"""Throughput benchmarks; see benchmarks/README.md."""
