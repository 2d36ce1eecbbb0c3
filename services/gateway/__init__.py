"""The gateway: REST ingress that answers 202 only once the broker has the event."""
