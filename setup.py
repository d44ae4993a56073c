"""Builds the native bitwise engine (plain C, loaded with ctypes) with the package."""
from glob import glob

from setuptools import Extension, setup

# Every C file of src/bibert/csrc: the runtime, one driver per op family, one file per ISA
# (docs/packed_format.md, "Source layout"). The ISA files use per-function target attributes,
# so all compile with these plain flags and the library picks a family at run time.
CSRC = "src/bibert/csrc"

setup(
    ext_modules=[
        Extension(
            "bibert._bitkernels",
            sources=sorted(glob(f"{CSRC}/*.c") + glob(f"{CSRC}/isa/*.c")),
            depends=sorted(glob(f"{CSRC}/*.h") + glob(f"{CSRC}/isa/*.h")),
            extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off"],
            extra_link_args=["-pthread"],
        )
    ]
)
