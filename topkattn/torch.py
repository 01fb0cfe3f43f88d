"""Top-k attention for PyTorch models: exact Top-k forward, backward through the kept set.

:func:`topk_attention` is a drop-in for ``torch.nn.functional.scaled_dot_product_attention``
(same tensor layout ``(..., L, d)``) that keeps, for every query row, only the keys of an
exact Top-k set and renormalises the softmax over them (docs/design.md §1, ``P̂``). The set is given
by a fixed ``k``, a ratio ``rho = k / n`` or a tail budget ``eps`` (the smallest set with
discarded mass ``tau <= eps``, i.e. ``k_eps``, docs/design.md §2). Ties at the threshold keep the
lower key index, as everywhere in :mod:`topkattn`.

Training through it: the selection is piecewise constant in the scores, so its derivative
is zero almost everywhere; the backward pass is the gradient of the softmax over the kept
set (keys outside it get no gradient), computed by a custom :class:`torch.autograd.Function`
and checked with :func:`torch.autograd.gradcheck`.

:func:`kept_set_attention` takes any selector (a function of the scores that returns a
boolean mask), e.g. :func:`simulated_selector`, which imitates an approximate Top-k
retriever of a given precision ``p = |S_approx ∩ S_exact| / k`` (docs/design.md §6).

Memory: the scores of every row are materialised, ``(..., L, n)``, and the kept-set
probabilities of the same shape are saved for the backward pass. That is meant for the
small shapes of experiments and tests (a few thousand keys), not for long-context kernels.

This module needs PyTorch (``pip install torch``, or the ``torch`` extra of topkattn);
``import topkattn`` itself does not.
"""
from __future__ import annotations

import math
import numbers

try:
    import torch
except ImportError as _exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "topkattn.torch needs PyTorch: pip install torch (CPU wheels: "
        "pip install torch --index-url https://download.pytorch.org/whl/cpu), "
        "or install topkattn with its torch extra: pip install 'topkattn[torch]'"
    ) from _exc

__all__ = [
    "topk_attention", "kept_set_attention", "attention_scores", "topk_select",
    "simulated_selector", "retrieval_precision", "attention_entropy",
]


# ----------------------------------------------------------------- argument handling

def _check_qkv(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., length, dim), got {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, "
                        f"{key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError("query, key and value must be on the same device")
    if query.shape[:-2] != key.shape[:-2] or key.shape[:-2] != value.shape[:-2]:
        raise ValueError(f"query, key and value must have the same leading (batch) shape, got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same last dimension, got "
                         f"{query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same number of keys, got "
                         f"{key.shape[-2]} and {value.shape[-2]}")
    if key.shape[-2] == 0:
        raise ValueError("key must hold at least one key (n >= 1)")


def _bias(attn_mask, is_causal, L, n, dtype, device):
    """Additive bias (0 or -inf, or the float mask) of shape broadcastable to (..., L, n),
    or None. A causal query i sits at position n - L + i (bottom-right aligned, so one
    decoding query sees every cached key); for L == n this is the usual lower triangle."""
    bias = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got "
                            f"{type(attn_mask).__name__}")
        if attn_mask.dim() < 2 or attn_mask.shape[-2:] not in ((L, n), (1, n), (L, 1), (1, 1)):
            raise ValueError(f"attn_mask must broadcast to (..., L, n) = (..., {L}, {n}), got "
                             f"{tuple(attn_mask.shape)}")
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=dtype, device=device)
            bias = bias.masked_fill(~attn_mask.to(device), -math.inf)
        elif attn_mask.is_floating_point():
            if torch.isnan(attn_mask).any() or (attn_mask == math.inf).any():
                raise ValueError("attn_mask must not hold NaN or +inf")
            bias = attn_mask.detach().to(device=device, dtype=dtype)
        else:
            raise TypeError(f"attn_mask must be bool (True = may attend) or floating "
                            f"(added to the scores), got {attn_mask.dtype}")
    if is_causal:
        i = torch.arange(L, device=device).unsqueeze(-1) + (n - L)
        j = torch.arange(n, device=device)
        causal = torch.zeros((L, n), dtype=dtype, device=device).masked_fill(j > i, -math.inf)
        bias = causal if bias is None else bias + causal
    return bias


def _default_scale(d, scale):
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def attention_scores(query, key, attn_mask=None, is_causal=False, scale=None):
    """Scaled scores ``scale * query @ key^T`` plus the mask, shape ``(..., L, n)``.

    Masked keys get ``-inf``. ``scale`` defaults to ``1 / sqrt(d)``; a causal query ``i``
    sees keys ``j <= n - L + i`` (bottom-right aligned). Differentiable in query and key.
    """
    L, n, d = query.shape[-2], key.shape[-2], query.shape[-1]
    s = torch.matmul(query, key.transpose(-2, -1)) * _default_scale(d, scale)
    bias = _bias(attn_mask, is_causal, L, n, s.dtype, s.device)
    return s if bias is None else s + bias


