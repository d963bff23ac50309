"""Build of the compiled part: the sparse CPU kernels (plain C, no PyTorch headers). Everything else is in
pyproject.toml. ``optional``: without a C compiler llmprune still installs, and asking for the CPU kernels
says how to get them."""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-std=c11", "-pthread"]
dl = ["-ldl"] if sys.platform.startswith("linux") else []
links = [] if sys.platform == "win32" else ["-pthread", *dl]

setup(
    ext_modules=[
        Extension(
            "llmprune._sparse_cpu",
            ["src/llmprune/csrc/sparse_cpu.c"],
            extra_compile_args=flags,
            extra_link_args=links,
            optional=True,
        )
    ]
)
