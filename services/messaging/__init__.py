"""The shared messaging runtime: the only package that talks to RabbitMQ (aio-pika).

Services hand it typed events and plain async handlers; it owns connections, confirms,
acknowledgements, retries and dead-lettering.
"""

from services.messaging import amqp_decoding

# Before any connection: one malformed message must not close a connection (see the module).
amqp_decoding.install()
