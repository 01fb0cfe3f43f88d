"""When do block summaries alone let the certified search skip keys, and when does
MC-Search's sampling certify earlier than the deterministic bound?

Data: n keys in contiguous segments of 32-256 positions, each segment near one of n/512
random centres c ~ N(0, I_d) with isotropic noise of standard deviation ``sigma`` (the
``clustered`` data of bench_search.py has sigma = 0.35 at d = 64); each query is
``beta * (centre of a random key + sigma noise)``, beta = 12 / sqrt(d) in part 1 (1.5 at
d = 64, as in bench_search.py) and 1.5 in part 2. Logits are ``q.k / sqrt(d)``.

Part 1 (block summaries only, no per-key proxies): ``n/scored`` of Δk-Search for the
min/max box, the centroid ball and both ("auto"), against the oracle ``n/k_eps``, and the
median *logit slack* of a block for the row's query, ``|q| r_b / sqrt(d)`` with r_b the
block's ball radius: how far a block's upper bound can sit above its keys' logits.

Part 2: keys scored by Δk-Search and by MC-Search (delta = 1e-3, 256 samples per
checkpoint) on the same index, with block summaries only (the same visiting order for both,
so the difference is the sampling) and with the int8 proxies (where Δk-Search runs the
streaming search and MC-Search the level-list search), and the rows whose certificate came
from the Monte-Carlo bound.

Every certificate is checked against the true TV of the kept set from float64 logits.

    python benchmarks/exp_block_summaries.py            # about a minute
    python benchmarks/exp_block_summaries.py --markdown
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import topkattn  # noqa: E402


def segments(rng, n, d, sigma, beta, L):
    C = max(8, n // 512)
    cent = rng.standard_normal((C, d))
    lens = rng.integers(32, 257, size=n // 32 + 1)
    labels = np.repeat(rng.integers(0, C, size=lens.size), lens)[:n]
    K = cent[labels] + sigma * rng.standard_normal((n, d))
    pick = labels[rng.integers(0, n, size=L)]
    Q = beta * (cent[pick] + sigma * rng.standard_normal((L, d)))
    return K.astype(np.float32), Q.astype(np.float32)


def true_logits(K, Q):
    return (Q.astype(np.float64) @ K.astype(np.float64).T) / np.sqrt(K.shape[1])


def check(res, s, eps):
    """True TV of every row's kept set <= its certificate (float64)."""
    for r in range(s.shape[0]):
        kept = np.zeros(s.shape[1], bool)
        kept[res.indices[r][:res.k[r]]] = True
        e = np.exp(s[r] - s[r].max())
        tv = e[~kept].sum() / e.sum()
        assert tv <= res.tv_bound[r] * (1 + 1e-12), (tv, res.tv_bound[r])


def part1(rng, n, eps, L, markdown):
    rows = []
    for d in (16, 64):
        for sigma in (0.02, 0.05, 0.1, 0.2, 0.35):
            K, Q = segments(rng, n, d, sigma, 12.0 / np.sqrt(d), L)
            s = true_logits(K, Q)
            k_eps = topkattn.k_eps(s, eps)
            row = [d, sigma, f"{n / k_eps.mean():.1f}"]
            slack = None
            for summary in ("minmax", "ball", "auto"):
                ix = topkattn.KeyIndex(K, summary=summary, proxy=None)
                res = topkattn.certified_search(Q, ix, eps)
                check(res, s, eps)
                row.append(f"{n / res.keys_scored.mean():.2f}")
                if summary == "ball":
                    qn = np.linalg.norm(Q.astype(np.float64), axis=1)
                    slack = np.median(qn[:, None] * ix._rad[0][None, :] / np.sqrt(d))
            row.append(f"{slack:.2f}")
            rows.append(row)
    print(f"\nPart 1: block summaries only, n = {n}, eps = {eps}, {L} queries, "
          f"beta = 12 / sqrt(d) (the same logit scale at every d)")
    print(_common.format_table(["d", "sigma", "n/k_eps (oracle)", "minmax n/scored",
                                "ball n/scored", "auto n/scored", "block slack (logits)"],
                               rows, markdown=markdown))


def part2(rng, n, eps, L, markdown):
    rows = []
    cases = [("gauss", None), ("segments", 0.35), ("segments", 0.1), ("segments", 0.02)]
    for name, sigma in cases:
        d = 64
        if sigma is None:
            K = rng.standard_normal((n, d)).astype(np.float32)
            Q = (3.0 * rng.standard_normal((L, d))).astype(np.float32)
        else:
            K, Q = segments(rng, n, d, sigma, 1.5, L)
        s = true_logits(K, Q)
        k_eps = topkattn.k_eps(s, eps)
        ix = topkattn.KeyIndex(K)
        row = [name if sigma is None else f"{name} sigma={sigma}", f"{k_eps.mean() / n:.4f}"]
        for use_proxy in (False, True):
            dl = topkattn.certified_search(Q, ix, eps, use_proxy=use_proxy)
            mc = topkattn.certified_search(Q, ix, eps, method="mc", delta=1e-3, seed=1,
                                           use_proxy=use_proxy)
            check(dl, s, eps)
            for r in range(L):  # an MC row may exceed its bound (probability <= delta)
                kept = np.zeros(n, bool)
                kept[mc.indices[r][:mc.k[r]]] = True
                e = np.exp(s[r] - s[r].max())
                assert e[~kept].sum() / e.sum() <= mc.tv_bound[r] * (1 + 1e-12) \
                    or mc.certified_mc[r]
            row += [f"{dl.keys_scored.mean() / n:.4f}", f"{mc.keys_scored.mean() / n:.4f}",
                    f"{mc.certified_mc.mean():.2f}"]
        rows.append(row)
    print(f"\nPart 2: Δk-Search against MC-Search (delta = 1e-3, 256 samples per checkpoint), "
          f"n = {n}, eps = {eps}, d = 64, {L} queries; scored/n with block summaries only, "
          f"then with the int8 proxies (Δk: the streaming search; MC: the level-list search), "
          f"and the share of rows whose certificate is the Monte-Carlo one")
    print(_common.format_table(["data", "k_eps/n", "blocks: Δk", "blocks: MC", "MC rows",
                                "int8: Δk", "int8: MC", "MC rows"], rows, markdown=markdown))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    print(_common.machine_line())
    rng = np.random.default_rng(args.seed)
    part1(rng, args.n, args.eps, args.queries, args.markdown)
    part2(rng, args.n, args.eps, args.queries, args.markdown)


if __name__ == "__main__":
    main()