# ----------------------------------------------------------------- selection

def _live_counts(scores):
    return (scores > -math.inf).sum(dim=-1)


def _ranks(scores):
    """Rank of every key in its row by decreasing score, ties to the lower index (a stable
    descending sort keeps equal scores in index order); -inf keys rank last."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    arange = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, arange)


def _check_scores(scores):
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating-point torch.Tensor")
    if scores.dim() < 1 or scores.shape[-1] == 0:
        raise ValueError(f"scores must have shape (..., n) with n >= 1, got {tuple(scores.shape)}")
    if torch.isnan(scores).any() or (scores == math.inf).any():
        raise ValueError("scores hold NaN or +inf (check query, key and attn_mask)")
    live = _live_counts(scores)
    if (live == 0).any():
        raise ValueError("a row has every key masked: nothing to attend to")
    return live


def _one_budget(k, ratio, eps):
    given = [name for name, v in (("k", k), ("ratio", ratio), ("eps", eps)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of k, ratio and eps, got "
                         f"{', '.join(given) if given else 'none'}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k must be >= 1 (at least one key kept), got {k}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise TypeError(f"ratio must be a real number, got {type(ratio).__name__}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in the open interval (0, 1), got {eps}")


@torch.no_grad()
def topk_select(scores, k=None, *, ratio=None, eps=None):
    r"""Boolean mask of the exact Top-k set of every row of ``scores``.

    Exactly one budget is given:

    * ``k``: the ``min(k, n_live)`` largest scores, ``n_live`` = unmasked keys of the row;
    * ``ratio``: ``ceil(ratio * n_live)`` keys (at least 1), so a causal row keeps the
      same fraction of the keys it can see;
    * ``eps``: the smallest top set whose discarded softmax mass is ``tau <= eps``
      (``k_eps``, docs/design.md §2), computed in the dtype of ``scores``.

    Ties keep the lower index; masked keys (``-inf``) are never kept.

    Parameters
    ----------
    scores : Tensor, shape (..., n)
        Floating point; ``-inf`` marks masked keys. NaN, ``+inf`` and rows with every key
        masked raise ``ValueError``.
    k : int >= 1, optional
    ratio : float in (0, 1], optional
    eps : float in (0, 1), optional

    Returns
    -------
    keep : bool Tensor, shape (..., n)

    Examples
    --------
    >>> import torch
    >>> from topkattn.torch import topk_select
    >>> topk_select(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2).tolist()
    [False, True, True, False]
    """
    _one_budget(k, ratio, eps)
    live = _check_scores(scores)
    if k is not None:
        kk = live.clamp(max=k)
    elif ratio is not None:
        kk = torch.ceil(live.to(torch.float64) * ratio).to(live.dtype).clamp(1)
        kk = torch.minimum(kk, live)
    else:
        p = torch.softmax(scores, dim=-1)
        ps = torch.sort(p, dim=-1, descending=True).values
        # tail after the first j keys = suffix sum from j; summed from the small end so
        # small tails keep their relative accuracy
        tail = torch.flip(torch.cumsum(torch.flip(ps, (-1,)), -1), (-1,))
        kk = (tail > eps).sum(dim=-1).clamp(1)
        kk = torch.minimum(kk, live)
    return _keep_top(scores, kk)


def _keep_top(scores, kk):
    """The kk (per row) largest scores, ties at the threshold to the lower index.

    The kk-th largest value is the threshold whatever the order of ties, so an unstable
    partial sort finds it; keys strictly above it are kept, and of the keys equal to it
    the first ``kk - #above`` by index.
    """
    kmax = int(kk.max())
    vals = torch.topk(scores, kmax, dim=-1, sorted=True).values
    thr = vals.gather(-1, (kk - 1).unsqueeze(-1))
    above = scores > thr
    tied = scores == thr
    room = (kk - above.sum(dim=-1)).unsqueeze(-1)
    return above | (tied & (torch.cumsum(tied, dim=-1) <= room))


@torch.no_grad()
def simulated_selector(scores, precision, k=None, *, ratio=None, eps=None, generator=None):
    r"""An approximate Top-k retriever of a given precision (docs/design.md §6), as a mask.

    Each row keeps as many keys as its exact Top-k set ``S`` (:func:`topk_select` with the
    same ``k``, ``ratio`` or ``eps``), ``|S|`` say: ``m`` drawn uniformly from ``S`` and
    ``|S| - m`` drawn uniformly from the other unmasked keys, with
    ``m = floor(precision * |S| + u)``, ``u ~ U[0, 1)`` (randomised rounding, so the
    expected precision is ``precision`` even for small sets). A row with too few keys
    outside ``S`` takes the shortfall from inside it. Measure the precision obtained with
    :func:`retrieval_precision`.

    Parameters
    ----------
    scores : Tensor, shape (..., n)
        ``-inf`` marks masked keys (never selected).
    precision : float in [0, 1]
    k : int >= 1, optional
    ratio : float in (0, 1], optional
    eps : float in (0, 1), optional
        Exactly one of ``k``, ``ratio``, ``eps``: the exact set's size, as in
        :func:`topk_select`.
    generator : torch.Generator, optional
        Source of randomness (on the device of ``scores``), for reproducible runs.

    Returns
    -------
    keep : bool Tensor, shape (..., n)

    Examples
    --------
    >>> import torch
    >>> from topkattn.torch import simulated_selector, topk_select, retrieval_precision
    >>> g = torch.Generator().manual_seed(0)
    >>> s = torch.randn(4, 100, generator=g)
    >>> bool((simulated_selector(s, 1.0, 10) == topk_select(s, 10)).all())
    True
    >>> sel = simulated_selector(s, 0.5, 10, generator=g)
    >>> retrieval_precision(sel, topk_select(s, 10)).tolist()
    [0.5, 0.5, 0.5, 0.5]
    """
    if isinstance(precision, bool) or not isinstance(precision, numbers.Real) \
            or not 0.0 <= precision <= 1.0:
        raise ValueError(f"precision must be a real number in [0, 1], got {precision!r}")
    exact = topk_select(scores, k, ratio=ratio, eps=eps)
    kk = exact.sum(dim=-1)
    u = torch.rand(kk.shape, generator=generator, device=scores.device, dtype=torch.float64)
    m = torch.floor(precision * kk.to(torch.float64) + u).to(kk.dtype).clamp(max=kk)
    outside = (scores > -math.inf) & ~exact
    m = torch.maximum(m, kk - outside.sum(dim=-1))
    prio = torch.rand(scores.shape, generator=generator, device=scores.device,
                      dtype=torch.float64)
    # random rank inside each group; keys of the other group rank after every member
    rank_in = _ranks(torch.where(exact, prio, -math.inf))
    rank_out = _ranks(torch.where(outside, prio, -math.inf))
    return (exact & (rank_in < m.unsqueeze(-1))) | \
        (outside & (rank_out < (kk - m).unsqueeze(-1)))


def retrieval_precision(selected, exact):
    """Per-row precision ``|S_approx ∩ S_exact| / |S_exact|`` of two boolean masks
    ``(..., n)``, as float64 ``(...)``."""
    if selected.shape != exact.shape or selected.dtype != torch.bool or exact.dtype != torch.bool:
        raise ValueError("selected and exact must be boolean tensors of the same shape")
    hit = (selected & exact).sum(dim=-1).to(torch.float64)
    return hit / exact.sum(dim=-1).clamp(min=1).to(torch.float64)


def attention_entropy(scores):
    """Entropy ``H(P) = -sum_i P_i log P_i`` (nats) of ``softmax(scores)`` per row; masked
    keys (``-inf``) contribute 0. Shape ``(..., n)`` -> ``(...)``."""
    logp = torch.log_softmax(scores, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)


# ----------------------------------------------------------------- the autograd function

class _KeptSetSoftmaxAttention(torch.autograd.Function):
    """out = softmax(scores restricted to S) @ V, S = select(scores) held constant.

    Backward (with P the kept-set probabilities, zero outside S, and O the output):
    dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dO * O)); dQ = c dS K; dK = c dS^T Q.
    dS vanishes outside S, so keys outside the kept set get no gradient through the scores.
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, scale, select):
        s = torch.matmul(query, key.transpose(-2, -1)) * scale
        if bias is not None:
            s = s + bias
        keep = select(s.detach())
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool \
                or keep.shape != s.shape:
            raise ValueError(f"the selector must return a bool tensor of the scores' shape "
                             f"{tuple(s.shape)}")
        s = s.masked_fill(~keep, -math.inf)
        if (~torch.isfinite(s.amax(dim=-1))).any():
            raise ValueError("the selector kept no unmasked key in some row")
        p = torch.softmax(s, dim=-1)
        out = torch.matmul(p, value)
        ctx.save_for_backward(query, key, value, p, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, p, out = ctx.saved_tensors
        dq = dk = dv = None
        if ctx.needs_input_grad[2]:
            dv = torch.matmul(p.transpose(-2, -1), grad_out)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dp = torch.matmul(grad_out, value.transpose(-2, -1))
            ds = p * (dp - (grad_out * out).sum(dim=-1, keepdim=True)) * ctx.scale
            if ctx.needs_input_grad[0]:
                dq = torch.matmul(ds, key)
            if ctx.needs_input_grad[1]:
                dk = torch.matmul(ds.transpose(-2, -1), query)
        return dq, dk, dv, None, None, None


def kept_set_attention(query, key, value, select, attn_mask=None, is_causal=False, scale=None):
    r"""Softmax attention restricted to the keys a selector keeps.

    ``out = softmax(s restricted to S) @ value`` with ``s = scale * query @ key^T + mask``
    and ``S = select(s)`` (a boolean mask computed without gradient). The backward pass
    treats S as constant: gradients flow through the kept keys only.

    Parameters
    ----------
    query : Tensor, shape (..., L, d)
    key : Tensor, shape (..., n, d)
    value : Tensor, shape (..., n, d_v)
        Same dtype and device, same leading (batch, head) shape.
    select : callable
        ``select(scores) -> bool Tensor`` of the shape of ``scores`` ``(..., L, n)``;
        ``scores`` hold ``-inf`` at masked keys, and every row must keep one unmasked key.
    attn_mask : Tensor, optional
        Bool (True = may attend) or float (added to the scores, no gradient), broadcastable
        to ``(..., L, n)``.
    is_causal : bool
        Query ``i`` sees keys ``j <= n - L + i`` (the lower triangle when ``L == n``).
    scale : float, optional
        Defaults to ``1 / sqrt(d)``.

    Returns
    -------
    out : Tensor, shape (..., L, d_v)

    Examples
    --------
    >>> import torch
    >>> from topkattn.torch import kept_set_attention, topk_select
    >>> q, k, v = torch.randn(3, 1, 2, 5, 8, generator=torch.Generator().manual_seed(0))
    >>> out = kept_set_attention(q, k, v, lambda s: topk_select(s, 2))
    >>> tuple(out.shape)
    (1, 2, 5, 8)
    """
    _check_qkv(query, key, value)
    if not callable(select):
        raise TypeError(f"select must be callable, got {type(select).__name__}")
    L, n, d = query.shape[-2], key.shape[-2], query.shape[-1]
    c = _default_scale(d, scale)
    bias = _bias(attn_mask, is_causal, L, n, query.dtype, query.device)
    return _KeptSetSoftmaxAttention.apply(query, key, value, bias, c, select)


def topk_attention(query, key, value, k=None, *, ratio=None, eps=None, attn_mask=None,
                   is_causal=False, scale=None):
    r"""Exact Top-k softmax attention with a backward pass through the kept set.

    Each query row keeps its Top-k keys by score (:func:`topk_select`: a fixed ``k``, a
    ``ratio`` of the keys it can see, or the smallest set with discarded mass ``<= eps``),
    renormalises the softmax over them and averages their values. With ``k >= n`` (or
    ``ratio=1``) this is ordinary softmax attention. The selection is held constant in the
    backward pass (its derivative is zero almost everywhere); the gradient is that of the
    softmax over the kept set. Scores ``(..., L, n)`` and kept-set probabilities of the same
    shape are materialised (the latter saved for backward): meant for short sequences.

    Parameters
    ----------
    query : Tensor, shape (..., L, d)
    key : Tensor, shape (..., n, d)
    value : Tensor, shape (..., n, d_v)
    k : int >= 1, optional
    ratio : float in (0, 1], optional
    eps : float in (0, 1), optional
        Exactly one of ``k``, ``ratio``, ``eps``.
    attn_mask : Tensor, optional
        Bool (True = may attend) or float (added to the scores), broadcastable to
        ``(..., L, n)``.
    is_causal : bool
        Query ``i`` sees keys ``j <= n - L + i``.
    scale : float, optional
        Defaults to ``1 / sqrt(d)``.

    Returns
    -------
    out : Tensor, shape (..., L, d_v)

    Examples
    --------
    >>> import torch
    >>> from topkattn.torch import topk_attention
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(2, 4, 64, 16, generator=g, requires_grad=True) for _ in range(3))
    >>> out = topk_attention(q, k, v, 8, is_causal=True)
    >>> out.sum().backward()
    >>> tuple(out.shape), tuple(q.grad.shape)
    ((2, 4, 64, 16), (2, 4, 64, 16))
    """
    _one_budget(k, ratio, eps)
    return kept_set_attention(query, key, value,
                              lambda s: topk_select(s, k, ratio=ratio, eps=eps),
                              attn_mask=attn_mask, is_causal=is_causal, scale=scale)
