"""Chaos soak of the demo stack: a seeded workload, a nemesis, and a checker (``saga chaos``)."""
