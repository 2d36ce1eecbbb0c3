"""The notifier service: delivers notifications on their channels."""
