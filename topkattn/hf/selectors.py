"""Which keys a hooked attention row keeps: pure NumPy selectors (docs/design.md §2, §4, §6).

Each takes float64 logits ``s`` of shape ``(..., n)`` with ``-inf`` on masked keys (and,
for the block selector, the grouped queries and keys) and returns a boolean kept-key mask
of the same shape. :func:`forced_selection` is the exact selector with always-kept sink and
recent keys; :func:`simulated_selection` and :func:`block_selection` are the approximate
selectors that keep as many keys as a given exact set.
"""
from __future__ import annotations

import numpy as np

from ..core import k_eps

__all__ = ["logsumexp", "forced_selection", "rank", "simulated_selection", "block_selection"]


def logsumexp(x):
    """log sum exp over the last axis; -inf for rows of -inf."""
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - m), axis=-1)) + m[..., 0]


def forced_selection(s, sink, recent, eps=None, k=None):
    """The exact kept set when the first ``sink`` and last ``recent`` visible keys of every
    row are always kept (docs/design.md §2 in log space).

    Parameters
    ----------
    s : float64 array, shape (..., n)
        Logits with -inf on masked keys.
    sink, recent : int >= 0
    eps : float, optional
        The rest of the keys (outside the forced set F) is cut at the smallest top set with
        tau <= eps: tau = P(rest) * tau_rest, so tau_rest <= eps / P(rest).
    k : int array, shape (...), optional
        Otherwise: keys kept per row, the forced ones included. Exactly one of eps and k.

    Returns
    -------
    keep : bool array, shape (..., n)
    """
    unmasked = np.isfinite(s)
    c = np.cumsum(unmasked, axis=-1)
    tot = c[..., -1:]
    forced = unmasked & ((c <= sink) | (c > tot - recent))
    rest = np.where(forced, -np.inf, s)
    rest_count = (unmasked & ~forced).sum(-1)
    if eps is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            eps_r = eps * np.exp(logsumexp(s) - logsumexp(rest))
        need = (rest_count > 0) & (eps_r < 1)
        j = np.zeros(s.shape[:-1], dtype=np.int64)
        if need.any():
            j[need] = k_eps(rest[need], eps_r[need])
    else:
        j = np.clip(k - forced.sum(-1), 0, rest_count)
    # ties: lower position first
    return forced | ((rank(-rest) < j[..., None]) & np.isfinite(rest))


def rank(keys):
    """Rank of every entry along the last axis (0 = smallest; ties: lower position)."""
    order = np.argsort(keys, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(keys.shape[-1])[(None,) * (keys.ndim - 1)],
                      axis=-1)
    return ranks


def simulated_selection(exact, visible, precision, rng):
    """An approximate selector of retrieval precision p (docs/design.md §6).

    Of each row's exact set (size k, a bool mask ``exact``) keep floor(p k + u) members at
    random (u uniform, so p k on average) and fill the rest of the budget k uniformly from
    the ``visible`` keys outside it. ``rng`` is a NumPy Generator.
    """
    k = exact.sum(-1)
    m = np.minimum(np.floor(precision * k + rng.random(k.shape)).astype(np.int64), k)
    r = rng.random(exact.shape)
    keep_in = exact & (rank(np.where(exact, r, np.inf)) < m[..., None])
    outside = visible & ~exact
    keep_out = outside & (rank(np.where(outside, r, np.inf)) < (k - m)[..., None])
    return keep_in | keep_out


def block_selection(q5, k5, s64, mask, exact, scaling, block_size):
    """The block-bound selector at a fixed budget.

    Per query row, visit blocks of ``block_size`` consecutive keys by decreasing upper bound
    on their scores (per-dimension min/max summaries, docs/design.md §4:
    scale * sum_d max(q_d lo_d, q_d hi_d), plus the block's largest mask value) until they
    hold k = |exact set| visible keys; keep the k best scored of those.

    Parameters
    ----------
    q5 : array, shape (B, Hkv, g, L, d)
        Queries grouped by key/value head.
    k5 : array, shape (B, Hkv, 1, n, d)
    s64 : float64 array, shape (B, Hkv, g, L, n)
        The scores, -inf on masked keys.
    mask : array broadcastable to s64, or None
        The additive mask the scores include.
    exact : bool array of the shape of s64
        The exact kept set, whose size per row is the budget.
    scaling : float
    block_size : int

    Returns
    -------
    keep : bool array of the shape of s64
    """
    K = k5[:, :, 0]                                       # (B, Hkv, n, d)
    n = K.shape[-2]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    Kp = np.concatenate([K, np.repeat(K[..., -1:, :], pad, axis=-2)], axis=-2) if pad else K
    Kp = Kp.reshape(K.shape[:2] + (nb, block_size, K.shape[-1]))
    lo, hi = Kp.min(axis=3), Kp.max(axis=3)               # (B, Hkv, nb, d)
    q = q5.astype(np.float64)[..., None, :]               # (B, Hkv, g, L, 1, d)
    ub = scaling * np.maximum(q * lo[:, :, None, None], q * hi[:, :, None, None]).sum(-1)
    visible = np.isfinite(s64)
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask, dtype=np.float64), s64.shape)
        mp = np.concatenate([m, np.full(m.shape[:-1] + (pad,), -np.inf)], axis=-1) if pad else m
        ub = ub + mp.reshape(m.shape[:-1] + (nb, block_size)).max(-1)
    k = exact.sum(-1)
    vis_p = np.concatenate([visible, np.zeros(visible.shape[:-1] + (pad,), bool)], axis=-1) \
        if pad else visible
    counts = vis_p.reshape(visible.shape[:-1] + (nb, block_size)).sum(-1)
    order = np.argsort(-ub, axis=-1, kind="stable")
    got = np.cumsum(np.take_along_axis(counts, order, axis=-1), axis=-1)
    # blocks visited: every block before the one where the count reaches k, and that one
    visit_sorted = (got - np.take_along_axis(counts, order, axis=-1)) < k[..., None]
    visit = np.zeros_like(visit_sorted)
    np.put_along_axis(visit, order, visit_sorted, axis=-1)
    cand = np.repeat(visit, block_size, axis=-1)[..., :n] & visible
    return cand & (rank(np.where(cand, -s64, np.inf)) < k[..., None])
