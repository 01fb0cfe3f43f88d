"""Shared pieces of the fuzz targets: adversarial arrays from the fuzzer's bytes, the
accepted outcomes, and cheap certificate checks.

An input may end in a result or in a clean Python exception (ValueError, TypeError,
OverflowError or MemoryError with a message). Anything else is a finding: an uncaught
exception (reported by atheris), a crash or a sanitizer report (the process dies), or a
certificate below the truth (``Finding`` is raised).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np

ACCEPTED = (ValueError, TypeError, OverflowError, MemoryError)

# values that break arithmetic: NaN, infinities, subnormals, the ends of the float ranges
SPECIAL = np.array([
    np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324, -5e-324, 1e-310, 2.2250738585072014e-308,
    1e308, -1e308, 1.7976931348623157e308, -1.7976931348623157e308, 3.4028234663852886e38,
    -3.4028234663852886e38, 1.401298464324817e-45, 1e-38, 708.0, -708.0, 745.2, -745.2,
    1e4, -1e4, 1.0, -1.0, 0.5, 2.0 ** 53, 1e-300,
])

DTYPES = [
    np.dtype("<f8"), np.dtype("<f4"), np.dtype(">f8"), np.dtype(">f4"), np.dtype("<f2"),
    np.dtype("<i8"), np.dtype("<i4"), np.dtype("u1"), np.dtype("?"), np.dtype("<c16"),
    np.dtype("<f8"), np.dtype("<f4"), np.dtype("<f8"), np.dtype("O"), np.dtype("<f16")
    if hasattr(np, "float128") else np.dtype("<f8"),
]

# extents that wrap int64 byte counts or element counts when multiplied
HUGE = [2 ** 31, 2 ** 32 + 1, 2 ** 40, 2 ** 62, 2 ** 63 - 1]


class Finding(AssertionError):
    """A certificate below the truth, or another broken property."""


@contextlib.contextmanager
def accepted():
    """Let the accepted exceptions through (with a message); re-raise anything else."""
    try:
        yield
    except ACCEPTED as e:
        if not str(e) and not isinstance(e, MemoryError):
            raise Finding(f"{type(e).__name__} without a message") from e


def values(fdp, count, mode=None):
    """``count`` float64 values: a mix of normal draws, special values and raw bytes."""
    if mode is None:
        mode = fdp.ConsumeIntInRange(0, 4)
    if count == 0:
        return np.zeros(0)
    if mode == 0:  # moderate logits
        scale = [1.0, 10.0, 1e-3, 100.0, 700.0][fdp.ConsumeIntInRange(0, 4)]
        seed = fdp.ConsumeIntInRange(0, 2 ** 32 - 1)
        return np.random.default_rng(seed).standard_normal(count) * scale
    if mode == 1:  # few levels: ties
        levels = np.array([fdp.ConsumeRegularFloat() for _ in range(fdp.ConsumeIntInRange(1, 4))])
        levels = np.where(np.isfinite(levels), levels, 0.0)
        seed = fdp.ConsumeIntInRange(0, 2 ** 32 - 1)
        return levels[np.random.default_rng(seed).integers(0, len(levels), count)]
    if mode == 2:  # special values sprinkled over moderate ones
        seed = fdp.ConsumeIntInRange(0, 2 ** 32 - 1)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(count) * 5
        nspecial = fdp.ConsumeIntInRange(0, min(count, 8))
        for _ in range(nspecial):
            x[fdp.ConsumeIntInRange(0, count - 1)] = SPECIAL[fdp.ConsumeIntInRange(
                0, len(SPECIAL) - 1)]
        return x
    if mode == 3:  # raw float64 bits
        raw = fdp.ConsumeBytes(8 * count)
        raw += b"\0" * (8 * count - len(raw))
        return np.frombuffer(raw, dtype="<f8").copy()
    return SPECIAL[np.array([fdp.ConsumeIntInRange(0, len(SPECIAL) - 1)
                             for _ in range(count)], dtype=np.int64)]


def array(fdp, max_elems=4096, ndim_max=4, finite=False, huge_ok=True):
    """An adversarial ndarray: dtype and byte order, shape (zero and huge extents), strides
    (negative, zero, overlapping), an offset into a larger buffer, values."""
    dtype = DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)]
    ndim = fdp.ConsumeIntInRange(0, ndim_max)
    shape = []
    for _ in range(ndim):
        c = fdp.ConsumeIntInRange(0, 9)
        shape.append(0 if c == 0 else fdp.ConsumeIntInRange(1, 3) if c < 5
                     else fdp.ConsumeIntInRange(1, 300) if c < 9 else HUGE[
                         fdp.ConsumeIntInRange(0, len(HUGE) - 1)])
    layout = fdp.ConsumeIntInRange(0, 5)
    if dtype.kind == "O":
        layout = min(layout, 1)  # as_strided views of object arrays would forge pointers
    if not huge_ok:
        shape = [s if s <= 300 else 300 for s in shape]
    huge = any(s > max_elems for s in shape)
    if huge and 0 not in shape and dtype.kind == "O":
        shape, huge = [min(s, 8) for s in shape], False
    if huge and 0 not in shape:
        # a huge extent is only safe to make as a zero-stride view of a small buffer, and only
        # useful when it cannot make the core work for hours: keep one huge axis, clip others
        first = next(i for i, s in enumerate(shape) if s > max_elems)
        shape = [70000 if i == first else min(s, 3) for i, s in enumerate(shape)]
        layout = 2
    n = int(np.prod(shape, dtype=object)) if shape else 1
    if n > max_elems and not huge:
        shape = [min(s, 8) for s in shape]
        n = int(np.prod(shape, dtype=object)) if shape else 1
    vals = values(fdp, min(n, max_elems) if 0 not in shape else 0)
    if finite:
        vals = np.where(np.isfinite(vals), vals, 0.0)
    with np.errstate(all="ignore"):
        if dtype.kind == "O":
            base = np.array(list(vals) or [0.0], dtype=object)
        else:
            base = (vals if vals.size else np.zeros(1)).astype(dtype)
    if 0 in shape:
        try:
            return np.lib.stride_tricks.as_strided(base[:1], shape=shape,
                                                   strides=[0] * len(shape))
        except ValueError:  # NumPy refuses extents whose product overflows, even with a 0
            return np.empty([min(s, 1024) for s in shape], dtype=dtype)
    if not shape:
        return base.reshape(-1)[:1].reshape(())
    if layout == 0:  # C order
        return base.reshape(shape) if base.size == n else np.resize(base, shape)
    if layout == 1:  # negative strides (reversed axes) and a transpose
        a = np.resize(base, shape)
        sl = tuple(slice(None, None, -1) if fdp.ConsumeBool() else slice(None) for _ in shape)
        a = a[sl]
        if a.ndim >= 2 and fdp.ConsumeBool():
            a = np.swapaxes(np.ascontiguousarray(np.swapaxes(a, -1, -2)), -1, -2)
        return a
    if layout == 2:  # zero strides (broadcast views), possibly huge
        strides = [0 if (s > 300 or fdp.ConsumeBool()) else base.itemsize for s in shape]
        m = 1 + sum((s - 1) * st // base.itemsize for s, st in zip(shape, strides))
        if m > base.size:
            strides = [0] * len(shape)
        return np.lib.stride_tricks.as_strided(base, shape=shape, strides=strides,
                                               writeable=False)
    if layout == 3:  # overlapping rows: the row stride is smaller than the row
        step = fdp.ConsumeIntInRange(1, 3)
        strides = []
        acc = base.itemsize
        for s in reversed(shape):
            strides.insert(0, acc)
            acc = max(base.itemsize, acc * s // (step + 1))
        need = 1 + sum((s - 1) * st // base.itemsize for s, st in zip(shape, strides))
        buf = np.resize(base, need)
        return np.lib.stride_tricks.as_strided(buf, shape=shape, strides=strides,
                                               writeable=False)
    if layout == 4:  # an offset into a larger buffer, and an every-other-element stride
        off = fdp.ConsumeIntInRange(0, 7)
        buf = np.resize(base, 2 * n + off)
        return buf[off:off + 2 * n:2].reshape(shape) if len(shape) else buf[off]
    # misaligned: a view at an odd byte offset of a byte buffer
    raw = np.zeros(n * dtype.itemsize + 1 if dtype.kind != "O" else 1, dtype=np.uint8)
    if dtype.kind == "O":
        return np.resize(base, shape)
    raw[1:] = np.resize(base, n).view(np.uint8)
    return raw[1:].view(dtype).reshape(shape)


def int_param(fdp):
    c = fdp.ConsumeIntInRange(0, 6)
    if c == 0:
        return fdp.ConsumeIntInRange(-3, 3)
    if c == 1:
        return HUGE[fdp.ConsumeIntInRange(0, len(HUGE) - 1)] * (1 if fdp.ConsumeBool() else -1)
    if c == 2:
        vals = np.array([fdp.ConsumeIntInRange(-5, 400) for _ in range(fdp.ConsumeIntInRange(
            0, 6))], dtype=np.int64)  # then cast: negative values wrap in uint64
        return vals.astype([np.int64, np.int32, np.float64, np.uint64][
            fdp.ConsumeIntInRange(0, 3)])
    if c == 3:
        return fdp.ConsumeRegularFloat()
    return fdp.ConsumeIntInRange(0, 400)


def float_param(fdp):
    c = fdp.ConsumeIntInRange(0, 4)
    if c == 0:
        return float(SPECIAL[fdp.ConsumeIntInRange(0, len(SPECIAL) - 1)])
    if c == 1:
        return fdp.ConsumeRegularFloat()
    if c == 2:
        return np.array([fdp.ConsumeProbability() for _ in range(fdp.ConsumeIntInRange(0, 5))])
    return fdp.ConsumeProbability()


def flatten_sum(obj):
    """Touch every array in a result (a tuple, a dataclass, an array)."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = [getattr(obj, f) for f in obj.__dataclass_fields__]
    if isinstance(obj, (tuple, list)):
        for o in obj:
            flatten_sum(o)
    elif isinstance(obj, np.ndarray) and obj.dtype.kind != "O":
        obj.sum()


