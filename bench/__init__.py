"""Benchmarks and SASS tools: they time or compile the packages from outside, so they may import any layer."""
