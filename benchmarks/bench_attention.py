"""Dense and Top-k attention against NumPy and torch (CPU), and against the machine's
measured read bandwidth, in one run on the same data.

Cases (float32, H heads, one K/V per head):

* decode: one query per head (L = 1) against n keys, n from 4k to 1M, d = 64 and 128;
* prefill: L = n queries per head, n = 512 ... 8192, d = 64.

Competitors per case:

* ``topk_attention(k = 1% n)`` and ``topk_attention(eps = 1e-3)`` (ours);
* ``attention`` (ours, dense);
* NumPy Top-k: ``K @ q``, ``np.argpartition``, softmax over the kept scores, weighted sum
  of the kept rows of V; NumPy dense: ``K @ q``, softmax, ``p @ V``;
* torch: ``scaled_dot_product_attention`` (dense) and ``K @ q``, ``torch.topk``, softmax,
  gather of V rows (Top-k), when torch is installed.

Scores ``q.k / sqrt(d)`` are N(0, sigma^2) with sigma = 5 (Q is scaled by sigma): peaked like
trained attention, so that ``eps = 1e-3`` keeps a few percent of the keys (the k_eps / n
column). Before timing, our outputs on the first rows are checked against the float64
reference (``topkattn.reference``) to 2e-6, and NumPy's and torch's dense outputs to 1e-4; a
disagreement prints ``!!! MISMATCH``.

Times are the best of several calls, competitors timed in turns. GB/s is the bytes a
decode step must read at least, K once (H n d 4 bytes), over the time; "% bw" compares it
with the read bandwidth of all threads measured in the same run. topkattn uses all CPUs;
NumPy's matmul and torch use their own thread pools (printed).

    python benchmarks/bench_attention.py               # full run, a few minutes
    python benchmarks/bench_attention.py --quick       # smoke run, seconds
    python benchmarks/bench_attention.py --markdown    # tables for a README
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

try:
    import topkattn
except ImportError:  # run from a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import topkattn
from topkattn import reference as ref

try:
    import torch
except ImportError:
    torch = None

SIGMA = 5.0
EPS = 1e-3

# (H, n, d)
DECODE = ((32, 4096, 128), (32, 65536, 64), (32, 65536, 128), (12, 262144, 64),
          (12, 1 << 20, 64))
DECODE_QUICK = ((8, 4096, 64), (8, 65536, 64))
# (H, n = L, d)
PREFILL = ((4, 512, 64), (4, 1024, 64), (4, 2048, 64), (2, 8192, 64))
PREFILL_QUICK = ((2, 512, 64),)


def make(H, L, n, d, rng):
    Q = (SIGMA * rng.standard_normal((H, L, d))).astype(np.float32)
    K = rng.standard_normal((H, n, d), dtype=np.float32)
    V = rng.standard_normal((H, n, d), dtype=np.float32)
    return Q, K, V


# ------------------------------------------------------------------ NumPy / torch

def np_scores(Q, K):
    return np.matmul(Q, np.swapaxes(K, -1, -2)) * np.float32(1 / math.sqrt(Q.shape[-1]))


def np_dense(Q, K, V):
    s = np_scores(Q, K)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.matmul(p, V)


def np_topk(Q, K, V, k):
    s = np_scores(Q, K)
    n = s.shape[-1]
    idx = np.argpartition(s, n - k, axis=-1)[..., n - k:]
    top = np.take_along_axis(s, idx, axis=-1)
    p = np.exp(top - top.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    H, L = Q.shape[:2]
    Vk = V[np.arange(H)[:, None, None], idx]            # (H, L, k, dv)
    return np.einsum("hlk,hlkv->hlv", p, Vk)


def th_dense(Qt, Kt, Vt):
    return torch.nn.functional.scaled_dot_product_attention(Qt, Kt, Vt)


def th_topk(Qt, Kt, Vt, k):
    s = torch.matmul(Qt, Kt.transpose(-1, -2)) * (1 / math.sqrt(Qt.shape[-1]))
    top, idx = torch.topk(s, k, dim=-1)
    p = torch.softmax(top, dim=-1)
    H, L = Qt.shape[:2]
    Vk = Vt[torch.arange(H)[:, None, None], idx]
    return torch.einsum("hlk,hlkv->hlv", p, Vk)


# ------------------------------------------------------------------ one case

def run_case(kind, H, L, n, d, rng, budget):
    Q, K, V = make(H, L, n, d, rng)
    k = max(1, n // 100)
    ours_k = lambda: topkattn.topk_attention(Q, K, V, k=k)          # noqa: E731
    ours_e = lambda: topkattn.topk_attention(Q, K, V, eps=EPS)      # noqa: E731
    ours_d = lambda: topkattn.attention(Q, K, V)                    # noqa: E731
    npk = lambda: np_topk(Q, K, V, k)                               # noqa: E731
    npd = lambda: np_dense(Q, K, V)                                 # noqa: E731
    thk = thd = None
    if torch is not None:
        Qt, Kt, Vt = (torch.from_numpy(a) for a in (Q, K, V))

        def thk():
            with torch.no_grad():
                return th_topk(Qt, Kt, Vt, k)

        def thd():
            with torch.no_grad():
                return th_dense(Qt, Kt, Vt)

    # agreement before timing: ours against the float64 reference on a few rows (NumPy's
    # float32 pipeline is itself off by ~1e-5 on long rows, and may keep a different key
    # where two scores tie in float32)
    notes = []
    out_k, out_d = ours_k(), ours_d()
    _, info = topkattn.topk_attention(Q, K, V, eps=EPS, return_info=True)
    sub = (slice(0, 1), slice(0, min(L, 8)))
    exp_k = ref.topk_attention(Q[sub], K[:1], V[:1], k=k)[0]
    exp_d = ref.attention(Q[sub], K[:1], V[:1])
    for name, got, exp in (("topk", out_k[sub], exp_k), ("dense", out_d[sub], exp_d)):
        if np.abs(got - exp).max() > 2e-6 * max(1.0, np.abs(exp).max()):
            notes.append(f"{name} max diff {np.abs(got - exp).max():.2e} against float64")
    if np.abs(npd()[sub] - exp_d).max() > 1e-4:
        notes.append("numpy dense disagrees with float64")
    if thd is not None and np.abs(thd().numpy()[sub] - exp_d).max() > 1e-4:
        notes.append("torch dense disagrees with float64")
    for note in notes:
        print(f"!!! MISMATCH {kind} H={H} n={n} d={d}: {note}", flush=True)
    fns = [ours_k, ours_e, ours_d, npk, npd, thk, thd]
    times = _common.time_calls(fns, repeats=3, min_time=0.1, budget=budget)
    best = [t[0] if t else None for t in times]
    return {"kind": kind, "H": H, "L": L, "n": n, "d": d, "k": k,
            "keps_frac": float(info.k.mean()) / n, "t": best,
            "k_bytes": K.nbytes}


def fmt_ms(t):
    return "-" if t is None else (f"{t * 1e3:.3g}" if t < 10 else f"{t * 1e3:.0f}")


def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small cases, seconds")
    ap.add_argument("--markdown", action="store_true", help="Markdown tables")
    ap.add_argument("--threads", type=int, default=0, help="topkattn threads (0 = all CPUs)")
    ap.add_argument("--budget", type=float, default=6.0,
                    help="seconds of timed calls per competitor and case")
    args = ap.parse_args(argv)
    if args.threads:
        topkattn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    info = topkattn.build_info()
    print(f"machine: {_common.machine_line()}")
    print(f"topkattn {info['version']}: simd {info['simd_active']}, "
          f"{topkattn.get_num_threads()} threads; numpy {np.__version__}"
          + (f"; torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else
             "; torch not installed"))
    bw = _common.measure_read_bandwidth(nbytes=1 << 28 if args.quick else 1 << 30)
    print(f"read bandwidth: {bw['all']:.1f} GB/s ({bw['threads']} threads), "
          f"{bw['single']:.1f} GB/s (1 thread)\n", flush=True)

    cases = []
    for H, n, d in (DECODE_QUICK if args.quick else DECODE):
        cases.append(run_case("decode", H, 1, n, d, rng, args.budget))
        print(f"  done decode H={H} n={n} d={d}", file=sys.stderr, flush=True)
    for H, n, d in (PREFILL_QUICK if args.quick else PREFILL):
        cases.append(run_case("prefill", H, n, n, d, rng, args.budget))
        print(f"  done prefill H={H} n={n} d={d}", file=sys.stderr, flush=True)

    headers = ["case", "H", "n", "d", "k_eps/n", "ours k=1% ms", "ours eps ms", "ours dense ms",
               "numpy topk ms", "numpy dense ms", "torch topk ms", "torch sdpa ms",
               "k=1% vs numpy topk", "k=1% vs torch sdpa", "k=1% vs ours dense",
               "eps vs ours dense", "k=1% GB/s", "% bw"]
    rows = []
    for c in cases:
        tk, te, td, nk, nd, thk, thd = c["t"]
        gbs = c["k_bytes"] / tk / 1e9
        rows.append([c["kind"], c["H"], c["n"], c["d"], f"{c['keps_frac']:.3f}",
                     fmt_ms(tk), fmt_ms(te), fmt_ms(td), fmt_ms(nk), fmt_ms(nd), fmt_ms(thk),
                     fmt_ms(thd), ratio(nk, tk), ratio(thd, tk), ratio(td, tk), ratio(td, te),
                     f"{gbs:.1f}", f"{100 * gbs / bw['all']:.0f}%"])
    print(_common.format_table(headers, rows, markdown=args.markdown))
    print("\nratios: competitor time / ours (> 1 means ours is faster). GB/s: K read once "
          "(H n d 4 bytes) per call of topk_attention(k = 1% n); for prefill that is not the "
          "floor (scores cost L n d), shown for reference only.")


if __name__ == "__main__":
    main()
