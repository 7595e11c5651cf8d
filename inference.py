#!/usr/bin/env python3
"""Benchmark MAGMA generation against its baselines and peers (the benchmark: magma_ipu/benchmark/cli.py)."""

from magma_ipu.benchmark.cli import main

if __name__ == "__main__":
    main()
