"""Run-time dispatch and threads (docs/design.md §7): every SIMD path this CPU runs agrees with the
scalar one, the TOPKATTN_SIMD override works, and results do not depend on the thread
count."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import topkattn

from _util import FLOATS, assert_rel

ROOT = Path(__file__).resolve().parents[1]
INFO = topkattn.build_info()


def test_build_info():
    info = topkattn.build_info()
    for key in ("version", "simd_active", "simd_compiled", "simd_supported", "cpu_features",
                "compiler", "threads", "cuda"):
        assert key in info, key
    assert info["version"] == topkattn.__version__
    assert "scalar" in info["simd_compiled"] and "scalar" in info["simd_supported"]
    assert set(info["simd_supported"]) <= set(info["simd_compiled"])
    assert set(info["simd_compiled"]) <= {"scalar", "avx2", "avx512", "neon"}
    assert info["simd_active"] in info["simd_supported"]
    assert info["simd_active"] == topkattn.get_simd()
    assert isinstance(info["cpu_features"], list)
    if "avx2" in info["simd_supported"]:
        assert {"avx2", "fma", "f16c"} <= set(info["cpu_features"])
    # a build has the x86 sets or the NEON set, never both; NEON is the default where it is
    assert not ({"avx2", "avx512"} & set(info["simd_compiled"]) and "neon" in info["simd_compiled"])
    if "neon" in info["simd_supported"]:
        assert "neon" in info["cpu_features"]
    assert isinstance(info["cuda"], bool)
    assert info["threads"]["num_threads"] == topkattn.get_num_threads() >= 1


def test_set_simd_rejects_unknown_and_unsupported_paths():
    before = topkattn.get_simd()
    with pytest.raises(ValueError, match="unknown SIMD path nonsense"):
        topkattn.set_simd("nonsense")
    for path in INFO["simd_compiled"]:
        if path not in INFO["simd_supported"]:
            with pytest.raises(ValueError, match=f"SIMD path {path} is not available"):
                topkattn.set_simd(path)
    assert topkattn.get_simd() == before


def test_set_simd_switches(simd_path):
    assert topkattn.build_info()["simd_active"] == simd_path


def _data():
    """Batches without near-ties: continuous random logits, lengths that are not multiples
    of any vector width, masked keys, and a long row past the small-row cut-off."""
    rng = np.random.default_rng(11)
    out = []
    for dtype in FLOATS:
        for shape in [(3, 1), (5, 7), (4, 33), (6, 129), (2, 1001), (1, 20_011)]:
            x = (3.0 * rng.standard_normal(shape)).astype(dtype)
            x[rng.random(shape) < 0.1] = -np.inf
            x[:, 0] = 0.5
            out.append(x)
        out.append((rng.uniform(-1e4, 0, (3, 300))).astype(dtype))
    return out


def _everything(x):
    n = x.shape[-1]
    k = np.minimum(np.arange(x.shape[0]) * 3 + 1, n)
    res = {
        "log_tail_mass": topkattn.log_tail_mass(x, k),
        "tail_mass": topkattn.tail_mass(x, k),
        "kl_truncated": topkattn.kl_truncated(x, k),
        "tv_curve": topkattn.tv_curve(x),
        "gap_bound": topkattn.gap_bound(x, k),
        "gap_bound_gap": topkattn.gap_bound(x, k, form="gap"),
        "multigap": topkattn.multigap_bound(x, k, cuts=5),
        "multigap_linear": topkattn.multigap_bound(x, k, cuts=5, spacing="linear"),
        "multigap_all": topkattn.multigap_bound(x, k, cuts=np.arange(1, n + 1)),
        "entropy": topkattn.entropy(x),
        "fit_mu": topkattn.fit_gaussian(x)[0],
        "fit_sigma": topkattn.fit_gaussian(x)[1],
    }
    exact = {
        "topk": topkattn.topk(x, min(n, 10)),
        "effective_support": topkattn.effective_support(x, 1e-3),
    }
    for eps in (1e-300, 1e-9, 0.01, 0.3):
        kk, tau = topkattn.k_eps(x, eps, return_tail=True)
        exact[f"k_eps{eps}"] = kk
        res[f"k_eps_tau{eps}"] = tau
    return res, exact


def test_every_path_matches_scalar(simd_path):
    for x in _data():
        res, exact = _everything(x)
        topkattn.set_simd("scalar")
        sres, sexact = _everything(x)
        topkattn.set_simd(simd_path)
        for name in res:
            assert_rel(res[name], sres[name], rtol=1e-13, atol=1e-300,
                       what=f"{simd_path} vs scalar: {name} on {x.dtype} {x.shape}")
        for name in exact:
            np.testing.assert_array_equal(exact[name], sexact[name],
                                          err_msg=f"{simd_path} vs scalar: {name} on {x.shape}")


def _env_import(value):
    env = dict(os.environ)
    env["TOPKATTN_SIMD"] = value
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", "import topkattn; print(topkattn.get_simd())"],
                          env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", INFO["simd_supported"])
def test_env_var_forces_a_supported_path(path):
    r = _env_import(path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == path
    r = _env_import(path.upper() + " ")  # case and spaces do not matter
    assert r.returncode == 0 and r.stdout.strip() == path, r.stderr


def test_env_var_unknown_path_fails_at_import():
    r = _env_import("sse9")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "TOPKATTN_SIMD='sse9'" in r.stderr, r.stderr
    assert "unknown SIMD path" in r.stderr


def test_env_var_unsupported_path_fails_at_import():
    missing = [p for p in ("avx2", "avx512", "neon") if p not in INFO["simd_supported"]]
    if not missing:
        pytest.skip("this CPU runs every SIMD path, so none can be refused")
    for path in missing:
        r = _env_import(path)
        assert r.returncode != 0
        assert "ImportError" in r.stderr and f"TOPKATTN_SIMD={path!r}" in r.stderr, r.stderr
        assert "not available" in r.stderr


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(9)
    x = (2.5 * rng.standard_normal((64, 8192))).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = -np.inf
    k = rng.integers(0, 8193, 64)
    eps = 10.0 ** rng.uniform(-12, -0.5, 64)

    def run():
        return [
            topkattn.log_tail_mass(x, k), topkattn.kl_truncated(x, k), topkattn.tv_curve(x),
            *topkattn.k_eps(x, eps, return_tail=True), topkattn.topk(x, 100),
            topkattn.gap_bound(x, k), topkattn.gap_bound(x, k, form="gap"),
            topkattn.multigap_bound(x, k, cuts=12), topkattn.entropy(x),
            topkattn.effective_support(x, 1e-4), *topkattn.fit_gaussian(x),
        ]

    topkattn.set_num_threads(1)
    assert topkattn.get_num_threads() == 1
    one = run()
    topkattn.set_num_threads(4)
    assert topkattn.get_num_threads() == 4
    four = run()
    for i, (a, b) in enumerate(zip(one, four)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b, err_msg=f"result {i} differs between 1 and 4 threads")
        assert a.tobytes() == b.tobytes(), f"result {i} not bit-identical"


def test_set_num_threads_default_and_env():
    topkattn.set_num_threads(3)
    assert topkattn.get_num_threads() == 3
    topkattn.set_num_threads(0)
    assert topkattn.get_num_threads() >= 1
    env = dict(os.environ, TOPKATTN_NUM_THREADS="3",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", "import topkattn; print(topkattn.get_num_threads())"],
                       env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr
    env["TOPKATTN_NUM_THREADS"] = "many"
    r = subprocess.run([sys.executable, "-c", "import topkattn"], env=env, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "TOPKATTN_NUM_THREADS must be an integer" in r.stderr


def test_concurrent_callers_from_python_threads():
    """The core releases the GIL: calls from several Python threads at once (each with its
    own worker threads and scratch arenas) give what the same calls give one at a time."""
    import threading
    rng = np.random.default_rng(11)
    x = (2.0 * rng.standard_normal((12, 70_000))).astype(np.float32)  # long rows: chunked
    y = rng.standard_normal((300, 900))
    Q, K, V = (rng.standard_normal(s) for s in ((3, 5, 16), (3, 2000, 16), (3, 2000, 8)))
    index = topkattn.KeyIndex(K.astype(np.float32))
    jobs = [
        lambda: topkattn.k_eps(x, 1e-3, return_tail=True),
        lambda: (topkattn.topk(y, 17), topkattn.multigap_bound(y, 40)),
        lambda: topkattn.topk_attention(Q, K, V, eps=1e-2, return_info=True),
        lambda: topkattn.certified_search(Q, index, 1e-2).indices,
    ]

    def flat(res):
        out = []
        for r in res if isinstance(res, tuple) else (res,):
            out += flat(r) if isinstance(r, tuple) else [np.asarray(getattr(r, "indices", r))]
        return out

    expected = [flat(job()) for job in jobs]
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                got.setdefault(i, []).append(flat(jobs[i % len(jobs)]()))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, runs in got.items():
        for run in runs:
            for a, b in zip(run, expected[i % len(jobs)]):
                assert a.tobytes() == b.tobytes()


def test_thread_pool_survives_resizing_and_fork():
    """The worker threads persist across calls: growing and shrinking the thread count
    between calls gives the same results, and a child process made by fork() (which
    inherits none of the parent's workers) starts a pool of its own instead of waiting on
    threads it does not have. Run in a fresh interpreter so that the fork sees only
    this library's threads."""
    code = r"""
import os, sys
import numpy as np, topkattn
x = (2.0 * np.random.default_rng(3).standard_normal((3, 300_000))).astype(np.float32)
ref = topkattn.k_eps(x, 1e-4)
for n in (2, 4, 1, 3, 2):
    topkattn.set_num_threads(n)
    assert (topkattn.k_eps(x, 1e-4) == ref).all(), n
pid = os.fork()
if pid == 0:
    ok = (topkattn.k_eps(x, 1e-4) == ref).all() and (topkattn.tail_mass(x, 7) > 0).all()
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "child 0", (r.stdout, r.stderr)
