"""Batch execution: Slurm job arrays per exposure and the local executor."""
import pipeline  # noqa: F401  (process hygiene before any astropy import)
