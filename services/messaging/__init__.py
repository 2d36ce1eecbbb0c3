"""The shared messaging runtime: the only package that talks to RabbitMQ (aio-pika).

Services hand it typed events and plain async handlers; it owns connections, confirms,
acknowledgements, retries and dead-lettering.
"""
