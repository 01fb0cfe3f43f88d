"""What the hooks collect: :class:`Capture` (logits and Q/K/V of each layer) and
:class:`TopkRecord` (keys kept, tail mass, visible keys, entropy and precision per row)."""
from __future__ import annotations

import numpy as np

__all__ = ["Capture", "TopkRecord"]


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

    With ``selector="certified"`` each decode step also has, of shape ``(B, H, L)``:
    ``keys_scored[layer][i]`` (keys whose exact logit the certified search computed, of the
    n visible ones), ``bytes_read[layer][i]`` (bytes of the key side the search read:
    block summaries, int8 proxies, exact keys scored, kept positions; values not included)
    and ``tv_bound[layer][i]`` (the certificate: an upper bound on the row's
    ``TV(P, P_hat)``, at most eps). There ``k`` is the size of the certified kept set and
    ``tau`` its true discarded mass, computed for the record from every logit
    (``tau <= tv_bound``). Other calls (a prefill, other selectors) have None there.
    ``index_builds[layer]`` and ``index_appends[layer]`` count the decode steps that built
    the layer's key indexes from the cache and those that appended the new key to them.
    """

    def __init__(self, layers):
        self.layers = list(layers)
        self.k = {i: [] for i in self.layers}
        self.tau = {i: [] for i in self.layers}
        self.n = {i: [] for i in self.layers}
        self.entropy = {i: [] for i in self.layers}
        self.phase = {i: [] for i in self.layers}
        self.precision = {i: [] for i in self.layers}
        self.keys_scored = {i: [] for i in self.layers}
        self.bytes_read = {i: [] for i in self.layers}
        self.tv_bound = {i: [] for i in self.layers}
        self.index_builds = {i: 0 for i in self.layers}
        self.index_appends = {i: 0 for i in self.layers}

    def _store(self, layer, k, tau, n, entropy=None, phase=None, precision=None,
               keys_scored=None, bytes_read=None, tv_bound=None):
        self.k[layer].append(k)
        self.tau[layer].append(tau)
        self.n[layer].append(n)
        self.entropy[layer].append(entropy)
        self.phase[layer].append(phase)
        self.precision[layer].append(precision)
        self.keys_scored[layer].append(keys_scored)
        self.bytes_read[layer].append(bytes_read)
        self.tv_bound[layer].append(tv_bound)

    def summary(self):
        """A pandas DataFrame, one row per (layer, head) over every recorded query row.

        Columns: ``layer, head, rows, mean_n, mean_k, kept_fraction`` (sum k / sum n),
        ``mean_tau, max_tau, mean_entropy, mean_precision`` (NaN without an approximate
        selector), ``scored_fraction`` (sum keys_scored / sum n over the certified decode
        rows) and ``max_tv_bound`` (NaN without the certified selector). Rows with every
        key masked are left out.
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
            def per_head(arrays, fill=np.nan):
                return np.concatenate([(a if a is not None else np.full(e.shape, fill))
                                       .transpose(1, 0, 2).reshape(e.shape[1], -1)
                                       for a, e in zip(arrays, self.k[layer])], axis=1)
            pr = per_head(self.precision[layer])
            ks = per_head(self.keys_scored[layer])
            tvb = per_head(self.tv_bound[layer])
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
                                                else np.nan),
                             "scored_fraction": _fraction(ks[h][ok], n[h][ok]),
                             "max_tv_bound": (float(np.nanmax(tvb[h][ok]))
                                              if ok.any() and np.isfinite(tvb[h][ok]).any()
                                              else np.nan)})
        return pd.DataFrame.from_records(
            recs, columns=["layer", "head", "rows", "mean_n", "mean_k", "kept_fraction",
                           "mean_tau", "max_tau", "mean_entropy", "mean_precision",
                           "scored_fraction", "max_tv_bound"])


def _fraction(scored, n):
    """sum scored / sum n over the rows where scored is known (NaN if none)."""
    ok = np.isfinite(scored)
    return float(scored[ok].sum() / max(n[ok].sum(), 1)) if ok.any() else np.nan
