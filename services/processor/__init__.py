"""The processor service: summarises submitted datasets."""
