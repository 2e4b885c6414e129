"""Measuring an image: extraction, PSF, photometry, zero point, registration, classtar."""
try:
    from pipeline.measure import _kernels  # noqa: F401  (the Cython loops of extract and cleaning)
except ImportError as exc:     # a checkout used without installing it
    raise ImportError("pipeline.measure._kernels, the extraction's compiled loops, is not built: "
                      "install skydiff with `bash bootstrap.sh setup` (pip install -e . compiles "
                      "pipeline/measure/_kernels.pyx)") from exc
