"""The native CPU kernels (kernels/cpu/*.c) as the extension kernels._cpu; the rest is in pyproject.toml.

Plain C11 at -O3 with no -march: each instruction-set variant carries its own target attribute
and the module picks one at import by what the CPU reports, so one build runs on any x86-64 or arm64.
"""

from glob import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kernels._cpu",
            sources=sorted(glob("kernels/cpu/*.c")),
            depends=sorted(glob("kernels/cpu/*.h")),
            extra_compile_args=["-std=c11", "-O3", "-pthread", "-Wall", "-Wno-unused-function"],
            extra_link_args=["-pthread"],
        )
    ]
)
