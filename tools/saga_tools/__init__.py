"""Tooling that drives the demo stack: ``saga bench`` (throughput and latency next to the
broker's ceiling) and ``saga chaos`` (a soak under injected faults, checked end to end)."""
