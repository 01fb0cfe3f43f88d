"""The AttentionInterface path: transformers calls topkattn's attention function.

On transformers versions whose models dispatch attention through ``AttentionInterface``
(5.x and late 4.x), :func:`register` registers :func:`attention_function` (and a mask
function) under the name :data:`IMPLEMENTATION`; selecting it with
``model.set_attn_implementation`` routes every self-attention call of the model here. The
mask function delegates to the mask function of the implementation the model was using
(``eager`` or ``sdpa``), so the padding mask reaching the hook is exactly the stock one.
"""
from __future__ import annotations

import functools
import inspect
import sys

from .hooked import STATE_ATTR, run_certified, run_hooked
from .models import require_transformers

__all__ = ["IMPLEMENTATION", "register", "uses_interface", "install", "remove"]

#: Name under which the topkattn attention is registered with transformers.
IMPLEMENTATION = "topkattn"


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


def attention_function(module, query, key, value, attention_mask, scaling=None,
                         dropout=0.0, **kwargs):
    state = getattr(module, STATE_ATTR, None)
    base = getattr(module.config, "_topkattn_base", "eager")
    base_fn = _base_function(module, base)
    if state is None:  # a layer left out of `layers`
        return base_fn(module, query, key, value, attention_mask, scaling=scaling,
                       dropout=dropout, **kwargs)
    if dropout and module.training:
        raise RuntimeError("topkattn hooks run inference only: call model.eval() first")
    if state.mode == "topk" and state.certified is not None:
        if query.shape[2] == 1:     # a decode step: certified search on the layer's index
            return run_certified(state, query, key, value, attention_mask, scaling), None
        state.certified.drop()      # a prefill: the index is rebuilt at the next decode step
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

    out = run_hooked(state, query, key, value, attention_mask, scaling, stock)
    return out, None


def mask_function(*args, **kwargs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    config = kwargs.get("config")
    base = getattr(config, "_topkattn_mask_base", "eager")
    if getattr(config, "_topkattn_causal", False):
        # a materialised causal mask: sdpa would otherwise pass None and rely on is_causal
        kwargs["allow_is_causal_skip"] = False
    return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def register():
    """Register the attention (and mask) function once; False if transformers lacks it."""
    tr = require_transformers()
    iface = getattr(tr, "AttentionInterface", None)
    if iface is None:
        return False
    iface.register(IMPLEMENTATION, attention_function)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        pass
    else:
        AttentionMaskInterface.register(IMPLEMENTATION, mask_function)
    return True


def uses_interface(model, mods):
    """True when the model's self-attention dispatches through AttentionInterface."""
    if not register() or not getattr(model, "_supports_attention_backend", False):
        return False
    src_mod = sys.modules.get(type(mods[0]).__module__)
    try:
        src = inspect.getsource(type(mods[0]).forward)
    except (OSError, TypeError):
        return False
    return src_mod is not None and "ALL_ATTENTION_FUNCTIONS" in src


# Set on the model's config while the hook is installed: the implementation whose attention
# and mask functions the hook delegates to, and whether the model is a decoder.
_CONFIG_ATTRS = ("_topkattn_base", "_topkattn_mask_base", "_topkattn_causal")


def install(model, decoder):
    """Select :data:`IMPLEMENTATION` on ``model`` (after :func:`register`)."""
    config = model.config
    original = getattr(config, "_attn_implementation", None)
    base = original if original in ("eager", "sdpa") else "eager"
    config._topkattn_base = base
    # the stock mask format, so rows that are all padding get the stock treatment
    config._topkattn_mask_base = base
    config._topkattn_causal = decoder
    model.set_attn_implementation(IMPLEMENTATION)
    if config._attn_implementation != IMPLEMENTATION:
        raise RuntimeError(f"{type(model).__name__} did not accept "
                           f"set_attn_implementation({IMPLEMENTATION!r})")


def remove(model, original):
    """Select the ``original`` implementation again and clear the config."""
    config = model.config
    if config._attn_implementation != original and original is not None:
        model.set_attn_implementation(original)
    for attr in _CONFIG_ATTRS:
        if attr in vars(config):
            delattr(config, attr)
