"""How many bits per dimension must per-key codes have before a certified search can skip
the keys of the other clusters, and how many bytes would such a pass read?

The certified search (docs/design.md §4) reads, for every block its block summary cannot
dismiss, the per-key proxies, and scores exactly the keys their bounds cannot dismiss. On
the clustered keys of ``bench_search.py`` at d = 128 the block bound (the centroid ball,
``q.c + |q| r``) sits about 8 logits above the keys' logits, so a row must read the codes of
most blocks (the benchmark measures 60-75% of them). Per-key codes bound each key far more
tightly. This study measures, for codes of b bits per dimension against the block's
centroid, how tight the bound is and how many keys a certificate could still not skip
after one pass over the codes; that sizes a code of fewer bits than the int4 and int8
proxies the library has.

Model (idealised: exact query, exact residual norms, no rounding padding; the library's
bounds add a little to each): every key i of block b is ``c_b + x_i``; a code of b bits
stores a step ``s_i`` per key and codes ``z_ij``, and the bound on ``q.k_i`` is
``q.c_b + s_i q.z_i + |q| e_i`` with ``e_i = |x_i - s_i z_i|``. One bit: ``z = sign(x)``,
``s = mean |x_ij|`` (the least-squares step for signs). Two or more bits: ``2^b`` levels
``(j + 1/2) s`` for j in [-2^(b-1), 2^(b-1)), with ``s = 2.5 rms(x_i) / 2^(b-1)`` (clipped
at +-2.5 root mean squares). A code costs ``d b / 8`` bytes plus 8 (step and radius).

Columns: the median slack (bound minus logit, logits ``q.k / sqrt(d)``); "left": the
fraction of keys a certificate with budget eps could not skip, i.e. what remains after
dropping the keys of smallest bound while the sum of their bound masses ``e^U`` stays
within ``eps Z`` (Z the true total, so this is a floor for any search using the bound);
k_eps/n for comparison; and bytes: a pass over every code, over K's float32 bytes.

    python benchmarks/exp_code_bits.py                   # d = 128, n = 262144, ~1 minute
    python benchmarks/exp_code_bits.py --d 64 --n 65536 --markdown
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exp_block_summaries import segments  # noqa: E402

BLOCK = 64


def codes(X, bits):
    """(step (nb, B), codes (nb, B, d) float32) of the deviations X."""
    if bits == 1:
        return np.abs(X).mean(-1), np.where(X >= 0, 1.0, -1.0).astype(np.float32)
    half = 2 ** (bits - 1)
    s = 2.5 * np.sqrt((X ** 2).mean(-1)) / half
    s = np.where(s > 0, s, 1.0)
    z = np.clip(np.floor(X / s[..., None]), -half, half - 1) + 0.5
    return s, z.astype(np.float32)


def run(n, d, eps, queries, seed):
    rng = np.random.default_rng(seed)
    sigma, beta = 0.35, 1.5                      # bench_search.py's clustered keys
    K, Q = segments(rng, n, d, sigma, beta, queries)
    nb = n // BLOCK
    Kb = K[: nb * BLOCK].astype(np.float64).reshape(nb, BLOCK, d)
    c = Kb.mean(axis=1)
    X = (Kb - c[:, None, :]).astype(np.float32)
    del Kb
    rad = np.sqrt((X.astype(np.float64) ** 2).sum(-1)).max(-1)
    kinds = {"ball (per block)": None}
    for bits in (1, 2, 3, 4, 8):
        s, z = codes(X, bits)
        e = np.sqrt(((X - s[..., None].astype(np.float32) * z).astype(np.float64) ** 2).sum(-1))
        kinds[f"{bits}-bit codes"] = (bits, s, z, e)
    rows = {name: {"slack": [], "left": []} for name in kinds}
    keps = []
    scale = 1.0 / np.sqrt(d)
    Kf = K[: nb * BLOCK].astype(np.float64)
    for qi in range(queries):
        q = Q[qi].astype(np.float64)
        x = Kf @ q * scale
        m = x.max()
        w = np.sort(np.exp(x - m))
        Z = w.sum()
        tail = np.cumsum(w)                       # mass of the i + 1 smallest
        keps.append((x.size - int(np.searchsorted(tail, eps * Z, side="right"))) / x.size)
        qn = np.linalg.norm(q)
        qc = c @ q * scale
        for name, spec in kinds.items():
            if spec is None:
                U = np.repeat(qc + qn * rad * scale, BLOCK)
            else:
                _, s, z, e = spec
                U = (qc[:, None] + s * (z @ q.astype(np.float32)) * scale + qn * e * scale).ravel()
            cm = np.cumsum(np.exp(np.sort(U) - m))
            skip = int(np.searchsorted(cm, eps * Z, side="right"))
            rows[name]["slack"].append(float(np.median(U - x)))
            rows[name]["left"].append((U.size - skip) / U.size)
    out = []
    for name, spec in kinds.items():
        bytes_key = (2 * d * 4 + 4) / BLOCK if spec is None else d * spec[0] / 8 + 8
        out.append((name, np.median(rows[name]["slack"]), np.median(rows[name]["left"]),
                    np.max(rows[name]["left"]), bytes_key / (4 * d)))
    return out, (float(np.median(keps)), float(np.mean(keps)), float(np.max(keps)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    res, keps = run(args.n, args.d, args.eps, args.queries, args.seed)
    print(f"clustered keys, n = {args.n}, d = {args.d}, eps = {args.eps}, {args.queries} queries "
          f"(medians over them); k_eps/n median {keps[0]:.4f}, mean {keps[1]:.4f}, "
          f"max {keps[2]:.4f}\n")
    head = ("bound", "median slack (logits)", "left (median)", "left (max)", "bytes / K bytes")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|:--|--:|--:|--:|--:|")
        for name, sl, lm, lx, by in res:
            print(f"| {name} | {sl:.2f} | {lm:.4f} | {lx:.4f} | {by:.3f} |")
    else:
        print(f"{head[0]:<18} {head[1]:>22} {head[2]:>14} {head[3]:>11} {head[4]:>16}")
        for name, sl, lm, lx, by in res:
            print(f"{name:<18} {sl:>22.2f} {lm:>14.4f} {lx:>11.4f} {by:>16.3f}")


if __name__ == "__main__":
    main()
