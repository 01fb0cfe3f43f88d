"""n^C sparsity (arXiv 2404.02690): fixed vs dynamic Top-k windows on Gaussian attention, and collapse.

One self-attention layer on Gaussian inputs: ``X`` (n x d) with i.i.d. N(0, 1) entries,
``Q = X W_Q``, ``K = X W_K`` with i.i.d. N(0, 1/d) weight entries, scores
``sigma / sqrt(d) * q . k``, so every logit is close to N(0, sigma^2) and sigma (the logit
spread, the role of the seed's scale parameter R = B^2 ||W||_F) does not change with n.
The weights are drawn once and kept for every n (one layer, more and more tokens); the
measured logit standard deviation is printed next to |S_eps|.

For n = 2^8 .. 2^16 and each sigma it measures, with the C core:

* the whole-matrix error ``(1/n) ||D_spar^-1 A_spar - D^-1 A||`` of
  :func:`topkattn.attention_matrix_error`, Frobenius (``fro``) and entrywise l1 (``l1``,
  = the mean over rows of 2 tau, twice the TV distance), for fixed k in {1, ceil(ln n), 16,
  64} and for the dynamic window ``k = ceil(alpha * n^C)`` (:func:`topkattn.dynamic_k`);
* the effective support ``|S_eps| = #{j : P_j >= eps}`` (:func:`topkattn.effective_support`)
  and, for reference, ``k_0.1`` (keys needed for a TV error of 0.1, :func:`topkattn.k_eps`).

Rows are i.i.d. given K, so for n above ``--rows`` (default 1024) a uniform subsample of
that many query rows is used against all n keys; the Frobenius error is then estimated as
``sqrt(mean_i ||E_i||^2) / sqrt(n)`` (the full-matrix value with the mean over all rows
replaced by the mean over the subsample), the l1 error and the |S_eps| means as plain means.

Claims tested: the error falls with n for k = Omega(n^C), does not for k = o(log n), and
|S_eps| stays O(1) as n grows ("attention collapse").

    python benchmarks/exp_nc_sparsity.py [--quick] [--sigma 1 2 4 8] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line  # noqa: E402

import topkattn  # noqa: E402
from topkattn import reference as ref  # noqa: E402


def weights(d, rng):
    """W_Q, W_K with i.i.d. N(0, 1/d) entries: drawn once, used for every n."""
    return rng.standard_normal((2, d, d)) / math.sqrt(d)


def layer(n, W, sigma, rows, rng):
    """Q (rows, d) for a subsample of the n queries, K (n, d), and the score scale."""
    d = W.shape[-1]
    X = rng.standard_normal((n, d))
    Wq, Wk = W
    pick = np.sort(rng.choice(n, size=rows, replace=False)) if rows < n else np.arange(n)
    return X[pick] @ Wq, X @ Wk, sigma / math.sqrt(d)


def windows(n, alpha, Cs):
    """Name -> k for the fixed and dynamic windows at this n."""
    w = {"k=1": 1, "k=ceil(ln n)": math.ceil(math.log(n)), "k=16": 16, "k=64": 64}
    for C in Cs:
        w[f"k=ceil({alpha:g} n^{C:g})"] = int(topkattn.dynamic_k(n, alpha, C))
    return {name: min(k, n) for name, k in w.items()}


def support_stats(Q, K, scale, eps_list, chunk=128):
    """Mean |S_eps| per eps, mean k_0.1 and the mean logit standard deviation over the
    query rows (scores in chunks)."""
    sup = {e: [] for e in eps_list}
    k01, sd = [], []
    for i in range(0, Q.shape[0], chunk):
        s = scale * (Q[i:i + chunk] @ K.T)
        for e in eps_list:
            sup[e].append(topkattn.effective_support(s, e))
        k01.append(topkattn.k_eps(s, 0.1))
        sd.append(topkattn.fit_gaussian(s)[1])
    return ({e: float(np.mean(np.concatenate(v))) for e, v in sup.items()},
            float(np.mean(np.concatenate(k01))), float(np.mean(np.concatenate(sd))))


def check_against_reference(rng, d):
    """The C core's matrix error against the float64 NumPy twin on one small layer."""
    Q, K, c = layer(300, weights(d, rng), 3.0, 300, rng)
    for k in (1, 7, 64):
        for norm in ("fro", "l1"):
            got = topkattn.attention_matrix_error(Q, K, k, scale=c, norm=norm)
            want = ref.attention_matrix_error(Q, K, k, scale=c, norm=norm)
            if not abs(got - want) <= 1e-9 * abs(want) + 1e-15:
                raise AssertionError(f"attention_matrix_error k={k} {norm}: {got} vs {want}")


def run(args):
    rng = np.random.default_rng(args.seed)
    check_against_reference(rng, args.d)
    W = weights(args.d, rng)
    records = []
    t0 = time.perf_counter()
    for sigma in args.sigma:
        for e in range(args.min_log2n, args.max_log2n + 1):
            n = 2 ** e
            rows = min(n, args.rows)
            Q, K, c = layer(n, W, sigma, rows, rng)
            rec = {"sigma": sigma, "n": n, "rows": rows}
            for name, k in windows(n, args.alpha, args.C).items():
                row_err = topkattn.attention_matrix_error(Q, K, k, scale=c, norm="rows")
                rec[name] = {
                    "k": k,
                    "fro": float(np.sqrt(np.mean(row_err ** 2)) / math.sqrt(n)),
                    "l1": float(topkattn.attention_matrix_error(Q, K, k, scale=c, norm="l1")),
                }
            rec["support"], rec["k_0.1"], rec["logit_sd"] = support_stats(Q, K, c,
                                                                          args.support_eps)
            records.append(rec)
            print(f"  sigma {sigma:g}  n 2^{e}  ({rows} rows)  "
                  f"{time.perf_counter() - t0:6.1f} s", flush=True)
    return records


