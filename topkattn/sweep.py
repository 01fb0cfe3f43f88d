"""Parameter sweep: empirical k_eps against the Gaussian design rule (DESIGN §2, §5).

For each cell ``(n, sigma)`` a *source* supplies rows of logits; for every eps the sweep
measures the oracle ``k_eps`` of each row, the tail mass tau left at it, and the two
certified bounds (single-gap, multi-gap) at the same k, and compares the median
``k_eps / n`` with the Gaussian rule evaluated at the row's fitted sigma.

Sources are registered in :data:`SOURCES`; a source is a function that yields batches
``(n, sigma, logits)`` with ``logits`` a float32 array of shape ``(m, n)``. A cell's rows
may arrive in several batches. Adding a source (e.g. attention rows captured from a
HuggingFace model) means writing one such generator and one entry in :data:`SOURCES`.
"""
from __future__ import annotations

import numbers
import sys
from collections import namedtuple

import numpy as np

from .core import fit_gaussian, gap_bound, gaussian_k_eps, k_eps, multigap_bound

__all__ = ["run", "SOURCES", "COLUMNS", "MULTIGAP_CUTS"]

#: Segments of the multi-gap bound (``topkattn.multigap_bound(..., cuts=MULTIGAP_CUTS)``).
MULTIGAP_CUTS = 8

#: Column name -> meaning, in the order of the DataFrame returned by :func:`run`.
COLUMNS = {
    "source": "where the logits came from",
    "n": "number of keys per row",
    "sigma": "standard deviation the logits were generated with",
    "sigma_fit": "mean over rows of the fitted (sample, ddof=1) standard deviation",
    "eps": "tail-mass budget",
    "k_eps_median": "median over rows of the oracle k_eps",
    "k_eps_q25": "25th percentile over rows of k_eps",
    "k_eps_q75": "75th percentile over rows of k_eps",
    "rho_median": "k_eps_median / n",
    "rho_rule": "asymptotic Gaussian rule gaussian_k_eps(n, sigma_fit, eps) / n",
    "rho_finite": "finite-n Gaussian predictor gaussian_k_eps(n, sigma_fit, eps, "
                  "finite_n=True) / n",
    "tau_at_k": "median over rows of the exact tail mass tau at the row's k_eps (<= eps)",
    "gap_bound_at_k": "median over rows of gap_bound(row, k_eps) (>= tau)",
    "multigap_bound_at_k": f"median over rows of multigap_bound(row, k_eps, "
                           f"cuts={MULTIGAP_CUTS}) (>= tau)",
}

# Logit values generated at once (float64 draws, then a float32 copy): bounds memory at
# about 48 MiB whatever n and rows are.
_CHUNK_VALUES = 1 << 22

_Source = namedtuple("_Source", ["batches", "total_rows", "description"])


# ----------------------------------------------------------------- sources

