"""Installing hooks on a model and removing them: :func:`hooked`.

Picks the installation path -- :mod:`~topkattn.hf.interface` where the model dispatches
through AttentionInterface, :mod:`~topkattn.hf.wrapped` otherwise -- sets each hooked
module's :class:`~topkattn.hf.hooked.State`, and restores the original attention on
exit, also after an exception.
"""
from __future__ import annotations

import contextlib

from . import interface as _interface
from .hooked import STATE_ATTR
from .interface import IMPLEMENTATION
from .models import attention_layers, model_kind
from .wrapped import wrapped_forward

__all__ = ["hooked"]


@contextlib.contextmanager
def hooked(model, states):
    """Install ``states`` (module -> State) on ``model`` and restore everything on exit."""
    mods = list(states)
    if any(getattr(m, STATE_ATTR, None) is not None for m in attention_layers(model)):
        raise RuntimeError("this model is already hooked by topkattn; hooks do not nest")
    config = model.config
    decoder = model_kind(config) == "decoder"
    interface = _interface.uses_interface(model, attention_layers(model))
    if decoder and not interface:
        raise ValueError(f"hooking the decoder-only {config.model_type!r} needs a transformers "
                         "version whose model dispatches attention through AttentionInterface "
                         "(tried: 4.57 and 5.23); this one does not")
    original_impl = getattr(config, "_attn_implementation", None)
    patched = []
    try:
        for m, s in states.items():
            setattr(m, STATE_ATTR, s)
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
                m.forward = wrapped_forward(m, original)
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward  # the instance attribute; the class method shows again
        for m in mods:
            if hasattr(m, STATE_ATTR):
                delattr(m, STATE_ATTR)
        if interface:
            if config._attn_implementation != original_impl and original_impl is not None:
                model.set_attn_implementation(original_impl)
            for attr in ("_topkattn_base", "_topkattn_mask_base", "_topkattn_causal"):
                if attr in vars(config):
                    delattr(config, attr)
