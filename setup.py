"""Build script for the optional compiled kernels; all metadata lives in pyproject.toml.

`tramontane.quant._kernels` is plain C (no torch headers), built with OpenMP threads. It is optional:
when it fails to compile, the install still succeeds and `tramontane.quant.kernels` falls back to
dequantize + F.linear. No -march flag: the AVX2 / AVX-512 paths are chosen at run time."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tramontane.quant._kernels",
            ["src/tramontane/quant/_kernels.c"],
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ],
)
