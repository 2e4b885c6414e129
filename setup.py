"""The compiled part of skydiff: the measurement stage's per-pixel loops (Cython).

Everything else about the package is in pyproject.toml; this file only declares the
extension, which ``pip install`` (``bash bootstrap.sh``) builds with the machine's C compiler.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-adds, so that the float sums round as sep's do and
# give the same results on every machine.
extensions = [Extension("pipeline.measure._kernels", ["pipeline/measure/_kernels.pyx"],
                        extra_compile_args=["-O2", "-ffp-contract=off"])]

setup(ext_modules=cythonize(extensions, language_level=3))
