"""Harness for running the real stack: used by the demo, the tests and the benchmarks."""