def slope(ns, ys):
    """Least-squares slope of log y against log n (nan if some y is 0)."""
    ys = np.asarray(ys, dtype=float)
    if np.any(ys <= 0):
        return float("nan")
    return float(np.polyfit(np.log(ns), np.log(ys), 1)[0])


def report(records, args):
    names = [k for k in records[0] if k.startswith("k=")]
    for sigma in args.sigma:
        rs = [r for r in records if r["sigma"] == sigma]
        ns = [r["n"] for r in rs]
        for metric, what in (("fro", "(1/n) ||E||_F"), ("l1", "(1/n) ||E||_1 = mean 2 tau")):
            print(f"\nsigma = {sigma:g}: {what} (k in brackets at the largest n)")
            head = ["window"] + [f"2^{int(math.log2(n))}" for n in ns] + ["slope"]
            body = []
            for nm in names:
                ys = [r[nm][metric] for r in rs]
                body.append([f"{nm} [{rs[-1][nm]['k']}]"] + [f"{y:.3g}" for y in ys]
                            + [f"{slope(ns, ys):+.2f}"])
            print(format_table(head, body))
        print(f"\nsigma = {sigma:g}: mean effective support |S_eps| and k_0.1 (keys for TV 0.1)")
        head = ["quantity"] + [f"2^{int(math.log2(n))}" for n in ns]
        body = [[f"|S_{e:g}|"] + [f"{r['support'][e]:.3g}" for r in rs] for e in args.support_eps]
        body.append(["k_0.1"] + [f"{r['k_0.1']:.4g}" for r in rs])
        body.append(["k_0.1 / n"] + [f"{r['k_0.1'] / r['n']:.3g}" for r in rs])
        body.append(["logit sd"] + [f"{r['logit_sd']:.3g}" for r in rs])
        print(format_table(head, body))


def plot(records, args):
    try:
        import matplotlib
        if "matplotlib.pyplot" not in sys.modules:
            # a script: no display needed; a caller that already uses pyplot (a notebook
            # with its inline backend) keeps its own backend
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    names = [k for k in records[0] if k.startswith("k=")]
    paths = []
    for metric, label in (("fro", "(1/n) ||E||_F"), ("l1", "(1/n) ||E||_1 = mean 2 tau")):
        fig, axes = plt.subplots(1, len(args.sigma), figsize=(4.2 * len(args.sigma), 3.6),
                                 squeeze=False, sharey=True)
        for ax, sigma in zip(axes[0], args.sigma):
            rs = [r for r in records if r["sigma"] == sigma]
            ns = [r["n"] for r in rs]
            for nm in names:
                ax.plot(ns, [max(r[nm][metric], 1e-300) for r in rs], marker="o", ms=3,
                        ls="--" if "n^" in nm else "-", label=nm)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"sigma = {sigma:g}")
            ax.set_xlabel("n")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel(label)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=7)
        fig.tight_layout(rect=(0, 0, 0.86, 1))
        p = os.path.join(args.out, f"nc_error_{metric}.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for sigma in args.sigma:
        rs = [r for r in records if r["sigma"] == sigma]
        for e in args.support_eps:
            ax.plot([r["n"] for r in rs], [r["support"][e] for r in rs], marker="o", ms=3,
                    label=f"sigma {sigma:g}, eps {e:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n")
    ax.set_ylabel("mean |S_eps|")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    p = os.path.join(args.out, "nc_support.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths + [p]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n up to 2^12, 256 rows")
    ap.add_argument("--sigma", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0],
                    help="logit spreads (standard deviation of the scores)")
    ap.add_argument("--d", type=int, default=32, help="head dimension")
    ap.add_argument("--min-log2n", type=int, default=8)
    ap.add_argument("--max-log2n", type=int)
    ap.add_argument("--rows", type=int, help="query rows used per layer (subsample above)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--C", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--support-eps", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="topkattn-nc-sparsity", help="directory for plots and JSON")
    args = ap.parse_args(argv)
    if args.max_log2n is None:
        args.max_log2n = 12 if args.quick else 16
    if args.rows is None:
        args.rows = 256 if args.quick else 1024
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(f"machine: {machine_line()}, simd {topkattn.get_simd()}, "
          f"{topkattn.get_num_threads()} threads")
    print(f"Gaussian self-attention, d = {args.d}, sigma in {args.sigma}, "
          f"n = 2^{args.min_log2n}..2^{args.max_log2n}, up to {args.rows} query rows, "
          f"alpha = {args.alpha:g}, C in {args.C}, seed {args.seed}")
    records = run(args)
    report(records, args)
    with open(os.path.join(args.out, "nc_sparsity.json"), "w") as f:
        json.dump({"args": vars(args), "records": records}, f, indent=1,
                  default=lambda o: str(o))
    for p in plot(records, args):
        print(f"wrote {p}")
    return records


if __name__ == "__main__":
    main()
