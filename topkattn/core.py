"""Distribution-level quantities of Top-k attention (docs/design.md §2, §5, §6).

Every function takes logits of shape ``(..., n)`` (float32, float64 or float16, any
strides; float16 gives the results of the same values as float32, bit for bit) and
reduces over the last axis, returning one float64 (or int64) value per row. A logit of
``-inf`` is a masked key: its probability is exactly zero. NaN and ``+inf`` are errors.
The computation runs in the C core (``topkattn._core``) with the GIL released.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import _core
from ._args import integer, logits as _logits, per_row as _per_row, scalar_out as _out
from ._backend import dispatch

__all__ = [
    "tail_mass", "log_tail_mass", "kl_truncated", "tv_curve", "k_eps", "topk",
    "gap_bound", "multigap_bound", "block_bound",
    "gaussian_tail_mass", "gaussian_k_eps", "fit_gaussian", "norm_cdf", "norm_sf",
    "norm_ppf", "norm_isf", "entropy", "effective_support",
]


# ----------------------------------------------------------------- tail mass, KL, k_eps

@dispatch("logits")
def log_tail_mass(logits, k):
    r"""Log of the softmax mass discarded by keeping the top-k keys.

    ``log tau`` with ``tau = TV(P, P_k) = sum over keys outside the top-k of P_i``
    (docs/design.md §2), computed in log space: exact to rounding even when tau is 1e-300 or
    smaller.

    Parameters
    ----------
    logits : array_like, shape (..., n)
        float32, float64 or float16; ``-inf`` marks masked keys.
    k : int or int array broadcastable to ``logits.shape[:-1]``
        Number of keys kept, in [0, n]. Ties at the threshold keep the lower index (the
        mass does not depend on which).

    Returns
    -------
    log_tau : float64, shape (...)
        0 for k = 0; -inf when every unmasked key is kept.

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> float(topkattn.log_tail_mass(np.array([0.0, -800.0]), 1))
    -800.0
    """
    x = _logits(logits)
    kk = _per_row(k, x.shape[:-1], "k", np.int64)
    (lt,) = _core.tail_mass(x, kk, False)
    return _out(lt)


@dispatch("logits")
def tail_mass(logits, k):
    r"""Discarded softmax mass tau = TV(P, P_k) of the top-k set, per row.

    By the TV identity (docs/design.md §2) this is also the total-variation distance between the
    attention distribution and its renormalised Top-k truncation, and
    ``tau = 1 - exp(-KL(P_k || P))``.

    Parameters
    ----------
    logits : array_like, shape (..., n)
    k : int or int array broadcastable to ``logits.shape[:-1]``, values in [0, n]

    Returns
    -------
    tau : float64, shape (...)

    See Also
    --------
    log_tail_mass : the same in log space, for tails below 1e-300.

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> x = np.log(np.array([0.5, 0.3, 0.2]))
    >>> round(float(topkattn.tail_mass(x, 1)), 12)
    0.5
    """
    return np.exp(log_tail_mass(logits, k))


@dispatch("logits")
def kl_truncated(logits, k):
    r"""KL(P_k || P) = -log(1 - tau) of the renormalised top-k truncation, per row.

    Computed from the head/tail ratio directly, so it is accurate both when tau is tiny
    (KL ~ tau) and when tau is close to 1 (KL large). ``+inf`` for k = 0.

    Parameters
    ----------
    logits : array_like, shape (..., n)
    k : int or int array broadcastable to ``logits.shape[:-1]``

    Returns
    -------
    kl : float64, shape (...)

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> x = np.log(np.array([0.5, 0.3, 0.2]))
    >>> round(float(topkattn.kl_truncated(x, 2)), 12) == round(float(-np.log(0.8)), 12)
    True
    """
    x = _logits(logits)
    kk = _per_row(k, x.shape[:-1], "k", np.int64)
    _, kl = _core.tail_mass(x, kk, True)
    return _out(kl)


@dispatch("logits")
def tv_curve(logits):
    r"""tau(k) for every k = 0..n, per row.

    Parameters
    ----------
    logits : array_like, shape (..., n)

    Returns
    -------
    curve : float64, shape (..., n + 1)
        ``curve[..., k]`` is the mass outside the top-k keys: 1 at k = 0, 0 at k = n,
        non-increasing. Values under ~1e-300 lose relative precision (use
        :func:`log_tail_mass` there). Costs one sort per row.

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> topkattn.tv_curve(np.log(np.array([0.2, 0.5, 0.3]))).round(12).tolist()
    [1.0, 0.5, 0.2, 0.0]
    """
    return _core.tv_curve(_logits(logits))


@dispatch("logits")
def k_eps(logits, eps, return_tail=False):
    r"""Smallest k whose top-k set discards at most eps of the softmax mass, per row.

    ``k_eps = min{k : tau(k) <= eps}`` (docs/design.md §2), the same set as nucleus (top-p)
    selection with ``p = 1 - eps``. Expected O(n) per row: a sampled bracket and one band
    pass, not a sort.

    Parameters
    ----------
    logits : array_like, shape (..., n)
    eps : float or float array broadcastable to ``logits.shape[:-1]``, in (0, 1)
    return_tail : bool
        Also return tau at k_eps.

    Returns
    -------
    k : int64, shape (...)
    tau : float64, shape (...), only if ``return_tail``; always <= eps.

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> x = np.log(np.array([0.6, 0.1, 0.3]))
    >>> int(topkattn.k_eps(x, 0.15))
    2
    """
    x = _logits(logits)
    e = _per_row(eps, x.shape[:-1], "eps", np.float64)
    res = _core.k_eps(x, e, bool(return_tail))
    return (_out(res[0]), _out(res[1])) if return_tail else _out(res[0])


@dispatch("logits")
def topk(logits, k):
    r"""Indices of the k largest logits per row, by decreasing logit.

    Ties go to the lower index. Masked keys (``-inf``) come last, by index.

    Parameters
    ----------
    logits : array_like, shape (..., n)
    k : int in [0, n]

    Returns
    -------
    indices : int64, shape (..., k)

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> topkattn.topk(np.array([1.0, 3.0, 3.0, 2.0]), 3).tolist()
    [1, 2, 3]
    """
    x = _logits(logits)
    return _core.topk(x, integer(k, "k"))


# ----------------------------------------------------------------- certified bounds

@dispatch("logits")
def gap_bound(logits, k, form="mass"):
    r"""Single-gap certified upper bound on tau for the top-k set (docs/design.md §2).

    With ``n'`` unmasked keys, head mass ``A`` and the (k+1)-th largest logit:

    * ``form="mass"``: ``(n'-k) e^{s_(k+1)} / (A + (n'-k) e^{s_(k+1)})``
    * ``form="gap"``: only the gap ``Delta = s_(k) - s_(k+1)``:
      ``(n'-k) e^{-Delta} / (k + (n'-k) e^{-Delta})`` (looser).

    Rounded outward: never below the exact tau.

    Parameters
    ----------
    logits : array_like, shape (..., n)
    k : int or int array broadcastable to ``logits.shape[:-1]``
    form : {"mass", "gap"}

    Returns
    -------
    bound : float64, shape (...), in [0, 1]

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> x = np.array([5.0, 0.0, 0.0, -1.0])
    >>> bool(topkattn.gap_bound(x, 1) >= topkattn.tail_mass(x, 1))
    True
    """
    forms = {"mass": _core.GAP_MASS, "gap": _core.GAP_GAP}
    if form not in forms:
        raise ValueError(f"form must be 'mass' or 'gap', got {form!r}")
    x = _logits(logits)
    kk = _per_row(k, x.shape[:-1], "k", np.int64)
    return _out(_core.gap_bound(x, kk, forms[form]))


@dispatch("logits")
def multigap_bound(logits, k, cuts=8, spacing="geometric"):
    r"""Multi-gap certified upper bound on tau (docs/design.md §2).

    The tail ranks ``k = m_0 < m_1 < ... < m_J = n'`` are cut into segments; every logit
    of segment j is at most its first one, so
    ``tail <= sum_j (m_j - m_{j-1}) e^{s_(m_{j-1}+1)}``. More cuts give a tighter bound;
    cutting at every rank gives the exact tau (up to the outward rounding).

    Parameters
    ----------
    logits : array_like, shape (..., n)
    k : int or int array broadcastable to ``logits.shape[:-1]``
    cuts : int or 1-D int array
        An int J >= 1: J segments between k and n' (``spacing`` says how). An array:
        strictly increasing ranks in [1, n]; per row those <= k are ignored and n' is
        appended.
    spacing : {"geometric", "linear"}
        For integer ``cuts``: segment lengths growing geometrically (short segments near
        the head, where the tail mass is) or equal lengths.

    Returns
    -------
    bound : float64, shape (...)

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> x = np.random.default_rng(0).normal(size=1000)
    >>> bool(topkattn.multigap_bound(x, 10, cuts=16) <= topkattn.gap_bound(x, 10))
    True
    """
    spacings = {"geometric": _core.SPACING_GEOMETRIC, "linear": _core.SPACING_LINEAR}
    if spacing not in spacings:
        raise ValueError(f"spacing must be 'geometric' or 'linear', got {spacing!r}")
    x = _logits(logits)
    kk = _per_row(k, x.shape[:-1], "k", np.int64)
    if isinstance(cuts, numbers.Integral) and not isinstance(cuts, (bool, np.bool_)):
        if cuts < 1:
            raise ValueError(f"cuts must be >= 1 segments, got {cuts}")
        return _out(_core.multigap_bound(x, kk, None, int(cuts), spacings[spacing]))
    c = np.asarray(cuts)
    if c.dtype.kind not in "iu":
        raise TypeError(f"cuts must be an int or an integer array of ranks, got {c.dtype}")
    return _out(_core.multigap_bound(x, kk, c, 0, spacings[spacing]))


@dispatch("block_upper", "block_sizes", "kept_mass", "scored_mass")
def block_bound(block_upper, block_sizes, kept_mass, scored_mass, log_space=False):
    r"""Blockwise certified bound on tau when some keys were never scored (docs/design.md §2).

    Unscored keys sit in blocks ``b`` of ``block_sizes[b]`` keys whose logits are at most
    ``block_upper[b]``; the unscored mass is at most ``U = sum_b |B_b| e^{u_b}``. With the
    scored mass ``Z_s`` and the kept mass ``A`` (the kept keys are among the scored ones):
    ``tau <= 1 - A / (Z_s + U)``.

    Parameters
    ----------
    block_upper : array_like, shape (..., B)
        Upper bounds on the logits of the unscored blocks (``-inf`` = empty block).
    block_sizes : int array_like, shape (B,) or (..., B)
        Number of unscored keys in each block (>= 0).
    kept_mass, scored_mass : array_like, broadcastable to ``block_upper.shape[:-1]``
        ``A = sum_{kept} e^{s_i}`` and ``Z_s = sum_{scored} e^{s_i}`` in the same units as
        ``e^{u_b}``; with ``log_space=True`` their logarithms (log-sum-exp values), which
        never overflow.
    log_space : bool

    Returns
    -------
    bound : float64, shape (...), rounded outward.

    Examples
    --------
    >>> import topkattn
    >>> round(float(topkattn.block_bound([0.0], [10], 90.0, 100.0)), 6)
    0.181818
    """
    u = np.asarray(block_upper, dtype=np.float64)
    if u.ndim == 0:
        raise ValueError("block_upper must have a last axis of blocks (..., B)")
    batch = u.shape[:-1]
    sizes = np.asarray(block_sizes)
    if sizes.dtype.kind not in "iu":
        raise TypeError(f"block_sizes must be integers, got {sizes.dtype}")
    if sizes.shape not in ((u.shape[-1],), u.shape):
        try:
            sizes = np.broadcast_to(sizes, u.shape)
        except ValueError:
            raise ValueError(f"block_sizes with shape {sizes.shape} does not match block_upper "
                             f"{u.shape}") from None
    a = _per_row(kept_mass, batch, "kept_mass", np.float64)
    z = _per_row(scored_mass, batch, "scored_mass", np.float64)
    if not log_space:
        if np.any(~(a >= 0)) or np.any(~(z > 0)):
            raise ValueError("kept_mass must be >= 0 and scored_mass > 0 (or pass log_space=True)")
        with np.errstate(divide="ignore"):
            a, z = np.log(a), np.log(z)
    if np.any(np.isnan(a)) or np.any(np.isnan(z)):
        raise ValueError("kept_mass and scored_mass must not be NaN")
    # a tolerance for kept ~ scored computed by the caller with its own rounding
    slack = np.where(np.isfinite(z), 1e-12 * np.maximum(1.0, np.abs(z)), 0.0)
    if np.any(a > z + slack):
        raise ValueError("kept_mass must not exceed scored_mass (the kept keys are scored keys)")
    rows = int(np.prod(batch, dtype=np.int64))
    u2 = u.reshape(rows, u.shape[-1])
    s2 = sizes.reshape(-1) if sizes.ndim == 1 else sizes.reshape(rows, u.shape[-1])
    out = _core.block_bound(u2, s2, a.reshape(rows), z.reshape(rows))
    return _out(out.reshape(batch))


# ----------------------------------------------------------------- Gaussian model (§5)

def _gauss(op, *args):
    arrs = np.broadcast_arrays(*[np.asarray(a, dtype=np.float64) for a in args])
    return _out(_core.gauss(op, *arrs))


@dispatch("x")
def norm_cdf(x):
    """Standard normal CDF Phi(x), accurate deep in both tails. Broadcasts."""
    return _gauss(_core.G_CDF, x)


@dispatch("x")
def norm_sf(x):
    """Standard normal upper tail Phi_c(x) = 1 - Phi(x) without cancellation. Broadcasts."""
    return _gauss(_core.G_SF, x)


@dispatch("p")
def norm_ppf(p):
    """Inverse CDF Phi^{-1}(p) for p in [0, 1] (-inf/+inf at the ends, NaN outside)."""
    return _gauss(_core.G_PPF, p)


@dispatch("p")
def norm_isf(p):
    """Inverse upper tail Phi_c^{-1}(p) = -Phi^{-1}(p), accurate for tiny p."""
    return _gauss(_core.G_ISF, p)


@dispatch("rho", "sigma")
def gaussian_tail_mass(rho, sigma):
    r"""Gaussian-model tail mass of the top fraction rho (docs/design.md §5).

    For i.i.d. scores ``N(mu, sigma^2)`` and n -> infinity, keeping the top ``rho = k/n``
    discards ``tau(rho) = Phi(Phi_c^{-1}(rho) - sigma)`` of the softmax mass.

    Parameters
    ----------
    rho : float or array in [0, 1]
    sigma : float or array >= 0 (broadcast together)

    Returns
    -------
    tau : float64

    Examples
    --------
    >>> import topkattn
    >>> round(float(topkattn.gaussian_tail_mass(0.5, 0.0)), 12)
    0.5
    """
    r = np.asarray(rho, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    if np.any(~((r >= 0) & (r <= 1))):
        raise ValueError("rho must be in [0, 1]")
    if np.any(~(s >= 0)) or np.any(np.isinf(s)):
        raise ValueError("sigma must be finite and >= 0")
    return _gauss(_core.G_TAIL, r, s)


@dispatch("n", "sigma", "eps")
def gaussian_k_eps(n, sigma, eps, finite_n=False):
    r"""Predicted k_eps for n i.i.d. Gaussian scores of standard deviation sigma (docs/design.md §5).

    The paper's asymptotic rule is ``k_eps / n ~ Phi_c(sigma + Phi^{-1}(eps))``. It drifts
    at finite n when sigma is large: the rule integrates the softmax weight over the whole
    Gaussian, but a real row stops near its maximum (about ``sqrt(2 ln n)``), so a few top
    scores carry mass the rule spreads beyond them. ``finite_n=True`` evaluates tau(k)
    exactly on a *typical row* -- the scores placed at the quantile positions
    ``Phi_c^{-1}((i - 0.44) / (n + 0.12))`` (Gringorten) -- and returns the smallest whole k
    with tau(k) <= eps, in O(log n) per call. Over sigma in [0.5, 5], n from 1e3 to 1e6 and
    eps in {1e-1, 1e-2, 1e-3} it tracks the simulated median k_eps with a mean relative
    error of 0.8% against the rule's 18% (``benchmarks/bench_gaussian.py``).

    Parameters
    ----------
    n : int or array >= 1
    sigma : float or array >= 0
    eps : float or array in (0, 1)
    finite_n : bool

    Returns
    -------
    k : float64
        ``finite_n=False``: the real-valued prediction ``n * Phi_c(sigma + Phi^{-1}(eps))``
        (take ``ceil`` for a budget; sigma = 0 gives ``n (1 - eps)``).
        ``finite_n=True``: a whole number in [1, n] (non-integer n is truncated first).

    Examples
    --------
    >>> import topkattn
    >>> k = topkattn.gaussian_k_eps(100_000, 2.0, 1e-2)
    >>> 0.0 < float(k) / 100_000 < 1.0
    True
    """
    nn = np.asarray(n, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    e = np.asarray(eps, dtype=np.float64)
    if np.any(~(nn >= 1)) or np.any(np.isinf(nn)):
        raise ValueError("n must be finite and >= 1")
    if np.any(~(s >= 0)) or np.any(np.isinf(s)):
        raise ValueError("sigma must be finite and >= 0")
    if np.any(~((e > 0) & (e < 1))):
        raise ValueError("eps must be in the open interval (0, 1)")
    return _gauss(_core.G_KEPS_FINITE if finite_n else _core.G_KEPS, nn, s, e)


@dispatch("logits")
def fit_gaussian(logits):
    r"""Mean and sample standard deviation (ddof=1) of the unmasked logits, per row.

    The sigma to feed :func:`gaussian_k_eps` (docs/design.md §5). A row with one unmasked key
    has sigma 0.

    Parameters
    ----------
    logits : array_like, shape (..., n)

    Returns
    -------
    mu, sigma : float64, shape (...)

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> mu, sigma = topkattn.fit_gaussian(np.array([1.0, 2.0, 3.0]))
    >>> float(mu), float(sigma)
    (2.0, 1.0)
    """
    mu, sigma = _core.fit_gaussian(_logits(logits))
    return _out(mu), _out(sigma)


# ----------------------------------------------------------------- row statistics (§6)

@dispatch("logits")
def entropy(logits):
    r"""Attention entropy ``H(P) = -sum_i P_i log P_i`` in nats, per row.

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> round(float(topkattn.entropy(np.zeros(4))), 12) == round(float(np.log(4)), 12)
    True
    """
    return _out(_core.entropy(_logits(logits)))


@dispatch("logits")
def effective_support(logits, threshold):
    r"""Effective support ``|S_eps| = #{i : P_i >= threshold}`` per row (docs/design.md §6).

    Parameters
    ----------
    logits : array_like, shape (..., n)
    threshold : float or array broadcastable to ``logits.shape[:-1]``, in (0, 1]

    Returns
    -------
    count : int64, shape (...)

    Examples
    --------
    >>> import numpy as np, topkattn
    >>> int(topkattn.effective_support(np.log(np.array([0.7, 0.2, 0.1])), 0.15))
    2
    """
    x = _logits(logits)
    t = _per_row(threshold, x.shape[:-1], "threshold", np.float64)
    return _out(_core.effective_support(x, t))
