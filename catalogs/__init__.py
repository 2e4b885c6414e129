"""Offline Gaia catalogue store: prefetch into LDAC tiles, run-time lookup and epoch propagation."""
import pipeline  # noqa: F401  (process hygiene before any astropy import)
