"""Parameter sweep: empirical k_eps against the Gaussian design rule (docs/design.md §2, §5).

Two sources. ``"bert"`` (the default) captures the attention logits of every layer and head
of a pretrained BERT model (the built-in all-MiniLM-L6-v2 unless another is given, see
:mod:`topkattn.hf`) on real English text (the built-in :mod:`topkattn.corpus` unless texts
are given) and reports one row per (text, layer, head, query row, eps). ``"synthetic"``
draws i.i.d. Gaussian rows and reports one summary row per (n, sigma, eps).

Synthetic: for each cell ``(n, sigma)`` a generator supplies rows of logits; for every eps the sweep
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
import os
import sys
from collections import namedtuple

import numpy as np

from . import corpus, hf
from .core import fit_gaussian, gap_bound, gaussian_k_eps, k_eps, multigap_bound

__all__ = ["run", "summarize", "prediction_errors", "SOURCES", "COLUMNS", "BERT_COLUMNS",
           "SUMMARY_COLUMNS", "MULTIGAP_CUTS", "SYNTHETIC_DEFAULTS", "BERT_DEFAULT_TEXTS"]

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

#: Columns of the DataFrame returned by ``run(source="bert")``, one row per
#: (text, layer, head, query row, eps).
BERT_COLUMNS = {
    "source": "'bert'",
    "text": "index of the text in the list of texts",
    "layer": "layer index (0 = first)",
    "head": "head index",
    "row": "query position in the text's tokens (0 = [CLS])",
    "n": "number of keys of the row (the text's tokens, padding excluded)",
    "eps": "tail-mass budget",
    "k_eps": "oracle k_eps of the row",
    "rho": "k_eps / n",
    "sigma_fit": "fitted (sample, ddof=1) standard deviation of the row's logits",
    "rho_rule": "Gaussian rule Phi_c(sigma_fit + Phi^{-1}(eps)) = gaussian_k_eps(n, sigma_fit, "
                "eps) / n",
    "rho_finite": "finite-n Gaussian predictor gaussian_k_eps(n, sigma_fit, eps, "
                  "finite_n=True) / n",
    "tau_at_k": "exact tail mass tau at k_eps (<= eps)",
    "gap_bound_at_k": "gap_bound(row, k_eps) (>= tau)",
    "multigap_bound_at_k": f"multigap_bound(row, k_eps, cuts={MULTIGAP_CUTS}) (>= tau)",
}

#: Columns of :func:`summarize` (one row per layer and eps of a "bert" sweep).
SUMMARY_COLUMNS = {
    "layer": "layer index",
    "eps": "tail-mass budget",
    "rows": "query rows (over texts and heads)",
    "n_mean": "mean number of keys per row",
    "rho_median": "median of k_eps / n",
    "rho_q25": "25th percentile of k_eps / n",
    "rho_q75": "75th percentile of k_eps / n",
    "rho_rule_median": "median of the Gaussian rule's k_eps / n",
    "rho_finite_median": "median of the finite-n predictor's k_eps / n",
    "sigma_fit_median": "median fitted sigma",
    "tau_median": "median tau at k_eps",
    "gap_ratio_median": "median of gap_bound / tau at k_eps over rows with tau > 0",
    "multigap_ratio_median": "median of multigap_bound / tau at k_eps over rows with tau > 0",
}

#: Grid of the synthetic source when n, sigma or rows are not given.
SYNTHETIC_DEFAULTS = {"n": (1024, 4096, 16384, 65536), "sigma": (0.5, 1.0, 2.0, 3.0, 4.0),
                      "rows": 64}

#: Number of built-in corpus texts the "bert" source uses when no texts are given.
BERT_DEFAULT_TEXTS = 32

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


#: Registered sources of logits: name -> (batches, total_rows, description).
SOURCES = {
    "bert": _Source(
        batches=None, total_rows=None,
        description="attention logits of a pretrained BERT model on real English text",
    ),
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

def run(source="bert", eps=(1e-1, 1e-2, 1e-3), n=None, sigma=None, rows=None, seed=0,
        model=None, texts=None, layers=None, max_length=None, batch_size=8, progress=True):
    r"""Measure k_eps, the tail mass and the certified bounds on real or synthetic logits.

    For each row of logits and each eps the sweep computes the oracle ``k_eps`` (smallest
    k with tail mass ``tau(k) <= eps``, docs/design.md §2), ``tau`` at that k, and the single-gap
    and multi-gap certified bounds at that k; it fits sigma per row (sample standard
    deviation). The Gaussian predictions (docs/design.md §5) are evaluated at the *fitted* sigma,
    as the design rule prescribes for rows whose sigma is unknown:
    ``rho_rule = gaussian_k_eps(n, sigma_fit, eps) / n = Phi_c(sigma_fit + Phi^{-1}(eps))``
    and ``rho_finite`` the same with ``finite_n=True``.

    Parameters
    ----------
    source : str
        One of :data:`SOURCES`.

        ``"bert"``: the pre-softmax attention logits of every layer and head of a BERT
        model on real text, captured with :func:`topkattn.hf.capture` (padding excluded:
        a row of a text of T tokens has n = T keys). Needs the ``hf`` extra. One result
        row per (text, layer, head, query row, eps), columns :data:`BERT_COLUMNS`.

        ``"synthetic"``: i.i.d. ``N(0, sigma^2)`` logits stored as float32. Rows of
        length n are drawn from ``numpy.random.default_rng([seed, n])`` (one
        standard-normal draw of shape ``(rows, n)``, scaled by each sigma), so a cell's
        rows depend only on ``(seed, n, rows)`` and its sigma, not on the rest of the
        grid. One result row per (n, sigma, eps), columns :data:`COLUMNS`.
    eps : float or sequence of float
        Tail-mass budgets, each in (0, 1).
    n : int or sequence of int, optional
        Synthetic only: row lengths, each >= 2 (default ``SYNTHETIC_DEFAULTS["n"]``).
    sigma : float or sequence of float, optional
        Synthetic only: standard deviations, each finite and >= 0 (default
        ``SYNTHETIC_DEFAULTS["sigma"]``).
    rows : int, optional
        Synthetic only: rows per (n, sigma) cell, >= 1 (default 64).
    seed : int
        Synthetic only: non-negative seed (the "bert" source is deterministic).
    model : None, str, path or (model, tokenizer), optional
        BERT only: ``None`` for the built-in all-MiniLM-L6-v2, a name or directory for
        :func:`topkattn.hf.load_model`, or an already loaded ``(model, tokenizer)``.
    texts : None, int or sequence of str, optional
        BERT only: the texts; ``None`` for :data:`BERT_DEFAULT_TEXTS` texts of the
        built-in corpus, an int for that many (:func:`topkattn.corpus.texts`).
    layers : int or sequence of int, optional
        BERT only: layers to measure (default all).
    max_length : int, optional
        BERT only: truncate texts to this many tokens (default: the model's maximum).
    batch_size : int
        BERT only: texts per forward pass.
    progress : bool
        Show a progress bar on stderr (only if ``tqdm`` is installed).

    Returns
    -------
    pandas.DataFrame
        ``"synthetic"``: one row per ``(n, sigma, eps)``, in the order the values were
        given (n outer, eps inner; repeated values are dropped), with the columns of
        :data:`COLUMNS`. Quantiles use linear interpolation, so a median over an even
        number of rows can be a half-integer.
        ``"bert"``: one row per ``(text, layer, head, row, eps)`` in that order, with the
        columns of :data:`BERT_COLUMNS`; :func:`summarize` condenses it per layer and eps.
        The multi-gap bound uses ``cuts=MULTIGAP_CUTS`` geometric segments.

    Raises
    ------
    ValueError
        Unknown source, a value out of range, or an option of the other source.
    TypeError
        A value of the wrong type (e.g. a float for ``rows``).
    ImportError
        ``"bert"`` without the ``hf`` extra installed.

    Examples
    --------
    >>> from topkattn import sweep
    >>> df = sweep.run("synthetic", n=[256], sigma=[1.0, 2.0], eps=[1e-2], rows=8,
    ...                progress=False)
    >>> df[["n", "sigma", "eps"]].to_records(index=False).tolist()
    [(256, 1.0, 0.01), (256, 2.0, 0.01)]
    >>> bool((df.tau_at_k <= df.eps).all() and (df.gap_bound_at_k >= df.tau_at_k).all())
    True
    """
    if not isinstance(source, str) or source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; available sources: "
                         f"{', '.join(sorted(SOURCES))}")
    eps_v = _check_floats(eps, "eps", lambda v: 0.0 < v < 1.0, "in the open interval (0, 1)")
    if source == "bert":
        given = [nm for nm, v in (("n", n), ("sigma", sigma), ("rows", rows)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to source='synthetic' only; the "
                             "'bert' source takes model, texts, layers and max_length")
        return _run_bert(eps_v, model, texts, layers, max_length, batch_size, progress)
    given = [nm for nm, v in (("model", model), ("texts", texts), ("layers", layers),
                              ("max_length", max_length)) if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to source='bert' only")
    n_v = _check_ints(SYNTHETIC_DEFAULTS["n"] if n is None else n, "n", 2)
    sigma_v = _check_floats(SYNTHETIC_DEFAULTS["sigma"] if sigma is None else sigma, "sigma",
                            lambda v: np.isfinite(v) and v >= 0.0, "finite and >= 0")
    rows = _check_int(SYNTHETIC_DEFAULTS["rows"] if rows is None else rows, "rows", 1)
    seed = _check_int(seed, "seed", 0)
    return _run_synthetic(eps_v, n_v, sigma_v, rows, seed, progress)


def _run_synthetic(eps_v, n_v, sigma_v, rows, seed, progress):
    source = "synthetic"
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


# ----------------------------------------------------------------- the "bert" source

# Logits held at once while capturing: texts per forward pass are limited so that
# batch * L * L stays under this (times layers * heads * 4 bytes: about 150 MiB for
# MiniLM's 6 x 12).
_BERT_BATCH_CELLS = 1 << 19


def _bert_inputs(model, texts, max_length, batch_size):
    if model is None or isinstance(model, (str, os.PathLike)):
        mdl, tok = hf.load_model(model)
    elif isinstance(model, tuple) and len(model) == 2:
        mdl, tok = model
    else:
        raise TypeError("model must be None, a name or path, or a (model, tokenizer) pair, "
                        f"got {type(model).__name__}")
    if texts is None:
        texts = corpus.texts(BERT_DEFAULT_TEXTS)
    elif isinstance(texts, numbers.Integral) and not isinstance(texts, bool):
        texts = corpus.texts(_check_int(texts, "texts", 1))
    elif isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be None, an int or a sequence of strings")
    texts = list(texts)
    if not texts or not all(t.strip() for t in texts):
        raise ValueError("texts must be a non-empty sequence of non-empty strings")
    limit = min(int(getattr(tok, "model_max_length", 512) or 512),
                int(mdl.config.max_position_embeddings))
    if max_length is None:
        max_length = limit
    max_length = _check_int(max_length, "max_length", 2)
    if max_length > limit:
        raise ValueError(f"max_length must be <= {limit} (the model's maximum), "
                         f"got {max_length}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    return mdl, tok, texts, max_length, batch_size


def _run_bert(eps_v, model, texts, layers, max_length, batch_size, progress):
    pd = _pandas()
    mdl, tok, texts, max_length, batch_size = _bert_inputs(model, texts, max_length,
                                                           batch_size)
    sel = hf.layer_indices(layers, len(hf.attention_layers(mdl)))
    lengths = [len(ids) for ids in
               tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    heads = int(mdl.config.num_attention_heads)
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches, cur = [], []
    for i in order:  # ascending lengths: the last text of a batch is its longest
        if cur and (len(cur) == batch_size
                    or (len(cur) + 1) * lengths[i] ** 2 > _BERT_BATCH_CELLS):
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)

    eps_arr = np.asarray(eps_v)
    n_eps = len(eps_v)
    per_text = {}
    bar = _progress_bar(sum(lengths) * heads * len(sel), bool(progress))
    try:
        for idx in batches:
            enc = tok([texts[i] for i in idx], truncation=True, max_length=max_length,
                      padding=True, return_tensors="pt")
            cap = hf.capture(mdl, enc, layers=sel)
            for b, i in enumerate(idx):
                T = lengths[i]
                x = np.stack([cap.logits[layer][b, :, :T, :T] for layer in sel])
                _, s_fit = fit_gaussian(x)                       # (nl, H, T)
                xb = np.broadcast_to(x, (n_eps,) + x.shape)
                k, tau = k_eps(xb, eps_arr.reshape(-1, 1, 1, 1), return_tail=True)
                gap = gap_bound(xb, k)
                mg = multigap_bound(xb, k, cuts=MULTIGAP_CUTS)
                per_text[i] = (T, s_fit, k, tau, gap, mg)
                if bar is not None:
                    bar.update(T * heads * len(sel))
            del cap
    finally:
        if bar is not None:
            bar.close()

    cols = {c: [] for c in ("text", "layer", "head", "row", "n", "eps", "k_eps",
                            "sigma_fit", "tau_at_k", "gap_bound_at_k",
                            "multigap_bound_at_k")}
    nl = len(sel)
    for i in range(len(texts)):
        T, s_fit, k, tau, gap, mg = per_text[i]
        shape = (nl, heads, T, n_eps)   # row order: layer, head, query row, eps

        def grid(a):
            return np.broadcast_to(a, shape).ravel()

        cols["text"].append(np.full(int(np.prod(shape)), i, dtype=np.int64))
        cols["layer"].append(grid(np.asarray(sel, dtype=np.int64)[:, None, None, None]))
        cols["head"].append(grid(np.arange(heads, dtype=np.int64)[None, :, None, None]))
        cols["row"].append(grid(np.arange(T, dtype=np.int64)[None, None, :, None]))
        cols["n"].append(np.full(int(np.prod(shape)), T, dtype=np.int64))
        cols["eps"].append(grid(eps_arr[None, None, None, :]))
        cols["sigma_fit"].append(grid(s_fit[..., None]))
        for name, a in (("k_eps", k), ("tau_at_k", tau), ("gap_bound_at_k", gap),
                        ("multigap_bound_at_k", mg)):
            cols[name].append(np.moveaxis(a, 0, -1).ravel())
    data = {c: np.concatenate(v) for c, v in cols.items()}
    nn = data["n"].astype(np.float64)
    data["rho"] = data["k_eps"] / nn
    data["rho_rule"] = np.asarray(gaussian_k_eps(nn, data["sigma_fit"], data["eps"]),
                                  dtype=np.float64) / nn
    data["rho_finite"] = np.asarray(gaussian_k_eps(nn, data["sigma_fit"], data["eps"],
                                                   finite_n=True), dtype=np.float64) / nn
    df = pd.DataFrame({c: data[c] for c in BERT_COLUMNS if c != "source"})
    df.insert(0, "source", "bert")
    return df


def summarize(df):
    """Condense a ``run(source="bert")`` result per (layer, eps).

    Parameters
    ----------
    df : pandas.DataFrame
        With the columns of :data:`BERT_COLUMNS`.

    Returns
    -------
    pandas.DataFrame
        One row per (layer, eps), sorted by layer then decreasing eps, with the columns
        of :data:`SUMMARY_COLUMNS`. Bound ratios are taken over rows with ``tau > 0``
        (a row that keeps every key has tau = 0 and both bounds 0); NaN if there is none.
    """
    pd = _pandas()
    missing = [c for c in BERT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"df lacks the columns {missing} of a 'bert' sweep")
    recs = []
    for (layer, eps), g in df.groupby(["layer", "eps"], sort=True):
        rho = g["rho"].to_numpy()
        tau = g["tau_at_k"].to_numpy()
        pos = tau > 0
        q25, med, q75 = np.quantile(rho, [0.25, 0.5, 0.75])
        recs.append({
            "layer": int(layer), "eps": float(eps), "rows": len(g),
            "n_mean": float(g["n"].mean()), "rho_median": med, "rho_q25": q25,
            "rho_q75": q75, "rho_rule_median": float(g["rho_rule"].median()),
            "rho_finite_median": float(g["rho_finite"].median()),
            "sigma_fit_median": float(g["sigma_fit"].median()),
            "tau_median": float(np.median(tau)),
            "gap_ratio_median": float(np.median(g["gap_bound_at_k"].to_numpy()[pos]
                                                / tau[pos])) if pos.any() else np.nan,
            "multigap_ratio_median": float(np.median(g["multigap_bound_at_k"].to_numpy()[pos]
                                                     / tau[pos])) if pos.any() else np.nan,
        })
    out = pd.DataFrame.from_records(recs, columns=list(SUMMARY_COLUMNS))
    return out.sort_values(["layer", "eps"], ascending=[True, False], kind="stable") \
        .reset_index(drop=True)


def prediction_errors(df):
    """How far the Gaussian predictors are from the empirical k_eps/n of a synthetic sweep.

    Parameters
    ----------
    df : pandas.DataFrame
        ``run(source="synthetic")`` output (the columns of :data:`COLUMNS`).

    Returns
    -------
    pandas.DataFrame
        Columns ``n, sigma, eps, rho_median, rho_rule, rho_finite`` of ``df`` and
        ``err_rule``, ``err_finite``: (predicted - empirical) / empirical.
    """
    t = df[["n", "sigma", "eps", "rho_median", "rho_rule", "rho_finite"]].copy()
    t["err_rule"] = (df["rho_rule"] - df["rho_median"]) / df["rho_median"]
    t["err_finite"] = (df["rho_finite"] - df["rho_median"]) / df["rho_median"]
    return t


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("topkattn.sweep needs pandas: pip install pandas") from None
    return pandas
