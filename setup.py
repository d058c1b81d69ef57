from setuptools import setup

setup(cffi_modules=["spialloc/_ffi_build.py:ffibuilder"])
