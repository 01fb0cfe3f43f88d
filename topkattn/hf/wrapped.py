"""The wrapped-forward path: for BERT models that do not dispatch through AttentionInterface.

On older transformers versions (BERT before 5) :func:`wrapped_forward` replaces the
``forward`` of each self-attention module with one that computes the per-head Q, K, V
itself and hands them to :func:`~topkattn.hf.hooked.run_hooked`.
"""
from __future__ import annotations

import inspect
import math

from .hooked import STATE_ATTR, run_hooked

__all__ = ["wrapped_forward", "install", "remove"]


def wrapped_forward(module, original):
    """A forward for an old-style BertSelfAttention that hands the scores to the hook."""
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
        state = getattr(module, STATE_ATTR)
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

        out = run_hooked(state, q, k, v, mask, scaling, stock)
        if result is not None:
            return result
        ctx = out.reshape(B, L, H * out.shape[-1])
        if old_style and not a.get("output_attentions"):
            return (ctx,)
        return ctx, None  # attention weights are not formed

    return forward


def install(modules, patched):
    """Wrap the forward of each module, appending it to ``patched`` once done."""
    for m in modules:
        m.forward = wrapped_forward(m, m.forward)
        patched.append(m)


def remove(patched):
    """Undo :func:`install` on the ``patched`` modules."""
    for m in patched:
        del m.forward  # the instance attribute; the class method shows again
