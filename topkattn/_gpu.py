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

import os

import numpy as np

from . import _args, _errors
from ._args import any_gpu, is_gpu_array
from ._args import batch_offsets as _batch_offsets
from ._results import TopkInfo

try:
    from . import _cuda
except ImportError:  # built without nvcc (TOPKATTN_CUDA=0, or auto with no nvcc)
    _cuda = None

__all__ = ["FUNCTIONS", "ENV_OPT_IN", "is_gpu_array", "any_gpu", "cuda_enabled", "info",
           "tail_mass", "log_tail_mass", "k_eps", "topk", "topk_attention"]

#: The public functions that have a twin here; the others run on the CPU only.
FUNCTIONS = ("tail_mass", "log_tail_mass", "k_eps", "topk", "topk_attention")

ENV_OPT_IN = "TOPKATTN_CUDA_UNVERIFIED"
_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}


# ----------------------------------------------------------------- opt-in

def cuda_enabled():
    """Whether GPU arrays are accepted now: the extension is built and opted in."""
    return _cuda is not None and os.environ.get(ENV_OPT_IN, "").strip() == "1"


def _require(name):
    if _cuda is None:
        raise _errors.no_cuda_core(name)
    if os.environ.get(ENV_OPT_IN, "").strip() != "1":
        raise _errors.cuda_not_opted_in(name, ENV_OPT_IN)


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

    def is_real(self, x):
        return not x.dtype.is_complex


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

    def is_real(self, x):
        return x.dtype.kind in "fiu"


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


# ----------------------------------------------------------------- distribution level

def log_tail_mass(logits, k):
    """GPU twin of :func:`topkattn.log_tail_mass` (see the module docstring)."""
    _require("logits")
    lib = _lib_of(logits)
    x, x2, batch, rows, n, code, rs, es = _rows(lib, logits)
    kk = _args.per_row(_host(lib, k), batch, "k", np.int64)
    _args.check_k(kk, 0, n)
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
    ee = _args.per_row(_host(lib, eps), batch, "eps", np.float64)
    _args.check_eps(ee)
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
    _require("logits")
    lib = _lib_of(logits)
    k = _args.integer(k, "k")
    x, x2, batch, rows, n, code, rs, es = _rows(lib, logits)
    _args.check_k(k, 0, n)
    dev = lib.device(x)
    out = lib.empty(batch + (k,), "int64", dev)
    if rows and k:
        _cuda.topk(code, lib.ptr(x2), rows, n, rs, es, k, lib.ptr(out), lib.stream(dev), dev,
                   tuple(batch))
    return out


# ----------------------------------------------------------------- attention

def _device_mask(lib, mask, acc, dev):
    """An additive mask (a GPU array of lib, or array_like) on device dev, as acc."""
    if is_gpu_array(mask):
        m = lib.wrap(mask)
        _args.mask_dtype(lib.is_bool(m), lib.is_real(m), lib.dtype_name(m),
                         "torch.where(keep, 0.0, -inf)")
        return lib.astype(m, acc)
    mh = np.asarray(mask)
    _args.mask_dtype(mh.dtype == np.bool_, mh.dtype.kind in "fiu", mh.dtype,
                     "np.where(keep, 0.0, -np.inf)")
    return lib.upload(mh.astype(acc), dev)


def topk_attention(Q, K, V, k=None, eps=None, ratio=None, scale=None, mask=None,
                   return_info=False):
    """GPU twin of :func:`topkattn.topk_attention`.

    Q, K, V must be GPU arrays of one library, one device and one dtype; the output has that
    dtype. ``mask`` may be a GPU array or array_like (it is moved to the device, as the
    accumulation type). ``return_info`` gives a :class:`~topkattn.TopkInfo` of GPU arrays.
    """
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
        _args.operand_ndim(nm, len(a.shape))
    L, d, n, dv = _args.attention_dims(Q.shape, K.shape, V.shape)
    acc = "float64" if code == _CODES["float64"] else "float32"
    named = [("Q", tuple(Q.shape)), ("K", tuple(K.shape)), ("V", tuple(V.shape))]
    m = None
    if mask is not None:
        m = _device_mask(lib, mask, acc, dev)
        m = lib.reshape(m, _args.mask_shape(m.shape, L, n))
        if lib.bad_mask_values(m):
            raise ValueError("mask must not contain NaN or +inf (use -inf to mask a key)")
        named.append(("mask", tuple(m.shape)))
    bshape = _args.batch_shape(named)
    if d > 4096:
        raise ValueError(f"d = {d} > 4096 is not supported on the GPU")
    scale = _args.scale(scale, d)
    kk, ee = _args.selection(bshape + (L,), n, _host(lib, k), _host(lib, eps), _host(lib, ratio))
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
