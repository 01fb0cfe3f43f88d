#!/usr/bin/env python3
"""Fuzz target: the distribution functions of topkattn (tail mass, KL, tv_curve, k_eps, topk,
the certified bounds, entropy, the Gaussian functions), through the public wrappers and
straight into topkattn._core, on adversarial arrays. Certificates and k_eps are checked
against the float64 reference on short finite rows.

    fuzz/run.sh core SECONDS
"""
import math
import sys

import numpy as np

import common
from common import Finding, accepted

tk = common.import_topkattn()
from topkattn import _core  # noqa: E402
from topkattn import reference as ref  # noqa: E402

ROW_FUNCS = ["tail_mass", "log_tail_mass", "kl_truncated", "tv_curve", "k_eps", "topk",
             "gap_bound", "multigap_bound", "block_bound", "entropy", "effective_support",
             "fit_gaussian", "norm_cdf", "norm_sf", "norm_ppf", "norm_isf",
             "gaussian_tail_mass", "gaussian_k_eps"]


# functions for which an empty last axis is valid (B = 0 blocks) or that work elementwise
ELEMENTWISE = {"block_bound", "norm_cdf", "norm_sf", "norm_ppf", "norm_isf",
               "gaussian_tail_mass", "gaussian_k_eps"}


def check_certificates(x, fdp):
    """Bounds >= tau and k_eps minimal, on a short row of finite-or--inf float64 logits."""
    row = np.asarray(x, dtype=np.float64).reshape(-1)[:200]
    if row.size == 0 or not np.all((row < np.inf) & ~np.isnan(row)) or not np.any(row > -np.inf):
        return
    if np.max(np.abs(row[np.isfinite(row)])) > 1e6:
        return  # the reference's own rounding is no longer far below the slack
    n = row.size
    k = fdp.ConsumeIntInRange(0, n)
    tau = float(ref.tail_mass(row, k))
    slack = 1e-10

    def above(bound, what):
        if tau > bound * (1 + slack) and tau > 1e-290:
            exact = common.mp_tail(row, _kept_mask(row, k))
            if exact > bound:
                raise Finding(f"{what} = {bound!r} below tau = {float(exact)!r} "
                              f"(k={k}, row={row.tolist()!r})")

    above(float(tk.gap_bound(row, k)), "gap_bound")
    above(float(tk.gap_bound(row, k, form="gap")), "gap_bound(gap)")
    cuts = fdp.ConsumeIntInRange(1, 12)
    above(float(tk.multigap_bound(row, k, cuts=cuts)), f"multigap_bound(cuts={cuts})")
    above(float(tk.multigap_bound(row, k, cuts=cuts, spacing="linear")),
          f"multigap_bound(cuts={cuts}, linear)")
    eps = min(max(fdp.ConsumeProbability(), 1e-300), 1 - 1e-12)
    ke = int(tk.k_eps(row, eps))
    curve = ref.tv_curve(row)
    if not (curve[ke] <= eps * (1 + 1e-9)) or (ke > 0 and not curve[ke - 1] > eps * (1 - 1e-9)):
        # decide with mpmath before calling it a finding
        mpc = ref.mp_tv_curve(row)
        if mpc[ke] > eps * (1 + 1e-12) or (ke > 0 and mpc[ke - 1] <= eps * (1 - 1e-12)):
            raise Finding(f"k_eps = {ke} not the smallest k with tau <= {eps!r} "
                          f"(row={row.tolist()!r})")
    # block_bound: split the tail into blocks bounded by their maxima
    order = np.argsort(-row, kind="stable")
    kept, tail = order[:k], order[k:]
    live = row[tail][row[tail] > -np.inf]
    if k >= 1 and live.size and np.isfinite(row[order[0]]):
        nb = fdp.ConsumeIntInRange(1, 4)
        blocks = np.array_split(live, nb)
        ub = np.array([b.max() if b.size else -np.inf for b in blocks])
        sz = np.array([b.size for b in blocks], dtype=np.int64)
        m = row[order[0]]
        la = m + math.log(math.fsum(np.exp(row[kept] - m)))
        bb = float(tk.block_bound(ub, sz, la, la, log_space=True))
        above(bb, "block_bound")


def _kept_mask(row, k):
    mask = np.zeros(row.size, bool)
    mask[np.argsort(-row, kind="stable")[:k]] = True
    return mask


