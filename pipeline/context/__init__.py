"""Candidate context: what is known around each candidate (catalogue sources, known solar-system
objects), added as ZTF's candidate columns to the subtraction's candidates before its
products are written."""
