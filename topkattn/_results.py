"""The result types of the public functions: plain records of NumPy (or GPU) arrays.

:class:`TopkInfo` (what :func:`topkattn.topk_attention` kept), :class:`AttentionError`
(:func:`topkattn.attention_error`) and :class:`SearchResult`
(:func:`topkattn.certified_search`). Nothing here imports another topkattn module.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TopkInfo", "AttentionError", "SearchResult"]


@dataclass(frozen=True)
class TopkInfo:
    """What :func:`topkattn.topk_attention` kept, per query row.

    Attributes
    ----------
    indices : ndarray of int64, shape (..., L, k_max)
        Kept key positions by decreasing score (ties: lower position first), padded with
        -1 where a row keeps fewer than ``k_max = k.max()``.
    k : ndarray of int64, shape (..., L)
        Keys kept per row (masked keys are never kept).
    tau : ndarray of float64, shape (..., L)
        Discarded softmax mass, which equals TV(P, P_k) (docs/design.md §2).
    """
    indices: np.ndarray
    k: np.ndarray
    tau: np.ndarray


@dataclass(frozen=True)
class AttentionError:
    r"""Output-level error of Top-k attention per query row (docs/design.md §3).

    With P the dense softmax, S the kept set, T the rest and ``tau = P(T)``:

    Attributes
    ----------
    error : ndarray, shape (...)
        ``||Attn - Attn_k||_2`` in float64, evaluated as ``||sum_{i in T} P_i (v_i - mu_H)||``
        (the same vector as the difference of the dense and Top-k outputs, without their
        cancellation); exactly 0 when nothing is discarded.
    tau : ndarray, shape (...)
        Discarded mass ``P(T)``.
    mu_head : ndarray, shape (..., d_v)
        ``sum_{i in S} P_i v_i / (1 - tau)`` (equals ``Attn_k``).
    mu_tail : ndarray, shape (..., d_v)
        ``sum_{i in T} P_i v_i / tau``; NaN where the tail has no mass (tau = 0).
    diam_bound : ndarray, shape (...)
        ``tau * max_{i in S, j in T} ||v_i - v_j||_2`` over keys of nonzero probability.
    var_bound : ndarray, shape (...)
        ``sqrt(tau / (1 - tau) * Var_P(V))``, ``Var_P(V) = sum_i P_i ||v_i - Attn||^2``.
    k : ndarray of int64, shape (...)
        Size of the kept set.

    The identity ``error = tau * ||mu_tail - mu_head||`` holds to rounding, and both
    bounds are >= error (they are rounded up by a relative 1e-12 so that rounding never
    puts them below it).
    """
    error: np.ndarray
    tau: np.ndarray
    mu_head: np.ndarray
    mu_tail: np.ndarray
    diam_bound: np.ndarray
    var_bound: np.ndarray
    k: np.ndarray


@dataclass
class SearchResult:
    """What :func:`topkattn.certified_search` returns; arrays have the query batch shape ``(...)``.

    Attributes
    ----------
    indices : int64 array, shape (..., kmax)
        Kept keys (original positions) by decreasing logit; rows with fewer than kmax kept
        keys are padded with -1. For a single query, exactly the k kept keys. Rows scored
        in full (``full_scoring``) on float32 or float16 keys come by decreasing score as
        ``topk_attention`` computes it for float32 operands (products accumulated in float32
        lanes, docs/design.md §3); their certificate allows for that rounding.
    k : int64 array (...)
        Number of kept keys.
    tv_bound : float64 array (...)
        Certified upper bound on TV(P, P_hat) of the kept set (<= eps). For
        ``method="mc"`` it holds with probability >= ``confidence`` on every row where
        ``certified_mc`` is true, and always elsewhere.
    keys_scored : int64 array (...)
        Distinct keys whose exact logit the search computed (<= n). Not counted: the
        probes that only steer it (a row's first look at its best sampled key, and for
        queries whose block bounds are looser than the levels cover, the keys of one block
        that place the levels' reference: docs/design.md §4), unless the search scores
        those keys again; their bytes are in ``bytes_read``.
    blocks_scored : int64 array (...)
        Blocks whose keys (proxies, or exact keys without proxies) were read.
    proxies_read : int64 array (...)
        Per-key proxies evaluated.
    bytes_read : float64 array (...)
        Bytes of the key side read: summaries of every block, proxies read, exact keys
        scored and the positions of kept keys (values V not included). A full pass over
        the keys shared by the m rows of a group (``full_scoring``) counts 1/m of it to
        each.
    certified_mc : bool array (...)
        Rows whose certificate rests on the Monte-Carlo estimate.
    full_scoring : bool array (...) or None
        Rows whose group of queries switched to full scoring (Δk-Search with proxies: the
        sample showed that most keys would have to be scored, so every key was scored in
        one pass shared by up to four queries of the head, and the certificate is the exact
        tail of the dropped keys, padded for rounding).
    output : array (..., d_v) or None
        Attention output of the kept set (softmax over it, weights times V rows).
    method, eps, delta, confidence
        What was certified: ``TV <= eps`` with probability >= confidence (1 for "delta").
    n : int or None
        Keys in the index when the search ran (the certificate is over keys ``0 .. n-1``;
        a concurrent :meth:`KeyIndex.append` may have added more since).
    """

    indices: np.ndarray
    k: np.ndarray
    tv_bound: np.ndarray
    keys_scored: np.ndarray
    blocks_scored: np.ndarray
    proxies_read: np.ndarray
    bytes_read: np.ndarray
    certified_mc: np.ndarray
    output: np.ndarray | None
    method: str
    eps: np.ndarray
    delta: float | None
    confidence: float
    n: int | None = None
    full_scoring: np.ndarray | None = None
