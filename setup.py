"""Finds fmstore's packages and builds the FMHS chain's compiled CPU decoder; all other metadata
is in pyproject.toml.

Packages are found, never listed, so a new subpackage cannot be left out of the wheel:

- every package under ``fmstore/``;
- the repository's ``trainer_integration/`` (and any subpackage) as ``fmstore.integrations``:
  the design's layer map keeps it at the top, users import ``fmstore.integrations.<name>``;
- the CUDA sources of ``kernels/`` (a plain folder, no Python) as the data folder
  ``fmstore/codec/cuda/``, which ``fmstore.codec.kernels`` compiles with nvcc on first use.

The extension ``fmstore.codec._fmhs`` (``fmstore/codec/fmhs_cpu.c``) is optional: where it does
not build (no C compiler), the install goes on and fmstore decodes with its numpy reference
(``fmstore/codec/native.py`` warns once)."""

import sys

from setuptools import Extension, find_packages, setup

INTEGRATIONS = "fmstore.integrations"
CUDA_SOURCES = "fmstore.codec.cuda"

packages = find_packages(include=["fmstore", "fmstore.*"])
packages += [INTEGRATIONS] + [f"{INTEGRATIONS}.{p}" for p in find_packages("trainer_integration")]
packages += [CUDA_SOURCES]

setup(
    packages=packages,
    package_dir={INTEGRATIONS: "trainer_integration", CUDA_SOURCES: "kernels"},
    # The C source of the CPU decoder travels too, so an sdist can build it.
    package_data={CUDA_SOURCES: ["*.cu"], "fmstore.codec": ["*.c"]},
    ext_modules=[
        Extension(
            "fmstore.codec._fmhs",
            sources=["fmstore/codec/fmhs_cpu.c"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
            optional=True,
        )
    ],
)
