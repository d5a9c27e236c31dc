"""Benchmark of the demo stack against the broker's own round-trip ceiling (``saga bench``)."""
