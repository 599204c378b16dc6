"""workqd: a supervised RabbitMQ work-queue daemon."""

__version__ = "0.1.0"
