"""Courier's shared contracts: event envelopes, event models and the broker topology.

Pure data: nothing here talks to a broker. Services import these to agree on what travels.
"""
