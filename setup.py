"""Build the C core of topkattn.

Each instruction-set file in ``csrc/cpu`` is compiled with its own flags; everything
else (dispatcher, algorithms, the CPython module) is compiled for the baseline of the
target (x86-64, or aarch64 where NEON is baseline and its files need no flags) so that
importing the package never executes an instruction the CPU lacks. gcc and clang (also
Apple clang) work; no flag or header here or in csrc/ is x86-only outside the x86 files
and TKA_HAVE_X86 guards.

The optional CUDA core (``csrc/cuda``) is a separate extension, ``topkattn._cuda``: its
``.cu`` files are compiled by nvcc for an explicit list of GPU targets (CUDA_GENCODE) and
linked with the static CUDA runtime. The CPU extension never links the CUDA runtime.

Environment:
    TOPKATTN_SANITIZE=1   build with AddressSanitizer + UBSan (see scripts/sanitize.sh)
    TOPKATTN_CUDA=auto    (default) build topkattn._cuda when nvcc is found, else warn and
                          build the CPU package alone
    TOPKATTN_CUDA=1       build topkattn._cuda; fail if nvcc is missing
    TOPKATTN_CUDA=0       never build topkattn._cuda
    CUDA_HOME             where to look for bin/nvcc first (else PATH, then /usr/local/cuda)
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext



def target_machine(env=None):
    """The CPU the extension is built for (lower case), which is not always the one the
    build runs on: on macOS ``ARCHFLAGS="-arch arm64"`` (cibuildwheel, cross builds) names
    it, elsewhere ``_PYTHON_HOST_PLATFORM`` (e.g. ``linux-aarch64``) when set."""
    env = os.environ if env is None else env
    arches = env.get("ARCHFLAGS", "").split()[1::2] if sys.platform == "darwin" else []
    if len(set(arches)) > 1:
        sys.exit(f"topkattn: ARCHFLAGS={env['ARCHFLAGS']!r} asks for several architectures at "
                 "once (universal2); build one wheel per architecture (x86_64, arm64)")
    if arches:
        return arches[0].lower()
    host = env.get("_PYTHON_HOST_PLATFORM", "")
    if host:
        return host.rsplit("-", 1)[-1].lower()
    return platform.machine().lower()


X86 = target_machine() in ("x86_64", "amd64", "i686", "i386", "x86")

# Flags for one file, chosen by its name suffix (x86 only: the NEON files need none).
ISA_FLAGS = {
    "_avx2.c": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.c": ["-mavx512f", "-mavx512bw", "-mavx2", "-mfma", "-mf16c"],
}

BANNED = ("-march", "-mavx", "-mfma", "-mf16c", "-msse4", "-mtune=native", "-mcpu=native")


def _check_global_flags():
    for var in ("CFLAGS", "CPPFLAGS", "LDFLAGS"):
        for flag in os.environ.get(var, "").split():
            if flag.startswith(BANNED):
                sys.exit(f"topkattn: {var} contains {flag!r}; global ISA flags would let wide "
                         "instructions run before dispatch. Remove it (the SIMD files get their "
                         "own flags).")


# ----------------------------------------------------------------- optional CUDA core

# SASS for Ampere (sm_80) and Hopper (sm_90), plus compute_90 PTX that newer GPUs JIT-compile.
CUDA_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-lineinfo"]


def cuda_mode(env=None):
    """'auto', '0' or '1' from TOPKATTN_CUDA (anything else is an error)."""
    env = os.environ if env is None else env
    mode = env.get("TOPKATTN_CUDA", "auto").strip().lower() or "auto"
    aliases = {"auto": "auto", "0": "0", "off": "0", "no": "0", "false": "0",
               "1": "1", "on": "1", "yes": "1", "true": "1"}
    if mode not in aliases:
        raise ValueError(f"TOPKATTN_CUDA must be auto, 0 or 1, got {mode!r}")
    return aliases[mode]


def find_nvcc(env=None):
    """Path of nvcc: $CUDA_HOME/bin, then PATH, then /usr/local/cuda/bin; None if absent."""
    env = os.environ if env is None else env
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    on_path = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    candidates += [on_path] if on_path else []
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_root(nvcc):
    """The toolkit directory of an nvcc (resolving wrappers such as /usr/local/bin/nvcc)."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    real = os.path.realpath(nvcc)
    for root in (os.path.dirname(os.path.dirname(real)), "/usr/local/cuda"):
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    raise RuntimeError(f"topkattn: found {nvcc} ({out.stdout.strip().splitlines()[-1:]}) but not "
                       "the CUDA headers next to it; set CUDA_HOME to the toolkit directory")


def want_cuda(env=None, nvcc_finder=find_nvcc):
    """(build?, nvcc path or None, warning or None) for the TOPKATTN_CUDA setting."""
    mode = cuda_mode(env)
    if mode == "0":
        return False, None, None
    nvcc = nvcc_finder(env)
    if nvcc:
        return True, nvcc, None
    if mode == "1":
        raise RuntimeError("topkattn: TOPKATTN_CUDA=1 but nvcc was not found (set CUDA_HOME or "
                           "put nvcc on PATH, or use TOPKATTN_CUDA=0 for the CPU package)")
    return False, None, ("topkattn: nvcc not found; building the CPU package without the "
                         "optional CUDA core (set TOPKATTN_CUDA=0 to silence this warning)")


