"""Builds the native bitwise engine (plain C, loaded with ctypes) with the package."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "bibert._bitkernels",
            sources=["src/bibert/csrc/bitkernels.c"],
            depends=["src/bibert/csrc/bitkernels.h"],
            extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off"],
            extra_link_args=["-pthread"],
        )
    ]
)
