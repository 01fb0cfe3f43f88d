"""Which backend runs a public function: the CPU core or the CUDA module.

Every public function that takes arrays is wrapped by :func:`dispatch`, which looks at its
array operands once per call. When one of them is a CUDA array (see
:func:`topkattn._args.is_gpu_array`) the call goes to the function of the same name in
:mod:`topkattn._gpu` (which checks that the CUDA core is built and switched on);
otherwise it runs the wrapped CPU implementation, which calls ``topkattn._core``. A CUDA
array that cannot be served -- given to a function without a GPU twin, or as a parameter
next to CPU operands -- is refused with a ``TypeError`` that names the argument and says
what to do, before any conversion to NumPy is tried.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np

from . import _gpu
from ._args import is_gpu_array
from ._errors import cpu_only, cpu_operands

__all__ = ["dispatch"]

# Types whose values are never CUDA arrays: a call whose arguments are all of these goes
# straight to the CPU implementation (subclasses take the full check).
_HOST_TYPES = frozenset({np.ndarray, float, int, bool, str, bytes, type(None), np.float64,
                         np.float32, np.int64, np.int32, np.bool_})


def dispatch(*operands, name=None):
    """Decorator: run ``func`` on the backend its array ``operands`` live on.

    Parameters
    ----------
    *operands : str
        Names of the parameters whose arrays choose the backend (``"logits"``;
        ``"Q", "K", "V"``). Every other argument is only checked not to be a CUDA array
        when the call runs on the CPU.
    name : str, optional
        How messages name the function (default: its ``__qualname__``).
    """
    def decorate(func):
        label = name or func.__qualname__
        params = list(inspect.signature(func).parameters)
        positions = {p: params.index(p) for p in operands}
        twin = func.__name__ if func.__name__ in _gpu.FUNCTIONS else None

        def gpu_operand(args, kwargs):
            for op, pos in positions.items():
                value = args[pos] if pos < len(args) else kwargs.get(op)
                if is_gpu_array(value):
                    return op
            return None

        def gpu_parameter(args, kwargs):
            named = list(zip(params, args)) + list(kwargs.items())
            for key, value in named:
                if is_gpu_array(value):
                    return key
            return None

        @functools.wraps(func)
        def run(*args, **kwargs):
            # the common case, decided by type alone: nothing that could be a CUDA array
            for value in args:
                if type(value) not in _HOST_TYPES:
                    break
            else:
                for value in kwargs.values():
                    if type(value) not in _HOST_TYPES:
                        break
                else:
                    return func(*args, **kwargs)
            op = gpu_operand(args, kwargs)
            if op is not None:
                if twin is None:
                    raise cpu_only(op, label)
                # looked up at each call, so the module's current function runs
                return getattr(_gpu, twin)(*args, **kwargs)
            bad = gpu_parameter(args, kwargs)
            if bad is not None:
                raise cpu_only(bad, label) if twin is None else cpu_operands(bad, label, operands)
            return func(*args, **kwargs)

        return run

    return decorate
