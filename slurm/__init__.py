"""Batch execution on Slurm: a job array per exposure, its summary job, and the folder watcher."""
import pipeline  # noqa: F401  (process hygiene before any astropy import)
