"""The one place where a status reported by a compiled core becomes a Python exception,
and where the messages about arrays on the wrong device are written.

A core reports bad input found while it runs as a status code and the flat index of the
row it was found in: 1 = NaN, 2 = +inf, otherwise a fully masked row. The messages say
where in the caller's batch shape that row is. Nothing here imports another topkattn
module.
"""
from __future__ import annotations

import numpy as np


def where(batch, row):
    """`` at batch index (i, j)`` for flat row ``row`` of ``batch``; "" without a batch."""
    if not batch or row < 0:
        return ""
    idx = np.unravel_index(row, batch)
    return " at batch index (" + ", ".join(str(int(i)) for i in idx) + ("," if len(idx) == 1 else "") + ")"


def check_logits_status(res, batch, name="logits"):
    """Raise the ValueError for a ``(code, row)`` status of a logits call; None is success."""
    if res is None:
        return
    code, row = res
    at = where(batch, row)
    if code == 1:
        raise ValueError(f"{name} contains NaN{at}")
    if code == 2:
        raise ValueError(f"{name} contains +inf{at} (use -inf for masked keys)")
    raise ValueError(f"{name} has a fully masked row{at} (every logit is -inf)")


def raise_attention_status(code, row, bshape, L):
    """Raise the ValueError for status ``code`` of query row ``row`` of ``(*bshape, L)``."""
    at = ""
    if row >= 0:
        idx = np.unravel_index(row, tuple(bshape) + (L,))
        at = f" (query row at index {tuple(int(i) for i in idx)} of (..., L))"
    if code == 1:
        raise ValueError(f"the scores q.k contain NaN{at}: Q or K has NaN or inf values")
    if code == 2:
        raise ValueError(f"the scores q.k are +inf{at}: Q or K has inf values")
    raise ValueError(f"mask masks every key of a query row{at}; a softmax over no key "
                     "is undefined")


def check_attention_result(res, bshape, L):
    """``res`` of an attention call of the CPU core, or its ``("error", code, row)``
    status raised as a ValueError."""
    if isinstance(res, tuple) and len(res) == 3 and isinstance(res[0], str):
        raise_attention_status(res[1], res[2], bshape, L)
    return res


# ----------------------------------------------------------------- arrays on the GPU

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
