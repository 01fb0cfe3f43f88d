"""The CUDA core against torch on the same GPU, in one run on the same data.

* ``k_eps`` (ours, radix walk, no sort) against the torch sort way: ``softmax``,
  ``torch.sort`` (descending), ``cumsum``, count below ``1 - eps``; rows x n from 64 x 8k to
  1024 x 128k, float32 scores N(0, 3^2). The k of both are compared (they may differ by one
  where float32 cumsum rounding crosses the boundary); target: ours >= 5x faster.
* decode ``topk_attention`` (L = 1, one K/V per head, d = 128, bfloat16) with k = 1% n,
  against ``K @ q`` + ``torch.topk`` + gather of V rows + softmax (the torch Top-k way) and
  against dense ``scaled_dot_product_attention``; target: ours within 1.5x of the time to
  read K once at the bandwidth measured in the same run (a device-to-device copy).

Times are medians of CUDA-event timings after a warm-up. The CUDA path is unverified until
tests/test_cuda.py has passed on a GPU; this script switches it on for itself
(TOPKATTN_CUDA_UNVERIFIED=1) and checks its results against torch before timing.

    python benchmarks/bench_cuda.py            # full run
    python benchmarks/bench_cuda.py --quick    # smaller sizes
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOPKATTN_CUDA_UNVERIFIED", "1")

try:
    import torch
except ImportError:
    torch = None

import topkattn  # noqa: E402
from topkattn import _gpu  # noqa: E402


def _need_gpu():
    if torch is None:
        sys.exit("bench_cuda.py: needs torch with CUDA (pip install torch); nothing to measure.")
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py: no CUDA device visible to torch; this benchmark runs on a GPU only.")
    info = _gpu.info()
    if not info["built"]:
        sys.exit("bench_cuda.py: topkattn was built without its CUDA core (topkattn._cuda); "
                 "rebuild with nvcc available (TOPKATTN_CUDA=1).")
    if info["devices"] < 1:
        sys.exit(f"bench_cuda.py: topkattn._cuda sees no device: {info['error']}")
    return info


def timed(fn, reps=10, warmup=2):
    """Median milliseconds of fn() between CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def bandwidth_gbs():
    """Device memory bandwidth from a 2 GiB device-to-device copy (read + write bytes)."""
    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def torch_k_eps(x, eps):
    p = torch.softmax(x, dim=-1)
    ps, _ = torch.sort(p, dim=-1, descending=True)
    c = torch.cumsum(ps, dim=-1)
    return (c < 1.0 - eps).sum(dim=-1) + 1


def bench_k_eps(sizes, eps=1e-3):
    print(f"\nk_eps, eps = {eps}, float32 scores N(0, 9)")
    print(f"{'rows x n':>16} {'ours ms':>9} {'torch ms':>9} {'speed-up':>9} {'k equal':>8} "
          f"{'max |dk|':>8}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows, n in sizes:
        x = 3.0 * torch.randn(rows, n, device="cuda", generator=g)
        k_ours = topkattn.k_eps(x, eps)
        k_torch = torch_k_eps(x, eps)
        same = (k_ours == k_torch).float().mean().item()
        dk = (k_ours - k_torch).abs().max().item()
        t_ours = timed(lambda: topkattn.k_eps(x, eps))
        t_torch = timed(lambda: torch_k_eps(x, eps))
        print(f"{rows:>7} x {n:>7} {t_ours:9.3f} {t_torch:9.3f} {t_torch / t_ours:8.2f}x "
              f"{100 * same:7.1f}% {dk:8d}")
        del x


def torch_topk_decode(q, K, V, k, scale):
    s = torch.einsum("hd,hnd->hn", q.float(), K.float()) * scale
    vals, idx = torch.topk(s, k, dim=-1)
    w = torch.softmax(vals, dim=-1)
    Vk = torch.gather(V, 1, idx[..., None].expand(-1, -1, V.shape[-1]))
    return torch.einsum("hk,hkd->hd", w, Vk.float()).to(V.dtype)


def bench_decode(sizes, bw, d=128, dtype=None):
    dtype = dtype or torch.bfloat16
    print(f"\ndecode topk_attention, k = 1% n, d = {d}, {str(dtype).replace('torch.', '')}; "
          f"read-K bound at {bw:.0f} GB/s")
    print(f"{'heads x n':>16} {'ours ms':>9} {'readK ms':>9} {'ours/readK':>10} "
          f"{'torch topk':>10} {'sdpa ms':>9} {'max err':>9}")
    g = torch.Generator(device="cuda").manual_seed(1)
    for heads, n in sizes:
        q = (5.0 * torch.randn(heads, 1, d, device="cuda", generator=g)).to(dtype)
        K = torch.randn(heads, n, d, device="cuda", generator=g).to(dtype)
        V = torch.randn(heads, n, d, device="cuda", generator=g).to(dtype)
        k = max(1, n // 100)
        scale = d ** -0.5
        ours = topkattn.topk_attention(q, K, V, k=k, scale=scale)
        ref = torch_topk_decode(q[:, 0], K, V, k, scale)
        err = (ours[:, 0].float() - ref.float()).abs().max().item()
        t_ours = timed(lambda: topkattn.topk_attention(q, K, V, k=k, scale=scale))
        t_torch = timed(lambda: torch_topk_decode(q[:, 0], K, V, k, scale))
        t_sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
            q[None], K[None], V[None], scale=scale))
        t_read = K.numel() * K.element_size() / (bw * 1e9) * 1e3
        print(f"{heads:>7} x {n:>7} {t_ours:9.3f} {t_read:9.3f} {t_ours / t_read:9.2f}x "
              f"{t_torch:10.3f} {t_sdpa:9.3f} {err:9.2e}")
        del q, K, V


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    args = ap.parse_args()
    info = _need_gpu()
    print(f"device: {info['device']}, CUDA runtime {info['runtime']} (topkattn._cuda), "
          f"torch {torch.__version__}")
    print("note: the CUDA path is unverified until tests/test_cuda.py passes on a GPU")
    bw = bandwidth_gbs()
    print(f"measured device-to-device copy bandwidth: {bw:.0f} GB/s")
    if args.quick:
        bench_k_eps([(64, 8192), (256, 32768)])
        bench_decode([(8, 16384), (32, 32768)], bw)
    else:
        bench_k_eps([(64, 8192), (1024, 8192), (64, 131072), (256, 131072), (1024, 131072)])
        bench_decode([(8, 32768), (32, 32768), (32, 131072), (64, 131072)], bw)


if __name__ == "__main__":
    main()
