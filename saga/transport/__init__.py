"""Transports behind one Broker interface: RabbitMQ (aio-pika) and an in-memory twin."""
