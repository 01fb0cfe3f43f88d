"""The messages about arrays on the wrong device.

Bad input that a compiled core finds while it runs (NaN, +inf, a fully masked row) becomes
an exception in C, in one place for both cores (``csrc/pyerr.c``, with the message table of
``csrc/status.c``); what is left for Python is the device check before any core is called.
Nothing here imports another topkattn module.
"""
from __future__ import annotations

_TO_HOST = "(.cpu() for torch, .get() for CuPy)"


def cpu_only(name, func):
    """A CUDA array reached a function that runs on the CPU only."""
    return TypeError(f"{name} is a CUDA array; {func} runs on the CPU only: pass {name}.cpu() "
                     f"(torch) or {name}.get() (CuPy)")


def cpu_operands(name, func, operands):
    """A CUDA parameter reached a function whose array operands are on the CPU."""
    ops = " and ".join(operands)
    verb = "is" if len(operands) == 1 else "are"
    return TypeError(f"{name} is a CUDA array but {ops} {verb} not; {func} runs where {ops} "
                     f"{verb}: pass {name}.cpu() (torch) or {name}.get() (CuPy), or move "
                     f"{ops} to the GPU too")


def no_cuda_core(name):
    return TypeError(
        f"{name} is a GPU array, but this topkattn was built without its CUDA core "
        "(topkattn._cuda; build_info()['cuda'] is False). Rebuild with nvcc available "
        f"(TOPKATTN_CUDA=1), or move the array to the CPU {_TO_HOST}.")


def cuda_not_opted_in(name, variable):
    return TypeError(
        f"{name} is a GPU array. topkattn's CUDA path is built but not yet verified on a "
        f"GPU, so it is off by default: set {variable}=1 to use it anyway, or move the "
        f"array to the CPU {_TO_HOST}.")
