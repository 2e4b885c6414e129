"""Candidate context: what is known around each candidate -- catalogue neighbours
(:mod:`pipeline.context.catalogs`, PS1-like and Gaia) and known solar-system objects
(:mod:`pipeline.context.solar_system`) -- added as ZTF's candidate columns to the
subtraction's candidates before its products are written, so the alert packets carry them."""
