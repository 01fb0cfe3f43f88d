"""Argument checks shared by every public function and by both backends.

The rules live here once: which arrays count as CUDA arrays, which dtypes become float
arrays, how a per-row parameter broadcasts, which Top-k selection was asked for, what a
scale and an additive mask may be, how attention operands must be shaped. Every check
raises a ``ValueError`` or ``TypeError`` that names the argument. Nothing here imports
another topkattn module.
"""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np

_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged
_OPERAND_SHAPES = {"Q": "(..., L, d)", "K": "(..., n, d)", "V": "(..., n, d_v)"}


# ----------------------------------------------------------------- where an array lives

def is_gpu_array(x):
    """True for a CUDA array (torch CUDA tensor, CuPy array, CUDA DLPack producer).

    Cheap for everything else: NumPy arrays, Python scalars and lists return at once, and
    neither torch nor CuPy is imported.
    """
    if isinstance(x, (np.ndarray, np.generic, int, float, list, tuple)) or x is None:
        return False
    if type(x).__module__.split(".")[0] == "torch":
        return bool(getattr(x, "is_cuda", False))
    try:
        if hasattr(x, "__cuda_array_interface__"):
            return True
        dev = getattr(x, "__dlpack_device__", None)
        return dev is not None and int(dev()[0]) in _DLPACK_CUDA
    except Exception:  # a property that raises (e.g. a CPU tensor of another library)
        return False


def any_gpu(*xs):
    """True if any argument is a GPU array (see :func:`is_gpu_array`)."""
    return any(is_gpu_array(x) for x in xs)


# ----------------------------------------------------------------- arrays and per-row values

FLOAT_DTYPES = (np.float32, np.float64, np.float16)


def float_array(x, name):
    """float32/float64/float16 ndarray view of ``x``; lists and integers become float64,
    other dtypes are refused with a TypeError naming ``name``. float16 stays float16: the
    C core converts it (exactly) itself."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
        if x.dtype.kind in "iub":
            x = x.astype(np.float64)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64 or float16, got {x.dtype}")
    if not x.flags.aligned:  # the C core reads elements as typed values: copy to aligned memory
        x = x.copy()
    return x


def common_float_dtype(*arrays):
    """The dtype attention operands are brought to: the widest of theirs (float16 <
    float32 < float64), so mixing never loses precision and one dtype alone is kept."""
    return np.result_type(*(a.dtype for a in arrays))


def logits(x, name="logits"):
    """:func:`float_array` with at least one axis."""
    x = float_array(x, name)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (..., n), got a scalar")
    if x.shape[-1] == 0:  # before per-row parameters are broadcast to a huge batch shape
        raise ValueError(f"{name} has an empty last axis (n = 0): there is no key")
    return x


def per_row(value, batch_shape, name, dtype):
    """Broadcast a scalar or array parameter to one value per row (C order)."""
    if batch_shape == () and (type(value) is float and dtype == np.float64
                              or type(value) is int and -2**63 <= value < 2**63):
        return np.array(value, dtype=dtype)  # the common scalar case, without broadcasting
    arr = np.asarray(value)
    if dtype == np.int64:
        if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
            if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise TypeError(f"{name} must be an integer or an integer array, got {arr.dtype}")
    try:
        arr = np.broadcast_to(arr, batch_shape)
    except ValueError:
        raise ValueError(f"{name} with shape {arr.shape} does not broadcast against the batch "
                         f"shape {batch_shape} of logits") from None
    return np.ascontiguousarray(arr, dtype=dtype)


def check_k(k, lo, n):
    """Every k (an int or int array) in [lo, n]."""
    k = np.asarray(k)
    if k.size and (k.min() < lo or k.max() > n):
        bad = k.min() if k.min() < lo else k.max()
        raise ValueError(f"k must be in [{lo}, n] = [{lo}, {n}], got {int(bad)}")


def check_eps(eps):
    """Every eps (a float64 array) in the open interval (0, 1)."""
    bad = eps[~((eps > 0) & (eps < 1))]
    if bad.size:
        raise ValueError(f"eps must be in the open interval (0, 1), got {float(bad[0])!r}")


def integer(value, name):
    """``value`` as a Python int; bools and non-integers are a TypeError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return operator.index(value)


def scalar_out(a):
    """0-d results come back as NumPy scalars, like NumPy's own reductions."""
    return a[()] if a.ndim == 0 else a


# ----------------------------------------------------------------- Top-k selection

