"""GPU arrays on the optional CUDA core (``topkattn._cuda``).

:func:`topkattn.tail_mass`, :func:`~topkattn.log_tail_mass`, :func:`~topkattn.k_eps`,
:func:`~topkattn.topk` and :func:`~topkattn.topk_attention` send CUDA arrays here: torch
tensors on a CUDA device, CuPy arrays, and any other array whose ``__dlpack_device__`` is a
CUDA device (taken zero-copy through ``torch.from_dlpack``, else ``cupy.from_dlpack``).
Results are arrays of the same library on the same device, computed on the library's current
stream of that device; inputs are read in place (a copy is made only when the rows cannot be
addressed with two strides, or when the last axis of an attention operand is not
contiguous). Each call waits for its own kernels, because it reads back one status word to
report bad input (NaN, +inf, fully masked rows) as ``ValueError`` like the CPU core.

Opt-in while unverified
-----------------------
The CUDA kernels compile in CI but have not yet been run on a GPU. Until tests/test_cuda.py
has passed on real hardware, GPU arrays are refused with a ``TypeError`` unless the
environment variable ``TOPKATTN_CUDA_UNVERIFIED=1`` is set (read at each call). Without it,
move the array to the CPU (``.cpu()`` for torch, ``.get()`` for CuPy) to use the CPU core.

dtypes: float32, float64, float16 and bfloat16 (torch only: CuPy has no bfloat16). Per-row
scalars come back float64, k and indices int64, attention outputs in the operands' dtype
(accumulated in float32, float64 for float64 operands).
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np

try:
    from . import _cuda
except ImportError:  # built without nvcc (TOPKATTN_CUDA=0, or auto with no nvcc)
    _cuda = None

ENV_OPT_IN = "TOPKATTN_CUDA_UNVERIFIED"
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged
_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}


# ----------------------------------------------------------------- detection, opt-in

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


def cuda_enabled():
    """Whether GPU arrays are accepted now: the extension is built and opted in."""
    return _cuda is not None and os.environ.get(ENV_OPT_IN, "").strip() == "1"


def _require(name):
    if _cuda is None:
        raise TypeError(
            f"{name} is a GPU array, but this topkattn was built without its CUDA core "
            "(topkattn._cuda; build_info()['cuda'] is False). Rebuild with nvcc available "
            "(TOPKATTN_CUDA=1), or move the array to the CPU (.cpu() for torch, .get() for CuPy).")
    if os.environ.get(ENV_OPT_IN, "").strip() != "1":
        raise TypeError(
            f"{name} is a GPU array. topkattn's CUDA path is built but not yet verified on a "
            f"GPU, so it is off by default: set {ENV_OPT_IN}=1 to use it anyway, or move the "
            "array to the CPU (.cpu() for torch, .get() for CuPy).")


# ----------------------------------------------------------------- array libraries

class _Torch:
    name = "torch"

    def __init__(self):
        import torch
        self.t = torch
        self.dtypes = {torch.float32: "float32", torch.float64: "float64",
                       torch.float16: "float16", torch.bfloat16: "bfloat16"}

    def wrap(self, x):
        return x if isinstance(x, self.t.Tensor) else self.t.from_dlpack(x)

    def dtype_name(self, x):
        return self.dtypes.get(x.dtype, str(x.dtype).replace("torch.", ""))

    def device(self, x):
        return x.device.index if x.device.index is not None else self.t.cuda.current_device()

    def stream(self, dev):
        return int(self.t.cuda.current_stream(dev).cuda_stream)

    def ptr(self, x):
        return int(x.data_ptr())

    def strides(self, x):
        return tuple(int(s) for s in x.stride())

    def itemsize(self, x):
        return x.element_size()

    def reshape(self, x, shape):
        return x.reshape(shape)

    def contiguous(self, x):
        return x.contiguous()

    def empty(self, shape, dtype, dev):
        dt = self.t.bfloat16 if dtype == "bfloat16" else getattr(self.t, dtype)
        return self.t.empty(tuple(shape), dtype=dt, device=f"cuda:{dev}")

    def upload(self, a, dev):
        return self.t.from_numpy(np.ascontiguousarray(a)).to(f"cuda:{dev}")

    def to_host(self, x):
        return x.detach().cpu().numpy() if x.dtype != self.t.bfloat16 else \
            x.detach().float().cpu().numpy()

    def astype(self, x, dtype):
        return x.to(self.t.bfloat16 if dtype == "bfloat16" else getattr(self.t, dtype))

    def exp(self, x):
        return self.t.exp(x)

    def bad_mask_values(self, m):
        return bool((self.t.isnan(m) | self.t.isposinf(m)).any())

    def is_bool(self, x):
        return x.dtype == self.t.bool

    def is_float(self, x):
        return x.dtype.is_floating_point


class _Cupy:
    name = "cupy"

    def __init__(self):
        import cupy
        self.cp = cupy

    def wrap(self, x):
        return x if isinstance(x, self.cp.ndarray) else self.cp.from_dlpack(x)

    def dtype_name(self, x):
        return str(x.dtype)

    def device(self, x):
        return int(x.device.id)

    def stream(self, dev):
        with self.cp.cuda.Device(dev):
            return int(self.cp.cuda.get_current_stream().ptr)

    def ptr(self, x):
        return int(x.data.ptr)

    def strides(self, x):
        return tuple(int(s) // x.itemsize for s in x.strides)

    def itemsize(self, x):
        return x.itemsize

    def reshape(self, x, shape):
        with self.cp.cuda.Device(self.device(x)):
            return x.reshape(shape)

    def contiguous(self, x):
        with self.cp.cuda.Device(self.device(x)):
            return self.cp.ascontiguousarray(x)

    def empty(self, shape, dtype, dev):
        with self.cp.cuda.Device(dev):
            return self.cp.empty(tuple(shape), dtype=dtype)

    def upload(self, a, dev):
        with self.cp.cuda.Device(dev):
            return self.cp.asarray(np.ascontiguousarray(a))

    def to_host(self, x):
        return self.cp.asnumpy(x)

    def astype(self, x, dtype):
        with self.cp.cuda.Device(self.device(x)):
            return x.astype(dtype, copy=False)

    def exp(self, x):
        with self.cp.cuda.Device(self.device(x)):
            return self.cp.exp(x)

    def bad_mask_values(self, m):
        with self.cp.cuda.Device(self.device(m)):
            return bool((self.cp.isnan(m) | (m == self.cp.inf)).any())

    def is_bool(self, x):
        return x.dtype == np.bool_

    def is_float(self, x):
        return x.dtype.kind == "f"


_LIBS = {}


def _lib_of(x):
    """The adapter for x's library: torch tensors and CuPy arrays as they are; other CUDA
    DLPack producers are viewed through torch (else CuPy)."""
    mod = type(x).__module__.split(".")[0]
    if mod not in ("torch", "cupy"):
        mod = "torch"
        try:
            import torch  # noqa: F401
        except ImportError:
            mod = "cupy"
    if mod not in _LIBS:
        _LIBS[mod] = _Torch() if mod == "torch" else _Cupy()
    return _LIBS[mod]


def _dtype_code(lib, x, name):
    dt = lib.dtype_name(x)
    if dt not in _CODES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16 on the GPU, got {dt}")
    return _CODES[dt]


def _host(lib, v):
    """A parameter given as a GPU array comes to the host (it is small: one value per row)."""
    return lib.to_host(lib.wrap(v)) if is_gpu_array(v) else v


def _rows(lib, x, name="logits"):
    """(x, 2-D view (rows, n), batch shape, n, dtype code, row and element strides in bytes)."""
    x = lib.wrap(x)
    code = _dtype_code(lib, x, name)
    shape = tuple(int(s) for s in x.shape)
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one axis (..., n), got a scalar")
    n = shape[-1]
    if n == 0:
        raise ValueError(f"{name} has an empty last axis (n = 0): there is no key")
    batch = shape[:-1]
    rows = int(np.prod(batch, dtype=np.int64))
    x2 = lib.reshape(x, (rows, n))  # a view when the batch axes allow it, else a copy
    st = lib.strides(x2)
    size = lib.itemsize(x2)
    return x, x2, batch, rows, n, code, st[0] * size, st[1] * size


def _where(batch, row):
    if not batch or row < 0:
        return ""
    idx = np.unravel_index(row, batch)
    return " at batch index (" + ", ".join(str(int(i)) for i in idx) + ("," if len(idx) == 1 else "") + ")"


def _per_row(value, batch, name, dtype):
    from .core import _per_row as per_row
    return per_row(value, batch, name, dtype)


# ----------------------------------------------------------------- distribution level

def log_tail_mass(logits, k):
    """GPU twin of :func:`topkattn.log_tail_mass` (see the module docstring)."""
    _require("logits")
    lib = _lib_of(logits)
    x, x2, batch, rows, n, code, rs, es = _rows(lib, logits)
    kk = _per_row(_host(lib, k), batch, "k", np.int64)
    if kk.size and (kk.min() < 0 or kk.max() > n):
        bad = kk.min() if kk.min() < 0 else kk.max()
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {int(bad)}")
    dev = lib.device(x)
    out = lib.empty(batch, "float64", dev)
    if rows:
        kd = lib.upload(kk.reshape(-1), dev)
        _cuda.tail_mass(code, lib.ptr(x2), rows, n, rs, es, lib.ptr(kd), lib.ptr(out), 0,
                        lib.stream(dev), dev, tuple(batch))
    return out


def tail_mass(logits, k):
    """GPU twin of :func:`topkattn.tail_mass`."""
    return _lib_of(logits).exp(log_tail_mass(logits, k))


def k_eps(logits, eps, return_tail=False):
    """GPU twin of :func:`topkattn.k_eps`."""
    _require("logits")
    lib = _lib_of(logits)
    x, x2, batch, rows, n, code, rs, es = _rows(lib, logits)
    ee = _per_row(_host(lib, eps), batch, "eps", np.float64)
    bad = ee[~((ee > 0) & (ee < 1))]
    if bad.size:
        raise ValueError(f"eps must be in the open interval (0, 1), got {float(bad[0]):.17g}")
    dev = lib.device(x)
    k_out = lib.empty(batch, "int64", dev)
    tau = lib.empty(batch, "float64", dev) if return_tail else None
    if rows:
        ed = lib.upload(ee.reshape(-1), dev)
        _cuda.k_eps(code, lib.ptr(x2), rows, n, rs, es, lib.ptr(ed), lib.ptr(k_out),
                    lib.ptr(tau) if tau is not None else 0, lib.stream(dev), dev, tuple(batch))
    return (k_out, tau) if return_tail else k_out


def topk(logits, k):
    """GPU twin of :func:`topkattn.topk`: int64 indices, shape (..., k)."""
    import numbers
    import operator
    _require("logits")
    lib = _lib_of(logits)
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = operator.index(k)
    x, x2, batch, rows, n, code, rs, es = _rows(lib, logits)
    if k < 0 or k > n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {k}")
    dev = lib.device(x)
    out = lib.empty(batch + (k,), "int64", dev)
    if rows and k:
        _cuda.topk(code, lib.ptr(x2), rows, n, rs, es, k, lib.ptr(out), lib.stream(dev), dev,
                   tuple(batch))
    return out


# ----------------------------------------------------------------- attention

def _batch_offsets(shape, strides, bshape):
    """Element offset of every batch element of an operand broadcast to bshape (C order)."""
    nd = len(bshape)
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


def topk_attention(Q, K, V, k=None, eps=None, ratio=None, scale=None, mask=None,
                   return_info=False):
    """GPU twin of :func:`topkattn.topk_attention`.

    Q, K, V must be GPU arrays of one library, one device and one dtype; the output has that
    dtype. ``mask`` may be a GPU array or array_like (it is moved to the device, as the
    accumulation type). ``return_info`` gives a :class:`~topkattn.TopkInfo` of GPU arrays.
    """
    from .attention import TopkInfo, _selection
    for nm, a in (("Q", Q), ("K", K), ("V", V)):
        if not is_gpu_array(a):
            raise TypeError(f"{nm} must be a GPU array like the other operands (Q, K and V on "
                            "one device), got " + type(a).__name__)
    _require("Q")
    lib = _lib_of(Q)
    Q, K, V = lib.wrap(Q), lib.wrap(K), lib.wrap(V)
    code = _dtype_code(lib, Q, "Q")
    for nm, a in (("K", K), ("V", V)):
        if lib.dtype_name(a) != lib.dtype_name(Q):
            raise TypeError(f"Q, K and V must have one dtype on the GPU, got Q {lib.dtype_name(Q)} "
                            f"and {nm} {lib.dtype_name(a)}")
    dev = lib.device(Q)
    if lib.device(K) != dev or lib.device(V) != dev:
        raise ValueError("Q, K and V must be on the same GPU")
    for nm, a in (("Q", Q), ("K", K), ("V", V)):
        if len(a.shape) < 2:
            shape = "(..., L, d)" if nm == "Q" else "(..., n, d)" if nm == "K" else "(..., n, d_v)"
            raise ValueError(f"{nm} must have shape {shape}, got a {len(a.shape)}-d array")
    L, d = (int(s) for s in Q.shape[-2:])
    n = int(K.shape[-2])
    dv = int(V.shape[-1])
    if int(K.shape[-1]) != d:
        raise ValueError(f"Q and K must have the same last axis d: Q has shape {tuple(Q.shape)}, "
                         f"K has shape {tuple(K.shape)}")
    if int(V.shape[-2]) != n:
        raise ValueError(f"K and V must have the same number of keys n (axis -2): K has shape "
                         f"{tuple(K.shape)}, V has shape {tuple(V.shape)}")
    if n == 0:
        raise ValueError(f"K has no keys (n = 0, shape {tuple(K.shape)})")
    if d == 0:
        raise ValueError(f"Q and K have d = 0 features (shapes {tuple(Q.shape)}, {tuple(K.shape)})")
    acc = "float64" if code == _CODES["float64"] else "float32"
    shapes = [tuple(Q.shape[:-2]), tuple(K.shape[:-2]), tuple(V.shape[:-2])]
    m = None
    if mask is not None:
        if is_gpu_array(mask):
            m = lib.wrap(mask)
            if lib.is_bool(m):
                raise TypeError("mask must be additive (0 to keep, -inf to mask a key), not "
                                "boolean; use torch.where(keep, 0.0, -inf)")
            if not lib.is_float(m):
                m = lib.astype(m, "float64")
            m = lib.astype(m, acc)
        else:
            mh = np.asarray(mask)
            if mh.dtype == np.bool_:
                raise TypeError("mask must be additive (0 to keep, -inf to mask a key), not "
                                "boolean; use np.where(keep, 0.0, -np.inf)")
            if mh.dtype.kind not in "fiu":
                raise TypeError(f"mask must be a real (additive) array, got {mh.dtype}")
            m = lib.upload(mh.astype(acc), dev)
        if len(m.shape) < 2:
            m = lib.reshape(m, (1,) * (2 - len(m.shape)) + tuple(m.shape))
        if lib.bad_mask_values(m):
            raise ValueError("mask must not contain NaN or +inf (use -inf to mask a key)")
        Lm, nm_ = int(m.shape[-2]), int(m.shape[-1])
        if Lm not in (1, L) or nm_ not in (1, n):
            raise ValueError(f"mask with shape {tuple(m.shape)} does not broadcast to (..., L, n) "
                             f"= (..., {L}, {n})")
        shapes.append(tuple(m.shape[:-2]))
    try:
        bshape = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError("the batch axes of Q, K, V" + (" and mask" if m is not None else "")
                         + f" ({', '.join(str(s) for s in shapes)}) do not broadcast") from None
    if d > 4096:
        raise ValueError(f"d = {d} > 4096 is not supported on the GPU")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    p = SimpleNamespace(bshape=bshape, L=L, n=n)
    kk, ee = _selection(p, _host(lib, k), _host(lib, eps), _host(lib, ratio))
    batch = int(np.prod(bshape, dtype=np.int64))
    rows = batch * L
    rshape = bshape + (L,)
    out = lib.empty(bshape + (L, dv), lib.dtype_name(Q), dev)
    k_out = lib.empty(rshape, "int64", dev) if return_info else None
    tau = lib.empty(rshape, "float64", dev) if return_info else None
    width = (n if kk is None else max(1, int(kk.max()))) if rows else 1
    idx = lib.empty(rshape + (width,), "int64", dev) if return_info else None
    if rows:
        ops = []
        for a in (Q, K, V):
            if int(a.shape[-1]) > 1 and lib.strides(a)[-1] != 1:
                a = lib.contiguous(a)
            st = lib.strides(a)
            ld = st[-2] if int(a.shape[-2]) > 1 else 0
            offs = lib.upload(_batch_offsets(tuple(a.shape[:-2]), st[:-2], bshape), dev)
            ops.append((a, offs, ld))
        m_ptr = m_off_ptr = 0
        m_sl = m_sn = 0
        if m is not None:
            mst = lib.strides(m)
            m_sl = mst[-2] if int(m.shape[-2]) > 1 else 0
            m_sn = mst[-1] if int(m.shape[-1]) > 1 else 0
            m_offs = lib.upload(_batch_offsets(tuple(m.shape[:-2]), mst[:-2], bshape), dev)
            m_ptr, m_off_ptr = lib.ptr(m), lib.ptr(m_offs)
        kd = lib.upload(kk.reshape(-1), dev) if kk is not None else None
        ed = lib.upload(ee.reshape(-1), dev) if ee is not None else None
        (qa, qo, qld), (ka, ko, kld), (va, vo, vld) = ops
        _cuda.topk_attention(
            code, lib.ptr(qa), lib.ptr(ka), lib.ptr(va), lib.ptr(qo), lib.ptr(ko), lib.ptr(vo),
            qld, kld, vld, batch, L, n, d, dv, float(scale), m_ptr, m_off_ptr, m_sl, m_sn,
            lib.ptr(kd) if kd is not None else 0, lib.ptr(ed) if ed is not None else 0,
            lib.ptr(out), lib.ptr(k_out) if k_out is not None else 0,
            lib.ptr(tau) if tau is not None else 0, lib.ptr(idx) if idx is not None else 0,
            width, lib.stream(dev), dev, tuple(int(b) for b in bshape))
    if not return_info:
        return out
    if rows:
        kmax = int(lib.to_host(k_out).max())
        if kmax < width:
            idx = lib.contiguous(idx[..., :kmax])
    return out, TopkInfo(idx, k_out, tau)


# ----------------------------------------------------------------- build_info

def info():
    """What the CUDA side of this installation has: the ``cuda`` entry of build_info().

    Returns
    -------
    dict
        ``built`` (the extension exists), ``enabled`` (GPU arrays are accepted now: built and
        ``TOPKATTN_CUDA_UNVERIFIED=1``), ``verified`` (False until the GPU tests have passed on
        a GPU), ``runtime`` (CUDA runtime version it was built with, e.g. "13.0"),
        ``devices`` (visible devices), ``device`` (name and compute capability of device 0,
        or None) and ``error`` (why no device is seen, or None).
    """
    if _cuda is None:
        return {"built": False, "enabled": False, "verified": False, "runtime": None,
                "devices": 0, "device": None, "error": "topkattn._cuda was not built"}
    rv = _cuda.runtime_version()
    d = _cuda.device_info(0)
    dev = None
    if d["name"] is not None:
        dev = f"{d['name']} (sm_{d['compute_capability'][0]}{d['compute_capability'][1]})"
    return {"built": True, "enabled": cuda_enabled(), "verified": False,
            "runtime": f"{rv // 1000}.{rv % 1000 // 10}", "devices": d["count"], "device": dev,
            "error": d["error"]}
