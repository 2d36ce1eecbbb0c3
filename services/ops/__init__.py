"""Dead-letter operations: the failure store, replay and discard, the ops API and the CLI."""