def selection(rshape, n, k, eps, ratio):
    """The kept-set rule of each query row: ``(k per row, None)`` or ``(None, eps per row)``.

    Exactly one of ``k`` (in [1, n]), ``eps`` (in (0, 1)) or ``ratio`` (in (0, 1],
    turned into ``k = ceil(ratio * n)``) must be given; ``rshape`` is the shape of the
    query rows ``(..., L)``.
    """
    given = [name for name, v in (("k", k), ("eps", eps), ("ratio", ratio)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of k, eps or ratio, got "
                         + (", ".join(given) if given else "none"))
    if ratio is not None:
        r = np.asarray(ratio, dtype=np.float64)
        if not np.all((r > 0) & (r <= 1)):
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        k = np.ceil(r * n - 1e-9 * r * n).astype(np.int64)
    if k is not None:
        kk = per_row(k, rshape, "k", np.int64)
        check_k(kk, 1, n)
        return kk, None
    ee = per_row(eps, rshape, "eps", np.float64)
    check_eps(ee)
    return None, ee


# ----------------------------------------------------------------- attention operands

def operand_ndim(name, ndim):
    """Q, K and V need at least the two matrix axes."""
    if ndim < 2:
        raise ValueError(f"{name} must have shape {_OPERAND_SHAPES[name]}, got a {ndim}-d array")


def attention_dims(q_shape, k_shape, v_shape):
    """``(L, d, n, d_v)`` of attention operands of these shapes, which must agree."""
    q_shape, k_shape, v_shape = (tuple(int(s) for s in x) for x in (q_shape, k_shape, v_shape))
    L, d = q_shape[-2:]
    n = k_shape[-2]
    if k_shape[-1] != d:
        raise ValueError(f"Q and K must have the same last axis d: Q has shape {q_shape}, "
                         f"K has shape {k_shape}")
    if v_shape[-2] != n:
        raise ValueError(f"K and V must have the same number of keys n (axis -2): K has shape "
                         f"{k_shape}, V has shape {v_shape}")
    if n == 0:
        raise ValueError(f"K has no keys (n = 0, shape {k_shape})")
    if d == 0:
        raise ValueError(f"Q and K have d = 0 features (shapes {q_shape}, {k_shape})")
    return L, d, n, v_shape[-1]


def batch_shape(named_shapes):
    """Broadcast batch shape (all axes but the last two) of ``(name, shape)`` pairs."""
    try:
        return tuple(np.broadcast_shapes(*(tuple(s)[:-2] for _, s in named_shapes)))
    except ValueError:
        raise ValueError("the batch axes of " + ", ".join(
            f"{name} {tuple(s)}" for name, s in named_shapes) + " do not broadcast") from None


def scale(value, d):
    """The score scale: ``1/sqrt(d)`` for None, else a finite real number (not a bool)."""
    if value is None:
        return 1.0 / math.sqrt(d)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise ValueError(f"scale must be a finite real number, got {value!r}")
    return float(value)


def mask_dtype(is_bool, is_real, dtype, example):
    """An additive mask is real; a boolean one is refused with the additive ``example``."""
    if is_bool:
        raise TypeError("mask must be additive (0 to keep, -inf to mask a key), not boolean; "
                        f"use {example}")
    if not is_real:
        raise TypeError(f"mask must be a real (additive) array, got {dtype}")


def mask_shape(shape, L, n):
    """The mask's shape with at least two axes, checked to broadcast to ``(..., L, n)``."""
    shape = tuple(int(s) for s in shape)
    shape = (1,) * (2 - len(shape)) + shape
    if shape[-2] not in (1, L) or shape[-1] not in (1, n):
        raise ValueError(f"mask with shape {shape} does not broadcast to (..., L, n) = "
                         f"(..., {L}, {n})")
    return shape


def batch_offsets(shape, strides, bshape):
    """Offset of every batch element of an array broadcast to ``bshape`` (C order).

    ``shape`` and ``strides`` are the array's batch axes (strides in any unit: the
    offsets come in the same unit); axes of length 1 and missing leading axes repeat.
    """
    nd = len(bshape)
    if 0 in tuple(bshape):  # an empty batch: no offsets (and no arange over its other axes)
        return np.zeros(0, dtype=np.int64)
    pad = nd - len(shape)
    off = np.zeros(bshape, dtype=np.int64)
    for ax in range(nd):
        i = ax - pad
        if i < 0 or shape[i] == 1 or bshape[ax] <= 1:
            continue
        view = [1] * nd
        view[ax] = bshape[ax]
        off = off + (np.arange(bshape[ax], dtype=np.int64) * strides[i]).reshape(view)
    return np.ascontiguousarray(off).reshape(-1)
