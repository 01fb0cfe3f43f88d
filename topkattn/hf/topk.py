"""Running a model with certified Top-k attention: :func:`use_topk_attention`."""
from __future__ import annotations

import contextlib
import numbers

import numpy as np

from .certified import CertifiedLayer, Session, cache_pre_hook
from .hooked import State
from .install import hooked
from .models import model_kind, selected_layers
from .records import TopkRecord

__all__ = ["use_topk_attention", "selection"]


def selection(eps, k, ratio, alpha=None, C=None):
    """The kept-set rule of :func:`use_topk_attention` as a one-entry dict (eps, k, ratio
    or dynamic), checked."""
    dyn = None if alpha is None and C is None else (alpha, C)
    given = [nm for nm, v in (("eps", eps), ("k", k), ("ratio", ratio), ("alpha/C", dyn))
             if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of eps, k, ratio or alpha/C, got "
                         + (", ".join(given) if given else "none"))
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
            raise ValueError(f"eps must be a number in the open interval (0, 1), got {eps!r}")
        return {"eps": float(eps)}
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k must be an integer, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return {"k": int(k)}
    if dyn is not None:
        for name, v in (("alpha", alpha), ("C", C)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a number (the dynamic window "
                                f"k = ceil(alpha * n**C) needs both), got {v!r}")
        if not alpha > 0 or not 0 <= C <= 1:
            raise ValueError(f"the dynamic window needs alpha > 0 and C in [0, 1], got "
                             f"alpha={alpha!r}, C={C!r}")
        return {"dynamic": (float(alpha), float(C))}
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    return {"ratio": float(ratio)}


@contextlib.contextmanager
def use_topk_attention(model, eps=None, k=None, ratio=None, layers=None, record=False, *,
                       alpha=None, C=None, prefill="topk", sink=0, recent=0,
                       selector="exact", precision=None, block_size=64, seed=None):
    """Run ``model``'s self-attention as certified Top-k attention inside the block.

    Each query row of each hooked layer keeps the keys chosen by exactly one of:

    * ``eps``: the smallest top set whose discarded softmax mass is ``tau <= eps`` -- the
      attention distribution used is within total variation ``eps`` of the dense one;
    * ``k``: the k highest-scoring keys (clipped to the row's visible keys);
    * ``ratio``: ``ceil(ratio * n)`` keys, n = the row's visible (unmasked) keys;
    * ``alpha`` and ``C``: the dynamic window ``k = ceil(alpha * n**C)``
      (:func:`topkattn.dynamic_k`, docs/design.md §6).

    The attention is computed by the C core (:func:`topkattn.topk_attention`, or
    :func:`topkattn.attention` over the kept set when sink/recent keys are forced in). The
    original attention implementation is restored on exit, also on an exception. Query rows
    whose keys are all masked are computed by the model's own attention.

    Decoder-only models (:data:`DECODER_MODEL_TYPES`, grouped-query attention included)
    are hooked at every call: the prefill (query length L > 1) and each decode step of
    ``model.generate`` (L = 1, keys = the cache). Their causal mask is honoured.

    Parameters
    ----------
    model : a supported transformers model, in eval mode
    eps, k, ratio : float, int, float
    alpha, C : float
        Exactly one of eps, k, ratio or the pair (alpha, C).
    layers : int or sequence of int, optional
        Layers to run with Top-k attention (default all); the others stay dense.
    record : bool
        Yield a :class:`TopkRecord` collecting k, tau, n and entropy per query row.
    prefill : {"topk", "dense"}
        Calls with more than one query row (a decoder's prefill, or any encoder call): with
        Top-k attention, or with the model's own dense attention.
    sink, recent : int >= 0
        Always keep the first ``sink`` and the last ``recent`` visible keys of every row
        (attention sinks and a local window); with ``eps`` the top set of the other keys
        is cut so that the total tail outside the kept set is still <= eps; with
        k / ratio / alpha, C the forced keys count towards k.

    selector : {"exact", "simulated", "blocks", "certified"}
        ``"exact"`` (default) keeps the exact top set. The approximate selectors keep a set
        of the same size k as the exact one (docs/design.md §6), to study how retrieval precision
        relates to quality: ``"simulated"`` keeps a fraction ``precision`` of the exact set
        (at random, ``seed``) and fills the rest uniformly from the other visible keys;
        ``"blocks"`` visits blocks of ``block_size`` consecutive keys by decreasing
        min/max-summary bound (the certified-search block bound, docs/design.md §4) until they hold
        k keys and keeps the k best scored of them. With ``record=True`` the measured
        precision ``|S_approx ∩ S_exact| / k`` of every row is recorded; tau is then the
        mass the approximate set discards (not bounded by eps).

        ``selector="certified"`` (decoder-only models, ``eps`` only) runs every decode step
        (query length L = 1) through certified search (docs/design.md §4): each hooked
        layer keeps one :class:`topkattn.KeyIndex` per batch item with an index per
        key/value head (the query heads of a group share it), built from the KV cache at the
        first decode step of a sequence and appended with each new key after that, and
        every row runs :func:`topkattn.certified_attention` on it (one call for all heads):
        only part of the cache is scored and
        the row's kept set carries a certificate ``TV(P, P_hat) <= tv_bound <= eps``.
        Calls with L > 1 (the prefill) follow ``prefill``. The index is rebuilt whenever
        the call does not continue the indexed sequence (another cache object, a batch size
        change, a cache shorter or longer than the index plus the new key, a changed last
        key), so a stale index is never searched. Padding: each sequence must see one
        contiguous range of keys at a decode step (left padding and static caches do);
        other masks, and masks that add finite biases, are refused with a ValueError. With
        ``record=True`` the record also holds keys scored, bytes read and ``tv_bound`` per
        row, and ``tau`` is the kept set's true discarded mass.
    precision : float in [0, 1]
        For ``selector="simulated"``.
    block_size : int
        For ``selector="blocks"``, and the ``KeyIndex`` block size for
        ``selector="certified"`` (default 64).
    seed : int, optional
        Seed of the simulated selector's random choices.

    Yields
    ------
    TopkRecord or None

    Examples
    --------
    >>> from topkattn import hf
    >>> model, tok = hf.load_model()  # doctest: +SKIP
    >>> with hf.use_topk_attention(model, eps=1e-2, record=True) as rec:  # doctest: +SKIP
    ...     out = model(**tok(["Sparse attention, certified."], return_tensors="pt"))
    >>> rec.summary().kept_fraction.mean() < 1  # doctest: +SKIP
    True

    A decoder generating with certified search at every decode step:

    >>> with hf.use_topk_attention(llama, eps=1e-2, selector="certified",
    ...                            record=True) as rec:  # doctest: +SKIP
    ...     out = llama.generate(input_ids=ids, max_new_tokens=32)
    >>> rec.summary()[["layer", "head", "scored_fraction", "max_tv_bound"]]  # doctest: +SKIP
    """
    select = selection(eps, k, ratio, alpha, C)
    if prefill not in ("topk", "dense"):
        raise ValueError(f"prefill must be 'topk' or 'dense', got {prefill!r}")
    for name, v in (("sink", sink), ("recent", recent)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {v!r}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if selector not in ("exact", "simulated", "blocks", "certified"):
        raise ValueError("selector must be 'exact', 'simulated', 'blocks' or 'certified', got "
                         f"{selector!r}")
    if selector == "certified":
        for name, v in (("k", k), ("ratio", ratio), ("alpha", alpha), ("C", C)):
            if v is not None:
                raise ValueError(f"selector='certified' takes eps only (it certifies "
                                 f"TV <= eps), got {name}={v!r}")
        if model_kind(model.config) != "decoder":
            raise ValueError("selector='certified' runs the decode steps of decoder-only "
                             f"models; {model.config.model_type!r} is not one")
    if selector != "exact" and (sink or recent):
        raise ValueError("sink/recent keys are only supported with selector='exact'")
    if selector == "simulated":
        if precision is None or not (0.0 <= float(precision) <= 1.0):
            raise ValueError("selector='simulated' needs precision in [0, 1], got "
                             f"{precision!r}")
    elif precision is not None:
        raise ValueError("precision is only used with selector='simulated'")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) \
            or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    mods, sel = selected_layers(model, layers)
    rec = TopkRecord(sel) if record else None
    rng = np.random.default_rng(seed)
    session = Session(block_size) if selector == "certified" else None
    states = {mods[i]: State("topk", i, rec, select=select, prefill=prefill,
                              sink_keys=int(sink), recent_keys=int(recent), selector=selector,
                              precision=float(precision) if precision is not None else 1.0,
                              block_size=int(block_size), rng=rng,
                              certified=CertifiedLayer(session) if session else None)
              for i in sel}
    with contextlib.ExitStack() as stack:
        if session is not None:
            for m, st in states.items():
                stack.callback(m.register_forward_pre_hook(cache_pre_hook(st.certified),
                                                           with_kwargs=True).remove)
        with hooked(model, states):
            yield rec
