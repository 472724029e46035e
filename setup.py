"""Build script for the optional compiled kernels; all metadata lives in pyproject.toml.

`tramontane.quant._kernels` is plain C (no torch headers), built with OpenMP threads from the files of
src/tramontane/quant/csrc (kernels.h lists what each owns). It is optional: when it fails to compile,
the install still succeeds and `tramontane.quant.kernels` falls back to dequantize + F.linear. No -march
flag: the AVX2 / AVX-512 paths are chosen at run time.

TRAMONTANE_KERNELS_CFLAGS, when set, adds flags after the usual ones, to the compile and the link: the
sanitizer build (`make asan`) uses it; an ordinary build leaves it unset."""

import os
from glob import glob

from setuptools import Extension, setup

CSRC = "src/tramontane/quant/csrc"
EXTRA = os.environ.get("TRAMONTANE_KERNELS_CFLAGS", "").split()

setup(
    ext_modules=[
        Extension(
            "tramontane.quant._kernels",
            sorted(glob(f"{CSRC}/*.c")),
            include_dirs=[CSRC],
            depends=sorted(glob(f"{CSRC}/*.h") + glob(f"{CSRC}/*.inc")),
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi", *EXTRA],
            extra_link_args=["-fopenmp", *EXTRA],
            optional=True,
        )
    ],
)
