#!/usr/bin/env python3
"""Fuzz target: certified search (KeyIndex, append, certified_search with "delta" and
"mc", certified_attention) on adversarial keys, queries and parameters, and the private
entry points (_core.index_order, index_fill, search) on index tuples with corrupted arrays.
Every certificate returned on a finite problem is checked against float64 scoring of all
keys (mpmath where float64 cannot decide).

    fuzz/run.sh search SECONDS
"""
import math
import sys

import numpy as np

import common
from common import Finding, accepted

tk = common.import_topkattn()
from topkattn import _core  # noqa: E402


def keys(fdp):
    """(H, n, d) keys: clustered, tied, huge/tiny norms, or an adversarial array."""
    c = fdp.ConsumeIntInRange(0, 5)
    if c == 0:  # (no huge extents: a search over 10^5 tied keys takes minutes under ASan)
        return common.array(fdp, max_elems=2048, huge_ok=False)
    H = fdp.ConsumeIntInRange(1, 2)
    n = fdp.ConsumeIntInRange(1, 200)
    d = fdp.ConsumeIntInRange(1, 12)
    rng = np.random.default_rng(fdp.ConsumeIntInRange(0, 2 ** 32 - 1))
    K = rng.standard_normal((H, n, d))
    if c == 1:  # clusters
        K = rng.standard_normal((H, 4, d))[:, rng.integers(0, 4, n)] * 3 + 0.1 * K
    elif c == 2:  # ties: few distinct keys
        K = K[:, rng.integers(0, min(n, 3), n)]
    elif c == 3:  # a scale from tiny to huge
        K = K * [1e-300, 1e-30, 1e-5, 1e5, 1e30, 1e100][fdp.ConsumeIntInRange(0, 5)]
    elif c == 4:  # values from the fuzzer
        K = common.values(fdp, H * n * d).reshape(H, n, d)
    if fdp.ConsumeBool():
        K = K.astype(np.float32)
    return K


