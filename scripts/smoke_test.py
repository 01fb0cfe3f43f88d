"""Smoke test of an installed topkattn: imports it, prints build_info(), and checks
tail_mass, k_eps, attention and topk_attention on small inputs against plain NumPy
float64 computations written out here (independent of topkattn.reference).

Needs only NumPy and the package itself (no torch, no test dependencies). Used by CI on
the wheel built from the sdist and by cibuildwheel on every wheel it builds:

    python scripts/smoke_test.py [--installed] [--expect-cuda 0|1]

--installed      fail if topkattn was imported from this source tree rather than from an
                 installed wheel (run it from a directory other than the repository root)
--expect-cuda    check that the optional CUDA extension is (1) or is not (0) built
"""
import argparse
import json
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def np_tail_mass(x, k):
    """tau = sum of the softmax weights outside the top k, per row (float64)."""
    x = np.asarray(x, dtype=np.float64)
    s = -np.sort(-x, axis=-1)
    p = np.exp(s - s[..., :1])
    p /= p.sum(axis=-1, keepdims=True)
    return p[..., k:].sum(axis=-1)


def np_k_eps(x, eps):
    """Smallest k with tau(k) <= eps, and tau there, per row (float64)."""
    x = np.asarray(x, dtype=np.float64)
    s = -np.sort(-x, axis=-1)
    p = np.exp(s - s[..., :1])
    p /= p.sum(axis=-1, keepdims=True)
    # tau(k) for k = 0..n: the mass of ranks k..n-1
    tail = np.concatenate([np.cumsum(p[..., ::-1], axis=-1)[..., ::-1],
                           np.zeros(p.shape[:-1] + (1,))], axis=-1)
    k = np.argmax(tail <= eps, axis=-1)
    return k, np.take_along_axis(tail, k[..., None], axis=-1)[..., 0]


def np_attention(Q, K, V, keep=None):
    """softmax(Q K^T / sqrt(d)) V in float64; with keep, the softmax runs over kept keys only."""
    Q, K, V = (np.asarray(a, dtype=np.float64) for a in (Q, K, V))
    s = Q @ np.swapaxes(K, -1, -2) / np.sqrt(Q.shape[-1])
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)) @ V


def check(name, ok, detail=""):
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return bool(ok)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--installed", action="store_true",
                    help="fail if topkattn is imported from this source tree")
    ap.add_argument("--expect-cuda", choices=("0", "1"), default=None,
                    help="check whether the optional CUDA extension was built")
    args = ap.parse_args(argv)

    import topkattn

    where = os.path.dirname(os.path.abspath(topkattn.__file__))
    info = topkattn.build_info()
    print(f"topkattn {topkattn.__version__} from {where}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print(json.dumps(info, indent=1, default=str))

    results = []
    results.append(check("imported from an installed location",
                         not args.installed or where != os.path.join(REPO, "topkattn"), where))
    results.append(check("no torch imported by topkattn", "torch" not in sys.modules))
    results.append(check("scalar kernels compiled", "scalar" in info["simd_compiled"],
                         ",".join(info["simd_compiled"])))
    if platform.machine().lower() in ("x86_64", "amd64"):
        results.append(check("AVX2 and AVX-512 kernels compiled",
                             {"avx2", "avx512"} <= set(info["simd_compiled"]),
                             ",".join(info["simd_compiled"])))
    if args.expect_cuda is not None:
        results.append(check(f"CUDA extension built == {args.expect_cuda == '1'}",
                             bool(info["cuda"]) == (args.expect_cuda == "1"), str(info["cuda"])))

    rng = np.random.default_rng(20260101)
    x64 = rng.normal(0.0, 2.0, size=(3, 5, 700))
    x64[0, 0, ::7] = -np.inf                         # masked keys
    active = topkattn.get_simd()
    # every kernel set this build has and this CPU runs, the default one last
    sets = [s for s in info["simd_compiled"] if s in info["simd_supported"] and s != active]
    for simd in sets + [active]:
        topkattn.set_simd(simd)
        for dtype in (np.float64, np.float32):
            x = x64.astype(dtype)
            for k in (0, 1, 13, 400):
                got = topkattn.tail_mass(x, k)
                want = np_tail_mass(x, k)
                results.append(check(f"[{simd}] tail_mass {np.dtype(dtype).name} k={k}",
                                     got.shape == want.shape and got.dtype == np.float64
                                     and np.allclose(got, want, rtol=1e-10, atol=1e-15),
                                     f"max abs diff {np.max(np.abs(got - want)):.2e}"))
            for eps in (0.5, 1e-2, 1e-4):
                k, tau = topkattn.k_eps(x, eps, return_tail=True)
                wk, wtau = np_k_eps(x, eps)
                results.append(check(f"[{simd}] k_eps {np.dtype(dtype).name} eps={eps:g}",
                                     np.array_equal(k, wk)
                                     and np.allclose(tau, wtau, rtol=1e-9, atol=1e-15),
                                     f"k in [{k.min()}, {k.max()}]"))

    Q = rng.standard_normal((2, 3, 8))
    K = rng.standard_normal((2, 11, 8))
    V = rng.standard_normal((2, 11, 4))
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        q, kk, v = (a.astype(dtype) for a in (Q, K, V))
        out = topkattn.attention(q, kk, v)
        want = np_attention(q, kk, v)
        results.append(check(f"attention {np.dtype(dtype).name}",
                             out.shape == (2, 3, 4) and out.dtype == dtype
                             and np.allclose(out, want, rtol=tol, atol=tol),
                             f"max abs diff {np.max(np.abs(out - want)):.2e}"))
        s = q.astype(np.float64) @ np.swapaxes(kk.astype(np.float64), -1, -2)
        rank = np.argsort(np.argsort(-s, axis=-1, kind="stable"), axis=-1)
        out = topkattn.topk_attention(q, kk, v, k=4)
        want = np_attention(q, kk, v, keep=rank < 4)
        results.append(check(f"topk_attention k=4 {np.dtype(dtype).name}",
                             out.shape == (2, 3, 4) and np.allclose(out, want, rtol=tol, atol=tol),
                             f"max abs diff {np.max(np.abs(out - want)):.2e}"))

    failed = results.count(False)
    if failed:
        print(f"smoke test: {failed} of {len(results)} checks FAILED")
        return 1
    print(f"smoke test: all {len(results)} checks ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