class BuildExt(build_ext):
    def build_extension(self, ext):
        if getattr(ext, "cu_sources", None):
            self._compile_cuda(ext)
        super().build_extension(ext)

    def _compile_cuda(self, ext):
        """nvcc-compile ext.cu_sources (in parallel) into objects handed to the linker."""
        objs, jobs = [], []
        t0 = time.time()
        for src in ext.cu_sources:
            obj = os.path.join(self.build_temp, "cuda", os.path.basename(src) + ".o")
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            headers = glob.glob(os.path.join(os.path.dirname(src), "*.h*")) + ["csrc/tka_status.h"]
            newest = max(os.path.getmtime(p) for p in [src] + headers)
            if self.force or not os.path.exists(obj) or os.path.getmtime(obj) < newest:
                cmd = [ext.nvcc, "-c", src, "-o", obj, "-I", "csrc/cuda"] + NVCC_FLAGS + CUDA_GENCODE
                print(" ".join(cmd), flush=True)
                jobs.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True)))
            objs.append(obj)
        failed = []
        for src, proc in jobs:
            out, _ = proc.communicate()
            if out.strip():
                sys.stderr.write(out)
            if proc.returncode != 0:
                failed.append(f"{src} (exit {proc.returncode})")
        if failed:
            raise RuntimeError("topkattn: nvcc failed to compile " + ", ".join(failed)
                               + " (output above). Set TOPKATTN_CUDA=0 to build the CPU package "
                               "without the optional CUDA core.")
        if jobs:
            targets = ", ".join(g.rsplit("code=", 1)[1] for g in CUDA_GENCODE)
            print(f"topkattn: CUDA core compiled in {time.time() - t0:.1f} s for {targets}",
                  flush=True)
        ext.extra_objects = list(ext.extra_objects or []) + [o for o in objs
                                                              if o not in (ext.extra_objects or [])]

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
# files (the NEON ones are empty except on aarch64) plus, on x86, the per-ISA ones
# (*_avx2.c, *_avx512.c: compiled with their flags).
sources = sorted(glob.glob("csrc/*.c"))
for path in sorted(glob.glob("csrc/cpu/*.c")):
    if X86 or not path.endswith(tuple(ISA_FLAGS)):
        sources.append(path)

# -ffp-contract=off: no fused multiply-adds the source does not ask for. gcc in C11 mode
# does not fuse anyway; clang would (and on aarch64 FMA is baseline), which would make the
# scalar set and the error analysis of the bounds depend on the compiler.
cflags = ["-std=c11", "-O2", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wextra",
          "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
ldflags = ["-pthread"]
if os.environ.get("TOPKATTN_SANITIZE") == "1":
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
    cflags = [f for f in cflags if not f.startswith("-O")] + ["-O1", "-g"] + san
    ldflags += san

core = Extension(
    "topkattn._core",
    sources=sources,
    # headers and the per-ISA kernel template: a change to them rebuilds the extension
    depends=sorted(glob.glob("csrc/*.h") + glob.glob("csrc/cpu/*.h") + glob.glob("csrc/cpu/*.inc")),
    include_dirs=["csrc", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_23_API_VERSION")]
    + ([("TKA_HAVE_X86", "1")] if X86 else []),
    extra_compile_args=cflags,
    extra_link_args=ldflags,
)



def cuda_extension(nvcc):
    """topkattn._cuda: csrc/cuda/*.cu through nvcc, csrc/cuda/module.c (with the status table
    and exception glue shared with the CPU core) through the C compiler, linked with the
    static CUDA runtime (no libcudart.so needed at run time)."""
    root = cuda_root(nvcc)
    libdirs = [d for d in (os.path.join(root, "lib64"), os.path.join(root, "lib"),
                           os.path.join(root, "targets", "x86_64-linux", "lib"))
               if os.path.isdir(d)]
    ext = Extension(
        "topkattn._cuda",
        sources=["csrc/cuda/module.c", "csrc/status.c", "csrc/pyerr.c"],
        include_dirs=["csrc/cuda", "csrc"],
        library_dirs=libdirs,
        libraries=["cudart_static", "stdc++", "dl", "rt"],
        extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        extra_link_args=["-pthread"],
        depends=sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.h")
                       + glob.glob("csrc/cuda/*.cuh") + ["csrc/tka_status.h", "csrc/pyerr.h"]),
    )
    ext.cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    ext.nvcc = nvcc
    return ext


if __name__ == "__main__":
    ext_modules = [core]
    build_cuda, nvcc, warning = want_cuda()
    if warning:
        print("WARNING: " + warning, file=sys.stderr)
    if build_cuda:
        ext_modules.append(cuda_extension(nvcc))
    setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
