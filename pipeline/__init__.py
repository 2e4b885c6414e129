"""skydiff per-quadrant pipeline: image model, stages, simulator and command line."""
from pipeline.core.runtime import configure_runtime

configure_runtime()

__version__ = "0.1.0"
