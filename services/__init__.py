"""Courier's services: the gateway, the consumers and the shared messaging runtime."""
