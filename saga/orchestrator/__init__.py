"""The orchestrator: the runtime that applies events to sagas, and the service that runs it on
RabbitMQ and a SQL store."""
