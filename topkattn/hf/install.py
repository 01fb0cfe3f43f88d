"""Installing hooks on a model and removing them: :func:`hooked`.

Picks the installation path -- :mod:`~topkattn.hf.interface` where the model dispatches
through AttentionInterface, :mod:`~topkattn.hf.wrapped` otherwise -- sets each hooked
module's :class:`~topkattn.hf.hooked.State`, and restores the original attention on
exit, also after an exception.
"""
from __future__ import annotations

import contextlib

from . import interface, wrapped
from .hooked import STATE_ATTR
from .models import attention_layers, model_kind

__all__ = ["hooked"]


@contextlib.contextmanager
def hooked(model, states):
    """Install ``states`` (module -> State) on ``model`` and restore everything on exit."""
    mods = list(states)
    if any(getattr(m, STATE_ATTR, None) is not None for m in attention_layers(model)):
        raise RuntimeError("this model is already hooked by topkattn; hooks do not nest")
    config = model.config
    decoder = model_kind(config) == "decoder"
    through_interface = interface.uses_interface(model, attention_layers(model))
    if decoder and not through_interface:
        raise ValueError(f"hooking the decoder-only {config.model_type!r} needs a transformers "
                         "version whose model dispatches attention through AttentionInterface "
                         "(tried: 4.57 and 5.23); this one does not")
    original_impl = getattr(config, "_attn_implementation", None)
    patched = []
    try:
        for m, s in states.items():
            setattr(m, STATE_ATTR, s)
        if through_interface:
            interface.install(model, decoder)
        else:
            wrapped.install(mods, patched)
        yield
    finally:
        wrapped.remove(patched)
        for m in mods:
            if hasattr(m, STATE_ATTR):
                delattr(m, STATE_ATTR)
        if through_interface:
            interface.remove(model, original_impl)
