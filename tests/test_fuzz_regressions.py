"""Regression tests for what the fuzz targets in fuzz/ found (see fuzz/README.md).

Each test replays the smallest form of one finding and asserts the right behaviour."""
import subprocess
import sys

import numpy as np
import pytest

import topkattn
from topkattn import _core
from topkattn import reference as ref

# the ASan runtime is loaded: scripts/sanitize.sh or fuzz/run.sh
with open("/proc/self/maps") as _maps:
    _mapped = _maps.read()
SANITIZED = "libasan" in _mapped or "asan_with_fuzzer" in _mapped


def misaligned(a):
    """A copy of ``a`` at an odd byte address (NumPy's ALIGNED flag is False)."""
    a = np.ascontiguousarray(a)
    raw = np.zeros(a.nbytes + 1, dtype=np.uint8)
    view = raw[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned
    return view


ROW_CALLS = {
    "tail_mass": lambda x: topkattn.tail_mass(x, 3),
    "log_tail_mass": lambda x: topkattn.log_tail_mass(x, 3),
    "kl_truncated": lambda x: topkattn.kl_truncated(x, 3),
    "tv_curve": topkattn.tv_curve,
    "k_eps": lambda x: topkattn.k_eps(x, 0.05, return_tail=True),
    "topk": lambda x: topkattn.topk(x, 4),
    "gap_bound": lambda x: topkattn.gap_bound(x, 3),
    "multigap_bound": lambda x: topkattn.multigap_bound(x, 3, cuts=4),
    "entropy": topkattn.entropy,
    "effective_support": lambda x: topkattn.effective_support(x, 0.05),
    "fit_gaussian": topkattn.fit_gaussian,
}


@pytest.mark.parametrize("name", sorted(ROW_CALLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_logits_give_the_aligned_results(name, dtype, rng):
    # found by fuzz_core: a float array at an odd address reached the kernels, which read
    # it as typed values (UBSan: misaligned load in csrc/cpu/kernels.inc); the Python layer
    # now copies such arrays to aligned memory
    x = rng.standard_normal((3, 70)).astype(dtype)
    x[1, 5] = -np.inf
    a, b = ROW_CALLS[name](x), ROW_CALLS[name](misaligned(x))
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        np.testing.assert_array_equal(u, v)


def test_misaligned_search_and_attention_inputs(rng):
    # found by fuzz_search: a misaligned query reached _core.search, which refused it as
    # "index array Q has the wrong dtype, rank or layout"
    K = rng.standard_normal((2, 300, 8))
    V = rng.standard_normal((2, 300, 3))
    Q = rng.standard_normal((2, 4, 8))
    index = topkattn.KeyIndex(K, block_size=16)
    a = topkattn.certified_search(Q, index, eps=0.01, V=V)
    b = topkattn.certified_search(misaligned(Q), index, eps=misaligned(np.full((2, 4), 0.01)),
                                  V=misaligned(V))
    for f in ("indices", "k", "tv_bound", "output"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    index2 = topkattn.KeyIndex(misaligned(K), block_size=16)
    index2.append(misaligned(K[:, :5]))
    assert index2.n == 305
    dense = topkattn.attention(misaligned(Q), misaligned(K), misaligned(V))
    np.testing.assert_allclose(dense, ref.attention(Q, K, V), rtol=1e-12, atol=1e-14)
    # found by fuzz_attention: a misaligned float64 mask reached the core as it was
    mask = np.where(rng.random((4, 300)) < 0.3, -np.inf, 0.0)
    np.testing.assert_array_equal(topkattn.attention(Q, K, V, mask=misaligned(mask)),
                                  topkattn.attention(Q, K, V, mask=mask))


@pytest.mark.parametrize("name", sorted(ROW_CALLS))
def test_empty_last_axis_with_a_huge_batch_fails_before_allocating(name):
    # found by fuzz_core: logits of shape (1, 2**31, 0) made the Python layer broadcast k to
    # 2**31 rows (16 GiB) before the core refused the empty last axis
    x = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(1, 2 ** 31, 0), strides=(0, 0, 0))
    with pytest.raises(ValueError, match="empty last axis"):
        ROW_CALLS[name](x)


def test_core_refuses_misaligned_logits():
    # found by fuzz_core: parse_logits (csrc/pyutil.c) took arrays that are not aligned and
    # the kernels read them as typed values (undefined behaviour); the private entry points
    # now refuse them, naming the argument
    x = np.linspace(-1.0, 1.0, 40)
    for dtype in (np.float64, np.float32):
        with pytest.raises(ValueError, match="logits is not aligned"):
            _core.entropy(misaligned(x.astype(dtype)))
    with pytest.raises(ValueError, match="logits is not aligned"):
        _core.multigap_bound(misaligned(x), np.array([3]), None, 4, 0)
    # a misaligned stride (every element 12 bytes apart) is refused as well
    raw = np.zeros(40 * 12 + 8, dtype=np.uint8)
    strided = np.lib.stride_tricks.as_strided(raw.view(np.float64), shape=(40,), strides=(12,))
    assert not strided.flags.aligned
    with pytest.raises(ValueError, match="logits is not aligned"):
        _core.tail_mass(strided, np.array([3]), False)
    # the aligned array itself still works
    assert np.isfinite(_core.entropy(x))


def _attention_args(q, k, v, mask=None):
    """_core.attention's arguments for one problem (batch shape (1,)), as the Python layer
    builds them, from arrays taken as they are."""
    off = np.zeros(1, dtype=np.int64)
    m = None if mask is None else (mask, off, int(mask.strides[0]), int(mask.strides[1]))
    return (0, (q, off, int(q.strides[0])), (k, off, int(k.strides[0])),
            (v, off, int(v.strides[0])), m, (1,), q.shape[0], k.shape[0], q.shape[1],
            v.shape[1], 0.5, None, None, False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_core_attention_refuses_misaligned_operands(dtype, rng):
    # the same for the operands of _core.attention: a misaligned array, byte offset or row
    # stride is refused, naming the operand
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((3, 4), (5, 4), (5, 2)))
    mask = np.zeros((3, 5))
    good = _core.attention(*_attention_args(q, k, v, mask))
    np.testing.assert_allclose(good, ref.attention(q, k, v, scale=0.5),
                               rtol=1e-5 if dtype == np.float32 else 1e-12)
    for name in ("Q", "K", "V", "mask"):
        ops = dict(Q=q, K=k, V=v, mask=mask)
        ops[name] = misaligned(ops[name])
        with pytest.raises(ValueError, match=f"{name} is not aligned"):
            _core.attention(*_attention_args(ops["Q"], ops["K"], ops["V"], ops["mask"]))
    args = list(_attention_args(q, k, v, mask))
    args[1] = (q, np.array([1], dtype=np.int64), args[1][2])  # an offset of one byte
    with pytest.raises(ValueError, match="Q is not aligned"):
        _core.attention(*args)
    args = list(_attention_args(q, k, v, mask))
    args[2] = (k, args[2][1], 6)  # a row stride of 6 bytes
    with pytest.raises(ValueError, match="K is not aligned"):
        _core.attention(*args)
    args = list(_attention_args(q, k, v, mask))
    args[4] = (mask, args[4][1], 40, 4)  # a column stride of 4 bytes in a float64 mask
    with pytest.raises(ValueError, match="mask is not aligned"):
        _core.attention(*args)


def test_core_search_refuses_misaligned_index_arrays(rng):
    # the index arrays and the queries of _core.search / index_fill / index_order: refused,
    # naming the array (they were refused before as "wrong dtype, rank or layout")
    K = rng.standard_normal((1, 40, 4))
    index = topkattn.KeyIndex(K, block_size=8)
    t = index._tuple()
    q, eps = np.zeros((1, 1, 4)), np.full(1, 0.1)
    _core.search(t, q, 1.0, eps, 0, 0.0, 0, 16, True, None)
    with pytest.raises(ValueError, match="Q is not aligned"):
        _core.search(t, misaligned(q), 1.0, eps, 0, 0.0, 0, 16, True, None)
    with pytest.raises(ValueError, match="keys is not aligned"):
        _core.search((misaligned(t[0]),) + t[1:], q, 1.0, eps, 0, 0.0, 0, 16, True, None)
    with pytest.raises(ValueError, match="keys is not aligned"):
        _core.index_order(misaligned(K), 8)


def _nan_in_second_row():
    Q = np.ones((1, 5, 2))
    Q[0, 3] = np.nan
    return Q, np.ones((1, 3, 2)), np.zeros((1, 3, 4))


def _masked_second_row():
    mask = np.zeros((2, 3))
    mask[1] = -np.inf
    return np.ones((2, 2)), np.ones((3, 2)), np.zeros((3, 4)), mask


@pytest.mark.parametrize("call", ["attention", "topk_attention", "mask"])
def test_attention_reports_a_bad_row_after_the_first(call):
    # found by fuzz_attention: NaN scores (or a fully masked row) in query row >= 1 of a
    # problem with few groups were not reported; with return_info=True the core then
    # copied the kept lists of uninitialised k values (a huge allocation or a heap read)
    Q, K, V = _nan_in_second_row()
    with pytest.raises(ValueError):
        if call == "attention":
            topkattn.attention(Q, K, V)
        elif call == "topk_attention":
            topkattn.topk_attention(Q, K, V, k=2)  # return_info=False: no copy of the lists
        else:
            q, k, v, mask = _masked_second_row()
            topkattn.attention(q, k, v, mask=mask)


def test_key_index_refuses_an_empty_batch_before_allocating():
    # found by fuzz_search: KeyIndex(K) with K of shape (0, 41, 2**31, 1) allocated the
    # 2**31 key positions (16 GiB) for an index no search can use (no key set)
    K = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(0, 41, 2 ** 31, 1),
                                        strides=(0, 0, 0, 0))
    with pytest.raises(ValueError, match="empty batch axis"):
        topkattn.KeyIndex(K)


@pytest.mark.parametrize("op", [-1, -2 ** 31, 7, 2 ** 31 - 1])
def test_core_gauss_refuses_an_unknown_op(op):
    # found by fuzz_core: py_gauss (csrc/module.c) ran an unknown op < 0 as the finite-n
    # k_eps, reading second and third arrays it had not checked (ASan: heap-buffer-overflow
    # when they were shorter, a NULL dereference when missing); unknown ops are refused
    # now, whatever arrays come with them
    x = np.full(3, 100.0)
    with pytest.raises(ValueError, match="unknown op"):
        _core.gauss(op, x, np.full(3, 2.0), np.full(3, 0.1))
    with pytest.raises(ValueError, match="unknown op"):
        _core.gauss(op, x)
    # the known ops are what the public functions compute
    np.testing.assert_array_equal(_core.gauss(6, x, np.full(3, 2.0), np.full(3, 0.1)),
                                  topkattn.gaussian_k_eps(100, 2.0, 0.1, finite_n=True))


@pytest.mark.parametrize("row", [[1e38, 0.0], [-1e300, -1e301], [1e19, 1e19 - 1e4]])
def test_k_eps_with_a_huge_log_normaliser(row):
    # found by fuzz_attention (eps = 1e-310 with scale = -3.4e38); the exact answer is 1:
    # the top key carries all the mass to within e^-1000 or less
    x = np.array(row)
    k, tau = topkattn.k_eps(x, 1e-300, return_tail=True)
    assert int(k) == 1 and float(tau) <= 1e-300


@pytest.mark.parametrize("n", [1025, 3000])
def test_k_eps_on_logits_spread_over_subnormals(n):
    # found by tests/c/test_simd_sets.c: a bracket of logits whose spread is subnormal made
    # the bucket scale of the weighted selection infinite and a bucket index NaN (a crash)
    rng = np.random.default_rng(0)
    sub = np.array([5e-324, -5e-324, 0.0, -0.0, 2.2250738585072009e-308, 1e-310,
                    1.401298464324817e-45, 5.960464477539063e-08])
    x = sub[rng.integers(0, 8, n)]
    for eps in (0.01, 0.3, 0.9):
        k, tau = topkattn.k_eps(x, eps, return_tail=True)
        # every weight is 1 to within 6e-8: k is about (1 - eps) n, and the exact answer
        assert int(k) == int(ref.k_eps(x, eps)) and float(tau) <= eps


def test_multigap_bound_with_a_huge_segment_count_returns():
    # found by fuzz_core (a timeout): multigap_row (csrc/rows.c) ran its segment loop
    # J = cuts times whatever the row's length; run in a subprocess so that a hang cannot
    # stall the suite
    code = ("import numpy as np, topkattn; x = np.linspace(0.0, -3.0, 8); "
            "print(*[float(topkattn.multigap_bound(x, 2, cuts=J, spacing=s)) "
            "for J in (2**62, 2**63 - 1) for s in ('geometric', 'linear')])")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("multigap_bound(cuts=2**62) did not return within 20 s")
    assert out.returncode == 0, out.stderr
    exact = float(ref.tail_mass(np.linspace(0.0, -3.0, 8), 2))
    assert all(exact <= float(b) <= 1.0 for b in out.stdout.split())


@pytest.mark.parametrize("spacing", [0, 1])
def test_multigap_shortcut_is_the_loop_bit_for_bit(spacing, rng):
    # many segments take a shortcut over the segment loop (csrc/rows.c, multigap_u); the
    # private flag `exhaustive` runs the loop itself: the two agree bit for bit at J around
    # and past the shortcut's threshold (8 span (log2 span + 1), span = n' - k), on rows
    # with ties and -inf entries
    for n in (2, 3, 9, 40, 150):
        x = np.round(rng.standard_normal((6, n)) * 4, 1)
        x[1, : n // 2] = -np.inf
        x[2] = x[2, 0]
        x[3, -1] = -np.inf
        x[1, -1] = 0.0
        kk = np.array([1, max(n // 3, 1), n - 1, 1, max(n - 2, 1), 1], dtype=np.int64)
        span = n
        thr = int(8 * span * (np.log2(span) + 1))
        for J in (thr - 1, thr, thr + 1, 2 * thr + 7, 5 * thr + 3, 40 * thr + 1):
            fast = _core.multigap_bound(x, kk, None, J, spacing)
            full = _core.multigap_bound(x, kk, None, J, spacing, True)
            np.testing.assert_array_equal(fast, full, err_msg=f"n={n} J={J}")
            tau = np.array([ref.tail_mass(x[r], int(kk[r])) for r in range(6)])
            assert np.all(fast >= tau)
    # and the public function's cuts agree with the reference's segment ends: at J past the
    # threshold, cutting at every rank after the first gives what the explicit ranks give
    x = rng.standard_normal(30)
    J = 10 ** 6
    ends = ref.multigap_cuts(3, 30, J, ["geometric", "linear"][spacing])
    assert ends == sorted(set(ends)) and ends[-1] == 30 and ends[1:] == list(
        range(ends[0] + 1, 31))


def test_attention_error_with_no_value_columns_and_an_empty_huge_batch(rng):
    # found by fuzz_attention: d_v = 0 failed with "cannot reshape array of size 0", and a
    # mask of shape (2**31, 0, 1, 1) (an empty batch) made attention_error build an index
    # grid of 2**31 entries (16 GiB)
    q, K = rng.standard_normal((3, 6)), rng.standard_normal((8, 6))
    r = topkattn.attention_error(q, K, np.zeros((8, 0)), k=2)
    np.testing.assert_array_equal(r.error, np.zeros(3))
    np.testing.assert_allclose(r.tau, topkattn.tail_mass(ref.scores(q, K), 2), rtol=1e-12)
    mask = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(2 ** 31, 0, 1, 1),
                                           strides=(0, 0, 0, 0))
    r = topkattn.attention_error(q, K, rng.standard_normal((8, 2)), k=2, mask=mask)
    assert r.error.shape == (2 ** 31, 0, 3) and r.tau.size == 0


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("L", [2, 5, 9])
def test_attention_names_the_lowest_bad_query_row(L, threads, rng):
    """The error names the lowest failing query row, whatever group of four it is in and
    whatever the thread count."""
    topkattn.set_num_threads(threads)
    Q = rng.standard_normal((3, L, 8))
    K, V = rng.standard_normal((3, 6, 8)), rng.standard_normal((3, 6, 4))
    Q[2, 0, 0] = np.nan
    Q[1, L - 1, 3] = np.nan
    for call in (lambda: topkattn.attention(Q, K, V),
                 lambda: topkattn.topk_attention(Q, K, V, k=2, return_info=True),
                 lambda: topkattn.attention_error(Q, K, V, k=2)):
        with pytest.raises(ValueError, match=rf"index \(1, {L - 1}\)"):
            call()


@pytest.mark.parametrize("proxy", ["int8", None])
def test_key_index_with_a_block_size_near_2_63(proxy, rng):
    # found while fixing parse_index: KeyIndex(K, block_size=2**62) was accepted, and the
    # search sized its buffers by the block size (an overflow to a small buffer, then a
    # segmentation fault); a block size past the capacity now means one block, as it should
    K = rng.standard_normal((2, 100, 4))
    Q = 3 * K[:, :3]
    want = topkattn.certified_search(Q, topkattn.KeyIndex(K, block_size=100, proxy=proxy), 0.01)
    for bs in (101, 2 ** 40, 2 ** 62, 2 ** 63 - 1):
        index = topkattn.KeyIndex(K, block_size=bs, proxy=proxy)
        got = topkattn.certified_search(Q, index, 0.01)
        for f in ("indices", "k", "tv_bound", "keys_scored"):
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
        index.append(K[:, :7])
        got = topkattn.certified_search(Q, index, 0.01)
        assert index.n == 107 and np.all(got.k >= 1)


def test_core_index_tuple_with_a_huge_block_size(rng):
    # found by fuzz_search (UBSan): parse_index (csrc/py_search.c) computed
    # cap + block_size - 1 in a signed type, an overflow for a block size near 2^63 in a
    # corrupted index tuple; such a block size now stands for one block of every key
    index = topkattn.KeyIndex(rng.standard_normal((1, 50, 3)), block_size=50)
    t = index._tuple()
    q, eps = rng.standard_normal((1, 2, 3)), np.full(2, 0.05)
    want = _core.search(t, q, 1.0, eps, 0, 0.0, 0, 16, True, None)
    for bs in (2 ** 62, 2 ** 63 - 1):
        t2 = t[:3] + (bs,) + t[4:]
        got = _core.search(t2, q, 1.0, eps, 0, 0.0, 0, 16, True, None)
        for a, b in zip(want[:4], got[:4]):
            np.testing.assert_array_equal(a, b)
        _core.index_fill(t2, 0)
    with pytest.raises(OverflowError):
        _core.search(t[:3] + (2 ** 63,) + t[4:], q, 1.0, eps, 0, 0.0, 0, 16, True, None)


def test_core_index_order_without_keys_or_dimensions():
    # found by fuzz_search: _core.index_order looped over every head when there were no keys
    # (2^31 heads of shape (0, 1): 8 s) and allocated the positions of 2^31 keys of d = 0
    # (16 GiB) before anything refused them
    def zeros(shape):
        return np.lib.stride_tricks.as_strided(np.zeros(1), shape=shape,
                                               strides=(0,) * len(shape))
    code = ("import time, numpy as np; from topkattn import _core; t = time.perf_counter(); "
            "p = _core.index_order(np.lib.stride_tricks.as_strided(np.zeros(1), "
            "shape=(2**31, 0, 1), strides=(0, 0, 0)), 4); "
            "print(p.shape == (2**31, 0), time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    ok, seconds = out.stdout.split()
    assert ok == "True" and float(seconds) < 1.0
    for shape in ((1, 2 ** 31, 0), (2 ** 31, 1, 0), (0, 0, 0)):
        with pytest.raises(ValueError, match="d = 0"):
            _core.index_order(zeros(shape), 4)
    assert _core.index_order(np.zeros((3, 0, 2)), 4).shape == (3, 0)
    np.testing.assert_array_equal(_core.index_order(np.zeros((2, 3, 2)), 4),
                                  np.tile(np.arange(3), (2, 1)))


@pytest.mark.parametrize("d", [8, 128])
@pytest.mark.parametrize("L", [1, 4])
def test_float32_scores_over_keys_with_negative_or_zero_row_strides(L, d, rng):
    # found by fuzz_attention: the float32 scoring loops formed the address of the keys a
    # few steps ahead (to prefetch them) from the row stride before checking that the keys
    # are contiguous; with a negative stride that pointer arithmetic overflowed (UBSan,
    # kernels.inc, clang's build; gcc's sanitized build had dropped the unused address).
    # The offsets are now formed only for contiguous keys. Keys read backwards or all one
    # row give the results of a copy.
    Q = rng.standard_normal((2, L, d)).astype(np.float32)
    K = rng.standard_normal((2, 40, d)).astype(np.float32)
    V = rng.standard_normal((2, 40, 3)).astype(np.float32)
    one = np.broadcast_to(K[:, :1], K.shape)
    for keys in (K[:, ::-1], one):
        assert keys.strides[1] <= 0
        copy = np.ascontiguousarray(keys)
        np.testing.assert_array_equal(topkattn.attention(Q, keys, V), topkattn.attention(Q, copy, V))
        np.testing.assert_array_equal(topkattn.topk_attention(Q, keys, V, k=5),
                                      topkattn.topk_attention(Q, copy, V, k=5))


@pytest.mark.parametrize("summary", ["minmax", "ball", "auto"])
def test_streaming_search_over_min_max_summaries(summary, rng):
    # found by fuzz_search: the streaming search's sample formed the address of the head's
    # block radii (used only with 4-bit proxies) for every index; an index of min/max
    # summaries has none, and NULL plus an offset is undefined (UBSan, clang's build). The
    # address is formed only with 4-bit proxies. The streaming search over each summary
    # kind (int8 proxies, the sample's blocks, several heads) certifies against float64.
    cent = rng.standard_normal((6, 9))
    K = cent[rng.integers(0, 6, (2, 3000))] + 0.2 * rng.standard_normal((2, 3000, 9))
    Q = 3.0 * K[:, rng.integers(0, 3000, 5)]
    index = topkattn.KeyIndex(K, block_size=16, summary=summary)
    res = topkattn.certified_search(Q, index, 1e-3)
    assert res.proxies_read.sum() > 0
    for h in range(2):
        s = (Q[h] @ K[h].T) / 3.0
        for i in range(5):
            kept = res.indices[h, i, :res.k[h, i]]
            p = np.exp(s[i] - s[i].max())
            assert 1.0 - p[kept].sum() / p.sum() <= res.tv_bound[h, i] <= 1e-3
