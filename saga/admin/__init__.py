"""The admin HTTP API (FastAPI, served in-process by the orchestrator) and its client.

Nothing is imported here: the ``saga`` command line uses :mod:`saga.admin.client` (httpx only),
and only an orchestrator with ``SAGA_ADMIN_PORT`` set loads FastAPI and uvicorn.
"""
