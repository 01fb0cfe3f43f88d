"""Core row reductions against plain NumPy and torch (CPU), and against the machine's
measured read bandwidth, in one run on the same data.

For each shape (rows x n), dtype and function:

* ``k_eps(x, eps)``  vs sort descending, float64 exp relative to the row maximum,
  cumulative sums from the bottom, first k whose tail is <= eps (NumPy: ``np.sort`` +
  ``np.cumsum``; torch: ``torch.sort`` + ``torch.cumsum``), vectorised over rows;
* ``tail_mass(x, k)`` with k = 1% of n (at least 1) vs the fixed-k selection of the tail
  (NumPy: ``np.partition``, the value form of ``np.argpartition``; torch: ``torch.topk``
  and masking of the kept keys) and float64 log-sum-exp of the tail and of the row;
* ``tv_curve(x)``    vs sort + cumulative sums from the bottom, divided by the total.

Logits are N(0, 2^2), seeded; float32 rows are the float64 draw rounded. Every result is
checked against the NumPy one before timing (k_eps identical, tau and the curve within
1e-9 relative); a disagreement prints a line starting with ``!!! MISMATCH``.

Times are the best of several calls after a warm-up (the checked call); the three
competitors are called in turns, so a change of machine load hits them alike, each turn after
a pause in which no thread of the process burns CPU (see ``_common.settle``). topkattn
uses its default thread count (all CPUs) unless ``--threads``; NumPy runs on one thread;
torch uses its own intra-op thread count (printed). GB/s is the logits read once (rows * n * itemsize)
over topkattn's time; "% bw" compares it with the all-thread read bandwidth, measured
before and after the timings (the higher of the two is used: memory bandwidth on a
shared host drifts). Inputs smaller than the last-level cache are cache-resident after
the warm-up (marked ``*``): their GB/s can exceed the memory bandwidth; the large cases
(64 x 1e6 float32 = 256 MB) are the ones that measure streaming from memory.

    python benchmarks/bench_core.py                 # full run, a few minutes
    python benchmarks/bench_core.py --quick         # smoke run, seconds
    python benchmarks/bench_core.py --markdown      # table for a README
    python benchmarks/bench_core.py --simd scalar --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

try:
    import topkattn
except ImportError:  # run from a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import topkattn

try:
    import torch
except ImportError:
    torch = None

SIGMA = 2.0
EPS = 1e-3
RTOL = 1e-9

DEFAULT_SHAPES = ((1, 1_000_000), (16, 65536), (64, 16384), (256, 4096), (4096, 512),
                  (1, 4096), (1, 512))  # single rows: per-call costs count
QUICK_SHAPES = ((1, 65536), (16, 4096), (256, 512))
DEFAULT_LARGE = (64, 1_000_000)   # float32, 256 MB: well above L3
QUICK_LARGE = (4, 1_000_000)
DTYPES = (np.float32, np.float64)


def tail_k(n):
    return max(1, n // 100)


# ------------------------------------------------------------------ NumPy baselines

def np_k_eps(x, eps):
    """k_eps and tau per row: ascending sort, e^(s - max) in float64, cumsum from the
    bottom (c[j] = mass of the j+1 smallest = tau at k = n-1-j), first k with tau <= eps."""
    a = np.sort(x, axis=-1)
    w = np.exp(a.astype(np.float64) - a[..., -1:])
    c = np.cumsum(w, axis=-1)
    z = c[..., -1:]
    m = np.count_nonzero(c <= eps * z, axis=-1)          # smallest logits droppable
    n = x.shape[-1]
    k = n - m
    tail = np.where(m > 0, np.take_along_axis(c, np.maximum(m - 1, 0)[..., None], -1)[..., 0], 0.0)
    return k, tail / z[..., 0]


def np_tail_mass(x, k):
    """tau of the top-k set: partition, log-sum-exp (float64) of the tail and of the row."""
    n = x.shape[-1]
    t = np.partition(x, n - k, axis=-1)[..., : n - k].astype(np.float64)
    mt = t.max(axis=-1, keepdims=True)
    lse_t = mt[..., 0] + np.log(np.exp(t - mt).sum(axis=-1))
    xd = x.astype(np.float64)
    m = xd.max(axis=-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(xd - m).sum(axis=-1))
    return np.exp(lse_t - lse)


def np_tv_curve(x):
    """tau(k), k = 0..n: ascending sort, e^(s - max) in float64, cumsum from the bottom."""
    a = np.sort(x, axis=-1)
    w = np.exp(a.astype(np.float64) - a[..., -1:])
    c = np.cumsum(w, axis=-1)
    out = np.empty(x.shape[:-1] + (x.shape[-1] + 1,))
    out[..., :-1] = c[..., ::-1] / c[..., -1:]
    out[..., -1] = 0.0
    return out


# ------------------------------------------------------------------ torch baselines

def th_k_eps(xt, eps):
    a, _ = torch.sort(xt, dim=-1)
    a = a.double()
    w = torch.exp(a - a[..., -1:])
    c = torch.cumsum(w, dim=-1)
    z = c[..., -1:]
    m = (c <= eps * z).sum(dim=-1)
    k = xt.shape[-1] - m
    tail = torch.where(m > 0, torch.gather(c, -1, (m - 1).clamp(min=0)[..., None])[..., 0],
                       torch.zeros((), dtype=c.dtype))
    return k, tail / z[..., 0]


def th_tail_mass(xt, k):
    _, idx = torch.topk(xt, k, dim=-1, sorted=False)
    xd = xt.double()
    lse = torch.logsumexp(xd, dim=-1)
    lse_t = torch.logsumexp(xd.scatter(-1, idx, float("-inf")), dim=-1)
    return torch.exp(lse_t - lse)


def th_tv_curve(xt):
    a, _ = torch.sort(xt, dim=-1)
    a = a.double()
    c = torch.cumsum(torch.exp(a - a[..., -1:]), dim=-1)
    return torch.cat([torch.flip(c, dims=[-1]) / c[..., -1:],
                      torch.zeros(c.shape[:-1] + (1,), dtype=c.dtype)], dim=-1)


# ------------------------------------------------------------------ checks

def _rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = np.abs(a - b)
    s = np.maximum(np.abs(a), np.abs(b))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(d == 0, 0.0, d / s)
    return float(r.max()) if r.size else 0.0


def _mismatch(label, who, msg):
    print(f"!!! MISMATCH {label}: {who} disagrees with NumPy: {msg}", flush=True)
    return 1


def _as_numpy(res):
    """Results as NumPy arrays (torch tensors converted; tuples element-wise)."""
    if isinstance(res, tuple):
        return tuple(_as_numpy(r) for r in res)
    return res.numpy() if torch is not None and isinstance(res, torch.Tensor) else np.asarray(res)


def check_results(func, ref, results, label):
    """Compare each (who, result) with the NumPy result; returns the number of failures.

    k_eps: identical k, tau within RTOL; tail_mass, tv_curve: within RTOL relative."""
    bad = 0
    for who, res in results:
        res = _as_numpy(res)
        if func == "k_eps":
            (k, tau), (k_ref, tau_ref) = res, ref
            if not np.array_equal(k, k_ref):
                rows = np.flatnonzero(k != k_ref)
                r = rows[0]
                bad += _mismatch(label, who, f"k_eps differs in {rows.size} rows (row {r}: "
                                            f"{k[r]} vs {k_ref[r]})")
                continue
            res, ref_v = tau, tau_ref
        else:
            ref_v = ref
        e = _rel_err(res, ref_v)
        if e > RTOL:
            bad += _mismatch(label, who, f"max rel. err {e:.2e} > {RTOL:g}")
    return bad


# ------------------------------------------------------------------ cases

def callables(func, x, xt):
    """Zero-argument callables for one case: (topkattn, NumPy, torch or None), and the
    topkattn call whose result is checked (k_eps: with its tail)."""
    if func == "k_eps":
        return (lambda: topkattn.k_eps(x, EPS), lambda: np_k_eps(x, EPS),
                (lambda: th_k_eps(xt, EPS)) if xt is not None else None,
                lambda: topkattn.k_eps(x, EPS, return_tail=True))
    if func == "tail_mass":
        k = tail_k(x.shape[-1])
        f_tk = lambda: topkattn.tail_mass(x, k)  # noqa: E731
        return (f_tk, lambda: np_tail_mass(x, k),
                (lambda: th_tail_mass(xt, k)) if xt is not None else None, f_tk)
    return (lambda: topkattn.tv_curve(x), lambda: np_tv_curve(x),
            (lambda: th_tv_curve(xt)) if xt is not None else None,
            lambda: topkattn.tv_curve(x))


def first_call(fn):
    """(result, seconds) of one untimed-for-the-table call: the warm-up."""
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


def _core_file():
    return topkattn._core.__file__


def make_logits(rows, n, seed):
    rng = np.random.default_rng(seed)
    return SIGMA * rng.standard_normal((rows, n))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--simd", choices=("scalar", "avx2", "avx512"),
                    help="force a topkattn kernel set (topkattn.set_simd)")
    ap.add_argument("--threads", type=int,
                    help="threads for topkattn and torch (default: topkattn all CPUs, "
                         "torch its own default)")
    ap.add_argument("--repeats", type=int, help="timed calls per measurement (at least)")
    ap.add_argument("--bw-mib", type=int, help="buffer for the bandwidth measurement (MiB)")
    ap.add_argument("--no-large", action="store_true", help="skip the memory-bound large case")
    ap.add_argument("--only", choices=("k_eps", "tail_mass", "tv_curve"), action="append",
                    help="benchmark only these functions (repeatable)")
    ap.add_argument("--seed", type=int, default=12345)
    return ap.parse_args(argv)


def exp_cost_ns(n=4096, calls=2000):
    """Nanoseconds per value of the core's vector exp (the one every sum of exponentials
    uses), on cache-resident float64 values of the softmax range; best of 5."""
    x = np.random.default_rng(0).uniform(-30.0, 0.0, n)
    vexp = topkattn._core.vexp
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            vexp(x)
        best = min(best, (time.perf_counter() - t) / calls)
    # vexp also copies its input and allocates its output: subtract a plain copy's cost
    t_copy = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            np.array(x, copy=True)
            np.empty_like(x)
        t_copy = min(t_copy, (time.perf_counter() - t) / calls)
    return max(best - t_copy, 0.0) / n * 1e9


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.simd:
        topkattn.set_simd(args.simd)
    if args.threads:
        topkattn.set_num_threads(args.threads)
        if torch is not None:
            torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    large = QUICK_LARGE if args.quick else DEFAULT_LARGE
    repeats = args.repeats or (3 if args.quick else 5)
    min_time = 0.05 if args.quick else 0.3
    budget = 1.0 if args.quick else 8.0   # seconds of timed calls per competitor and case
    bw_bytes = (args.bw_mib or (128 if args.quick else 1024)) << 20
    funcs = args.only or ["k_eps", "tail_mass", "tv_curve"]

    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info = topkattn.build_info()
    nthreads = topkattn.get_num_threads()
    bw = _common.measure_read_bandwidth(bw_bytes, threads=nthreads,
                                        repeats=3 if args.quick else 5)
    l3 = _common.l3_bytes() or (32 << 20)

    header = [
        f"machine: {_common.machine_line()}",
        f"numpy {np.__version__} (single-threaded: sort, partition, exp, cumsum run on one "
        f"core); torch " + (f"{torch.__version__}, {torch.get_num_threads()} intra-op threads"
                            if torch is not None else "not installed"),
        f"topkattn {info['version']}: simd_active={topkattn.get_simd()}, "
        f"threads={nthreads}, compiler {info['compiler']}, extension built "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(os.path.getmtime(_core_file())))}",
        "",  # bandwidth, filled in at the end
        f"logits N(0, {SIGMA:g}^2), eps = {EPS:g} for k_eps, k = max(1, n/100) for tail_mass; "
        f"times: best of {repeats} or more calls after a warm-up, competitors called in "
        f"turns, each turn after a pause for spinning threads to stop (fewer calls, at least "
        f"1, when {repeats} would exceed {budget:g} s); "
        f"* = input fits in L3 ({l3 >> 20} MiB): cache-resident",
    ]

    cases = []
    for func in funcs:
        for rows, n in shapes:
            for dt in DTYPES:
                cases.append((func, rows, n, dt))
    if not args.no_large:
        for func in funcs:
            if func != "tv_curve":
                cases.append((func, large[0], large[1], np.float32))

    table = []
    gbs_list = []
    failures = 0
    data = {}
    for func, rows, n, dt in cases:
        key = (rows, n)
        if key not in data:
            data.clear()  # keep at most one shape's arrays alive
            base = make_logits(rows, n, args.seed + rows * 7919 + n)
            data[key] = {np.float64: base, np.float32: base.astype(np.float32)}
        x = data[key][dt]
        xt = torch.from_numpy(x) if torch is not None else None
        label = f"{func} {np.dtype(dt).name} {rows}x{n}"
        f_tk, f_np, f_th, f_chk = callables(func, x, xt)
        # the first call of each competitor is its warm-up and gives the checked result
        ref, w_np = first_call(f_np)
        got = [("topkattn", first_call(f_chk)[0])]
        _, w_tk = first_call(f_tk)
        w_th = None
        if f_th is not None:
            res_th, w_th = first_call(f_th)
            got.append(("torch", res_th))
        failures += check_results(func, ref, got, label)
        del ref, got
        (t_tk, _), (t_np, _), th = _common.time_calls(
            [f_tk, f_np, f_th], repeats=repeats, min_time=min_time, budget=budget,
            warm=[w_tk, w_np, w_th])
        t_th = th[0] if th else None
        gbs = x.nbytes / t_tk / 1e9
        resident = x.nbytes <= l3
        table.append([
            func, np.dtype(dt).name, f"{rows} x {n:_}", _common.fmt_ms(t_tk),
            _common.fmt_ms(t_np), _common.fmt_ms(t_th), _common.fmt_ratio(t_np, t_tk),
            _common.fmt_ratio(t_th, t_tk), f"{gbs:.2f}", "*" if resident else "",
        ])
        gbs_list.append(gbs)
        if not args.markdown:
            print(f"  {label}: topkattn {t_tk * 1e3:.2f} ms, NumPy {t_np * 1e3:.2f} ms"
                  + (f", torch {t_th * 1e3:.2f} ms" if t_th else ""), file=sys.stderr,
                  flush=True)
    data.clear()
    # memory bandwidth on a shared host drifts: measure again after the timings and
    # compare against the higher of the two (the lower percentage)
    bw2 = _common.measure_read_bandwidth(bw_bytes, threads=nthreads,
                                         repeats=3 if args.quick else 5)
    header[3] = (f"measured read bandwidth ({bw['nbytes'] >> 20} MiB float32 buffer, "
                 f"np.add/maximum.reduce, before / after the timings): "
                 f"{bw['single']:.2f} / {bw2['single']:.2f} GB/s on 1 thread, "
                 f"{bw['all']:.2f} / {bw2['all']:.2f} GB/s on {bw['threads']} threads; "
                 f"'% bw' is against {max(bw['all'], bw2['all']):.2f} GB/s "
                 f"({bw['threads']} threads, as topkattn uses; the higher measurement)")
    bw_ref = max(bw["all"], bw2["all"])
    exp_ns = exp_cost_ns()
    header.append(
        f"the vector exp (float64, {topkattn.get_simd()}): {exp_ns:.2f} ns per value on one "
        f"thread (4096 cache-resident values); every sum of exponentials pays it once per "
        f"logit, so one thread cannot pass {1e9 / exp_ns * 4 / 1e9:.2f} GB/s of float32 "
        f"logits ({nthreads} threads: {nthreads * 1e9 / exp_ns * 4 / 1e9:.2f} GB/s)")
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header.append(f"1-minute load average at start / end: {load0:.2f} / {load1:.2f} on "
                  f"{_common.cpu_count()} CPUs (other processes compete for the cores when it "
                  f"exceeds what this benchmark itself runs)")
    for row, gbs in zip(table, gbs_list):
        row[-1] = f"{100 * gbs / bw_ref:.0f}%" + row[-1]

    heads = ["function", "dtype", "rows x n", "topkattn ms", "NumPy ms", "torch ms",
             "speed-up vs NumPy", "speed-up vs torch", "GB/s", "% bw"]
    if args.markdown:
        print("\n".join(f"- {h}" for h in header))
        print()
    else:
        print("\n".join(header))
    print(_common.format_table(heads, table, markdown=args.markdown, align="lllrrrrrrr"))
    if failures:
        print(f"!!! MISMATCH: {failures} disagreement(s) with the NumPy results, see above")
    print(("\n" if args.markdown else "") + f"total {time.perf_counter() - t_start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