def _synthetic_batches(n_values, sigma_values, rows, seed):
    """i.i.d. N(0, sigma^2) rows, float32.

    The rows of length n come from ``default_rng([seed, n])`` as standard normals ``z``
    and every sigma uses ``sigma * z``: a cell depends only on (seed, n, sigma, rows),
    not on the rest of the grid, and the comparison across sigma is free of draw noise.
    """
    for n in n_values:
        rng = np.random.default_rng([seed, n])
        chunk = max(1, _CHUNK_VALUES // n)
        done = 0
        while done < rows:
            m = min(chunk, rows - done)
            # Drawn in row order, so the rows do not depend on the chunk size.
            z = rng.standard_normal((m, n))
            for sigma in sigma_values:
                yield n, sigma, (z * sigma).astype(np.float32)
            done += m


SOURCES = {
    "synthetic": _Source(
        batches=_synthetic_batches,
        total_rows=lambda n_values, sigma_values, rows: len(n_values) * len(sigma_values) * rows,
        description="i.i.d. N(0, sigma^2) logits, float32",
    ),
}


# ----------------------------------------------------------------- argument checks

def _as_list(value, name):
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {value!r}")
    arr = np.atleast_1d(np.asarray(value, dtype=object))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a number or a flat sequence of numbers")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    out = []
    for v in arr.tolist():
        if v not in out:  # repeated values would give repeated rows
            out.append(v)
    return out


def _check_ints(value, name, lo):
    vals = _as_list(value, name)
    out = []
    for v in vals:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must contain integers, got {v!r}")
        if v < lo:
            raise ValueError(f"{name} must contain integers >= {lo}, got {v}")
        out.append(int(v))
    return out


def _check_floats(value, name, ok, rule):
    vals = _as_list(value, name)
    out = []
    for v in vals:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must contain real numbers, got {v!r}")
        v = float(v)
        if not ok(v):
            raise ValueError(f"{name} must contain values {rule}, got {v!r}")
        out.append(v)
    return out


def _check_int(value, name, lo):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def _progress_bar(total, enabled):
    """A tqdm bar on stderr, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="row", desc="topkattn sweep", file=sys.stderr,
                leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------- the sweep

def run(source="synthetic", eps=(1e-1, 1e-2, 1e-3), n=(1024, 4096, 16384, 65536),
        sigma=(0.5, 1.0, 2.0, 3.0, 4.0), rows=64, seed=0, progress=True):
    r"""Measure k_eps, the tail mass and the certified bounds over a grid of (n, sigma, eps).

    For every cell ``(n, sigma)`` the source supplies ``rows`` rows of ``n`` logits. For
    each row and each eps the sweep computes the oracle ``k_eps`` (smallest k with tail
    mass ``tau(k) <= eps``, DESIGN §2), ``tau`` at that k, and the single-gap and
    multi-gap certified bounds at that k; it fits sigma per row (sample standard
    deviation). It then summarises each ``(n, sigma, eps)`` over the rows.

    The Gaussian predictions (DESIGN §5) are evaluated at the *fitted* sigma
    (``sigma_fit``), as the design rule prescribes for real rows whose sigma is unknown:
    ``rho_rule = gaussian_k_eps(n, sigma_fit, eps) / n`` and ``rho_finite`` the same with
    ``finite_n=True``.

    Parameters
    ----------
    source : str
        Where the logits come from; one of :data:`SOURCES`. ``"synthetic"``: i.i.d.
        ``N(0, sigma^2)`` logits stored as float32. Rows of length n are drawn from
        ``numpy.random.default_rng([seed, n])`` (one standard-normal draw of shape
        ``(rows, n)``, scaled by each sigma), so a cell's rows depend only on
        ``(seed, n, rows)`` and its sigma, not on the rest of the grid.
    eps : float or sequence of float
        Tail-mass budgets, each in (0, 1).
    n : int or sequence of int
        Row lengths, each >= 2.
    sigma : float or sequence of float
        Standard deviations of the generated logits, each finite and >= 0.
    rows : int
        Rows per (n, sigma) cell, >= 1.
    seed : int
        Non-negative seed.
    progress : bool
        Show a progress bar on stderr (only if ``tqdm`` is installed).

    Returns
    -------
    pandas.DataFrame
        One row per ``(n, sigma, eps)``, in the order the values were given (n outer,
        eps inner; repeated values are dropped), with the columns of :data:`COLUMNS`:
        ``source, n, sigma, sigma_fit, eps, k_eps_median, k_eps_q25, k_eps_q75,
        rho_median, rho_rule, rho_finite, tau_at_k, gap_bound_at_k,
        multigap_bound_at_k``. Quantiles use linear interpolation, so a median over an
        even number of rows can be a half-integer. The multi-gap bound uses
        ``cuts=MULTIGAP_CUTS`` geometric segments.

    Raises
    ------
    ValueError
        Unknown source, or a value out of range.
    TypeError
        A value of the wrong type (e.g. a float for ``rows``).

    Examples
    --------
    >>> from topkattn import sweep
    >>> df = sweep.run(n=[256], sigma=[1.0, 2.0], eps=[1e-2], rows=8, progress=False)
    >>> df[["n", "sigma", "eps"]].to_records(index=False).tolist()
    [(256, 1.0, 0.01), (256, 2.0, 0.01)]
    >>> bool((df.tau_at_k <= df.eps).all() and (df.gap_bound_at_k >= df.tau_at_k).all())
    True
    """
    if not isinstance(source, str) or source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; available sources: "
                         f"{', '.join(sorted(SOURCES))}")
    eps_v = _check_floats(eps, "eps", lambda v: 0.0 < v < 1.0, "in the open interval (0, 1)")
    n_v = _check_ints(n, "n", 2)
    sigma_v = _check_floats(sigma, "sigma", lambda v: np.isfinite(v) and v >= 0.0,
                            "finite and >= 0")
    rows = _check_int(rows, "rows", 1)
    seed = _check_int(seed, "seed", 0)
    pd = _pandas()
    src = SOURCES[source]

    # (n, sigma) -> lists of per-row arrays: fitted sigma, and per eps k, tau, bounds
    acc = {}
    eps_arr = np.asarray(eps_v)
    bar = _progress_bar(src.total_rows(n_v, sigma_v, rows), bool(progress))
    try:
        for cell_n, cell_sigma, x in src.batches(n_v, sigma_v, rows, seed):
            cell = acc.setdefault((cell_n, cell_sigma), {"sigma_fit": [], "k": [], "tau": [],
                                                         "gap": [], "multigap": []})
            _, s_fit = fit_gaussian(x)
            # One pass per eps: logits broadcast to (n_eps, m, n) without a copy.
            xb = np.broadcast_to(x, (len(eps_v),) + x.shape)
            k, tau = k_eps(xb, eps_arr[:, None], return_tail=True)
            gap = gap_bound(xb, k)
            mg = multigap_bound(xb, k, cuts=MULTIGAP_CUTS)
            cell["sigma_fit"].append(np.atleast_1d(s_fit))
            cell["k"].append(k)
            cell["tau"].append(tau)
            cell["gap"].append(gap)
            cell["multigap"].append(mg)
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        if bar is not None:
            bar.close()

    records = []
    for cell_n in n_v:
        for cell_sigma in sigma_v:
            cell = acc[(cell_n, cell_sigma)]
            s_fit = float(np.mean(np.concatenate(cell["sigma_fit"])))
            k = np.concatenate(cell["k"], axis=1)
            tau = np.concatenate(cell["tau"], axis=1)
            gap = np.concatenate(cell["gap"], axis=1)
            mg = np.concatenate(cell["multigap"], axis=1)
            q25, med, q75 = np.quantile(k, [0.25, 0.5, 0.75], axis=1)
            for j, e in enumerate(eps_v):
                records.append({
                    "source": source, "n": cell_n, "sigma": cell_sigma, "sigma_fit": s_fit,
                    "eps": e, "k_eps_median": med[j], "k_eps_q25": q25[j],
                    "k_eps_q75": q75[j], "rho_median": med[j] / cell_n,
                    "tau_at_k": float(np.median(tau[j])),
                    "gap_bound_at_k": float(np.median(gap[j])),
                    "multigap_bound_at_k": float(np.median(mg[j])),
                })

    df = pd.DataFrame.from_records(records)
    nn = df["n"].to_numpy(dtype=np.float64)
    sf = df["sigma_fit"].to_numpy()
    ee = df["eps"].to_numpy()
    df["rho_rule"] = np.asarray(gaussian_k_eps(nn, sf, ee), dtype=np.float64) / nn
    df["rho_finite"] = np.asarray(gaussian_k_eps(nn, sf, ee, finite_n=True),
                                  dtype=np.float64) / nn
    df = df[list(COLUMNS)]
    return df.astype({"n": np.int64, "k_eps_median": np.float64, "k_eps_q25": np.float64,
                      "k_eps_q75": np.float64})


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("topkattn.sweep needs pandas: pip install pandas") from None
    return pandas
