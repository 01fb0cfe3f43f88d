"""Parameter sweep: empirical k_eps against the Gaussian design rule (docs/design.md §2, §5).

Two sources. ``"bert"`` (the default) captures the attention logits of every layer and head
of a pretrained BERT model (the built-in all-MiniLM-L6-v2 unless another is given, see
:mod:`topkattn.hf`) on real English text (the built-in :mod:`topkattn.corpus` unless texts
are given) and reports one row per (text, layer, head, query row, eps). ``"synthetic"``
draws i.i.d. Gaussian rows and reports one summary row per (n, sigma, eps).

A "bert" sweep is cut into tasks (runs of texts) that run in this process or on a Dask
cluster (``client=``), and can write its rows task by task to a resumable Parquet dataset
(``out=``, :class:`SweepDataset`) instead of returning them; the rows are the same either
way, whatever the number of workers.

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

from . import _sweepstore, corpus, hf
from .core import fit_gaussian, gap_bound, gaussian_k_eps, k_eps, multigap_bound

__all__ = ["run", "summarize", "prediction_errors", "open_dataset", "SweepDataset", "SOURCES",
           "COLUMNS", "BERT_COLUMNS", "SUMMARY_COLUMNS", "MULTIGAP_CUTS", "SYNTHETIC_DEFAULTS",
           "BERT_DEFAULT_TEXTS", "TASK_SIZE"]

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
        model=None, texts=None, layers=None, max_length=None, batch_size=8, progress=True,
        *, rows_per_head=None, task_size=None, out=None, resume=False, client=None,
        torch_threads=1):
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
        Non-negative seed: of the synthetic draws, and of the query rows that
        ``rows_per_head`` samples (the "bert" source is otherwise deterministic).
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
        BERT only: texts per forward pass (at most; long texts get fewer).
    progress : bool
        Show a progress bar on stderr (only if ``tqdm`` is installed): over rows for the
        synthetic source, over tasks for "bert".
    rows_per_head : int, optional
        BERT only: measure this many query rows per (text, layer, head) instead of all of
        them (a text with fewer tokens keeps all its rows). The rows of text ``i`` at
        ``(layer, head)`` are ``sorted(default_rng([seed, i, layer, head]).choice(T, R,
        replace=False))``: the same whatever the batching, the task split or the number
        of workers.
    task_size : int, optional
        BERT only: at most this many texts per task (default :data:`TASK_SIZE`). A task,
        the unit of work given to a worker and of the files written, is a run of
        consecutive forward batches (texts sorted by length), also capped at about 2 M
        logit cells and 4096 tokens. The split does not change the results.
    out : str or os.PathLike, optional
        BERT only: write the rows to this directory as a Parquet dataset (created if
        needed; it must be new or empty unless ``resume``) instead of returning them, and
        return a :class:`SweepDataset`. Needs ``pyarrow`` (the ``dist`` extra). The rows
        are written task by task (one file per task and layer, each written under a
        temporary name and renamed), a manifest records finished tasks, and ``_run.json``
        the configuration, package versions and timing.
    resume : bool
        BERT with ``out`` only: continue the sweep already in ``out`` (it must have been
        started with the same texts and settings): finished tasks are kept, the others
        run. A finished sweep is returned as it is.
    client : dask.distributed.Client, optional
        BERT only: run the tasks on this Dask cluster (needs the ``dist`` extra); each
        worker loads the model once (``model`` must then be None or a name or path, which
        every worker must be able to load) and keeps it. With ``out``, workers write the
        files themselves, so ``out`` must be a directory they can all reach. A worker that
        dies mid-task has its task run again by another. Results are identical to the
        in-process run for any number of workers.
    torch_threads : int
        BERT only: torch threads of the forward passes, in this process for the duration
        of the sweep (the previous setting is restored after it) and in each worker (where
        the topkattn core gets as many). torch's logits can differ in the last bit between
        thread counts, so a sweep fixes the count to give the same rows wherever it runs.
        Default 1: run one worker process per core.

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
    SweepDataset
        ``"bert"`` with ``out``: the dataset in ``out``; open its rows with
        :meth:`SweepDataset.to_pandas` (the same DataFrame as without ``out``),
        :meth:`SweepDataset.dataset` (a ``pyarrow.dataset.Dataset``, to scan in batches)
        or any Parquet reader (``dask.dataframe.read_parquet(out)``), and summarise it with
        :func:`summarize` in bounded memory.

    Raises
    ------
    ValueError
        Unknown source, a value out of range, or an option of the other source.
    TypeError
        A value of the wrong type (e.g. a float for ``rows``).
    ImportError
        ``"bert"`` without the ``hf`` extra installed; ``out`` or ``client`` without the
        ``dist`` extra.
    FileExistsError
        ``out`` holds another sweep or other files and ``resume`` is False.

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
        if resume and out is None:
            raise ValueError("resume applies to a sweep written to a directory (out=)")
        return _run_bert(eps_v, model, texts, layers, max_length, batch_size, progress, seed,
                         rows_per_head, task_size, out, resume, client, torch_threads)
    given = [nm for nm, v in (("model", model), ("texts", texts), ("layers", layers),
                              ("max_length", max_length), ("rows_per_head", rows_per_head),
                              ("task_size", task_size), ("out", out),
                              ("client", client)) if v is not None]
    if resume:
        given.append("resume")
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

# A task (the unit of work of a distributed sweep, and of a Parquet file per layer) is a run
# of consecutive forward batches holding at most ``task_size`` texts, at most this many
# logit cells (sum of T^2 over its texts; bounds a task's time) and at most this many
# tokens (sum of T; bounds its rows: 12 heads x 6 layers x 3 eps x 4096 tokens is about
# 0.9 M rows, ~110 MB of columns, for MiniLM at every query row).
_TASK_CELLS = 4 * _BERT_BATCH_CELLS
_TASK_TOKENS = 4096

#: Default maximum number of texts per task of a "bert" sweep (``task_size``).
TASK_SIZE = 64


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


def _plan(lengths, batch_size, task_size):
    """Forward batches (lists of text indices, ascending lengths) grouped into tasks.

    Depends only on the lengths, batch_size and task_size, never on who runs the tasks:
    the same texts always share a forward pass, so every worker count gives the same
    logits.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur = [], []
    for i in order:  # ascending lengths: the last text of a batch is its longest
        if cur and (len(cur) == batch_size
                    or (len(cur) + 1) * lengths[i] ** 2 > _BERT_BATCH_CELLS):
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    tasks, cur, texts_in, cells, tokens = [], [], 0, 0, 0
    for b in batches:
        b_cells = sum(lengths[i] ** 2 for i in b)
        b_tokens = sum(lengths[i] for i in b)
        if cur and (texts_in + len(b) > task_size or cells + b_cells > _TASK_CELLS
                    or tokens + b_tokens > _TASK_TOKENS):
            tasks.append(cur)
            cur, texts_in, cells, tokens = [], 0, 0, 0
        cur.append(b)
        texts_in += len(b)
        cells += b_cells
        tokens += b_tokens
    tasks.append(cur)
    return tasks


