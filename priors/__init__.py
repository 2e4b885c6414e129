"""Focal-plane distortion priors: offline fit from low-airmass exposures, run-time lookup."""
import pipeline  # noqa: F401  (process hygiene before any astropy import)
