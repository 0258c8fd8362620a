"""Benchmarks: kernel microbenchmarks and end-to-end model comparisons (`kiln bench`)."""
