"""Gaussian score model (docs/design.md §5): predicted k_eps against simulated rows.

For n i.i.d. N(0, sigma^2) logits, the empirical k_eps of a row is the smallest k whose
top-k set leaves softmax mass <= eps outside it. This script draws many rows, takes the
median of k_eps/n (and its interquartile range) per (n, sigma, eps), and compares it with

* the asymptotic rule      k/n = Phi_c(sigma + Phi^{-1}(eps))   (finite_n=False)
* the finite-n predictor   (finite_n=True, see csrc/gauss.c for the method)

both from ``topkattn.gaussian_k_eps``. The empirical k_eps is computed here in plain
NumPy (sort, exp relative to the maximum in float64, cumulative sums from the bottom) so
that the comparison does not depend on the package.

One sorted standard-normal draw serves every sigma (logits sigma*z), so each repetition
costs one sort plus a few passes over n. Default run: 1 to 2.5 minutes on 2 cores.

    python benchmarks/bench_gaussian.py            # n = 1e3, 1e4, 1e5, 1e6
    python benchmarks/bench_gaussian.py --quick    # fewer repetitions, no n = 1e6
"""
import argparse
import os
import sys
import time

import numpy as np

try:
    from topkattn import gaussian_k_eps
except ImportError:  # run from a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from topkattn import gaussian_k_eps

SIGMAS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)
EPSILONS = (1e-1, 1e-2, 1e-3)
# (n, repetitions): fewer repetitions where a draw is expensive
DEFAULT_PLAN = ((1_000, 4001), (10_000, 2001), (100_000, 601), (1_000_000, 301))
QUICK_PLAN = ((1_000, 1001), (10_000, 401), (100_000, 101))


def empirical_k_eps(z_desc, sigma, eps):
    """Smallest k with softmax mass outside the top k of sigma*z <= eps, for each eps.

    z_desc is sorted in decreasing order. tail[k] = sum_{i >= k} w_i (0-based) is the mass
    outside the top k, so k_eps = first k with tail[k] <= eps * total (k = n if none).
    """
    w = np.exp(sigma * (z_desc - z_desc[0]))
    tail = np.cumsum(w[::-1])[::-1]
    ok = tail[None, :] <= np.asarray(eps)[:, None] * tail[0]
    n = z_desc.shape[0]
    return np.where(ok.any(axis=1), ok.argmax(axis=1), n)


def simulate(n, reps, rng):
    """k_eps of `reps` rows: array (reps, len(SIGMAS), len(EPSILONS))."""
    out = np.empty((reps, len(SIGMAS), len(EPSILONS)))
    for r in range(reps):
        z = rng.standard_normal(n)
        z[::-1].sort()  # descending, in place
        for j, s in enumerate(SIGMAS):
            out[r, j] = empirical_k_eps(z, s, EPSILONS)
    return out


def median_ci_halfwidth(x):
    """Distribution-free 95% confidence half-width of the median (order-statistic ranks)."""
    x = np.sort(x)
    m = x.shape[0]
    d = int(np.ceil(1.96 * np.sqrt(m) / 2))
    lo = x[max(0, m // 2 - d)]
    hi = x[min(m - 1, m // 2 + d)]
    return 0.5 * (hi - lo)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no n = 1e6")
    ap.add_argument("--seed", type=int, default=20240607)
    args = ap.parse_args(argv)
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    rng = np.random.default_rng(args.seed)

    hdr = (f"{'n':>8} {'sigma':>5} {'eps':>6} | {'median k/n':>11} {'q25':>10} {'q75':>10}"
           f" {'ci95':>6} | {'rule k/n':>11} {'rel.err':>8} | {'finite-n':>11} {'rel.err':>8}")
    print(hdr)
    print("-" * len(hdr))
    errs = {"rule": [], "finite-n": []}
    big = {"rule": [], "finite-n": []}  # sigma >= 3
    t_start = time.perf_counter()
    for n, reps in plan:
        t0 = time.perf_counter()
        k = simulate(n, reps, rng)
        sim_s = time.perf_counter() - t0
        sig = np.asarray(SIGMAS)[:, None]
        eps = np.asarray(EPSILONS)[None, :]
        k_rule = np.asarray(gaussian_k_eps(n, sig, eps, finite_n=False), dtype=np.float64)
        k_fin = np.asarray(gaussian_k_eps(n, sig, eps, finite_n=True), dtype=np.float64)
        for j, s in enumerate(SIGMAS):
            for l, e in enumerate(EPSILONS):
                ks = k[:, j, l]
                med = np.median(ks)
                q25, q75 = np.percentile(ks, [25, 75])
                ci = median_ci_halfwidth(ks) / med
                pr, pf = k_rule[j, l], k_fin[j, l]
                er, ef = (pr - med) / med, (pf - med) / med
                errs["rule"].append(abs(er))
                errs["finite-n"].append(abs(ef))
                if s >= 3:
                    big["rule"].append(abs(er))
                    big["finite-n"].append(abs(ef))
                print(f"{n:>8} {s:>5g} {e:>6g} | {med / n:>11.4e} {q25 / n:>10.3e} {q75 / n:>10.3e}"
                      f" {ci:>6.1%} | {pr / n:>11.4e} {er:>+8.2%} | {pf / n:>11.4e} {ef:>+8.2%}")
        print(f"# n={n}: {reps} rows simulated in {sim_s:.1f} s")
    print("-" * len(hdr))
    print("ci95 = relative half-width of the distribution-free 95% interval of the simulated "
          "median (the noise floor of the comparison)")
    for name in ("rule", "finite-n"):
        a, b = np.asarray(errs[name]), np.asarray(big[name])
        print(f"{name:>9}: |rel.err| median {np.median(a):.2%}, mean {a.mean():.2%}, "
              f"max {a.max():.2%}   (sigma >= 3: median {np.median(b):.2%}, max {b.max():.2%})")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
