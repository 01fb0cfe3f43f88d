"""Capturing a model's attention logits (and Q, K, V) per layer: :func:`capture`."""
from __future__ import annotations

from collections.abc import Mapping

from .hooked import State
from .install import hooked
from .models import require_torch, selected_layers
from .records import Capture

__all__ = ["capture"]


def _run_model(model, inputs):
    torch = require_torch()
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, torch.Tensor):
            return model(inputs)
    raise TypeError("inputs must be a tokenizer output (a mapping such as BatchEncoding) "
                    f"or a tensor of input ids, got {type(inputs).__name__}")


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
    mods, sel = selected_layers(model, layers)
    cap = Capture(sel, bool(qkv))
    states = {mods[i]: State("capture", i, cap, qkv=bool(qkv)) for i in sel}
    with hooked(model, states):
        cap.output = _run_model(model, inputs)
    return cap