def _sampled_rows(T, rows_per_head, seed, text, layers, heads):
    """Query rows of each (layer, head) of a text: None for all of them, else an int64
    array (n_layers, heads, rows_per_head) of sorted distinct rows drawn from
    ``default_rng([seed, text, layer, head])``."""
    if rows_per_head is None or T <= rows_per_head:
        return None
    idx = np.empty((len(layers), heads, rows_per_head), dtype=np.int64)
    for a, layer in enumerate(layers):
        for h in range(heads):
            rng = np.random.default_rng([seed, text, layer, h])
            idx[a, h] = np.sort(rng.choice(T, rows_per_head, replace=False))
    return idx


def _compute_task(mdl, tok, spec, task):
    """The result rows of one task: {text index: dict of column arrays}, each text's rows
    in (layer, head, row, eps) order (the columns of BERT_COLUMNS except "source")."""
    sel = spec["layers"]
    eps_arr = np.asarray(spec["eps"], dtype=np.float64)
    n_eps = eps_arr.size
    heads = int(mdl.config.num_attention_heads)
    out = {}
    for batch in task["batches"]:
        idx = [i for i, _, _ in batch]
        enc = tok([t for _, t, _ in batch], truncation=True, max_length=spec["max_length"],
                  padding=True, return_tensors="pt")
        cap = hf.capture(mdl, enc, layers=sel)
        for b, (i, _, T) in enumerate(batch):
            real = int(enc["attention_mask"][b].sum())
            if real != T:
                raise RuntimeError(f"text {i}: {real} tokens, the plan says {T} (was the "
                                   "model or tokenizer changed?)")
            rows = _sampled_rows(T, spec["rows_per_head"], spec["seed"], i, sel, heads)
            if rows is None:
                x = np.stack([cap.logits[layer][b, :, :T, :T] for layer in sel])
                row_ids = np.broadcast_to(np.arange(T, dtype=np.int64)[None, None, :],
                                          (len(sel), heads, T))
            else:
                x = np.stack([np.take_along_axis(cap.logits[layer][b, :, :T, :T],
                                                 rows[a][:, :, None], axis=1)
                              for a, layer in enumerate(sel)])
                row_ids = rows
            _, s_fit = fit_gaussian(x)                       # (nl, H, R)
            xb = np.broadcast_to(x, (n_eps,) + x.shape)
            k, tau = k_eps(xb, eps_arr.reshape(-1, 1, 1, 1), return_tail=True)
            gap = gap_bound(xb, k)
            mg = multigap_bound(xb, k, cuts=MULTIGAP_CUTS)
            shape = x.shape[:-1] + (n_eps,)   # row order: layer, head, query row, eps
            size = int(np.prod(shape))

            def grid(a):
                return np.broadcast_to(a, shape).ravel()

            cols = {
                "text": np.full(size, i, dtype=np.int64),
                "layer": grid(np.asarray(sel, dtype=np.int64)[:, None, None, None]),
                "head": grid(np.arange(heads, dtype=np.int64)[None, :, None, None]),
                "row": grid(row_ids[..., None]),
                "n": np.full(size, T, dtype=np.int64),
                "eps": grid(eps_arr[None, None, None, :]),
                "sigma_fit": grid(s_fit[..., None]),
            }
            for name, a in (("k_eps", k), ("tau_at_k", tau), ("gap_bound_at_k", gap),
                            ("multigap_bound_at_k", mg)):
                cols[name] = np.moveaxis(a, 0, -1).ravel()
            nn = cols["n"].astype(np.float64)
            cols["rho"] = cols["k_eps"] / nn
            cols["rho_rule"] = np.asarray(gaussian_k_eps(nn, cols["sigma_fit"], cols["eps"]),
                                          dtype=np.float64) / nn
            cols["rho_finite"] = np.asarray(gaussian_k_eps(nn, cols["sigma_fit"], cols["eps"],
                                                           finite_n=True),
                                            dtype=np.float64) / nn
            out[i] = cols
        del cap
    return out


