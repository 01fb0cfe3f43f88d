"""Concurrent use from Python threads: searches while a KeyIndex grows, and every public
function from 8 threads at once giving the serial results bit for bit."""
import math
import threading
import time

import numpy as np
import pytest

import topkattn
from topkattn.search import KeyIndex, _RWLock, certified_search


def _tv_float64(K, q, scale, kept):
    """True TV(P, P_hat) of the kept set over the keys K, from float64 logits (fsum)."""
    s = scale * (np.asarray(K, np.float64) @ np.asarray(q, np.float64))
    keep = np.zeros(s.shape[0], bool)
    keep[kept] = True
    e = np.exp(s - s.max())
    return math.fsum(e[~keep]) / math.fsum(e)


# ------------------------------------------------------------------ the reader-writer lock


def _run_all(threads, timeout):
    """Start every thread, wait for all of them, and fail on one still running (a deadlock)."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "deadlock"

def test_rwlock_excludes_writers_from_readers():
    lock = _RWLock()
    inside = {"r": 0, "w": 0}
    bad = []
    guard = threading.Lock()

    def reader():
        for _ in range(300):
            with lock.shared():
                with guard:
                    inside["r"] += 1
                    if inside["w"]:
                        bad.append("reader with a writer")
                with guard:
                    inside["r"] -= 1

    def writer():
        for _ in range(100):
            with lock.exclusive():
                with guard:
                    inside["w"] += 1
                    if inside["w"] > 1 or inside["r"]:
                        bad.append("writer not alone")
                with guard:
                    inside["w"] -= 1

    threads = [threading.Thread(target=reader) for _ in range(4)]
    threads += [threading.Thread(target=writer) for _ in range(2)]
    _run_all(threads, timeout=60)
    assert not bad, bad[:3]


def test_rwlock_waiting_writer_blocks_new_readers():
    lock = _RWLock()
    order = []
    first_reader_in = threading.Event()
    release_first = threading.Event()

    def first():
        with lock.shared():
            first_reader_in.set()
            release_first.wait(10)
        order.append("r1 out")

    def writer():
        with lock.exclusive():
            order.append("w")

    def late_reader():
        with lock.shared():
            order.append("r2")

    t1 = threading.Thread(target=first)
    t1.start()
    first_reader_in.wait(10)
    tw = threading.Thread(target=writer)
    tw.start()
    while not lock._writers_waiting:          # the writer is queued behind the reader
        threading.Event().wait(0.001)
    t2 = threading.Thread(target=late_reader)
    t2.start()
    threading.Event().wait(0.05)
    assert "r2" not in order                  # the late reader waits behind the writer
    release_first.set()
    for t in (t1, tw, t2):
        t.join(10)
    assert order.index("w") < order.index("r2")


# ------------------------------------------------------------------ searches while appending

@pytest.mark.parametrize("summary,proxy", [("auto", "int8"), ("minmax", None)])
def test_searches_while_appending_are_certified(summary, proxy):
    """One thread appends keys in odd-sized chunks (so the last block's summaries are
    rewritten and the buffers reallocated) while three threads search; every certificate
    is checked against float64 scoring of the keys present when that search started."""
    rng = np.random.default_rng(7)
    d, n0, chunk, chunks = 24, 200, 37, 60
    H = 2
    K_all = rng.standard_normal((H, n0 + chunk * chunks, d))
    queries = rng.standard_normal((40, H, d)) * 2.5
    # hidden outliers: appended keys aligned with the queries, the keys a search must not
    # miss if it read a stale or half-written summary
    for j in range(chunks):
        pos = n0 + j * chunk + int(rng.integers(chunk))
        K_all[:, pos] = 3.0 * queries[j % len(queries)] / np.linalg.norm(
            queries[j % len(queries)], axis=-1, keepdims=True) * math.sqrt(d) / 2.5
    index = KeyIndex(K_all[:, :n0], block_size=16, summary=summary, proxy=proxy)
    scale = 1.0 / math.sqrt(d)
    done = threading.Event()
    results, errors = [], []

    def appender():
        try:
            seen = 0
            for j in range(chunks):
                # paced by the searches: at least two finish between appends, so that
                # they see many sizes of the index
                while len(results) < seen + 2 and not errors:
                    time.sleep(0.0005)
                seen = len(results)
                index.append(K_all[:, n0 + j * chunk:n0 + (j + 1) * chunk])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    def searcher(tid):
        try:
            i = tid
            while not done.is_set() or i < tid + 9:
                q = queries[i % len(queries)]
                method = "delta" if i % 2 == 0 else "mc"
                res = certified_search(q, index, eps=0.02, method=method,
                                       delta=1e-9 if method == "mc" else None, seed=i)
                results.append((q, res))
                i += 3
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=appender)]
    threads += [threading.Thread(target=searcher, args=(t,)) for t in range(3)]
    _run_all(threads, timeout=300)
    assert not errors, errors[:3]
    assert index.n == K_all.shape[1]
    seen_n = {res.n for _, res in results}
    assert len(seen_n) > 3, f"the searches did not overlap the appends (n seen: {seen_n})"
    checked = 0
    for q, res in results:
        n_s = res.n
        assert n0 <= n_s <= K_all.shape[1] and (n_s - n0) % chunk == 0
        for h in range(H):
            k = int(res.k[h])
            kept = res.indices[h, :k]
            assert 1 <= k <= n_s and kept.min() >= 0 and kept.max() < n_s
            assert res.tv_bound[h] <= 0.02
            tv = _tv_float64(K_all[h, :n_s], q[h], scale, kept)
            assert tv <= res.tv_bound[h], (
                f"{res.method}: true TV {tv!r} above the certificate {res.tv_bound[h]!r} "
                f"(n = {n_s})")
            checked += 1
    assert checked >= 100


# ------------------------------------------------------------------ every public function

def _calls(seed):
    """(name, thunk) for every public function of topkattn on inputs drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 300)) * (1 + seed % 4)
    x[0, rng.integers(0, 300, 20)] = -np.inf
    x32 = x.astype(np.float32)
    k = [3, 50, 299]
    Q = rng.standard_normal((2, 5, 16))
    K = rng.standard_normal((2, 120, 16))
    V = rng.standard_normal((2, 120, 8))
    index = KeyIndex(K, block_size=16)
    K_big = rng.standard_normal((1, 20_000, 16))  # ordered on the thread pool below the top
    p = rng.uniform(0.01, 0.99, 7)
    return [
        ("tail_mass", lambda: topkattn.tail_mass(x, k)),
        ("log_tail_mass", lambda: topkattn.log_tail_mass(x32, k)),
        ("kl_truncated", lambda: topkattn.kl_truncated(x, k)),
        ("tv_curve", lambda: topkattn.tv_curve(x)),
        ("k_eps", lambda: topkattn.k_eps(x, 1e-3, return_tail=True)),
        ("topk", lambda: topkattn.topk(x, 17)),
        ("gap_bound", lambda: topkattn.gap_bound(x, k)),
        ("gap_bound_gap", lambda: topkattn.gap_bound(x32, k, form="gap")),
        ("multigap_bound", lambda: topkattn.multigap_bound(x, k, cuts=5)),
        ("multigap_bound_ranks", lambda: topkattn.multigap_bound(x, 10, cuts=[20, 40, 100])),
        ("block_bound", lambda: topkattn.block_bound(x[1:, :10], np.arange(1, 11), 1.0, 2.0)),
        ("gaussian_tail_mass", lambda: topkattn.gaussian_tail_mass(p, 1.0 + p)),
        ("gaussian_k_eps", lambda: topkattn.gaussian_k_eps(1000, 2.0 + p, 1e-2)),
        ("gaussian_k_eps_finite", lambda: topkattn.gaussian_k_eps(1000, 2.0, p, finite_n=True)),
        ("fit_gaussian", lambda: topkattn.fit_gaussian(x)),
        ("norm_cdf", lambda: topkattn.norm_cdf(x[1])),
        ("norm_sf", lambda: topkattn.norm_sf(x[2])),
        ("norm_ppf", lambda: topkattn.norm_ppf(p)),
        ("norm_isf", lambda: topkattn.norm_isf(p)),
        ("entropy", lambda: topkattn.entropy(x)),
        ("effective_support", lambda: topkattn.effective_support(x, 1e-3)),
        ("attention", lambda: topkattn.attention(Q, K, V)),
        ("topk_attention", lambda: topkattn.topk_attention(Q, K, V, eps=1e-2,
                                                           return_info=True)),
        ("attention_error", lambda: topkattn.attention_error(Q[:, 0], K, V, k=9)),
        ("attention_matrix_error", lambda: topkattn.attention_matrix_error(Q, K, 7)),
        ("dynamic_k", lambda: topkattn.dynamic_k(np.arange(1, 50), 2.0, 0.5)),
        ("certified_search", lambda: certified_search(Q[:, 0], index, eps=1e-2)),
        ("certified_search_mc", lambda: certified_search(Q, index, eps=1e-2, method="mc",
                                                         delta=1e-3, seed=seed)),
        ("certified_attention", lambda: topkattn.certified_attention(Q, index, V, eps=1e-2)),
        ("KeyIndex", lambda: KeyIndex(K, block_size=8)._tuple()),
        ("KeyIndex_large", lambda: KeyIndex(K_big, block_size=16)._tuple()),
    ]


