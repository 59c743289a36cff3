"""Builds the FMHS chain's compiled CPU decoder (``fmstore/codec/fmhs_cpu.c``) as the extension
module ``fmstore.codec._fmhs``; all other metadata is in pyproject.toml.  The extension is
optional: where it does not build (no C compiler), the install goes on and fmstore decodes with
its numpy reference (``fmstore/codec/native.py`` warns once)."""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fmstore.codec._fmhs",
            sources=["fmstore/codec/fmhs_cpu.c"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
            optional=True,
        )
    ]
)
