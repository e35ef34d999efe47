"""The loader's C extension, declared here because pyproject's ``[[tool.setuptools.ext-modules]]`` table is still
experimental in setuptools (it warns on every install). Everything else about the package is in pyproject.toml.

``soilnet.data._native``: the loader's reads and image conversion without the GIL (soilnet/data/native.py loads it
with ctypes).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            name="soilnet.data._native",
            sources=["soilnet/data/_native.c"],
            # no fused multiply-add: the values of torch's mul_ then add_
            extra_compile_args=["-O3", "-ffp-contract=off"],
        )
    ]
)
