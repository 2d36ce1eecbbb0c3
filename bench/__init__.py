"""Benchmarks that print figures; run them by hand (`python -m bench.<name>`), never as tests."""
