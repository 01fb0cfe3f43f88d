"""What certified Top-k attention does to a model: :func:`evaluate`."""
from __future__ import annotations

import math
import numbers

import numpy as np

from .models import require_torch, selected_layers
from .topk import selection, use_topk_attention

__all__ = ["evaluate", "EVALUATE_LAYER_COLUMNS", "EVALUATE_MODEL_COLUMNS", "MLM_STRIDE"]


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
    import pandas as pd
    eps_list = _eps_list(eps)
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a non-empty sequence of strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    mods, sel = selected_layers(model, layers)
    batches = _batches(model, tokenizer, texts, max_length, int(batch_size))
    full = [_forward(model, enc) for enc, _ in batches]
    layer_recs, model_recs = [], []
    for e in eps_list:
        tally = _Tally(sel)
        with use_topk_attention(model, eps=e, layers=sel, record=True) as rec:
            for (enc, chosen), ref in zip(batches, full):
                tally.add(enc, chosen, ref, _forward(model, enc), rec)
        layer_recs.extend(tally.layer_records(e))
        last = len(mods) - 1
        drift_last = (tally.drift(last) if last in sel
                      else _drift_last(full, batches, model, e, sel))
        model_recs.append(tally.model_record(e, drift_last))
    return (pd.DataFrame.from_records(layer_recs, columns=list(EVALUATE_LAYER_COLUMNS)),
            pd.DataFrame.from_records(model_recs, columns=list(EVALUATE_MODEL_COLUMNS)))


def _eps_list(eps):
    eps_list = [eps] if isinstance(eps, numbers.Real) else list(eps)
    if not eps_list:
        raise ValueError("eps must not be empty")
    for e in eps_list:
        selection(e, None, None)
    return eps_list


def _batches(model, tokenizer, texts, max_length, batch_size):
    """Tokenized batches ``(encoding, [MASK] positions or None)``; a masked-language model
    gets every MLM_STRIDE-th real token masked."""
    torch = require_torch()
    mlm = getattr(model, "get_output_embeddings", lambda: None)() is not None
    kw = {"truncation": True, "padding": True, "return_tensors": "pt"}
    if max_length is not None:
        kw["max_length"] = int(max_length)
    batches = []
    for s in range(0, len(texts), batch_size):
        enc = dict(tokenizer(list(texts[s:s + batch_size]), **kw))
        chosen = None
        if mlm:
            enc, chosen = _mask_tokens(torch, enc, tokenizer)
        batches.append((enc, chosen))
    return batches


def _forward(model, enc):
    """(hidden states, logits or None) of one batch."""
    torch = require_torch()
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return out.hidden_states, getattr(out, "logits", None)


def _relative(num, den):
    return math.sqrt(num / den) if den > 0 else float("nan")


class _Tally:
    """The sums behind one eps's rows of both tables, batch by batch."""

    def __init__(self, layers):
        self.layers = layers
        self.num = {i: 0.0 for i in layers}     # squared hidden-state drift
        self.den = {i: 0.0 for i in layers}     # squared hidden-state norm
        self.stats = {i: {"rows": 0, "n": 0, "k": 0, "tau": 0.0} for i in layers}
        self.cos, self.agree, self.masked = [], 0, 0

    def add(self, enc, chosen, full, topk, rec):
        torch = require_torch()
        (h_full, lg_full), (h_top, lg_top) = full, topk
        am = enc["attention_mask"].bool()
        for i in self.layers:   # hidden_states[0] is the embedding output
            a, b = h_top[i + 1][am], h_full[i + 1][am]
            self.num[i] += float(((a - b) ** 2).sum())
            self.den[i] += float((b ** 2).sum())
        w = am.unsqueeze(-1).to(h_full[-1].dtype)
        ef = (h_full[-1] * w).sum(1) / w.sum(1)
        et = (h_top[-1] * w).sum(1) / w.sum(1)
        self.cos.extend(torch.nn.functional.cosine_similarity(et, ef, dim=-1).tolist())
        if chosen is not None and lg_full is not None:
            self.agree += int((lg_top.argmax(-1)[chosen] == lg_full.argmax(-1)[chosen]).sum())
            self.masked += int(chosen.sum())
        qmask = am.numpy()[:, None, :]          # real query rows
        for i in self.layers:
            k = rec.k[i][-1]
            valid = np.broadcast_to(qmask, k.shape) & (rec.n[i][-1] > 0)
            st = self.stats[i]
            st["rows"] += int(valid.sum())
            st["n"] += int(rec.n[i][-1][valid].sum())
            st["k"] += int(k[valid].sum())
            st["tau"] = max(st["tau"], float(rec.tau[i][-1][valid].max(initial=0)))

    def drift(self, layer):
        return _relative(self.num[layer], self.den[layer])

    def layer_records(self, e):
        out = []
        for i in self.layers:
            st = self.stats[i]
            out.append({
                "eps": float(e), "layer": i, "rows": st["rows"],
                "n_mean": st["n"] / max(st["rows"], 1), "k_mean": st["k"] / max(st["rows"], 1),
                "kept_fraction": st["k"] / max(st["n"], 1), "tau_max": st["tau"],
                "hidden_drift": self.drift(i),
            })
        return out

    def model_record(self, e, drift_last):
        kk = sum(self.stats[i]["k"] for i in self.layers)
        nn = sum(self.stats[i]["n"] for i in self.layers)
        return {
            "eps": float(e), "kept_fraction": kk / max(nn, 1), "hidden_drift_last": drift_last,
            "cosine_mean": float(np.mean(self.cos)), "cosine_min": float(np.min(self.cos)),
            "mlm_top1_agreement": self.agree / self.masked if self.masked else float("nan"),
        }


def _drift_last(full, batches, model, e, sel):
    """Relative drift of the last hidden state when the last layer itself is not hooked."""
    num = den = 0.0
    with use_topk_attention(model, eps=e, layers=sel):
        for (enc, _), (h_full, _) in zip(batches, full):
            h = _forward(model, enc)[0][-1]
            am = enc["attention_mask"].bool()
            num += float(((h[am] - h_full[-1][am]) ** 2).sum())
            den += float((h_full[-1][am] ** 2).sum())
    return _relative(num, den)
