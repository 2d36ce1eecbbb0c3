"""The processor service: summarises submitted datasets and analyses uploaded files."""
