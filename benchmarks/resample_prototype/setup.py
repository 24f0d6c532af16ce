"""Prototype only (not part of the package): `python setup.py build_ext --inplace` builds _resample here."""

from setuptools import Extension, setup

setup(name="resample_prototype", ext_modules=[Extension("_resample", ["_resample.c"], extra_compile_args=["-O3"])])
