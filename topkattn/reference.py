"""Plain NumPy twins of the C core, the reference the tests compare it against.

Every function here mirrors one function of :mod:`topkattn.core` with the same arguments
and the same output shapes, but is written for clarity, not speed: each row is sorted
(stable, by decreasing logit, ties to the lower index, ``-inf`` last) and the quantities of
docs/design.md §2, §5 and §6 are computed from the sorted row in float64, in log space where a
mass could underflow. Inputs are upcast to float64 first, so a float32 row is treated as
the exact float32 values it holds (the C core does the same).

The ``mp_*`` functions compute the same quantities with mpmath at 50 significant digits,
for extreme rows (tails of e^-5000, spreads of 1e4) where float64 itself is in doubt.
They are slow: use them on short rows.

The attention twins (``scores``, ``attention``, ``topk_attention``,
``attention_matrix_error``) form the full ``(..., L, n)`` score matrix in float64 and apply
the definitions of docs/design.md §3 and §6 directly.

Nothing here validates arguments beyond what the computation needs; the tests feed it
valid input only.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "tail_mass", "log_tail_mass", "kl_truncated", "tv_curve", "k_eps", "topk",
    "gap_bound", "multigap_bound", "multigap_cuts", "block_bound",
    "entropy", "effective_support", "fit_gaussian",
    "norm_cdf", "norm_sf", "norm_ppf", "norm_isf", "gaussian_tail_mass", "gaussian_k_eps",
    "mp_norm_cdf", "mp_norm_sf", "mp_norm_ppf", "mp_norm_isf",
    "mp_gaussian_tail_mass", "mp_gaussian_k_eps",
    "mp_log_tail_mass", "mp_tail_mass", "mp_kl_truncated", "mp_tv_curve", "mp_k_eps",
    "MP_DPS",
    "scores", "attention", "topk_attention", "attention_matrix_error",
]

MP_DPS = 50


# ------------------------------------------------------------------------ helpers

def _rows(logits):
    """float64 copy of ``logits`` as (rows, n) plus the batch shape."""
    x = np.array(logits, dtype=np.float64)
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def _per_row(value, batch, dtype):
    return np.broadcast_to(np.asarray(value, dtype=dtype), batch).reshape(-1)


def _sorted_desc(row):
    """The row sorted by decreasing value (-inf last)."""
    return np.asarray(row, dtype=np.float64)[np.argsort(-row, kind="stable")]


def _lse_parts(v):
    """(m, log sum(exp(v - m))) with m the largest element, so that a large common offset
    m never rounds the small log-sum away; (-inf, 0) for an empty or all -inf v."""
    v = np.asarray(v, dtype=np.float64)
    v = v[v > -np.inf]
    if v.size == 0:
        return -np.inf, 0.0
    m = v.max()
    return m, math.log(np.sum(np.exp(v - m)))


def _lse(v):
    """log(sum(exp(v))) relative to the largest element; -inf for an empty or all -inf v."""
    m, ls = _lse_parts(v)
    return m + ls


def _lse_diff(a, b):
    """LSE(a) - LSE(b) without adding the two maxima to their log-sums first."""
    (ma, la), (mb, lb) = _lse_parts(a), _lse_parts(b)
    if ma == -np.inf or mb == -np.inf:
        return ma - mb
    return (ma - mb) + (la - lb)


def _softplus(z):
    """log(1 + e^z) without overflow or cancellation."""
    if z == np.inf:
        return np.inf
    if z == -np.inf:
        return 0.0
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


def _n_live(row):
    return int(np.count_nonzero(row > -np.inf))


def _head_tail(row, k):
    """(top-k logits, the others) of one row, sorted by decreasing logit."""
    v = _sorted_desc(row)
    return v[:k], v[k:]


# --------------------------------------------------------------- §2 distribution

def _log_tau_row(row, k):
    if k == 0:
        return 0.0
    head, tail = _head_tail(row, k)
    if _lse_parts(tail)[0] == -np.inf:
        return -np.inf
    # log tau = LSE(tail) - LSE(all) = -log(1 + e^{LSE(head) - LSE(tail)})
    return -_softplus(_lse_diff(head, tail))


def _kl_row(row, k):
    if k == 0:
        return np.inf
    head, tail = _head_tail(row, k)
    if _lse_parts(tail)[0] == -np.inf:
        return 0.0
    # KL = -log(1 - tau) = log(1 + e^{LSE(tail) - LSE(head)})
    return _softplus(_lse_diff(tail, head))


def log_tail_mass(logits, k):
    """log tau of the top-k set per row (docs/design.md §2): LSE(tail) - LSE(all)."""
    x, batch = _rows(logits)
    kk = _per_row(k, batch, np.int64)
    out = np.array([_log_tau_row(r, int(kr)) for r, kr in zip(x, kk)], dtype=np.float64)
    return out.reshape(batch)


def tail_mass(logits, k):
    """tau = TV(P, P_k) of the top-k set per row (docs/design.md §2)."""
    return np.exp(log_tail_mass(logits, k))


def kl_truncated(logits, k):
    """KL(P_k || P) = -log(1 - tau) per row (docs/design.md §2)."""
    x, batch = _rows(logits)
    kk = _per_row(k, batch, np.int64)
    out = np.array([_kl_row(r, int(kr)) for r, kr in zip(x, kk)], dtype=np.float64)
    return out.reshape(batch)


def tv_curve(logits):
    """tau(k) for k = 0..n per row, shape (..., n + 1)."""
    x, batch = _rows(logits)
    n = x.shape[-1]
    out = np.empty((x.shape[0], n + 1))
    for i, r in enumerate(x):
        v = _sorted_desc(r)
        e = np.exp(v - v[0])
        # suffix sums, smallest term first
        suffix = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])
        out[i] = suffix / suffix[0]
    return out.reshape(batch + (n + 1,))


def _log_suffix(row):
    """log of the mass of sorted[i:] for i = 0..n, accumulated in log space from the
    smallest logit up (no underflow however far the tail lies below the head)."""
    v = _sorted_desc(row)
    acc = np.logaddexp.accumulate(v[::-1])[::-1] if v.size else v
    return np.concatenate([acc, [-np.inf]])


def k_eps(logits, eps, return_tail=False):
    """Smallest k with tau(k) <= eps per row (docs/design.md §2), by scanning every k."""
    x, batch = _rows(logits)
    ee = _per_row(eps, batch, np.float64)
    ks = np.empty(x.shape[0], dtype=np.int64)
    taus = np.empty(x.shape[0])
    for i, (r, e) in enumerate(zip(x, ee)):
        ls = _log_suffix(r)
        log_tau = ls - ls[0]
        k = int(np.argmax(log_tau <= math.log(e)))  # log_tau[n] = -inf, so one exists
        ks[i] = k
        taus[i] = math.exp(log_tau[k])
    ks, taus = ks.reshape(batch), taus.reshape(batch)
    return (ks, taus) if return_tail else ks


def topk(logits, k):
    """Indices of the k largest logits per row: stable argsort of -x (ties to lower index)."""
    x = np.asarray(logits)
    order = np.argsort(-x.astype(np.float64), axis=-1, kind="stable")
    return order[..., :k].astype(np.int64)


# -------------------------------------------------------------- §2 certified bounds

def _bound_from_log_ratio(log_head_over_u):
    """U / (A + U) from log(A / U)."""
    return math.exp(-_softplus(log_head_over_u))


def _bound_rows(logits, k, inner):
    """Per-row bound: 1 for k = 0, 0 once every unmasked key is kept, else
    ``inner(v, k, n')`` on the row sorted in decreasing order."""
    x, batch = _rows(logits)
    kk = _per_row(k, batch, np.int64)
    out = np.empty(x.shape[0])
    for i, (r, k) in enumerate(zip(x, kk)):
        k, nl = int(k), _n_live(r)
        out[i] = 1.0 if k == 0 else 0.0 if k >= nl else inner(_sorted_desc(r), k, nl)
    return out.reshape(batch)


def gap_bound(logits, k, form="mass"):
    """Single-gap bound per row (docs/design.md §2), n' = number of unmasked keys."""
    def inner(v, k, nl):
        if form == "mass":
            # log A - log U with A = sum_{j<=k} e^{s_(j)}, U = (n'-k) e^{s_(k+1)}
            mh, lsh = _lse_parts(v[:k])
            return _bound_from_log_ratio((mh - v[k]) + lsh - math.log(nl - k))
        # A >= k e^{s_(k)}: log(A / U) >= log k - log(n'-k) + (s_(k) - s_(k+1))
        return _bound_from_log_ratio(math.log(k) - math.log(nl - k) + (v[k - 1] - v[k]))
    return _bound_rows(logits, k, inner)


def multigap_cuts(k, n_live, cuts=8, spacing="geometric"):
    """Segment ends m_1 < ... < m_J = n' after m_0 = k, as multigap_bound uses them.

    Integer ``cuts`` J: the j-th cut sits at ``k + ceil(span^(j/J))`` (geometric) or
    ``k + ceil(span * j / J)`` (linear), ``span = n' - k``, the last one at n'; cuts that do
    not advance are dropped and none goes past n'. An array of ranks: those in (k, n')
    are kept and n' is appended.
    """
    ends = []
    prev = k
    if isinstance(cuts, (int, np.integer)):
        span = float(n_live - k)
        for j in range(1, int(cuts) + 1):
            if prev >= n_live:
                break
            if spacing == "geometric":
                off = math.ceil(math.pow(span, float(j) / float(cuts)))
            else:
                off = math.ceil(span * float(j) / float(cuts))
            cut = n_live if j == cuts else k + int(off)
            if cut <= prev:
                continue
            cut = min(cut, n_live)
            ends.append(cut)
            prev = cut
    else:
        for c in np.asarray(cuts).tolist():
            if prev < c < n_live:
                ends.append(int(c))
                prev = int(c)
    if prev < n_live:
        ends.append(n_live)
    return ends


def multigap_bound(logits, k, cuts=8, spacing="geometric"):
    """Multi-gap bound per row (docs/design.md §2), cut ranks from :func:`multigap_cuts`."""
    def inner(v, k, nl):
        prev, terms = k, []
        for end in multigap_cuts(k, nl, cuts, spacing):
            # every logit of (prev, end] is <= s_(prev+1); terms relative to s_(k+1)
            terms.append(math.log(end - prev) + (v[prev] - v[k]))
            prev = end
        mh, lsh = _lse_parts(v[:k])
        return _bound_from_log_ratio((mh - v[k]) + lsh - _lse(np.array(terms)))
    return _bound_rows(logits, k, inner)


def block_bound(block_upper, block_sizes, kept_mass, scored_mass, log_space=False):
    """Blockwise bound ``1 - A / (Z_s + sum_b |B_b| e^{u_b})`` per row (docs/design.md §2)."""
    u = np.asarray(block_upper, dtype=np.float64)
    batch = u.shape[:-1]
    sizes = np.broadcast_to(np.asarray(block_sizes), u.shape).reshape(-1, u.shape[-1])
    u = u.reshape(-1, u.shape[-1])
    a = _per_row(kept_mass, batch, np.float64)
    z = _per_row(scored_mass, batch, np.float64)
    if not log_space:
        with np.errstate(divide="ignore"):
            a, z = np.log(a), np.log(z)
    out = np.empty(u.shape[0])
    for i in range(u.shape[0]):
        live = sizes[i] > 0
        log_u = _lse(np.log(sizes[i][live].astype(np.float64)) + u[i][live])
        log_z = np.logaddexp(z[i], log_u)
        out[i] = 1.0 if a[i] == -np.inf else -math.expm1(a[i] - log_z)
    return out.reshape(batch)


# ------------------------------------------------------------- §5, §6 statistics

def entropy(logits):
    """H(P) = -sum P_i log P_i in nats per row."""
    x, batch = _rows(logits)
    out = np.empty(x.shape[0])
    for i, r in enumerate(x):
        d = r[r > -np.inf]
        d = d - d.max()  # exact for the largest logit, so log P_max keeps its digits
        logp = d - math.log(np.sum(np.exp(d)))
        out[i] = -np.sum(np.exp(logp) * logp)
    return out.reshape(batch)


def effective_support(logits, threshold):
    """#{i : P_i >= threshold} per row."""
    x, batch = _rows(logits)
    t = _per_row(threshold, batch, np.float64)
    out = np.empty(x.shape[0], dtype=np.int64)
    for i, r in enumerate(x):
        m, ls = _lse_parts(r)
        p = np.exp((r - m) - ls)
        out[i] = np.count_nonzero(p >= t[i])
    return out.reshape(batch)


def fit_gaussian(logits):
    """Mean and sample standard deviation (ddof=1; 0 for one key) of the unmasked logits."""
    x, batch = _rows(logits)
    mu = np.empty(x.shape[0])
    sd = np.empty(x.shape[0])
    for i, r in enumerate(x):
        v = r[r > -np.inf]
        mu[i] = v.mean()
        sd[i] = v.std(ddof=1) if v.size > 1 else 0.0
    return mu.reshape(batch), sd.reshape(batch)


# ------------------------------------------------------------ §5 Gaussian model

def norm_cdf(x):
    """Phi(x) via scipy.special.ndtr."""
    from scipy import special
    return special.ndtr(np.asarray(x, dtype=np.float64))


def norm_sf(x):
    """Phi_c(x) = Phi(-x)."""
    from scipy import special
    return special.ndtr(-np.asarray(x, dtype=np.float64))


def norm_ppf(p):
    """Phi^{-1}(p) via scipy.special.ndtri."""
    from scipy import special
    return special.ndtri(np.asarray(p, dtype=np.float64))


def norm_isf(p):
    """Phi_c^{-1}(p) = -Phi^{-1}(p)."""
    from scipy import special
    return -special.ndtri(np.asarray(p, dtype=np.float64))


def gaussian_tail_mass(rho, sigma):
    """tau(rho) = Phi(Phi_c^{-1}(rho) - sigma) (docs/design.md §5)."""
    return norm_cdf(norm_isf(rho) - np.asarray(sigma, dtype=np.float64))


def gaussian_k_eps(n, sigma, eps):
    """The asymptotic rule n * Phi_c(sigma + Phi^{-1}(eps)) (docs/design.md §5)."""
    return np.asarray(n, dtype=np.float64) * norm_sf(np.asarray(sigma, dtype=np.float64)
                                                      + norm_ppf(eps))


def _mp():
    import mpmath
    mpmath.mp.dps = MP_DPS
    return mpmath


def mp_norm_sf(x):
    """Phi_c(x) as an mpf, x taken as the exact double it is."""
    mp = _mp()
    return mp.erfc(mp.mpf(float(x)) / mp.sqrt(2)) / 2


def mp_norm_cdf(x):
    """Phi(x) as an mpf."""
    return mp_norm_sf(-float(x))


def mp_norm_isf(p):
    """Phi_c^{-1}(p) as an mpf, by Newton steps on log Phi_c from a double start."""
    mp = _mp()
    p = mp.mpf(float(p))
    if p == 0:
        return mp.inf
    if p == 1:
        return -mp.inf
    if p > mp.mpf(1) / 2:
        return -_isf_newton(mp, 1 - p)
    return _isf_newton(mp, p)


def _isf_newton(mp, p):
    """x >= 0 with Phi_c(x) = p, 0 < p <= 1/2, for p as an mpf."""
    from scipy import special
    x = mp.mpf(float(-special.ndtri(float(p)))) if float(p) > 0 else mp.sqrt(-2 * mp.log(p))
    for _ in range(100):
        f = mp.erfc(x / mp.sqrt(2)) / 2
        # Newton on log Phi_c(x) = log p: well conditioned deep in the tail
        step = (mp.log(f) - mp.log(p)) * f / mp.npdf(x)
        x += step
        if abs(step) <= abs(x) * mp.mpf(10) ** (-MP_DPS + 5) + mp.mpf(10) ** (-MP_DPS + 5):
            break
    return x


def mp_norm_ppf(p):
    """Phi^{-1}(p) as an mpf."""
    return -mp_norm_isf(p)


def mp_gaussian_tail_mass(rho, sigma):
    """Phi(Phi_c^{-1}(rho) - sigma) as an mpf."""
    mp = _mp()
    z = mp_norm_isf(rho)
    return mp.erfc(-(z - mp.mpf(float(sigma))) / mp.sqrt(2)) / 2


def mp_gaussian_k_eps(n, sigma, eps):
    """n * Phi_c(sigma + Phi^{-1}(eps)) as an mpf."""
    mp = _mp()
    y = mp.mpf(float(sigma)) + mp_norm_ppf(eps)
    return mp.mpf(float(n)) * mp.erfc(y / mp.sqrt(2)) / 2


# -------------------------------------------------- §2 in high precision (mpmath)

def _mp_sorted_exp(row):
    """e^{s_(i)} of the sorted unmasked logits as mpfs (no shift: mpmath has no underflow)."""
    mp = _mp()
    v = _sorted_desc(np.asarray(row, dtype=np.float64))
    return [mp.exp(mp.mpf(float(s))) for s in v if s > -np.inf]


def mp_tv_curve(row):
    """tau(k) for k = 0..n of one row as a list of mpfs."""
    mp = _mp()
    n = np.asarray(row).shape[-1]
    e = _mp_sorted_exp(row)
    suffix = [mp.mpf(0)] * (n + 1)
    for i in range(len(e) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + e[i]
    return [s / suffix[0] for s in suffix]


def mp_tail_mass(row, k):
    """tau of the top-k set of one row as an mpf."""
    return mp_tv_curve(row)[int(k)]


def mp_log_tail_mass(row, k):
    """log tau of one row as an mpf (-inf when tau = 0)."""
    mp = _mp()
    t = mp_tail_mass(row, k)
    return mp.log(t) if t > 0 else -mp.inf


def mp_kl_truncated(row, k):
    """KL(P_k || P) = log(1 + tail / head) of one row as an mpf."""
    mp = _mp()
    e = _mp_sorted_exp(row)
    k = int(k)
    if k == 0:
        return mp.inf
    return mp.log1p(mp.fsum(e[k:]) / mp.fsum(e[:k]))


def mp_k_eps(row, eps):
    """(k_eps, tau(k_eps)) of one row, exact in mpmath arithmetic."""
    mp = _mp()
    e = mp.mpf(float(eps))
    curve = mp_tv_curve(row)
    for k, t in enumerate(curve):
        if t <= e:
            return k, t
    raise AssertionError("unreachable: tau(n) = 0")


# ---------------------------------------------------------------------- attention

def scores(Q, K, scale=None, mask=None):
    """float64 scores ``scale * Q K^T (+ mask)``, shape (..., L, n)."""
    Q = np.asarray(Q, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    if scale is None:
        scale = 1.0 / math.sqrt(Q.shape[-1])
    s = scale * np.matmul(Q, np.swapaxes(K, -1, -2))
    if mask is not None:
        s = s + np.asarray(mask, dtype=np.float64)
    return s


def _softmax(s):
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def attention(Q, K, V, scale=None, mask=None):
    """Dense softmax attention in float64."""
    return np.matmul(_softmax(scores(Q, K, scale, mask)), np.asarray(V, dtype=np.float64))


def _keep_mask(s, k):
    """Boolean (..., L, n): the top k[...] of every row (stable: ties to the lower index),
    never a masked key."""
    order = np.argsort(-s, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(s.shape[-1]), axis=-1)
    return (rank < np.asarray(k)[..., None]) & (s > -np.inf)


def topk_attention(Q, K, V, k=None, eps=None, scale=None, mask=None):
    """Top-k attention in float64; returns (out, k per row, tau per row)."""
    s = scores(Q, K, scale, mask)
    rows = s.shape[:-1]
    if k is None:
        k = k_eps(s, np.broadcast_to(eps, rows))
    k = np.minimum(np.broadcast_to(k, rows), (s > -np.inf).sum(axis=-1))
    keep = _keep_mask(s, k)
    P = _softmax(s)
    PS = np.where(keep, P, 0.0)
    out = np.matmul(PS / PS.sum(axis=-1, keepdims=True), np.asarray(V, dtype=np.float64))
    return out, k, tail_mass(s, k)


def attention_matrix_error(Q, K, k, scale=None, mask=None, norm="fro"):
    """(1/L) ||D_spar^-1 A_spar - D^-1 A|| from the full matrices (docs/design.md §6)."""
    s = scores(Q, K, scale, mask)
    k = np.minimum(np.broadcast_to(k, s.shape[:-1]), (s > -np.inf).sum(axis=-1))
    P = _softmax(s)
    PS = np.where(_keep_mask(s, k), P, 0.0)
    E = PS / PS.sum(axis=-1, keepdims=True) - P
    L = s.shape[-2]
    if norm == "rows":
        return np.sqrt((E * E).sum(axis=-1))
    if norm == "l1":
        return np.abs(E).sum(axis=(-1, -2)) / L
    return np.sqrt((E * E).sum(axis=(-1, -2))) / L