def _flatten(obj):
    """Every array and scalar of a result, in order, for a bitwise comparison."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return [obj]
    if isinstance(obj, np.ndarray) or np.isscalar(obj):
        return [np.asarray(obj)]
    if isinstance(obj, dict):
        return [v for key in sorted(obj) for v in _flatten(obj[key])]
    if hasattr(obj, "__dataclass_fields__"):
        return [v for f in obj.__dataclass_fields__ for v in _flatten(getattr(obj, f))]
    if isinstance(obj, (tuple, list)):
        return [v for o in obj for v in _flatten(o)]
    if hasattr(obj, "_asdict"):
        return _flatten(obj._asdict())
    raise TypeError(f"cannot compare a {type(obj).__name__}")


def _bitwise_equal(a, b):
    fa, fb = _flatten(a), _flatten(b)
    if len(fa) != len(fb):
        return False
    for u, v in zip(fa, fb):
        if isinstance(u, np.ndarray) or isinstance(v, np.ndarray):
            u, v = np.asarray(u), np.asarray(v)
            if u.dtype != v.dtype or u.shape != v.shape or u.tobytes() != v.tobytes():
                return False
        elif u != v:
            return False
    return True


def test_every_public_function_from_8_threads_matches_serial():
    names = {name for name, _ in _calls(0)}
    public = {f for f in topkattn.__all__ if callable(getattr(topkattn, f))}
    public |= {"attention", "topk_attention", "attention_error", "attention_matrix_error",
               "dynamic_k", "certified_search", "certified_attention", "KeyIndex"}
    state = {"build_info", "set_simd", "get_simd", "set_num_threads", "get_num_threads"}
    results = {"TopkInfo", "AttentionError", "SearchResult"}   # result types, not computations
    missing = public - state - results - {n.rsplit("_mc", 1)[0] for n in names} - names
    assert not missing, f"public functions not exercised: {sorted(missing)}"

    seeds = list(range(8))
    serial = {s: [(name, fn()) for name, fn in _calls(s)] for s in seeds}
    calls = {s: _calls(s) for s in seeds}
    barrier = threading.Barrier(len(seeds))
    got, errors = {}, []

    def worker(s):
        try:
            barrier.wait(30)
            out = []
            for _ in range(3):
                out = [(name, fn()) for name, fn in calls[s]]
            got[s] = out
        except BaseException as e:  # pragma: no cover - reported below
            errors.append((s, e))

    threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
    _run_all(threads, timeout=300)
    assert not errors, errors[:3]
    for s in seeds:
        for (name, a), (name2, b) in zip(serial[s], got[s]):
            assert name == name2
            assert _bitwise_equal(a, b), f"{name} (seed {s}): threaded result differs"
