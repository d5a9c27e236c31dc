"""Test your own sagas in plain pytest, without RabbitMQ or a database (see :mod:`.harness`)."""

from saga.testing.harness import FakeClock, Harness, Reply, fail, ok, silence

__all__ = ["FakeClock", "Harness", "Reply", "fail", "ok", "silence"]