def multigap_args(fdp, x):
    """Raw arguments of _core.multigap_bound: any segment count (up to 2^63 - 1); the
    exhaustive segment loop (a test hook, time linear in the count) only for counts up to
    10^6 steps over all rows, and then its result must be the shortcut's, bit for bit."""
    a = (x, common.int_param(fdp), None if fdp.ConsumeBool() else common.int_param(fdp),
         fdp.ConsumeIntInRange(-2, 2 ** 63 - 1) if fdp.ConsumeBool()
         else fdp.ConsumeIntInRange(-2, 10 ** 5), fdp.ConsumeIntInRange(-1, 2))
    rows = float(np.prod(np.shape(x)[:-1], dtype=float))
    return a + (True,) if a[3] * rows <= 10 ** 6 and fdp.ConsumeBool() else a


def one(data):
    import atheris
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, len(ROW_FUNCS) + 1)
    x = common.array(fdp)
    if which < len(ROW_FUNCS) and ROW_FUNCS[which] in ELEMENTWISE and getattr(x, "ndim", 0) \
            and np.prod([s for s in x.shape[:-1] if s], dtype=float) > 1e6:
        # a legitimate problem with > 1e6 rows of nothing: its output alone takes gigabytes
        return
    if which == len(ROW_FUNCS):  # certificates on a clean short row
        with accepted():
            check_certificates(x, fdp)
        return
    if which == len(ROW_FUNCS) + 1:  # the private entry points with raw arguments
        name = ["tail_mass", "tv_curve", "k_eps", "topk", "gap_bound", "multigap_bound",
                "block_bound", "entropy", "effective_support", "fit_gaussian",
                "gauss"][fdp.ConsumeIntInRange(0, 10)]
        args = {
            "tail_mass": lambda: (x, common.int_param(fdp), fdp.ConsumeBool()),
            "tv_curve": lambda: (x,),
            "k_eps": lambda: (x, common.float_param(fdp), fdp.ConsumeBool()),
            "topk": lambda: (x, fdp.ConsumeIntInRange(-2 ** 63, 2 ** 63 - 1)),
            "gap_bound": lambda: (x, common.int_param(fdp), fdp.ConsumeIntInRange(-1, 2)),
            "multigap_bound": lambda: multigap_args(fdp, x),
            "block_bound": lambda: (x, common.int_param(fdp), common.float_param(fdp),
                                    common.float_param(fdp)),
            "entropy": lambda: (x,),
            "effective_support": lambda: (x, common.float_param(fdp)),
            "fit_gaussian": lambda: (x,),
            "gauss": lambda: (fdp.ConsumeIntInRange(-2 ** 31, 2 ** 31 - 1) if fdp.ConsumeBool()
                              else fdp.ConsumeIntInRange(-2, 8), x,
                              *[common.array(fdp) for _ in range(fdp.ConsumeIntInRange(0, 2))]),
        }[name]
        a = args()
        with accepted():
            out = getattr(_core, name)(*a)
            if name == "multigap_bound" and len(a) == 6:
                fast = _core.multigap_bound(*a[:5])
                if not np.array_equal(out, fast, equal_nan=True):
                    raise Finding(f"multigap_bound shortcut {fast!r} != loop {out!r} "
                                  f"(cuts={a[3]}, spacing={a[4]})")
        return
    name = ROW_FUNCS[which]
    f = getattr(tk, name)
    with accepted():
        if name in ("tail_mass", "log_tail_mass", "kl_truncated", "topk", "gap_bound"):
            k = common.int_param(fdp) if name != "topk" else fdp.ConsumeIntInRange(-2, 400)
            out = f(x, k)
        elif name == "multigap_bound":
            cuts = common.int_param(fdp)
            out = f(x, common.int_param(fdp), cuts=cuts,
                    spacing=["geometric", "linear", "x"][fdp.ConsumeIntInRange(0, 2)])
        elif name == "k_eps":
            out = f(x, common.float_param(fdp), return_tail=fdp.ConsumeBool())
        elif name == "block_bound":
            out = f(x, common.int_param(fdp), common.float_param(fdp), common.float_param(fdp),
                    log_space=fdp.ConsumeBool())
        elif name == "effective_support":
            out = f(x, common.float_param(fdp))
        elif name == "gaussian_tail_mass":
            out = f(x, common.array(fdp))
        elif name == "gaussian_k_eps":
            out = f(common.int_param(fdp), x, common.float_param(fdp),
                    finite_n=fdp.ConsumeBool())
        else:
            out = f(x)
        for o in (out if isinstance(out, tuple) else (out,)):
            np.asarray(o).sum()  # the result is readable to the end


if __name__ == "__main__":
    common.run(one, sys.argv)
