"""The certified selector: decode steps through certified search on a growing key index.

With ``use_topk_attention(model, eps=..., selector="certified")`` every hooked layer of a
decoder-only model keeps one :class:`~topkattn.KeyIndex` per batch item, with an index per
key/value head (its batch axis; the query heads of a group share it). A decode step (query
length L = 1) appends the new keys to it and runs :func:`topkattn.certified_attention` on
it once for all heads (their query groups in parallel on the library's threads), so only
part of the KV cache is scored and every row carries a certificate
``TV(P, P_hat) <= tv_bound <= eps``
(docs/design.md §4). Calls with L > 1 (a prefill) follow the ``prefill`` option.

When the index is trusted. A layer's index stays valid while the calls continue the same
sequence: the same cache object (recorded by a forward pre-hook on the attention module),
the same batch size, the same visible key range start, the keys before this call exactly
the ones indexed (the cache length before the call equals the index length) and the last
indexed key unchanged. Anything else -- a new ``generate`` call, a cropped or reset cache,
another batch -- rebuilds the index from the current cache, so a stale index is never
searched.

Masks. At a decode step every row of a batch item must see one contiguous range of keys,
the same for every head: ``[lo, hi)`` (left padding gives ``lo > 0``, a static cache
``hi < n``), with additive mask values 0 there. Any other mask is refused with a
ValueError naming ``attention_mask``.
"""
from __future__ import annotations

import weakref

import numpy as np

from ..search import KeyIndex, certified_attention
from .models import require_torch

__all__ = ["CertifiedLayer", "Session", "cache_pre_hook", "decode", "RESERVE", "REORDER"]

#: Keys of room an index gets beyond the cache when it is built (at least; a quarter of
#: the cache for long ones), so that the decode steps append without reallocating.
RESERVE = 1024

#: Whether the indexes reorder the cache's keys into tight blocks when they are built
#: (``KeyIndex(reorder=...)``). Off: in the decode benchmark (randomly initialised Llama
#: layout, head dim 128, n = 32768) the search read every key's int8 proxy either way and
#: scored the same keys, and the build without reordering took 36-57 ms per head against
#: 141-194 ms. Keys appended during decoding stay in arrival order in both cases.
REORDER = False


class Session:
    """State shared by the hooked layers of one ``use_topk_attention`` block: the visible
    key ranges of the last decode mask (computed once per forward, for every layer)."""

    def __init__(self, block_size):
        self.block_size = int(block_size)
        self._mask = None           # the mask tensor whose ranges are cached (kept alive)
        self._mask_key = None
        self._ranges = None

    def ranges(self, mask, B, n):
        """Per batch item the visible key range ``(lo, hi)`` of a decode step's mask
        (``(B, 1 or H, 1, n)``, bool or additive), as two int arrays of length B."""
        if mask is None:
            return np.zeros(B, dtype=np.int64), np.full(B, n, dtype=np.int64)
        key = (mask.shape, mask.dtype, mask._version, B, n)
        if mask is self._mask and key == self._mask_key:
            return self._ranges
        r = _ranges(mask, B, n)
        self._mask, self._mask_key, self._ranges = mask, key, r
        return r


def _ranges(mask, B, n):
    torch = require_torch()
    m = mask.detach()
    if m.dim() != 4 or m.shape[-1] != n or m.shape[0] not in (1, B):
        raise ValueError(f"attention_mask of shape {tuple(m.shape)} is not a decode-step mask "
                         f"for {B} sequences of {n} keys; the certified selector supports "
                         "masks (B, 1 or H, 1, n)")
    if m.dtype == torch.bool:
        vis = m.numpy() if m.device.type == "cpu" else m.cpu().numpy()
    else:
        a = m.float().numpy()
        low = a <= float(torch.finfo(m.dtype).min)
        vis = ~(low | np.isneginf(a))
        if np.any(a[vis] != 0):
            raise ValueError("attention_mask adds finite non-zero values to some logits "
                             "(an attention bias); the certified selector supports only "
                             "masks that hide keys (0 or -inf)")
    vis = np.broadcast_to(vis, (B,) + vis.shape[1:])
    v0 = vis[:, 0, 0]                                   # (B, n)
    if not (vis == v0[:, None, None]).all():
        raise ValueError("attention_mask differs between heads; the certified selector needs "
                         "the same visible keys for every head of a sequence")
    cnt = v0.sum(-1)
    lo = np.argmax(v0, axis=-1)
    hi = lo + cnt
    contiguous = v0.cumsum(-1)[np.arange(B), np.maximum(hi - 1, 0)] == cnt
    if (cnt == 0).any() or not contiguous.all():
        raise ValueError("attention_mask must leave each sequence one contiguous, non-empty "
                         "range of visible keys at a decode step (left padding, a static "
                         "cache); the certified selector does not support this mask "
                         "(use selector='exact')")
    return lo.astype(np.int64), hi.astype(np.int64)


def as_numpy(t):
    """NumPy view of a CPU tensor (no copy); float16/bfloat16 are widened to float32."""
    torch = require_torch()
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.numpy()


def _cache_of(kwargs):
    for name in ("cache", "past_key_values", "layer_past"):
        c = kwargs.get(name)
        if c is not None:
            return c
    return None


