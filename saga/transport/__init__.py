"""RabbitMQ transport: topology (pure), publishing with confirms, consuming with manual acks."""
