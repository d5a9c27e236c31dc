"""The orchestrator: the runtime that applies events to sagas, and the service that runs it on
RabbitMQ and a SQL store.

* :class:`OrchestratorService` is the process ``saga run`` starts: give it settings and a
  registry, ``await service.serve()`` (or ``start()`` / ``stop()`` inside your own program),
  and start sagas in-process with ``await service.start_saga(name, input, key=...)``.
* :class:`Orchestrator` is its core (load, decide, commit), also driven by the test harness.
"""

from saga.orchestrator.loader import load_registry
from saga.orchestrator.runtime import Orchestrator, Outcome, Result
from saga.orchestrator.service import OrchestratorService
from saga.settings import Settings, load_settings

__all__ = [
    "Orchestrator",
    "OrchestratorService",
    "Outcome",
    "Result",
    "Settings",
    "load_registry",
    "load_settings",
]