def _frame(blocks):
    """The DataFrame of BERT_COLUMNS from {text index: columns}, in text order."""
    pd = _pandas()
    keys = sorted(blocks)
    data = {c: np.concatenate([blocks[i][c] for i in keys]) for c in BERT_COLUMNS
            if c != "source"}
    df = pd.DataFrame(data)
    df.insert(0, "source", "bert")
    return df


def _run_bert(eps_v, model, texts, layers, max_length, batch_size, progress, seed=0,
              rows_per_head=None, task_size=None, out=None, resume=False, client=None,
              torch_threads=1):
    if client is not None and not (model is None or isinstance(model, (str, os.PathLike))):
        raise TypeError("with a client, model must be None or a name or path (each worker "
                        "loads the model itself), not a loaded model")
    mdl, tok, texts, max_length, batch_size = _bert_inputs(model, texts, max_length,
                                                           batch_size)
    if rows_per_head is not None:
        rows_per_head = _check_int(rows_per_head, "rows_per_head", 1)
    task_size = TASK_SIZE if task_size is None else _check_int(task_size, "task_size", 1)
    torch_threads = _check_int(torch_threads, "torch_threads", 1)
    seed = _check_int(seed, "seed", 0)
    sel = hf.layer_indices(layers, len(hf.attention_layers(mdl)))
    lengths = [len(ids) for ids in
               tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    plan = _plan(lengths, batch_size, task_size)
    tasks = [{"id": t, "batches": [[(i, texts[i], lengths[i]) for i in b] for b in bs],
              "cost": sum(lengths[i] ** 2 for b in bs for i in b)}
             for t, bs in enumerate(plan)]
    spec = {"model": None if model is None or isinstance(model, tuple) else os.fspath(model),
            "eps": list(eps_v), "layers": list(sel), "max_length": max_length,
            "rows_per_head": rows_per_head, "seed": seed, "threads": torch_threads,
            "out": None, "compute": _compute_task, "columns": list(BERT_COLUMNS)}
    if out is None:
        blocks = {}
        with _sweepstore.torch_threads(torch_threads, client is None):
            for res in _sweepstore.execute(tasks, spec, client, (mdl, tok), progress, None):
                blocks.update(res["blocks"])
        return _frame(blocks)
    config = {"source": "bert", "model": _sweepstore.model_name(model),
              "eps": list(eps_v), "layers": list(sel), "max_length": max_length,
              "batch_size": batch_size, "task_size": task_size,
              "rows_per_head": rows_per_head, "seed": seed, "torch_threads": torch_threads,
              "texts": len(texts),
              "texts_sha256": _sweepstore.texts_digest(texts),
              "multigap_cuts": MULTIGAP_CUTS, "tasks": len(tasks),
              "expected_rows": _sweepstore.expected_rows(lengths, len(sel),
                                                         int(mdl.config.num_attention_heads),
                                                         len(eps_v), rows_per_head)}
    store = _sweepstore.Store.open(out, config, resume)
    spec["out"] = store.root
    done = store.finished()
    todo = [t for t in tasks if t["id"] not in done]
    store.begin(workers=_sweepstore.describe_client(client), threads=torch_threads,
                todo=len(todo))
    try:
        with _sweepstore.torch_threads(torch_threads, client is None):
            for res in _sweepstore.execute(todo, spec, client, (mdl, tok), progress,
                                           len(tasks) - len(todo)):
                store.record(res)
    except BaseException:
        store.end(complete=False)
        raise
    store.end(complete=True)
    return SweepDataset(store.root)


_SUMMARY_INPUT = ("n", "rho", "rho_rule", "rho_finite", "sigma_fit", "tau_at_k",
                  "gap_bound_at_k", "multigap_bound_at_k")


def _summary_record(layer, eps, g):
    rho = g["rho"].to_numpy()
    tau = g["tau_at_k"].to_numpy()
    pos = tau > 0
    q25, med, q75 = np.quantile(rho, [0.25, 0.5, 0.75])
    return {
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
    }


def _summary_frame(recs):
    pd = _pandas()
    out = pd.DataFrame.from_records(recs, columns=list(SUMMARY_COLUMNS))
    return out.sort_values(["layer", "eps"], ascending=[True, False], kind="stable") \
        .reset_index(drop=True)


def summarize(df):
    """Condense a ``run(source="bert")`` result per (layer, eps).

    Parameters
    ----------
    df : pandas.DataFrame, SweepDataset, str or os.PathLike
        With the columns of :data:`BERT_COLUMNS`, or a sweep's dataset (or its
        directory), which is read one (layer, eps) group at a time: only that layer's
        files and that eps's row groups, and only the columns the summary needs.

    Returns
    -------
    pandas.DataFrame
        One row per (layer, eps), sorted by layer then decreasing eps, with the columns
        of :data:`SUMMARY_COLUMNS`. Bound ratios are taken over rows with ``tau > 0``
        (a row that keeps every key has tau = 0 and both bounds 0); NaN if there is none.
        A dataset gives the same values as the DataFrame of the same sweep.
    """
    if isinstance(df, (str, os.PathLike)):
        df = open_dataset(df)
    if isinstance(df, SweepDataset):
        return df.summarize()
    missing = [c for c in BERT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"df lacks the columns {missing} of a 'bert' sweep")
    recs = [_summary_record(layer, eps, g)
            for (layer, eps), g in df.groupby(["layer", "eps"], sort=True)]
    return _summary_frame(recs)


# ----------------------------------------------------------------- the dataset of a sweep

def open_dataset(path):
    """The dataset a ``run(source="bert", out=path)`` sweep wrote.

    Parameters
    ----------
    path : str or os.PathLike
        The ``out`` directory (for ``topkattn sweep``: ``OUT/dataset``).

    Returns
    -------
    SweepDataset

    Raises
    ------
    FileNotFoundError
        ``path`` holds no sweep.
    ImportError
        pyarrow is not installed.
    """
    return SweepDataset(path)


class SweepDataset:
    """The rows of a "bert" sweep stored as a Parquet dataset (what :func:`run` returns
    with ``out``).

    The directory holds ``layer=L/part-TTTTT.parquet`` files (hive partitioning by layer:
    one file per task and layer, one row group per eps, so a per-layer or per-eps read
    touches only that layer's files and that eps's row groups), ``_run.json`` (the
    configuration, package versions, sessions with their timing, per-worker peak
    memory) and ``_manifest.jsonl`` (one line per finished task). The files have the
    columns of :data:`BERT_COLUMNS` except ``source`` (always "bert") and ``layer`` (the
    partition key).

    Parameters
    ----------
    path : str or os.PathLike
        The dataset directory.

    Attributes
    ----------
    path : str
        Absolute path of the directory.
    metadata : dict
        The contents of ``_run.json``.
    """

    def __init__(self, path):
        _sweepstore.require_pyarrow()
        self.path = os.path.abspath(os.fspath(path))
        self.metadata = _sweepstore.read_run(self.path)

    def __repr__(self):
        return (f"SweepDataset({self.path!r}, rows={self.rows}, "
                f"complete={self.complete})")

    @property
    def config(self):
        """dict: the sweep's settings (model, eps, layers, texts, tasks, ...)."""
        return self.metadata["config"]

    @property
    def complete(self):
        """bool: every task has finished and the row count is the expected one."""
        return bool(self.metadata.get("complete"))

    @property
    def rows(self):
        """int: rows of the finished tasks."""
        return int(sum(r["rows"] for r in _sweepstore.read_manifest(self.path).values()))

    def dataset(self):
        """The rows as a ``pyarrow.dataset.Dataset`` (``layer`` an int64 partition
        column), for scanning in batches with filters and column selection."""
        import pyarrow as pa
        import pyarrow.dataset as ds
        part = ds.partitioning(pa.schema([("layer", pa.int64())]), flavor="hive")
        schema = _sweepstore.file_schema(list(BERT_COLUMNS))
        return ds.dataset(self.path, format="parquet", partitioning=part,
                          schema=schema.append(pa.field("layer", pa.int64())))

    def _filter(self, layers, eps):
        import pyarrow.dataset as ds
        expr = None
        for name, values in (("layer", layers), ("eps", eps)):
            if values is None:
                continue
            values = [values] if np.isscalar(values) else list(values)
            e = ds.field(name).isin(values)
            expr = e if expr is None else expr & e
        return expr

    def to_pandas(self, layers=None, eps=None):
        """The rows as the DataFrame :func:`run` returns without ``out``.

        Parameters
        ----------
        layers, eps : scalar or sequence, optional
            Read only these layers / eps values (default all).

        Returns
        -------
        pandas.DataFrame
            Columns :data:`BERT_COLUMNS`, rows in (text, layer, head, row, eps) order,
            eps in the order the sweep was given them.
        """
        table = self.dataset().to_table(filter=self._filter(layers, eps))
        df = table.to_pandas()
        pos = {e: j for j, e in enumerate(self.config["eps"])}
        order = np.lexsort((df["eps"].map(pos).to_numpy(), df["row"].to_numpy(),
                            df["head"].to_numpy(), df["layer"].to_numpy(),
                            df["text"].to_numpy()))
        df = df.iloc[order].reset_index(drop=True)
        df.insert(0, "source", "bert")
        return df[list(BERT_COLUMNS)]

    def summarize(self):
        """:func:`summarize` of the rows, reading one (layer, eps) group at a time.

        Returns
        -------
        pandas.DataFrame
            Columns :data:`SUMMARY_COLUMNS`; peak memory is that of one group's eight
            input columns (about 64 bytes a row), not of the whole dataset.
        """
        data = self.dataset()
        recs = []
        for layer in self.config["layers"]:
            for e in self.config["eps"]:
                g = data.to_table(columns=list(_SUMMARY_INPUT),
                                  filter=self._filter([layer], [e])).to_pandas()
                if len(g):
                    recs.append(_summary_record(layer, e, g))
                del g
        return _summary_frame(recs)

    def rho_histograms(self, bins):
        """Histogram and exact median of k_eps/n over all rows, per eps, in bounded memory.

        Parameters
        ----------
        bins : array_like
            Bin edges (``numpy.histogram``).

        Returns
        -------
        dict
            eps -> (counts, median): int64 counts of shape ``(len(bins) - 1,)`` and the
            median of ``rho`` (computed from the distinct values, k_eps / n, and their
            counts).
        """
        data = self.dataset()
        out = {}
        for e in self.config["eps"]:
            counts = np.zeros(len(bins) - 1, dtype=np.int64)
            values, freq = np.empty(0), np.empty(0, dtype=np.int64)
            for batch in data.to_batches(columns=["rho"], filter=self._filter(None, [e])):
                rho = batch.column(0).to_numpy()
                counts += np.histogram(rho, bins=bins)[0]
                u, c = np.unique(rho, return_counts=True)
                values, inv = np.unique(np.concatenate([values, u]), return_inverse=True)
                freq = np.bincount(inv, weights=np.concatenate([freq, c]),
                                   minlength=len(values)).astype(np.int64)
            total = int(freq.sum())
            if total == 0:
                continue
            cum = np.cumsum(freq)
            lo = values[np.searchsorted(cum, (total - 1) // 2, side="right")]
            hi = values[np.searchsorted(cum, total // 2, side="right")]
            out[e] = (counts, float(np.mean([lo, hi])))
        return out


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