def check(q, K, res, scale, eps):
    """Every row's certificate against the truth over all keys (float64, then mpmath)."""
    K = np.asarray(K, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    H, n, d = K.shape
    Q = q.reshape(H, -1, d)
    idx = res.indices.reshape(H, Q.shape[1], -1)
    kk = res.k.reshape(H, Q.shape[1])
    tvb = res.tv_bound.reshape(H, Q.shape[1])
    e = np.broadcast_to(np.asarray(eps, dtype=np.float64), res.k.shape).reshape(H, Q.shape[1])
    heads = range(H) if H <= 64 else np.linspace(0, H - 1, 64).astype(int)  # a cheap sample
    for h in heads:
        with np.errstate(all="ignore"):
            s = scale * (K[h] @ Q[h].T).T  # (L, n)
        for r in range(min(Q.shape[1], 64)):
            k = int(kk[h, r])
            kept = idx[h, r, :k]
            if not (1 <= k <= n and np.all((kept >= 0) & (kept < n))
                    and len(set(kept.tolist())) == k and np.all(idx[h, r, k:] == -1)):
                raise Finding(f"malformed kept set k={k} {idx[h, r].tolist()} (n={n})")
            if not 0 <= tvb[h, r] <= e[h, r]:
                raise Finding(f"tv_bound {tvb[h, r]!r} outside [0, eps={e[h, r]!r}]")
            row = s[r]
            if not np.all(np.isfinite(row)):
                continue
            mask = np.zeros(n, bool)
            mask[kept] = True
            ex = np.exp(row - row.max())
            tv = math.fsum(ex[~mask]) / math.fsum(ex)
            if common.exact_tv_bigger(tv, tvb[h, r], lambda: common.mp_tail(row, mask)):
                raise Finding(f"{res.method}: true TV {tv!r} above the certificate "
                              f"{tvb[h, r]!r} (k={k}, n={n})")


def corrupt(fdp, t):
    """The index tuple with one entry replaced by something adversarial."""
    t = list(t)
    i = fdp.ConsumeIntInRange(0, len(t) - 1)
    c = fdp.ConsumeIntInRange(0, 4)
    if c == 0:
        t[i] = None
    elif c == 1:
        t[i] = common.array(fdp, max_elems=512)
    elif c == 2 and isinstance(t[i], np.ndarray) and t[i].size:
        t[i] = t[i][..., ::-1] if fdp.ConsumeBool() else t[i].reshape(-1)
    elif c == 3:
        t[i] = common.int_param(fdp)
    else:
        t[i] = fdp.ConsumeIntInRange(-2 ** 63, 2 ** 63 - 1)
    return tuple(t)


def streaming(fdp):
    """The streaming Δk-Search (csrc/search.c, search_stream): it serves every "delta"
    search of an index with proxies (int8 or 4-bit) and use_proxy=True. Its branches want
    many blocks (the sample: the top 1/8 of the blocks by bound and every 8th block; blocks far below
    the level cut that are never read; the switch to scoring every key when the sample says
    most keys are candidates) and peaked queries (few candidates, several rounds of the
    cut). Keys: up to 1,500 per head in clusters, blocks of 1 to 64 keys (or one block past
    n), queries near a key times a gain; every certificate is checked against float64
    scoring of all keys."""
    H = fdp.ConsumeIntInRange(1, 2)
    n = fdp.ConsumeIntInRange(1, 1500)
    d = fdp.ConsumeIntInRange(1, 16)
    rng = np.random.default_rng(fdp.ConsumeIntInRange(0, 2 ** 32 - 1))
    ncl = fdp.ConsumeIntInRange(1, 64)
    spread = [0.01, 0.1, 0.5, 1.0][fdp.ConsumeIntInRange(0, 3)]
    K = rng.standard_normal((H, ncl, d))[:, rng.integers(0, ncl, n)] \
        + spread * rng.standard_normal((H, n, d))
    if fdp.ConsumeIntInRange(0, 3) == 0:  # some keys of a much larger norm, or exact ties
        K[:, rng.integers(0, n, max(n // 50, 1))] *= [10.0, 0.0, -1.0][fdp.ConsumeIntInRange(0, 2)]
    if fdp.ConsumeBool():
        K = K.astype(np.float32)
    bs = fdp.ConsumeIntInRange(1, 64) if fdp.ConsumeIntInRange(0, 7) else \
        [n, n + 1, 2 ** 40, 2 ** 63 - 1][fdp.ConsumeIntInRange(0, 3)]
    with accepted():
        index = tk.KeyIndex(K, block_size=bs, summary=["auto", "minmax", "ball"][
            fdp.ConsumeIntInRange(0, 2)], proxy=["int8", "int4"][fdp.ConsumeIntInRange(0, 1)],
            reorder=fdp.ConsumeIntInRange(0, 3) > 0)
        if fdp.ConsumeIntInRange(0, 3) == 0:  # appended keys: blocks of the unordered tail
            extra = fdp.ConsumeIntInRange(1, 300)
            index.append(rng.standard_normal((H, extra, d)) * spread
                         + K[:, rng.integers(0, n, extra)])
        Kfull = np.empty_like(index._keys[:, :index.n])
        np.put_along_axis(Kfull, index._perm[:, :index.n, None], index._keys[:, :index.n],
                          axis=1)
        L = fdp.ConsumeIntInRange(1, 3)
        gain = [0.3, 1.0, 3.0, 10.0, 30.0, 100.0][fdp.ConsumeIntInRange(0, 5)]
        pick = rng.integers(0, index.n, (H, L))
        q = np.take_along_axis(np.asarray(Kfull, dtype=np.float64), pick[..., None], axis=1)
        q = gain * (q + [0.0, 0.1, 1.0][fdp.ConsumeIntInRange(0, 2)]
                    * rng.standard_normal(q.shape))
        eps = [1e-1, 1e-2, 1e-4, 1e-8, 1e-14][fdp.ConsumeIntInRange(0, 4)]
        if fdp.ConsumeIntInRange(0, 3) == 0:  # per-row eps
            eps = np.exp(-rng.uniform(0.0, 30.0, (H, L)))
        scale = None if fdp.ConsumeBool() else [1.0, 0.1, 1e-3][fdp.ConsumeIntInRange(0, 2)]
        if fdp.ConsumeBool():
            res = tk.certified_search(q, index, eps, scale=scale)
        else:
            V = rng.standard_normal((H, index.n, fdp.ConsumeIntInRange(1, 3)))
            out, res = tk.certified_attention(q, index, V, eps, scale=scale, return_info=True)
            np.asarray(out).sum()
        sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
        check(q, Kfull, res, sc, eps)


def one(data):
    import atheris
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 2) == 0:
        streaming(fdp)
        return
    K = keys(fdp)
    which = fdp.ConsumeIntInRange(0, 3)
    with accepted():
        index = tk.KeyIndex(K, block_size=fdp.ConsumeIntInRange(0, 70) if fdp.ConsumeIntInRange(
                                0, 7) else common.int_param(fdp),
                            summary=["auto", "minmax", "ball", "x"][fdp.ConsumeIntInRange(0, 3)],
                            proxy=["int8", None, "int4"][fdp.ConsumeIntInRange(0, 2)],
                            reorder=fdp.ConsumeBool())
        if fdp.ConsumeBool():
            index.append(keys(fdp) if fdp.ConsumeIntInRange(0, 3) == 0 else
                         common.values(fdp, int(np.prod(index.batch_shape)) * 3 * index.d)
                         .reshape(index.batch_shape + (3, index.d)))
        # the keys in original positions (the index stores them reordered)
        Kfull = np.empty_like(index._keys[:, :index.n])
        np.put_along_axis(Kfull, index._perm[:, :index.n, None], index._keys[:, :index.n],
                          axis=1)
        d = index.d
        if which == 3:  # the private entry points with a corrupted index
            t = corrupt(fdp, index._tuple())
            c = fdp.ConsumeIntInRange(0, 2)
            if c == 0:
                _core.index_fill(t, fdp.ConsumeIntInRange(-2, 300))
            elif c == 1:
                _core.index_order(common.array(fdp, max_elems=1024), common.int_param(fdp))
            else:
                H = index._heads
                _core.search(t, np.zeros((H, 1, d)), 1.0, np.full(H, 0.1), 0, 0.0, 0, 16,
                             True, None)
            return
        L = fdp.ConsumeIntInRange(0, 4)
        shape = index.batch_shape + ((L,) if fdp.ConsumeBool() else ()) + (d,)
        if fdp.ConsumeIntInRange(0, 5) == 0:
            q = common.array(fdp, max_elems=256)
        else:
            q = common.values(fdp, int(np.prod(shape))).reshape(shape) * \
                [1.0, 3.0, 30.0, 1e-3][fdp.ConsumeIntInRange(0, 3)]
        eps = common.float_param(fdp) if fdp.ConsumeIntInRange(0, 3) == 0 else \
            [1e-2, 1e-6, 0.3, 1e-12][fdp.ConsumeIntInRange(0, 3)]
        method = ["delta", "mc", "x"][fdp.ConsumeIntInRange(0, 2)]
        delta = [1e-3, None, 0.5, 2.0][fdp.ConsumeIntInRange(0, 3)] if method != "delta" \
            else (None if fdp.ConsumeIntInRange(0, 5) else 0.1)
        scale = None if fdp.ConsumeBool() else common.float_param(fdp)
        kw = dict(method=method, delta=delta, scale=scale,
                  seed=fdp.ConsumeIntInRange(0, 2 ** 64 - 1) if fdp.ConsumeBool() else None,
                  mc_samples=fdp.ConsumeIntInRange(0, 300), use_proxy=fdp.ConsumeBool())
        if which == 0:
            res = tk.certified_search(q, index, eps, **kw)
        else:
            V = (common.array(fdp, max_elems=1024) if which == 2 else
                 np.random.default_rng(0).standard_normal(index.batch_shape + (index.n, 3)))
            out, res = tk.certified_attention(q, index, V, eps, return_info=True, **kw)
            np.asarray(out).sum()
        sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
        if method == "delta" or not res.certified_mc.any():
            check(q, Kfull, res, sc, eps)


if __name__ == "__main__":
    common.run(one, sys.argv)
