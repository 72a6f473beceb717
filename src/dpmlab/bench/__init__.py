"""Benchmark harness: error vs NFE against references, with peer libraries."""
