"""The hooked self-attention: what one attention call of a hooked layer does.

Both installation paths (:mod:`~topkattn.hf.interface`, :mod:`~topkattn.hf.wrapped`) hand
the call's per-head Q, K, V, the model's mask and a way to run the model's own attention
to :func:`run_hooked`, which, step by step: groups the query heads by key/value head
(grouped-query attention, no copies); for a capture, stores the logits and runs the stock
attention; otherwise finds each row's visible keys and the rows with none, turns the
selection into a budget per row, runs Top-k attention through the C core (or dense
attention over a kept set chosen by a selector of :mod:`~topkattn.hf.selectors`), gives
rows without visible keys the stock output, and records k, tau, n and entropy per row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..attention import attention, dynamic_k, topk_attention
from ..core import entropy
from .models import require_torch
from .certified import as_numpy, decode
from .selectors import block_selection, forced_selection, logsumexp, simulated_selection

__all__ = ["STATE_ATTR", "State", "run_hooked", "run_certified", "as_numpy"]

#: Attribute set on each self-attention module while a hook is active.
STATE_ATTR = "_topkattn_state"


@dataclass
class State:
    """What a hooked self-attention module does on its next call."""
    mode: str                        # "capture" or "topk"
    layer: int
    sink: object                     # Capture or TopkRecord (or None)
    select: dict = field(default_factory=dict)  # one of eps / k / ratio / dynamic
    qkv: bool = False
    prefill: str = "topk"            # decoders: "topk" or "dense" for calls with L > 1
    sink_keys: int = 0               # always keep the first sink_keys visible keys
    recent_keys: int = 0             # and the last recent_keys visible keys
    selector: str = "exact"          # or an approximate selector: "simulated", "blocks"
    precision: float = 1.0           # "simulated": fraction of the exact set retrieved
    block_size: int = 64             # "blocks": keys per block summary
    rng: object = None               # "simulated": numpy Generator
    certified: object = None         # "certified": the layer's CertifiedLayer


def _additive_mask(torch, mask, dtype):
    """The mask as an additive float tensor with ``-inf`` on masked keys, or None.

    float32/float64 CPU masks are converted in NumPy (one single-threaded pass): at a
    decode step the mask is one row per sequence, and torch's element-wise ops on it run
    through the intra-op thread pool, which stalls for milliseconds when other processes
    hold the cores."""
    if mask is None:
        return None
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype)
    if np_dtype is not None and mask.device.type == "cpu" and mask.dtype in (
            torch.bool, torch.float32, torch.float64):
        m = mask.detach().numpy()
        if m.dtype == np.bool_:
            out = np.zeros(m.shape, dtype=np_dtype)
            out[~m] = -np.inf
        else:
            with np.errstate(over="ignore"):    # float64 lows become -inf in float32
                out = m.astype(np_dtype)        # a copy: the model's mask is not modified
            # transformers masks with finfo(dtype).min (not -inf): that low is a masked key
            out[out <= np.finfo(np_dtype).min] = -np.inf
        return torch.from_numpy(out)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    m = mask.to(dtype)
    # transformers masks with finfo(dtype).min (not -inf); any value that low is a masked key
    return m.masked_fill(m <= torch.finfo(m.dtype).min, float("-inf"))


# ----------------------------------------------------------------- step 1: grouped views

@dataclass
class _Call:
    """One attention call with the query heads grouped by key/value head (no copies):
    q5 (B, Hkv, g, L, d), k5/v5 (B, Hkv, 1, n, d), add5 broadcastable to
    (B, Hkv, g, L, n) or None."""
    q5: object
    k5: object
    v5: object
    add5: object
    scaling: float
    B: int
    Hq: int
    L: int
    n: int

    @property
    def rshape(self):
        return tuple(self.q5.shape[:4])

    def logits(self):
        torch = require_torch()
        with torch.no_grad():
            x = torch.matmul(self.q5, self.k5.transpose(-1, -2)) * self.scaling
            return x if self.add5 is None else x + self.add5

    def per_head(self, a):
        """(B, Hkv, g, L, ...) -> (B, Hq, L, ...)"""
        return a.reshape((self.B, self.Hq, self.L) + a.shape[4:])


def _grouped(q, k, v, mask, scaling):
    torch = require_torch()
    B, Hq, L, d = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"unsupported head layout: {Hq} query heads and {Hkv} key/value "
                         "heads; topkattn.hf supports query heads that are a multiple of the "
                         "key/value heads (multi-head or grouped-query attention)")
    g = Hq // Hkv
    add = _additive_mask(torch, mask, q.dtype)
    add5 = None
    if add is not None:
        add5 = add[:, :, None] if add.shape[1] == 1 else add.reshape(add.shape[0], Hkv, g,
                                                                      *add.shape[2:])
    return _Call(q.reshape(B, Hkv, g, L, d), k[:, :, None], v[:, :, None], add5,
                 float(1.0 / math.sqrt(d) if scaling is None else scaling), B, Hq, L, n)


# ----------------------------------------------------------------- step 2: visible keys

@dataclass
class _Rows:
    """The mask as NumPy (rows without a visible key get 0 there, so the C core accepts
    them), the raw mask, the (B, L) rows without a visible key (or None) and the visible
    keys of every row (B, Hkv, g, L)."""
    mask: object
    raw_mask: object
    dead: object
    n: object


def _visible(call):
    if call.add5 is None:
        return _Rows(None, None, None, np.full(call.rshape, call.n, dtype=np.int64))
    raw = as_numpy(call.add5)
    masked = np.isneginf(raw)
    dead_rows = np.broadcast_to(masked.all(axis=-1), call.rshape)
    m_np, dead = raw, None
    if dead_rows.any():
        dead = dead_rows.any(axis=(1, 2))
        m_np = np.where(masked.all(axis=-1, keepdims=True), 0.0, raw).astype(raw.dtype)
    return _Rows(m_np, raw, dead, np.broadcast_to((~masked).sum(axis=-1), call.rshape))


def _scores(call, rows):
    """float64 logits; rows without a visible key are all 0 (their output is replaced)."""
    s = as_numpy(call.logits()).astype(np.float64)
    if rows.dead is not None:
        s = np.where(np.isneginf(s).all(-1, keepdims=True), 0.0, s)
    return s


# ----------------------------------------------------------------- step 3: budget per row

def _budget(select, n_rows):
    """Keys to keep per row for k / ratio / dynamic (of the row's visible keys: causal
    rows see fewer than n), or None for eps."""
    n_sel = np.maximum(n_rows, 1)
    if "k" in select:
        return np.minimum(select["k"], n_sel)
    if "ratio" in select:
        r = select["ratio"]
        return np.clip(np.ceil(r * n_sel - 1e-9 * r * n_sel).astype(np.int64), 1, n_sel)
    if "dynamic" in select:
        alpha, C = select["dynamic"]
        return np.minimum(np.asarray(dynamic_k(n_sel, alpha, C), dtype=np.int64), n_sel)
    return None


# ----------------------------------------------------------------- step 4: attention

def _topk(call, rows, select, k_rows, want):
    """Top-k attention of the exact top sets in the C core: (out, k, tau, None)."""
    qn, kn, vn = as_numpy(call.q5), as_numpy(call.k5), as_numpy(call.v5)
    sel = {"k": k_rows} if k_rows is not None else {"eps": select["eps"]}
    res = topk_attention(qn, kn, vn, scale=call.scaling, mask=rows.mask, return_info=want,
                         **sel)
    if not want:
        return res, None, None, None
    out, info = res
    return out, info.k.copy(), info.tau.copy(), None


def _kept_set(state, call, rows, s64, k_rows, want):
    """Dense attention over the kept set of a selector: (out, k, tau, precision)."""
    keep = forced_selection(s64, state.sink_keys, state.recent_keys,
                            eps=state.select.get("eps"), k=k_rows)
    prec = None
    if state.selector != "exact":
        exact = keep
        if state.selector == "simulated":
            keep = simulated_selection(exact, np.isfinite(s64), state.precision, state.rng)
        else:
            keep = block_selection(as_numpy(call.q5), as_numpy(call.k5), s64, rows.raw_mask,
                                   exact, call.scaling, state.block_size)
        prec = (keep & exact).sum(-1) / np.maximum(exact.sum(-1), 1)
    base = np.zeros_like(s64) if rows.mask is None else np.broadcast_to(rows.mask, s64.shape)
    out = attention(as_numpy(call.q5), as_numpy(call.k5), as_numpy(call.v5),
                    scale=call.scaling, mask=np.where(keep, base, -np.inf))
    if not want:
        return out, None, None, prec
    with np.errstate(divide="ignore"):
        tau = np.exp(logsumexp(np.where(keep, -np.inf, s64)) - logsumexp(s64))
    return out, keep.sum(-1), tau, prec


# ----------------------------------------------------------------- step 5: back to torch

def _output(call, out_np, dtype, rows, stock):
    """(B, L, Hq, d_v) tensor; rows without a visible key get the stock output."""
    torch = require_torch()
    out = torch.from_numpy(np.ascontiguousarray(
        call.per_head(out_np).transpose(0, 2, 1, 3))).to(dtype)
    if rows.dead is not None:
        idx = np.flatnonzero(rows.dead.any(axis=1))
        ref = stock(torch.from_numpy(idx))                  # (b, L, Hq, d_v)
        dead = torch.from_numpy(rows.dead[idx])             # (b, L)
        sub = out[torch.from_numpy(idx)]
        sub[dead] = ref[dead].to(out.dtype)
        out[torch.from_numpy(idx)] = sub
    return out


# ----------------------------------------------------------------- step 6: the record

def _record(state, call, rows, s64, kk, tau, prec):
    """Store k, tau, n, entropy and precision per row (B, Hq, L); rows without a visible
    key have n = k = 0 and NaN elsewhere."""
    ent = call.per_head(np.asarray(entropy(s64), dtype=np.float64))
    kk = call.per_head(np.asarray(kk, dtype=np.int64))
    tau = call.per_head(np.asarray(tau, dtype=np.float64))
    n_out = np.ascontiguousarray(call.per_head(np.broadcast_to(rows.n, call.rshape)),
                                 dtype=np.int64)
    if prec is not None:
        prec = call.per_head(np.asarray(prec, dtype=np.float64))
    if rows.dead is not None:
        dmask = np.broadcast_to(rows.dead[:, None, :], (call.B, call.Hq, call.L))
        kk = np.where(dmask, 0, kk)
        tau = np.where(dmask, np.nan, tau)
        ent = np.where(dmask, np.nan, ent)
        n_out = np.where(dmask, 0, n_out)
        if prec is not None:
            prec = np.where(dmask, np.nan, prec)
    state.sink._store(state.layer, kk, tau, n_out, ent,
                      "prefill" if call.L > 1 else "decode", prec)


def run_hooked(state, q, k, v, mask, scaling, stock):
    """One self-attention call. q (B, Hq, L, d), k/v (B, Hkv, n, d) with Hkv dividing Hq
    (grouped-query attention), mask as the model built it.

    ``stock(batch_index)`` returns the model's own attention output ``(b, L, Hq, d_v)`` for
    the given batch entries (all of them for ``None``). Returns ``(B, L, Hq, d_v)``.
    """
    call = _grouped(q, k, v, mask, scaling)
    if state.mode == "capture":
        out = stock(None)
        state.sink._store(state.layer, as_numpy(call.per_head(call.logits())),
                          *((as_numpy(q), as_numpy(k), as_numpy(v)) if state.qkv else ()))
        return out
    rows = _visible(call)
    k_rows = _budget(state.select, rows.n)
    want = state.sink is not None
    s64 = None
    if state.sink_keys or state.recent_keys or state.selector not in ("exact", "certified"):
        s64 = _scores(call, rows)
        out_np, kk, tau, prec = _kept_set(state, call, rows, s64, k_rows, want)
    else:
        out_np, kk, tau, prec = _topk(call, rows, state.select, k_rows, want)
    out = _output(call, out_np, q.dtype, rows, stock)
    if want:
        _record(state, call, rows, _scores(call, rows) if s64 is None else s64, kk, tau, prec)
    return out


def run_certified(state, q, k, v, mask, scaling):
    """One decode step (L = 1) of the certified selector: the layer's key indexes grow by
    the new key and every row runs :func:`topkattn.certified_attention`. Returns
    ``(B, 1, Hq, d_v)``; with a record, stores k, tau, n, entropy and the search's keys
    scored, bytes read and certificate per row."""
    want = state.sink is not None
    out, info = decode(state.certified, q, k, v, mask, scaling, state.select["eps"], want)
    if want:
        _record_certified(state, q, k, v, mask, scaling, info)
    return out


def _record_certified(state, q, k, v, mask, scaling, info):
    """The record of a certified decode step; tau and entropy from float64 logits of the
    visible keys (float64 products of the stored float32 values, like the search's)."""
    B, Hq, L, d = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    g = Hq // Hkv
    Q = as_numpy(q).astype(np.float64).reshape(B, Hkv, g * L, d)
    K = as_numpy(k)
    lo, hi = info["lo"], info["hi"]
    tau = np.empty((B, Hkv, g * L))
    ent = np.empty((B, Hkv, g * L))
    for b in range(B):
        for h in range(Hkv):
            s64 = scaling * (Q[b, h] @ K[b, h, lo[b]:hi[b]].astype(np.float64).T)
            idx = info["indices"][b][h]
            keep = np.zeros(s64.shape, dtype=bool)
            r, c = np.nonzero(idx >= 0)
            keep[r, idx[r, c]] = True
            with np.errstate(divide="ignore"):
                tau[b, h] = np.exp(logsumexp(np.where(keep, -np.inf, s64)) - logsumexp(s64))
            ent[b, h] = entropy(s64)
    cert = state.certified
    n_out = np.broadcast_to((hi - lo)[:, None, None], (B, Hq, L)).astype(np.int64)
    state.sink._store(state.layer, info["k"], tau.reshape(B, Hq, L), n_out,
                      ent.reshape(B, Hq, L), "decode", None,
                      keys_scored=info["keys_scored"], bytes_read=info["bytes_read"],
                      tv_bound=info["tv_bound"])
    state.sink.index_builds[state.layer] = cert.builds
    state.sink.index_appends[state.layer] = cert.appends