def exact_tv_bigger(tv_float64, bound, mp_tv):
    """Whether the true TV exceeds ``bound``: decided in float64 when it is clear, else by
    ``mp_tv()`` (an mpmath evaluation)."""
    if not tv_float64 > bound * (1 - 1e-9):
        return False
    return mp_tv() > bound


def mp_tail(logits, kept_mask):
    """tau of the kept set at 50 digits."""
    import mpmath
    mpmath.mp.dps = 50
    e = [mpmath.e ** mpmath.mpf(float(x)) if x > -math.inf else mpmath.mpf(0) for x in logits]
    tail = mpmath.fsum(v for v, k in zip(e, kept_mask) if not k)
    tot = mpmath.fsum(e)
    return tail / tot if tot > 0 else mpmath.mpf(0)


def import_topkattn():
    """Import topkattn from the sanitized build in $TOPKATTN_FUZZ_BUILD (fuzz/build.sh),
    not from an editable install of the checkout; its Python files are instrumented for
    coverage, the C core carries libFuzzer's native instrumentation."""
    import atheris
    build = os.environ.get("TOPKATTN_FUZZ_BUILD")
    if build:
        sys.meta_path[:] = [f for f in sys.meta_path
                            if "__editable__" not in getattr(f, "__module__", "")
                            and "__editable__" not in type(f).__module__]
        sys.path.insert(0, build)
    with atheris.instrument_imports(include=["topkattn"]):
        import topkattn
        import topkattn.reference  # noqa: F401
    if build and not topkattn._core.__file__.startswith(os.path.abspath(build)):
        raise SystemExit(f"topkattn._core came from {topkattn._core.__file__}, not {build}")
    return topkattn


def run(test_one, argv=None):
    import atheris
    argv = list(sys.argv if argv is None else argv)
    atheris.Setup(argv, test_one, enable_python_coverage=True)
    atheris.Fuzz()


os.environ.setdefault("TOPKATTN_NUM_THREADS", "1")
