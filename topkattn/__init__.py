"""topkattn: certified Top-k sparse attention.

Exact tail masses (the TV identity), k_eps, Top-k selection, certified bounds, the
Gaussian score model, and dense and Top-k attention with their output-level error,
computed by a C core with run-time SIMD dispatch.

Environment variables read at import:

``TOPKATTN_SIMD``
    ``scalar``, ``avx2``, ``avx512`` (x86-64) or ``neon`` (aarch64): force a kernel set
    (error if unavailable).
``TOPKATTN_NUM_THREADS``
    Worker threads for batched calls (default: online CPUs).
``TOPKATTN_CUDA_UNVERIFIED``
    ``1``: accept GPU arrays (torch, CuPy) on the optional CUDA core, which is built but not
    yet verified on a GPU; otherwise they raise TypeError (read at each call).
"""
import os as _os

from . import _core, _gpu
from .attention import (
    AttentionError,
    TopkInfo,
    attention,
    attention_error,
    attention_matrix_error,
    dynamic_k,
    topk_attention,
)
from .core import (
    block_bound,
    effective_support,
    entropy,
    fit_gaussian,
    gap_bound,
    gaussian_k_eps,
    gaussian_tail_mass,
    k_eps,
    kl_truncated,
    log_tail_mass,
    multigap_bound,
    norm_cdf,
    norm_isf,
    norm_ppf,
    norm_sf,
    tail_mass,
    topk,
    tv_curve,
)
from .search import KeyIndex, SearchResult, certified_attention, certified_search

__version__ = "0.1.0"


def set_simd(name):
    """Use the kernel set ``name`` ("scalar", "avx2", "avx512" or "neon") from now on.

    Raises ``ValueError`` if this build or this CPU does not have it. Results of every
    set agree to rounding; the tests compare each with "scalar".
    """
    _core.set_simd(str(name))


def get_simd():
    """Name of the kernel set in use."""
    return _core.simd_info()["active"]


def set_num_threads(n):
    """Number of threads for batched calls; ``n <= 0`` restores the default (all CPUs).

    Results do not depend on the thread count: each row is computed by one thread.
    """
    _core.set_num_threads(int(n))


def get_num_threads():
    """Number of threads batched calls may use."""
    return _core.get_num_threads()


def build_info():
    """How this installation was built and what it runs.

    Returns
    -------
    dict
        ``simd_active`` (kernel set in use), ``simd_compiled``, ``simd_supported`` (by this
        CPU), ``cpu_features`` (from CPUID/XGETBV on x86-64; ``neon``, ``fp16-convert`` on
        aarch64, where they are baseline), ``compiler``, ``threads`` (POSIX
        threads, and how many are used), ``cuda`` (whether the CUDA extension was built),
        ``cuda_info`` (``built``, ``enabled``, ``verified``, ``runtime``, ``devices``,
        ``device``, ``error``; see ``topkattn._gpu.info``) and ``version``.

    Examples
    --------
    >>> import topkattn
    >>> "scalar" in topkattn.build_info()["simd_compiled"]
    True
    """
    info = _core.simd_info()
    cuda = _gpu.info()
    return {
        "version": __version__,
        "simd_active": info["active"],
        "simd_compiled": list(info["compiled"]),
        "simd_supported": list(info["supported"]),
        "cpu_features": info["cpu_features"].split(",") if info["cpu_features"] else [],
        "compiler": info["compiler"],
        "threads": {"backend": "pthreads", "num_threads": get_num_threads()},
        "cuda": cuda["built"],
        "cuda_info": cuda,
    }


def _apply_environment():
    simd = _os.environ.get("TOPKATTN_SIMD", "").strip().lower()
    if simd:
        try:
            set_simd(simd)
        except ValueError as e:
            raise ImportError(f"TOPKATTN_SIMD={simd!r}: {e}") from None
    threads = _os.environ.get("TOPKATTN_NUM_THREADS", "").strip()
    if threads:
        try:
            set_num_threads(int(threads))
        except ValueError:
            raise ImportError(f"TOPKATTN_NUM_THREADS must be an integer, got {threads!r}") from None


_apply_environment()

__all__ = [
    "tail_mass", "log_tail_mass", "kl_truncated", "tv_curve", "k_eps", "topk",
    "gap_bound", "multigap_bound", "block_bound",
    "gaussian_tail_mass", "gaussian_k_eps", "fit_gaussian",
    "norm_cdf", "norm_sf", "norm_ppf", "norm_isf",
    "entropy", "effective_support",
    "attention", "topk_attention", "attention_error", "attention_matrix_error", "dynamic_k",
    "TopkInfo", "AttentionError",
    "KeyIndex", "SearchResult", "certified_search", "certified_attention",
    "build_info", "set_simd", "get_simd", "set_num_threads", "get_num_threads",
]
