#!/usr/bin/env python3
"""Fuzz target: dense and Top-k attention (topkattn.attention, topk_attention,
attention_error, attention_matrix_error, dynamic_k) on adversarial Q, K, V, masks and
parameters. On small finite problems the Top-k result is checked against the float64
reference: the kept mass tau is the true tail mass of the kept set, and with ``eps`` it is
at most eps.

    fuzz/run.sh attention SECONDS
"""
import sys

import numpy as np

import common
from common import Finding, accepted

tk = common.import_topkattn()
from topkattn import reference as ref  # noqa: E402


def operands(fdp):
    """Q, K, V: either fully adversarial arrays, or a consistent problem with adversarial
    layouts and values."""
    if fdp.ConsumeIntInRange(0, 3) == 0:
        return common.array(fdp), common.array(fdp), common.array(fdp)
    b = [fdp.ConsumeIntInRange(0, 3) for _ in range(fdp.ConsumeIntInRange(0, 2))]
    L, n, d, dv = (fdp.ConsumeIntInRange(0, 9) for _ in range(4))
    shapes = [tuple(b) + (L, d), tuple(b) + (n, d), tuple(b) + (n, dv)]
    out = []
    for shp in shapes:
        size = int(np.prod(shp))
        vals = common.values(fdp, size).reshape(shp) if size else np.zeros(shp)
        dt = [np.float64, np.float32, np.float64, ">f8", np.int64][fdp.ConsumeIntInRange(0, 4)]
        with np.errstate(all="ignore"):
            a = vals.astype(dt)
        if fdp.ConsumeBool() and a.ndim >= 2:  # transposed storage: non-unit last stride
            a = np.swapaxes(np.ascontiguousarray(np.swapaxes(a, -1, -2)), -1, -2)
        if fdp.ConsumeBool() and a.ndim >= 1 and a.shape[0] > 0:
            a = a[::-1]
        out.append(a)
    return tuple(out)


def check_topk(Q, K, V, res, info, k, eps):
    """Kept sets and tau against the float64 reference, on finite float64 problems."""
    if not all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in (Q, K, V)):
        return
    if Q.ndim != 2 or K.ndim != 2 or Q.size == 0 or K.size == 0:
        return
    if not (np.isfinite(Q).all() and np.isfinite(K).all()) or np.abs(Q).max() > 1e3 \
            or np.abs(K).max() > 1e3:
        return
    s = ref.scores(Q, K)
    for r in range(Q.shape[0]):
        kept = info.indices[r][info.indices[r] >= 0]
        mask = np.zeros(K.shape[0], bool)
        mask[kept] = True
        m = s[r].max()
        e = np.exp(s[r] - m)
        true_tau = float(np.sum(e[~mask]) / np.sum(e))
        if abs(true_tau - info.tau[r]) > 1e-9 * max(true_tau, 1e-300) + 1e-15:
            raise Finding(f"row {r}: tau {info.tau[r]!r} but the kept set has {true_tau!r}")
        if eps is not None and true_tau > eps * (1 + 1e-9):
            exact = common.mp_tail(s[r], mask)
            if exact > eps:
                raise Finding(f"row {r}: eps={eps!r} but tau={float(exact)!r}")


def one(data):
    import atheris
    fdp = atheris.FuzzedDataProvider(data)
    Q, K, V = operands(fdp)
    which = fdp.ConsumeIntInRange(0, 5)
    scale = None if fdp.ConsumeBool() else common.float_param(fdp)
    mask = None
    if fdp.ConsumeIntInRange(0, 3) == 0:
        if fdp.ConsumeBool():
            mask = common.array(fdp)
        else:  # a (L, n) mask of the problem's shape (when that is small)
            L = Q.shape[-2] if getattr(Q, "ndim", 0) >= 2 else 1
            n = K.shape[-2] if getattr(K, "ndim", 0) >= 2 else 1
            rng = np.random.default_rng(fdp.ConsumeIntInRange(0, 99))
            mask = np.where(rng.random((min(L, 64), min(n, 64))) < 0.3, -np.inf, 0.0)
    with accepted():
        if which == 0:
            out = tk.attention(Q, K, V, scale=scale, mask=mask)
            np.asarray(out).sum()
        elif which == 1:
            sel = fdp.ConsumeIntInRange(0, 3)
            k = common.int_param(fdp) if sel == 0 else None
            eps = common.float_param(fdp) if sel == 1 else None
            ratio = common.float_param(fdp) if sel == 2 else None
            if sel == 3:
                k, eps = 1, 0.5
            want_info = fdp.ConsumeIntInRange(0, 3) > 0
            res = tk.topk_attention(Q, K, V, k=k, eps=eps, ratio=ratio, scale=scale,
                                    mask=mask, return_info=want_info)
            out, info = res if want_info else (res, None)
            np.asarray(out).sum()
            if not want_info:
                return
            if mask is None and scale is None and sel in (0, 1):
                check_topk(Q, K, V, out, info, k, eps if sel == 1 else None)
        elif which == 2:
            r = tk.attention_error(Q, K, V, k=common.int_param(fdp) if fdp.ConsumeBool()
                                   else None, eps=common.float_param(fdp), scale=scale,
                                   mask=mask)
            common.flatten_sum(r)
        elif which == 3:
            r = tk.attention_matrix_error(Q, K, common.int_param(fdp), scale=scale, mask=mask,
                                          norm=["fro", "l1", "rows", "x"][
                                              fdp.ConsumeIntInRange(0, 3)])
            common.flatten_sum(r)
        elif which == 4:
            r = tk.dynamic_k(common.int_param(fdp) if fdp.ConsumeBool() else Q,
                             common.float_param(fdp), common.float_param(fdp))
            np.asarray(r).sum()
        else:
            # the same problem twice: results must not depend on the call (no state)
            a = tk.attention(Q, K, V)
            b = tk.attention(Q, K, V)
            if not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True):
                raise Finding("attention is not deterministic")


if __name__ == "__main__":
    common.run(one, sys.argv)
