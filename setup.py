"""Build the Cython kernels.  Everything else lives in pyproject.toml.

One op = one extension: ``normffn._kernels.<op>`` is compiled from ``kernels/<op>.pyx``.

Environment switches:
  NORMFFN_DEBUG=1     Cython bounds/initialisation checks on, -O1 -g (for debugging and sanitizers)
  NORMFFN_SANITIZE=1  add -fsanitize=address,undefined (implies NORMFFN_DEBUG)
  NORMFFN_NO_OPENMP=1 build without OpenMP (kernels then run on one thread)
"""
import glob
import os
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPS = ["layer_norm", "batch_norm", "ffn", "rms_norm", "add_norm"]
# Not ops: machine-limit probes used by `python -m normffn bench`.
HELPERS = ["_bench"]


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


SANITIZE = _flag("NORMFFN_SANITIZE")
DEBUG = _flag("NORMFFN_DEBUG") or SANITIZE

COMPILER_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
}

# -O3 but never fast-math (it breaks NaN/Inf semantics) and never a native-arch build: the
# kernels dispatch to AVX2/AVX-512 at run time through GCC target_clones (kernels/core.h).
OPT_ARGS = ["-O1", "-g", "-fno-omit-frame-pointer"] if DEBUG else ["-O3"]
# Never contract a*b+c into an FMA behind our back: every CPU path (AVX-512, AVX2, baseline,
# streaming or not) then rounds identically, so results do not depend on the machine.
OPT_ARGS += ["-ffp-contract=off"]
SAN_ARGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"] if SANITIZE else []


class BuildExtOpenMP(build_ext):
    """Add OpenMP to compile *and* link args when the compiler supports it, and say so; compile
    the extensions in parallel (one job per CPU) unless --parallel/-j says otherwise."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1

    def _has_openmp(self):
        if _flag("NORMFFN_NO_OPENMP"):
            return False
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "omp.c")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
            try:
                objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
                self.compiler.link_executable(objs, os.path.join(tmp, "omp"),
                                              extra_postargs=["-fopenmp"])
            except Exception:
                return False
        return True

    def build_extensions(self):
        omp = self._has_openmp()
        omp_args = ["-fopenmp"] if omp else []
        print(f"normffn: OpenMP {'enabled' if omp else 'NOT available: kernels run on one thread'};"
              f" flags {' '.join(OPT_ARGS + SAN_ARGS)}; Cython bounds checks "
              f"{'on' if DEBUG else 'off'}", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = OPT_ARGS + SAN_ARGS + omp_args + ext.extra_compile_args
            ext.extra_link_args = SAN_ARGS + omp_args + ext.extra_link_args
        super().build_extensions()


# Every extension is rebuilt when any C header changes (Cython tracks the .pxd files itself).
HEADERS = sorted(glob.glob("kernels/*.h"))

extensions = [
    Extension(
        f"normffn._kernels.{op}",
        [f"kernels/{op}.pyx"],
        depends=HEADERS,
        include_dirs=["kernels", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for op in OPS + HELPERS
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=COMPILER_DIRECTIVES,
                          include_path=["kernels"]),
    cmdclass={"build_ext": BuildExtOpenMP},
)