def cache_pre_hook(layer_state):
    """A ``register_forward_pre_hook(..., with_kwargs=True)`` hook recording the cache
    object the attention module is called with (its identity tells a new sequence)."""
    def hook(module, args, kwargs):
        layer_state.pending_cache = _cache_of(kwargs)
    return hook


class CertifiedLayer:
    """One hooked layer's key indexes: ``indexes[b]`` for batch item b, a
    :class:`~topkattn.KeyIndex` with one index per key/value head (batch shape ``(Hkv,)``),
    covering the keys ``lo[b] .. hi[b] - 1`` of the cache. One search call then runs the
    query groups of every head, in parallel on the library's threads.

    Attributes
    ----------
    builds : int
        Times the indexes were (re)built from the cache.
    appends : int
        Calls that appended new keys to the existing indexes.
    """

    def __init__(self, session):
        self.session = session
        self.pending_cache = None
        self._cache_ref = None
        self.indexes = None
        self.lo = self.hi = None
        self._last = None
        self.builds = 0
        self.appends = 0

    def reset(self):
        self.indexes = None
        self._cache_ref = None

    def _same_cache(self, cache):
        return (cache is not None and self._cache_ref is not None
                and self._cache_ref() is cache)

    def _remember(self, cache, K):
        try:
            self._cache_ref = weakref.ref(cache) if cache is not None else None
        except TypeError:                       # not weak-referenceable: never trusted
            self._cache_ref = None
        self._last = np.stack([K[b, :, self.hi[b] - 1] for b in range(K.shape[0])]).copy()

    def sync(self, K, lo, hi, L):
        """Make the indexes cover keys ``[lo[b], hi[b])`` of ``K`` (NumPy, (B, Hkv, n, d)),
        where the last L of them are this call's new keys: append them when the calls
        continue the indexed sequence, else rebuild."""
        cache, self.pending_cache = self.pending_cache, None
        B = K.shape[0]
        cont = (self.indexes is not None and self._same_cache(cache)
                and len(self.indexes) == B and np.array_equal(self.lo, lo)
                and np.array_equal(hi - L, self.hi)
                and all(np.array_equal(K[b, :, self.hi[b] - 1], self._last[b])
                        for b in range(B)))
        try:
            if cont:
                for b in range(B):
                    self.indexes[b].append(K[b, :, self.hi[b]:hi[b]])
                self.appends += 1
            else:
                self.indexes = None
                bs = self.session.block_size
                # room for the decode steps (appends stay O(1)), allocated at the build
                indexes = [KeyIndex(K[b, :, lo[b]:hi[b]], block_size=bs, reorder=REORDER,
                                    capacity=int(n + max(RESERVE, n // 4)))
                           for b, n in enumerate(np.asarray(hi) - np.asarray(lo))]
                self.indexes = indexes
                self.builds += 1
            self.lo, self.hi = np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)
            self._remember(cache, K)
        except BaseException:
            self.reset()        # some indexes may hold the new keys and others not
            raise

    def drop(self):
        """Forget the indexes (a call this layer did not index, e.g. a prefill)."""
        self.pending_cache = None
        self.reset()


def decode(layer, q, k, v, mask, scaling, eps, want):
    """One certified decode step. q (B, Hq, 1, d), k/v (B, Hkv, n, d) torch tensors.

    Returns ``(out, info)``: out (B, 1, Hq, d_v) torch, info None or a dict of
    (B, Hq, 1) arrays ``k, keys_scored, bytes_read, tv_bound`` and the kept ``indices``
    (a list per (b, kv head) of (g, kmax) arrays, -1 padded) with ``lo, hi``.
    """
    torch = require_torch()
    B, Hq, L, d = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    g = Hq // Hkv
    lo, hi = layer.session.ranges(mask, B, n)
    K, V = as_numpy(k), as_numpy(v)
    layer.sync(K, lo, hi, L)
    Q = as_numpy(q).reshape(B, Hkv, g * L, d)
    dv = V.shape[-1]
    out = np.empty((B, Hkv, g * L, dv), dtype=np.float32 if V.dtype == np.float32 else V.dtype)
    stats = None
    if want:
        stats = {f: np.zeros((B, Hkv, g * L), dtype=t) for f, t in
                 (("k", np.int64), ("keys_scored", np.int64), ("bytes_read", np.float64),
                  ("tv_bound", np.float64))}
        stats["indices"] = [[None] * Hkv for _ in range(B)]
    for b in range(B):  # every head's query group in one call
        res = certified_attention(Q[b], layer.indexes[b], V[b, :, lo[b]:hi[b]], eps,
                                  scale=scaling, return_info=want)
        if want:
            o, info = res
            for f in ("k", "keys_scored", "bytes_read", "tv_bound"):
                stats[f][b] = getattr(info, f)
            for h in range(Hkv):
                stats["indices"][b][h] = info.indices[h]
        else:
            o = res
        out[b] = o
    res_t = torch.from_numpy(out.reshape(B, Hq, L, dv).transpose(0, 2, 1, 3).copy()).to(q.dtype)
    if want:
        for f in ("k", "keys_scored", "bytes_read", "tv_bound"):
            stats[f] = stats[f].reshape(B, Hq, L)
        stats["lo"], stats["hi"] = lo, hi
    return res_t, stats
