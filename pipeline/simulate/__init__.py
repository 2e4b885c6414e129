"""The sky simulator: the source of truth for every test and benchmark."""
