#!/usr/bin/env python3
"""Fuzz target: certified search (KeyIndex, append, certified_search with "delta" and
"mc", certified_attention) on adversarial keys, queries and parameters, and the private
entry points (_core.index_order, index_fill, search) on index tuples with corrupted arrays.
Every certificate returned on a finite problem is checked against float64 scoring of all
keys (mpmath where float64 cannot decide).

    fuzz/run.sh search SECONDS
"""
import math
import os
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


# TOPKATTN_FUZZ_KNOWN=1: also run the inputs of known, reported issues of the C core
KNOWN_C_BUGS = os.environ.get("TOPKATTN_FUZZ_KNOWN") == "1"


def one(data):
    import atheris
    fdp = atheris.FuzzedDataProvider(data)
    K = keys(fdp)
    which = fdp.ConsumeIntInRange(0, 3)
    with accepted():
        index = tk.KeyIndex(K, block_size=fdp.ConsumeIntInRange(0, 70),
                            summary=["auto", "minmax", "ball", "x"][fdp.ConsumeIntInRange(0, 3)],
                            proxy=["int8", None][fdp.ConsumeIntInRange(0, 1)],
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
            if not KNOWN_C_BUGS and isinstance(t[3], (int, np.integer)) and t[3] > 2 ** 40:
                # known: parse_index computes cap + block_size - 1 in a signed type
                # (UBSan: overflow for block_size near 2^63)
                return
            c = fdp.ConsumeIntInRange(0, 2)
            if c == 0:
                _core.index_fill(t, fdp.ConsumeIntInRange(-2, 300))
            elif c == 1:
                keys_arr = common.array(fdp, max_elems=1024)
                if not KNOWN_C_BUGS and getattr(keys_arr, "ndim", 0) == 3 \
                        and keys_arr.shape[0] > 10 ** 6:
                    # known: index_order loops over every head even when n = 0 (8 s for
                    # 2^31 heads without sanitizers; the public KeyIndex refuses such keys)
                    return
                _core.index_order(keys_arr, common.int_param(fdp))
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
