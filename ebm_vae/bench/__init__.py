"""Benchmark sections for `scripts/bench.py`: each module has `run(args) -> dict`.

Every figure is printed beside a baseline measured in the same run, and their ratio.
Tests never assert wall times.
"""
