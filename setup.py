"""Build script for the optional compiled kernels; all metadata lives in pyproject.toml.

`tramontane.quant._kernels` is plain C (no torch headers), built with OpenMP threads from the files of
src/tramontane/quant/csrc (kernels.h lists what each owns). It is optional: when it fails to compile,
the install still succeeds and `tramontane.quant.kernels` falls back to dequantize + F.linear. No -march
flag: the AVX2 / AVX-512 paths are chosen at run time.

TRAMONTANE_KERNELS_CFLAGS, when set, adds flags after the usual ones, to the compile and the link: the
sanitizer build (`make asan`) uses it; an ordinary build leaves it unset.

The sources compile side by side, one per core (`ParallelBuildExt`): setuptools compiles an extension's
files one after another, and the two instruction-set files take ~35 s each (measured: one build 138 s
with them in turn, 77 s side by side on 2 cores)."""

import os
from concurrent.futures import ThreadPoolExecutor
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/tramontane/quant/csrc"
EXTRA = os.environ.get("TRAMONTANE_KERNELS_CFLAGS", "").split()


class ParallelBuildExt(build_ext):
    """build_ext with each source file compiled in a thread of its own (the compiler runs as a
    subprocess, so the threads overlap), their objects in the sources' order for the link."""

    def build_extensions(self) -> None:
        compile_some = self.compiler.compile

        def compile_each(sources, *args, **kwargs):
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                done = pool.map(lambda src: compile_some([src], *args, **kwargs), sources)
                return [obj for objs in done for obj in objs]

        self.compiler.compile = compile_each
        super().build_extensions()


setup(
    cmdclass={"build_ext": ParallelBuildExt},
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
