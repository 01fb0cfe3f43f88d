"""Dense and Top-k attention and their output-level error (docs/design.md §3, §6).

Shapes follow ``torch.nn.functional.scaled_dot_product_attention``: ``Q (..., L, d)``,
``K (..., n, d)``, ``V (..., n, d_v)``; the batch axes ``...`` broadcast, so one K/V can
serve many heads' queries. Scores are ``scale * q . k`` (default ``scale = 1/sqrt(d)``)
plus an optional additive ``mask`` broadcastable to ``(..., L, n)``, where ``-inf`` masks a
key. The C core scores one query row at a time into a buffer of n float64 scores (no
``(L, n)`` matrix is formed), selects the kept set, and sums only the kept rows of V; rows
are spread over threads with the GIL released, and results do not depend on the thread
count. Operands of different dtypes are brought to the widest of them (float16 < float32 <
float64), and outputs have that dtype. Scores of float64 and float16 problems are
accumulated in float64 (float16 operands are converted exactly inside the C core, and a
float16 output is the float64 result rounded once); those of float32 problems in float32
vector lanes joined in float64 (no less accurate than a float32 BLAS product,
docs/design.md §3). Weights, their sums, the selection and tau are float64 either way;
dense attention of float32 problems sums the weighted values in float32 within blocks of 64
keys and in float64 across blocks.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _args, _core
from ._backend import dispatch
from ._results import AttentionError, TopkInfo
from .core import k_eps as _k_eps, tail_mass as _tail_mass

__all__ = [
    "attention", "topk_attention", "TopkInfo", "attention_error", "AttentionError",
    "dynamic_k", "attention_matrix_error",
]

_DENSE, _TOPK, _ROW_ERROR = _core.MODE_DENSE, _core.MODE_TOPK, _core.MODE_ROW_ERROR


# ----------------------------------------------------------------- argument handling

def _aligned(a, dtype):
    """``a`` as ``dtype`` with adjacent, aligned last-axis elements (copied only if needed)."""
    a = a.astype(dtype, copy=False)
    if (a.shape[-1] > 1 and a.strides[-1] != a.itemsize) or not a.flags.aligned or \
            a.strides[-2] % a.itemsize:
        a = np.ascontiguousarray(a)
    return a


def _offsets(a, bshape):
    """Byte offset of every batch element of ``a`` (the last two axes are the matrix)."""
    return _args.batch_offsets(a.shape[:-2], a.strides[:-2], bshape)


@dataclass
class _Problem:
    """Validated operands, ready for ``_core.attention``."""
    q: tuple
    k: tuple
    v: tuple
    mask: tuple | None
    bshape: tuple
    L: int
    n: int
    d: int
    dv: int
    scale: float
    dtype: type

    @property
    def rows(self):
        return int(np.prod(self.bshape, dtype=np.int64)) * self.L

    def call(self, mode, k=None, eps=None, want_info=False):
        return _core.attention(mode, self.q, self.k, self.v, self.mask,
                               tuple(int(b) for b in self.bshape), self.L, self.n, self.d,
                               self.dv, self.scale, k, eps, want_info)


def _operand(x, name):
    x = _args.float_array(x, name)
    _args.operand_ndim(name, x.ndim)
    return x


def _problem(Q, K, V, scale, mask, need_v=True):
    Q = _operand(Q, "Q")
    K = _operand(K, "K")
    V = _operand(V, "V") if need_v else K
    L, d, n, dv = _args.attention_dims(Q.shape, K.shape, V.shape)
    named = [("Q", Q.shape), ("K", K.shape), ("V", V.shape)]
    m = None
    if mask is not None:
        m = np.asarray(mask)
        _args.mask_dtype(m.dtype == np.bool_, m.dtype.kind in "fiu", m.dtype,
                         "np.where(keep, 0.0, -np.inf)")
        m = m.astype(np.float64, copy=False)
        if not m.flags.aligned:  # the core reads the mask as doubles
            m = m.copy()
        m = m.reshape(_args.mask_shape(m.shape, L, n))
        if np.isnan(m).any() or np.isposinf(m).any():
            raise ValueError("mask must not contain NaN or +inf (use -inf to mask a key)")
        named.append(("mask", m.shape))
    bshape = _args.batch_shape(named)
    scale = _args.scale(scale, d)
    dtype = _args.common_float_dtype(Q, K, V)
    ops = []
    for a in (Q, K, V):
        a = _aligned(a, dtype)
        ld = a.strides[-2] if a.shape[-2] > 1 else 0
        ops.append((a, _offsets(a, bshape), int(ld)))
    mtuple = None
    if m is not None:
        mb = np.broadcast_to(m, m.shape[:-2] + (L, n))
        sl = mb.strides[-2] if L > 1 else 0
        sn = mb.strides[-1] if n > 1 else 0
        mtuple = (mb, _offsets(mb, bshape), int(sl), int(sn))
    return _Problem(ops[0], ops[1], ops[2], mtuple, bshape, int(L), int(n), int(d),
                    int(dv), scale, dtype)


def _empty(p, shape):
    return np.zeros(shape, dtype=p.dtype)


# ----------------------------------------------------------------- dense and Top-k

@dispatch("Q", "K", "V")
def attention(Q, K, V, scale=None, mask=None):
    r"""Dense softmax attention, the reference every sparse result is compared with.

    ``out[..., l, :] = sum_j softmax(scale * Q[..., l, :] . K[..., j, :] + mask[..., l, j]) V[..., j, :]``

    Parameters
    ----------
    Q : array_like, shape (..., L, d)
    K : array_like, shape (..., n, d)
    V : array_like, shape (..., n, d_v)
        float32, float64 or float16 (integers are converted to float64). The batch axes
        ``...`` of Q, K, V and mask broadcast against each other.
    scale : float, optional
        Score scale; default ``1/sqrt(d)``.
    mask : array_like, optional
        Additive mask broadcastable to ``(..., L, n)``: 0 keeps a key, ``-inf`` masks it.
        A query row with every key masked is an error.

    Returns
    -------
    out : ndarray, shape (..., L, d_v)
        The widest dtype of Q, K and V (float16 < float32 < float64).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> Q, K, V = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 16, 8)), rng.standard_normal((2, 16, 3))
    >>> attention(Q, K, V).shape
    (2, 4, 3)
    """
    p = _problem(Q, K, V, scale, mask)
    shape = p.bshape + (p.L, p.dv)
    if p.rows == 0:
        return _empty(p, shape)
    return p.call(_DENSE).reshape(shape)


def _selection(p, k, eps, ratio):
    return _args.selection(p.bshape + (p.L,), p.n, k, eps, ratio)


@dispatch("Q", "K", "V")
def topk_attention(Q, K, V, k=None, eps=None, ratio=None, scale=None, mask=None,
                   return_info=False):
    r"""Top-k attention: softmax over the kept keys only, fused per query row.

    Exactly one of ``k``, ``eps`` or ``ratio`` chooses the kept set of each query row:

    * ``k``: the k highest-scoring keys;
    * ``ratio``: ``k = ceil(ratio * n)``;
    * ``eps``: the smallest top set whose discarded mass is ``tau <= eps`` (``k_eps``,
      docs/design.md §2), i.e. the output is certified to come from a distribution within total
      variation ``eps`` of the dense softmax; its error is ``tau * ||mu_T - mu_H||`` (§3).

    Ties at the threshold keep the lower key position. Masked keys are never kept (k is
    clipped to the number of unmasked keys). Only the kept rows of V are read.

    Parameters
    ----------
    Q, K, V, scale, mask
        As in :func:`attention`.
    k : int or int array broadcastable to (..., L), optional
        Keys kept per query row, in [1, n].
    eps : float or array broadcastable to (..., L), optional
        TV budget per query row, in (0, 1).
    ratio : float or array broadcastable to (..., L), optional
        Fraction of keys kept, in (0, 1].
    return_info : bool
        Also return a :class:`TopkInfo` (indices, k, tau per row).

    Returns
    -------
    out : ndarray, shape (..., L, d_v)
        The widest dtype of Q, K and V (float16 < float32 < float64).
    info : TopkInfo
        Only with ``return_info=True``.

    Notes
    -----
    The kept set, ``k`` and ``tau`` are exact for the scores as the core computes them: in
    float64 for float64 and float16 problems, accumulated in float32 lanes when Q, K and V are all
    float32. Against the exact scores of float32 inputs, ``tau`` is then within a factor
    ``exp(2 delta)`` either way, ``delta`` the largest score rounding error
    (docs/design.md §3).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> Q, K, V = rng.standard_normal((4, 16)), 3 * rng.standard_normal((1000, 16)), rng.standard_normal((1000, 8))
    >>> out, info = topk_attention(Q, K, V, eps=1e-2, return_info=True)
    >>> bool((info.tau <= 1e-2).all()), out.shape
    (True, (4, 8))
    """
    p = _problem(Q, K, V, scale, mask)
    kk, ee = _selection(p, k, eps, ratio)
    shape = p.bshape + (p.L, p.dv)
    rshape = p.bshape + (p.L,)
    if p.rows == 0:
        out = _empty(p, shape)
        info = TopkInfo(np.zeros(rshape + (0,), np.int64), np.zeros(rshape, np.int64),
                        np.zeros(rshape, np.float64))
        return (out, info) if return_info else out
    out, k_rows, tau, idx = p.call(_TOPK, kk, ee, return_info)
    out = out.reshape(shape)
    if not return_info:
        return out
    info = TopkInfo(idx.reshape(rshape + (idx.shape[-1],)), k_rows.reshape(rshape),
                    tau.reshape(rshape))
    return out, info


# ----------------------------------------------------------------- output-level error

_BOUND_PAD = 1.0 + 1e-12


def _diameter(vs, vt):
    """max ||a - b|| over rows a of vs and b of vt, in blocks (float64)."""
    best = 0.0
    ns = (vs * vs).sum(axis=1)
    step = max(1, 4_000_000 // max(1, vt.shape[0] * max(1, vs.shape[1])))
    nt = (vt * vt).sum(axis=1)
    for i in range(0, vs.shape[0], step):
        a = vs[i:i + step]
        d2 = ns[i:i + step, None] + nt[None, :] - 2.0 * (a @ vt.T)
        j = np.unravel_index(np.argmax(d2), d2.shape)
        # recompute the winner directly: the expansion above can cancel
        best = max(best, float(np.linalg.norm(a[j[0]] - vt[j[1]])), math.sqrt(max(d2.max(), 0.0)))
    return best


@dispatch("q", "K", "V")
def attention_error(q, K, V, k=None, eps=None, scale=None, mask=None):
    r"""Exact output error of Top-k attention and its two bounds, per query row (docs/design.md §3).

    Parameters
    ----------
    q : array_like, shape (..., L, d) or (d,)
        Query rows (a 1-d ``q`` is one row and drops the L axis from the results).
    K : array_like, shape (..., n, d)
    V : array_like, shape (..., n, d_v)
    k : int or int array broadcastable to (..., L), optional
        Keep the top-k keys. Exactly one of ``k`` and ``eps``.
    eps : float or array broadcastable to (..., L), optional
        Keep the ``k_eps`` top set (tau <= eps).
    scale, mask
        As in :func:`attention`.

    Returns
    -------
    AttentionError
        Fields of shape (..., L) (and (..., L, d_v) for ``mu_head``, ``mu_tail``).

    Notes
    -----
    Computed in float64 with NumPy from the scores (``O(L n d)`` memory per batch
    element); the kept set and tau come from the C core, exactly as in
    :func:`topk_attention`. The diameter costs ``O(k (n - k) d_v)`` per row.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> K, V = 2 * rng.standard_normal((500, 16)), rng.standard_normal((500, 4))
    >>> r = attention_error(rng.standard_normal(16), K, V, eps=1e-2)
    >>> bool(r.error <= r.var_bound <= 1), bool(r.error <= r.diam_bound)
    (True, True)
    """
    single = np.ndim(q) == 1
    if single:
        q = np.asarray(q)[None, :]
    p = _problem(q, K, V, scale, mask)
    kk, ee = _selection(p, k, eps, None)
    Q64 = np.broadcast_to(p.q[0].astype(np.float64), p.bshape + (p.L, p.d))
    K64 = np.broadcast_to(p.k[0].astype(np.float64), p.bshape + (p.n, p.d))
    V64 = np.broadcast_to(p.v[0].astype(np.float64), p.bshape + (p.n, p.dv))
    s = p.scale * np.einsum("...ld,...nd->...ln", Q64, K64)
    if p.mask is not None:
        s = s + p.mask[0]
    rshape = p.bshape + (p.L,)
    if ee is not None:
        kk = _k_eps(s, ee.reshape(rshape))
    kk = np.asarray(kk, dtype=np.int64).reshape(rshape)
    live = (s > -np.inf).sum(axis=-1)
    kk = np.minimum(kk, live)
    tau = np.asarray(_tail_mass(s, kk), dtype=np.float64).reshape(rshape)
    order = np.argsort(-s, axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1)  # the inverse permutation (no index grid of the batch)
    kept = rank < kk[..., None]
    P = np.exp(s - s.max(axis=-1, keepdims=True))
    P /= P.sum(axis=-1, keepdims=True)
    dense = np.einsum("...ln,...nv->...lv", P, V64)
    PS = np.where(kept, P, 0.0)
    PT = np.where(kept, 0.0, P)
    sparse = np.einsum("...ln,...nv->...lv", PS, V64) / PS.sum(axis=-1, keepdims=True)
    mass_t = PT.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_tail = np.einsum("...ln,...nv->...lv", PT, V64) / mass_t
    mu_tail = np.where(mass_t > 0, mu_tail, np.nan)
    diam = np.zeros(rshape)
    var = np.zeros(rshape)
    nrows = int(np.prod(rshape))  # explicit: reshape(-1, 0) is ambiguous when d_v = 0
    flatP = P.reshape(nrows, p.n)
    flatK = kept.reshape(nrows, p.n)
    flatD = dense.reshape(nrows, p.dv)
    error = np.zeros(rshape)
    flatT = PT.reshape(nrows, p.n)
    flatS = sparse.reshape(nrows, p.dv)
    # np.ndindex materialises range(extent) of every axis: none for an empty batch
    for r, pos in enumerate(np.ndindex(*rshape) if nrows else ()):
        Vr = V64[pos[:-1]]
        # Attn - Attn_k = sum_{i in T} P_i (v_i - mu_H): the difference of the two outputs
        # without the cancellation of subtracting two nearly equal vectors
        error.flat[r] = np.linalg.norm(flatT[r] @ (Vr - flatS[r]))
        var.flat[r] = flatP[r] @ ((Vr - flatD[r]) ** 2).sum(axis=1)
        head = flatK[r] & (flatP[r] > 0)
        tail = ~flatK[r] & (flatP[r] > 0)
        if head.any() and tail.any():
            diam.flat[r] = _diameter(Vr[head], Vr[tail])
    with np.errstate(divide="ignore", invalid="ignore"):
        var_bound = np.sqrt(np.where(tau > 0, tau / (1.0 - tau) * var, 0.0)) * _BOUND_PAD
    diam_bound = tau * diam * _BOUND_PAD
    res = AttentionError(error=error, tau=tau, mu_head=sparse, mu_tail=mu_tail,
                         diam_bound=diam_bound, var_bound=var_bound, k=kk)
    if single:
        res = AttentionError(*(np.asarray(getattr(res, f))[..., 0] if getattr(res, f).ndim == len(rshape)
                               else np.asarray(getattr(res, f))[..., 0, :]
                               for f in ("error", "tau", "mu_head", "mu_tail", "diam_bound",
                                         "var_bound", "k")))
    return res


# ----------------------------------------------------------------- n^C sparsity (§6)

@dispatch("n")
def dynamic_k(n, alpha, C):
    r"""The dynamic window ``k = ceil(alpha * n**C)`` clipped to [1, n] (docs/design.md §6).

    Parameters
    ----------
    n : int or int array
        Number of keys (>= 1).
    alpha : float
        Positive multiplier.
    C : float
        Exponent in [0, 1].

    Returns
    -------
    int or ndarray of int64
        Usable as the ``k`` argument of :func:`topk_attention`. ``alpha * n**C`` within a
        relative 1e-12 of an integer counts as that integer (so ``dynamic_k(4, 1, 0.5) == 2``
        despite rounding in the power).

    Examples
    --------
    >>> dynamic_k(65536, 2.0, 0.5), dynamic_k(10, 100.0, 0.5)
    (512, 10)
    """
    arr = np.asarray(n)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"n must be an integer or an integer array, got {arr.dtype}")
    if np.any(arr < 1):
        raise ValueError(f"n must be >= 1, got {n!r}")
    if not isinstance(alpha, numbers.Real) or not (alpha > 0) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if not isinstance(C, numbers.Real) or not (0 <= C <= 1):
        raise ValueError(f"C must be in [0, 1], got {C!r}")
    x = float(alpha) * arr.astype(np.float64) ** float(C)
    k = np.ceil(x * (1.0 - 1e-12)).astype(np.int64)
    k = np.clip(k, 1, arr.astype(np.int64))
    return int(k) if k.ndim == 0 else k


@dispatch("Q", "K")
def attention_matrix_error(Q, K, k, scale=None, mask=None, norm="fro"):
    r"""Whole-matrix error of Top-k attention, ``(1/L) * ||D_spar^-1 A_spar - D^-1 A||``.

    ``D^-1 A`` is the (L, n) attention matrix (rows = softmax of the scores) and
    ``D_spar^-1 A_spar`` the same with each row restricted to its top-k keys and
    renormalised (docs/design.md §6; for self-attention L = n). Row i of the difference is
    ``tau_i/(1-tau_i) P_j`` on kept keys and ``-P_j`` on discarded ones. The matrix is never
    formed: each row is scored, selected and reduced in the C core.

    Parameters
    ----------
    Q : array_like, shape (..., L, d)
    K : array_like, shape (..., n, d)
    k : int or int array broadcastable to (..., L)
        Keys kept per row, in [1, n] (e.g. from :func:`dynamic_k`).
    scale, mask
        As in :func:`attention`.
    norm : {"fro", "l1", "rows"}
        ``"fro"`` (default): the entrywise l2 (Frobenius) norm, ``(1/L) sqrt(sum_ij E_ij^2)``;
        ``"l1"``: the entrywise l1 norm ``(1/L) sum_ij |E_ij| = mean_i 2 tau_i``;
        ``"rows"``: no reduction, the l2 norm of every row, shape (..., L).

    Returns
    -------
    ndarray of float64, shape (...) (or (..., L) for ``norm="rows"``)

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((256, 16))
    >>> float(attention_matrix_error(X, X, k=256))
    0.0
    """
    if norm not in ("fro", "l1", "rows"):
        raise ValueError(f"norm must be 'fro', 'l1' or 'rows', got {norm!r}")
    p = _problem(Q, K, None, scale, mask, need_v=False)
    kk, _ = _selection(p, k, None, None)
    rshape = p.bshape + (p.L,)
    if p.rows == 0:
        sq = tau = np.zeros(rshape)
    else:
        sq, tau = p.call(_ROW_ERROR, kk)
        sq, tau = sq.reshape(rshape), tau.reshape(rshape)
    if norm == "rows":
        return np.sqrt(sq)
    if norm == "l1":
        return _args.scalar_out(2.0 * tau.sum(axis=-1) / p.L)
    return _args.scalar_out(np.sqrt(sq.sum(axis=-1)) / p.L)
