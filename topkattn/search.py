"""Certified search: certify TV(P, P_hat) <= eps after scoring only part of the keys
(docs/design.md §2 blockwise bound, §4).

A :class:`KeyIndex` holds, per key set, blocks of keys with summaries that bound ``q.k``
over a block for any query, and per-key int8 proxies that bound ``q.k`` key by key.
:func:`certified_search` visits blocks and keys by decreasing upper bound, scores the
promising keys exactly (float64) and stops as soon as the kept set is certified;
:func:`certified_attention` returns the attention output of the certified set.
"""
from __future__ import annotations

import contextlib
import numbers
import threading

import numpy as np

from . import _core
from ._args import float_array as _float_array
from ._backend import dispatch
from ._results import SearchResult

__all__ = ["KeyIndex", "SearchResult", "certified_search", "certified_attention"]

_SUMMARIES = {"minmax": _core.SUMMARY_MINMAX, "ball": _core.SUMMARY_BALL,
              "auto": _core.SUMMARY_MINMAX | _core.SUMMARY_BALL}
_METHODS = {"delta": _core.METHOD_DELTA, "mc": _core.METHOD_MC}


def _check_finite(x, name):
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


class _RWLock:
    """Reader-writer lock: any number of shared holders, or one exclusive holder.

    A waiting writer blocks new readers (so a stream of searches cannot starve
    :meth:`KeyIndex.append`). Not reentrant.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _check_capacity(capacity):
    if (not isinstance(capacity, numbers.Integral) or isinstance(capacity, bool)
            or capacity < 0):
        raise ValueError(f"capacity must be an integer >= 0, got {capacity!r}")


class KeyIndex:
    """Block summaries and per-key proxies of a key set, for certified search.

    Built once per key set; :meth:`append` grows it as a KV cache grows (amortised
    O(new keys): the capacity doubles when it runs out, copying the index once), and
    ``reserve(capacity)`` makes room for that many keys in advance, so that appends up to
    it never reallocate (``capacity`` tells the room there is).

    * **Blocks** of ``block_size`` keys carry a summary giving an upper bound on ``q.k``
      over the block for any ``q`` (docs/design.md §4): ``"minmax"`` (per-dimension min and max,
      bound ``sum_d max(q_d lo_d, q_d hi_d)``), ``"ball"`` (centroid ``c`` and radius ``r``,
      bound ``q.c + |q| r``) or ``"auto"`` (both stored; the smaller bound is used per block
      and query).
    * **Proxies** (``proxy="int8"``): each key is stored as ``a_i z_i`` with int8 codes
      ``z_i`` and a float32 scale ``a_i``, plus ``e_i >= |k_i - a_i z_i|``, so that
      ``q.k_i <= a_i q.z_i + |q| e_i`` (d + 8 bytes per key instead of 4d). The search
      expands a block by reading its proxies and scores exactly only the keys whose proxy
      bound is the largest outstanding one. With ``proxy="int4"`` each key is stored
      against its block's centroid ``c``: ``k_i ~ c + s_i z_i`` with codes ``z_i`` in
      ``[-8, 7]`` (two per byte) and a step ``s_i``, so that
      ``q.k_i <= q.c + s_i q.z_i + |q| e_i`` (d/2 + 8 bytes per key): half the bytes of the
      int8 codes, for bounds that stay tight where blocks are (clustered keys). Only the
      default search (``method="delta"``) reads them; MC-Search uses the block summaries.
    * **Order**: with ``reorder=True`` the keys given at construction are reordered so
      that blocks are tight: recursive bisection at the median of the projection on each
      node's leading principal direction (power iteration on up to 256 keys of the node),
      down to one block. Keys added by :meth:`append` form new blocks in arrival order.
      Indices reported by the search are always the original key positions.

    Every bound is padded for the rounding of the arithmetic that computes it, so it is
    never below the float64 logit (see ``csrc/search.c``).

    **Threads.** Searches (:func:`certified_search`, :func:`certified_attention`) may run
    concurrently with each other and with :meth:`append` from other Python threads. Each
    index carries a reader-writer lock: a search holds it shared, ``append`` exclusive, each
    across its call into the C core (which runs with the GIL released). So a search sees
    the index either entirely before or entirely after an append (never a half-written
    block summary or a reallocated buffer), and its certificate holds for the keys present
    when it started; ``SearchResult.n`` says how many that was. Appends wait for running
    searches to finish, and new searches wait behind a waiting append.

    Parameters
    ----------
    K : array_like, shape (..., n, d)
        Keys, float32, float64 or float16, finite. Leading axes are independent key sets
        (heads); the index keeps its own copy in its dtype (float16 keys are converted
        exactly inside the C core, so they give the results of the same values as float32).
    block_size : int
        Keys per block (>= 1).
    summary : {"auto", "minmax", "ball"}
        Block summary kind.
    proxy : {"int8", "int4", None}
        Per-key proxies, or none (block summaries only, as in the original method).
        ``"int4"`` needs the ball summary (``"auto"`` or ``"ball"``) and d <= 2^19.
    reorder : bool
        Cluster the initial keys into tight blocks.
    capacity : int, optional
        Keys to allocate room for (at least n): appends up to that many never reallocate,
        as after :meth:`reserve`, without building the index in a smaller buffer first.

    Attributes
    ----------
    n, d, block_size, batch_shape, dtype, summary, proxy, nbytes, capacity

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> rng = np.random.default_rng(0)
    >>> index = topkattn.KeyIndex(rng.standard_normal((1000, 16)), block_size=32)
    >>> index.n, index.d, index.block_size
    (1000, 16, 32)
    """

    @dispatch("K", name="KeyIndex")
    def __init__(self, K, block_size=64, summary="auto", proxy="int8", reorder=True,
                 capacity=None):
        K = _float_array(K, "K")
        if K.ndim < 2:
            raise ValueError(f"K must have shape (..., n, d), got shape {K.shape}")
        if K.shape[-2] == 0 or K.shape[-1] == 0:
            raise ValueError(f"K must have n >= 1 keys of d >= 1 dimensions, got shape {K.shape}")
        if 0 in K.shape[:-2]:  # no key set to search (and nothing worth allocating n for)
            raise ValueError(f"K has an empty batch axis, got shape {K.shape}")
        if (not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool)
                or block_size < 1):
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if summary not in _SUMMARIES:
            raise ValueError(f"summary must be one of {sorted(_SUMMARIES)}, got {summary!r}")
        if proxy not in ("int8", "int4", None):
            raise ValueError(f"proxy must be 'int8', 'int4' or None, got {proxy!r}")
        if proxy == "int4" and K.shape[-1] > _core.INT4_MAX_D:
            raise ValueError(f"proxy='int4' takes keys of at most {_core.INT4_MAX_D} dimensions "
                             f"(its integer sums must stay exact), got d = {K.shape[-1]}")
        if proxy == "int4" and not _SUMMARIES[summary] & _core.SUMMARY_BALL:
            raise ValueError("proxy='int4' codes keys against their block's centroid: "
                             f"summary must be 'auto' or 'ball', got {summary!r}")
        if capacity is not None:
            _check_capacity(capacity)
        _check_finite(K, "K")
        self.batch_shape = K.shape[:-2]
        self.d = int(K.shape[-1])
        self.block_size = int(block_size)
        self.summary = summary
        self.proxy = proxy
        self.dtype = K.dtype
        self._heads = int(np.prod(self.batch_shape, dtype=np.int64))
        n = int(K.shape[-2])
        self._lock = _RWLock()
        self.n = 0
        cap = max(n, int(capacity or 0))
        self._alloc(cap)  # self._keys is (heads, cap, d), C-contiguous
        if reorder and n > self.block_size:
            # the index's own copy of the keys is put in block order in place (in a
            # contiguous buffer of n keys a head when there is room beyond them)
            keys = self._keys if cap == n else np.empty((self._heads, n, self.d), self.dtype)
            keys[...] = K.reshape(self._heads, n, self.d)
            self._perm[:, :n] = _core.index_order(keys, self.block_size, True)
            if cap > n:
                self._keys[:, :n] = keys
        else:
            self._keys[:, :n] = K.reshape(self._heads, n, self.d)
            self._perm[:, :n] = np.arange(n, dtype=np.int64)
        self.n = n
        _core.index_fill(self._tuple(), 0)

    # ------------------------------------------------------------ storage

    def _alloc(self, cap):
        """(Re)allocate every array for ``cap`` keys, keeping the first n."""
        H, d, bs = self._heads, self.d, self.block_size
        cb = -(-cap // bs)
        old = getattr(self, "_keys", None)

        def grow(name, shape, dtype):
            new = np.zeros(shape, dtype=dtype)
            prev = getattr(self, name, None)
            if prev is not None:
                sl = tuple(slice(0, s) for s in prev.shape)
                new[sl] = prev
            setattr(self, name, new)

        grow("_keys", (H, cap, d), self.dtype)
        grow("_perm", (H, cap), np.int64)
        if old is None:
            self._maxabs = np.zeros(H, dtype=np.float64)
        kinds = _SUMMARIES[self.summary]
        if kinds & _core.SUMMARY_MINMAX:
            grow("_lo", (H, cb, d), np.float32)
            grow("_hi", (H, cb, d), np.float32)
        if kinds & _core.SUMMARY_BALL:
            grow("_ctr", (H, cb, d), np.float32)
            grow("_rad", (H, cb), np.float64)
            grow("_mom", (H, cb, 2), np.float64)
        if self.proxy:  # 4-bit codes two per byte, or int8 codes
            four = self.proxy == "int4"
            grow("_pz", (H, cap, (d + 1) // 2 if four else d), np.uint8 if four else np.int8)
            grow("_pscale", (H, cap), np.float32)
            grow("_perr", (H, cap), np.float32)
        self._cap = cap

    def _tuple(self):
        g = lambda name: getattr(self, name, None)  # noqa: E731
        return (self._keys, self._perm, self.n, self.block_size, _SUMMARIES[self.summary],
                g("_lo"), g("_hi"), g("_ctr"), g("_rad"), g("_pz"), g("_pscale"), g("_perr"),
                self._maxabs, g("_mom"))

    @property
    def nbytes(self):
        """Bytes the index holds for its n keys: key copy, positions, summaries, proxies."""
        H, n, d = self._heads, self.n, self.d
        nb = -(-n // self.block_size)
        kinds = _SUMMARIES[self.summary]
        total = H * n * (d * self.dtype.itemsize + 8) + H * 8
        total += H * nb * ((8 * d if kinds & _core.SUMMARY_MINMAX else 0)
                           + (4 * d + 24 if kinds & _core.SUMMARY_BALL else 0))
        if self.proxy:
            total += H * n * ((d + 1) // 2 if self.proxy == "int4" else d) + H * n * 8
        return int(total)

    @dispatch("new_keys")
    def append(self, new_keys):
        """Add keys at positions n, n+1, ... (amortised O(new keys): capacity doubles).

        Parameters
        ----------
        new_keys : array_like, shape (..., m, d)
            Same batch shape and d as the index; converted to the index dtype.
        """
        x = _float_array(new_keys, "new_keys")
        if x.ndim != len(self.batch_shape) + 2 or x.shape[:-2] != self.batch_shape \
                or x.shape[-1] != self.d:
            raise ValueError(f"new_keys must have shape {self.batch_shape + ('m', self.d)}, "
                             f"got {x.shape}")
        _check_finite(x, "new_keys")
        m = int(x.shape[-2])
        if m == 0:
            return self
        x = x.reshape(self._heads, m, self.d)
        with self._lock.exclusive():
            n0 = self.n
            if n0 + m > self._cap:
                self._alloc(max(n0 + m, 2 * self._cap))
            self._keys[:, n0:n0 + m] = x
            self._perm[:, n0:n0 + m] = np.arange(n0, n0 + m, dtype=np.int64)
            self.n = n0 + m
            try:
                _core.index_fill(self._tuple(), n0)
            except BaseException:
                self.n = n0  # the new blocks have no summaries: leave them out
                raise
        return self

    def reserve(self, capacity):
        """Make room for ``capacity`` keys in all (no-op if there is room already), so that
        appends up to that many keys never reallocate: an append that outgrows the
        capacity copies the whole index once (the capacity then doubles).

        Parameters
        ----------
        capacity : int
            Keys the index should hold without reallocating (>= 0).

        Returns
        -------
        KeyIndex
            self
        """
        _check_capacity(capacity)
        with self._lock.exclusive():
            if capacity > self._cap:
                self._alloc(int(capacity))
        return self

    @property
    def capacity(self):
        """Keys the index can hold before an append reallocates it."""
        return self._cap

    def __repr__(self):
        return (f"KeyIndex(batch_shape={self.batch_shape}, n={self.n}, d={self.d}, "
                f"block_size={self.block_size}, summary={self.summary!r}, "
                f"proxy={self.proxy!r}, dtype={self.dtype})")


def _prepare_queries(q, index, name):
    q = _float_array(q, name)
    bd = len(index.batch_shape)
    if q.ndim not in (bd + 1, bd + 2) or q.shape[:bd] != index.batch_shape \
            or q.shape[-1] != index.d:
        raise ValueError(f"{name} must have shape {index.batch_shape + (index.d,)} or "
                         f"{index.batch_shape + ('L', index.d)} to match the index, got {q.shape}")
    single = q.ndim == bd + 1
    L = 1 if single else int(q.shape[-2])
    qshape = q.shape[:-1]
    # float32 queries go to the core as they are (it converts each value exactly), the
    # others as float64 (float16 converts exactly too)
    Q = np.ascontiguousarray(q.reshape(index._heads, L, index.d),
                             dtype=np.float32 if q.dtype == np.float32 else np.float64)
    # the rows' largest L1 norm (for the overflow check of _search_locked) in one pass that
    # also finds NaN and inf: a non-finite norm means one of them, or an overflow of the sum
    qn1 = _core.search_qnorm(Q)
    if not np.isfinite(qn1):
        _check_finite(q, name)
    return Q, qshape, single, L, qn1


def _run(q, index, eps, V, method, delta, seed, scale, mc_samples, use_proxy, name,
         unordered=False, stages=False):
    if not isinstance(index, KeyIndex):
        raise TypeError(f"index must be a KeyIndex, got {type(index).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be 'delta' or 'mc', got {method!r}")
    Q, qshape, single, L, qn1 = _prepare_queries(q, index, name)
    if L == 0 or index._heads == 0:
        raise ValueError(f"{name} has no query (an empty axis)")
    e = np.asarray(eps, dtype=np.float64) if not isinstance(eps, np.ndarray) else eps
    if e.dtype.kind not in "fiu":
        raise TypeError(f"eps must be a float or float array, got {e.dtype}")
    try:
        e = np.broadcast_to(e.astype(np.float64), qshape)
    except ValueError:
        raise ValueError(f"eps with shape {e.shape} does not broadcast against the query "
                         f"batch shape {qshape}") from None
    if not np.all((e > 0) & (e < 1)):
        raise ValueError("eps must be in (0, 1)")
    if method == "mc":
        if delta is None:
            raise ValueError("method='mc' needs delta (the failure probability), in (0, 1)")
        delta = float(delta)
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
    elif delta is not None:
        raise ValueError("delta is only used with method='mc'")
    if seed is None:
        seed = 0
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    if (not isinstance(mc_samples, numbers.Integral) or isinstance(mc_samples, bool)
            or mc_samples < 2):
        raise ValueError(f"mc_samples must be an integer >= 2, got {mc_samples!r}")
    scale = 1.0 / np.sqrt(index.d) if scale is None else float(scale)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if V is not None:
        V = _float_array(V, "V")
    # shared: n, the summaries and the buffers stay as they are until the search returns
    with index._lock.shared():
        n = index.n
        res = _search_locked(Q, index, V, e, method, delta, seed, scale, mc_samples,
                             use_proxy, unordered, stages, qn1)
    idx, k, tv, ks, bsc, pr, by, mcf, out, fsc, stg = res
    kmax = idx.shape[-1]
    shp = lambda a: a.reshape(qshape)  # noqa: E731
    if out is not None:
        dt = np.result_type(V.dtype, q.dtype if isinstance(q, np.ndarray) else np.float64)
        out = out.reshape(qshape + (out.shape[-1],)).astype(dt, copy=False)
    result = SearchResult(
        indices=idx.reshape(qshape + (kmax,)), k=shp(k), tv_bound=shp(tv), keys_scored=shp(ks),
        blocks_scored=shp(bsc), proxies_read=shp(pr), bytes_read=shp(by),
        certified_mc=shp(mcf), output=out, method=method, eps=np.array(e),
        delta=delta if method == "mc" else None,
        confidence=1.0 - delta if method == "mc" else 1.0, n=n, full_scoring=shp(fsc))
    if stages:
        return result, stg.reshape(qshape + stg.shape[1:])
    return result


def _search_locked(Q, index, V, e, method, delta, seed, scale, mc_samples, use_proxy,
                   unordered=False, stages=False, qn1=None):
    """The part of a search that reads the index; the caller holds its lock shared.
    ``unordered``: the kept sets may come in any order (only the output is wanted).
    ``qn1``: the largest L1 norm of a query row, if the caller has it."""
    # every bound stays finite when |scale q|_1 max|k| is well inside the float64 range
    with np.errstate(over="ignore", invalid="ignore"):
        if qn1 is None:
            qn1 = np.abs(Q).sum(axis=-1).max()
        big = scale * qn1 * float(index._maxabs.max()) * (index.d + 8)
    if not big < 1e300:
        raise ValueError("logits would overflow float64: scale * |q|_1 * max|k| too large")
    Vc = None
    if V is not None:
        want = index.batch_shape + (index.n,)
        if V.ndim != len(want) + 1 or V.shape[:-1] != want:
            raise ValueError(f"V must have shape {want + ('d_v',)}, got {V.shape}")
        # V is not scanned for NaN/inf (a full pass per call): they propagate to the output.
        # Its rows are read where they lie: a view with adjacent values in each row (a
        # slice of a longer cache, heads apart) is not copied
        Vc = V.reshape(index._heads, index.n, V.shape[-1])
        it = Vc.itemsize
        if (Vc.shape[-1] > 1 and Vc.strides[-1] != it) or not Vc.flags.aligned \
                or not all(st >= 0 and st % it == 0 for st, m in zip(Vc.strides[:2], Vc.shape)
                           if m > 1):
            Vc = np.ascontiguousarray(Vc)
    eflat = np.ascontiguousarray(e, dtype=np.float64).reshape(-1)
    return _core.search(
        index._tuple(), Q, scale, eflat, _METHODS[method], float(delta or 0.0),
        int(seed) % (1 << 64), int(mc_samples), bool(use_proxy), Vc, bool(unordered),
        bool(stages))


@dispatch("q", "V")
def certified_search(q, index, eps, V=None, method="delta", delta=None, seed=None, scale=None,
                     mc_samples=256, use_proxy=True):
    r"""Smallest certified kept set after scoring only part of the keys (docs/design.md §4).

    Blocks and keys are visited by decreasing upper bound on their logit; visited keys are
    scored exactly in float64. With scored mass ``Z_s``, kept mass ``A`` and the bound
    ``U`` on the mass of everything unscored, ``TV(P, P_hat) <= 1 - A / (Z_s + U)``
    (§2); the search stops as soon as some top set of the scored keys meets ``eps`` and
    returns the smallest one.

    * ``method="delta"`` (Δk-Search): ``U`` sums the upper bounds (block summaries, or
      the proxies of expanded blocks). The certificate always holds.
    * ``method="mc"`` (MC-Search): additionally, at checkpoints (each time the number of
      scored keys doubles) ``mc_samples`` unscored keys are drawn with probability
      proportional to their cap ``e^{bound}`` and the unscored mass is bounded by the
      empirical Bernstein inequality (Maurer & Pontil 2009) at confidence
      ``1 - delta / 2^t`` for the t-th checkpoint, so that all checkpoints together fail
      with probability <= ``delta``. Sampled keys count as scored.

    Parameters
    ----------
    q : array_like, shape (..., d) or (..., L, d)
        Queries; ``...`` is the index's batch shape.
    index : KeyIndex
    eps : float or array broadcastable to the query batch shape
        Target TV, in (0, 1).
    V : array_like, shape (..., n, d_v), optional
        Values in original key order; the result then has ``output`` (NaN or inf in V
        propagate to it).
    method : {"delta", "mc"}
    delta : float, required for "mc"
        Failure probability of the MC certificate, in (0, 1).
    seed : int, optional
        Seed of the MC sampling (default 0); results are deterministic given it and do
        not depend on the thread count.
    scale : float, optional
        Logits are ``scale * q.k`` (default ``1/sqrt(d)``).
    mc_samples : int
        Keys sampled per MC checkpoint.
    use_proxy : bool
        Use the index's per-key proxies (if it has them).

    Returns
    -------
    SearchResult

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((4096, 32))
    >>> index = topkattn.KeyIndex(K)
    >>> res = topkattn.certified_search(3 * K[7], index, eps=1e-2)
    >>> bool(res.tv_bound <= 1e-2), int(res.indices[0])
    (True, 7)
    """
    return _run(q, index, eps, V, method, delta, seed, scale, mc_samples, use_proxy, "q")


@dispatch("Q", "V")
def certified_attention(Q, index, V, eps, method="delta", delta=None, seed=None, scale=None,
                        mc_samples=256, use_proxy=True, return_info=False):
    """Attention output of the certified kept set: ``sum_{i in S} P_hat_i v_i``.

    The set S comes from :func:`certified_search` (same arguments), so
    ``TV(P, P_hat) <= eps`` is certified for every row, and the output error is at most
    ``eps * diam(V)`` (docs/design.md §3).

    Parameters
    ----------
    Q : array_like, shape (..., L, d) or (..., d)
    index : KeyIndex
    V : array_like, shape (..., n, d_v)
    eps, method, delta, seed, scale, mc_samples, use_proxy
        As in :func:`certified_search`.
    return_info : bool
        Also return the :class:`SearchResult`.

    Returns
    -------
    out : array, shape (..., L, d_v) (or (..., d_v))
    info : SearchResult, only with ``return_info``

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> rng = np.random.default_rng(1)
    >>> K, V = rng.standard_normal((2, 512, 16)), rng.standard_normal((2, 512, 8))
    >>> out = topkattn.certified_attention(rng.standard_normal((2, 3, 16)),
    ...                                    topkattn.KeyIndex(K), V, eps=1e-3)
    >>> out.shape
    (2, 3, 8)
    """
    if V is None:
        raise ValueError("V is required for certified_attention")
    # without return_info nobody sees the kept set: it need not be sorted
    res = _run(Q, index, eps, V, method, delta, seed, scale, mc_samples, use_proxy, "Q",
               unordered=not return_info)
    return (res.output, res) if return_info else res.output


#: Stages of :func:`_stage_profile`, in the order of its arrays.
_STAGES = ("codes", "selection", "rerank", "certificate", "output")


def _stage_profile(Q, index, V, eps, **kw):
    """Per-stage seconds and bytes of :func:`certified_attention` (timers on; private).

    Parameters
    ----------
    Q, index, V, eps, **kw
        As in :func:`certified_attention`.

    Returns
    -------
    info : SearchResult
        As with ``return_info``, but without the kept sets (``indices`` has no columns).
    seconds, nbytes : float64 arrays, shape (..., 5)
        Per query row and stage (``_STAGES``): the int8 codes pass (proxy dot products
        and levels), the selection (block bounds, sample, cuts and bookkeeping: the row's
        time less the other stages), the exact scoring (rerank; for rows that switched to
        full scoring, their share of the group's pass), the certificate (kept set and bound)
        and the output (V rows). Bytes: summaries (selection), proxies (codes), exact keys
        (rerank), kept positions (certificate) and kept V rows (output).
    """
    if V is None:
        raise ValueError("V is required for _stage_profile")
    kw = dict(kw)
    args = [kw.pop(name, default) for name, default in
            (("method", "delta"), ("delta", None), ("seed", None), ("scale", None),
             ("mc_samples", 256), ("use_proxy", True))]
    if kw:
        raise TypeError(f"unexpected arguments {sorted(kw)}")
    info, stg = _run(Q, index, eps, V, *args, "Q", unordered=True, stages=True)
    return info, stg[..., 0, :], stg[..., 1, :]
