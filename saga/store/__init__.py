"""Store implementations of :class:`saga.ports.Store`."""

from saga.store.memory import MemoryStore

__all__ = ["MemoryStore"]
