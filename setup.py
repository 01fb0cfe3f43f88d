"""Build the C core of topkattn.

Each instruction-set file in ``csrc/cpu`` is compiled with its own flags; everything
else (dispatcher, algorithms, the CPython module) is compiled for baseline x86-64 so
that importing the package never executes an instruction the CPU lacks.

Environment:
    TOPKATTN_SANITIZE=1   build with AddressSanitizer + UBSan (see scripts/sanitize.sh)
"""
import glob
import os
import platform
import sys

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

# Flags for one file, chosen by its name suffix.
ISA_FLAGS = {
    "_avx2.c": ["-mavx2", "-mfma"],
    "_avx512.c": ["-mavx512f", "-mavx2", "-mfma"],
}

BANNED = ("-march", "-mavx", "-mfma", "-msse4", "-mtune=native")


def _check_global_flags():
    for var in ("CFLAGS", "CPPFLAGS", "LDFLAGS"):
        for flag in os.environ.get(var, "").split():
            if flag.startswith(BANNED):
                sys.exit(f"topkattn: {var} contains {flag!r}; global ISA flags would let wide "
                         "instructions run before dispatch. Remove it (the SIMD files get their "
                         "own flags).")


class BuildExt(build_ext):
    def build_extensions(self):
        _check_global_flags()
        compile_one = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = list(extra_postargs)
            for suffix, flags in ISA_FLAGS.items():
                if src.endswith(suffix):
                    extra += flags
            return compile_one(obj, src, ext, cc_args, extra, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()


# Every C file of csrc/ (the CPython wrappers, the core) and, from csrc/cpu/, the portable
# files plus, on x86, the per-ISA ones (*_avx2.c, *_avx512.c: compiled with their flags).
sources = sorted(glob.glob("csrc/*.c"))
for path in sorted(glob.glob("csrc/cpu/*.c")):
    if X86 or not path.endswith(tuple(ISA_FLAGS)):
        sources.append(path)

cflags = ["-std=c11", "-O2", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers"]
ldflags = ["-pthread"]
if os.environ.get("TOPKATTN_SANITIZE") == "1":
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
    cflags = [f for f in cflags if not f.startswith("-O")] + ["-O1", "-g"] + san
    ldflags += san

core = Extension(
    "topkattn._core",
    sources=sources,
    include_dirs=["csrc", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_23_API_VERSION")]
    + ([("TKA_HAVE_X86", "1")] if X86 else []),
    extra_compile_args=cflags,
    extra_link_args=ldflags,
)

setup(ext_modules=[core], cmdclass={"build_ext": BuildExt})
