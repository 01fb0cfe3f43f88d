"""Dense and Top-k attention, the output-level error and the n^C helpers (docs/design.md §3, §6),
against the float64 NumPy twins in topkattn.reference."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import topkattn
from topkattn import reference as ref

from _util import assert_rel

# (batch of Q, L, batch of K/V, n, d, d_v): L != n, d = 1, d_v != d, n not a multiple of
# any vector width, K/V shared by every head's queries
SHAPES = [
    ((), 1, (), 1, 1, 1),
    ((), 5, (), 37, 1, 3),
    ((3,), 7, (3,), 129, 16, 5),
    ((2, 4), 3, (2, 1), 250, 9, 17),
    ((4,), 2, (), 1000, 64, 64),
    ((2,), 33, (2,), 33, 7, 2),
]


def _qkv(rng, qb, L, kb, n, d, dv, spread=2.0, dtype=np.float64):
    Q = rng.standard_normal(qb + (L, d)) * spread
    K = rng.standard_normal(kb + (n, d))
    V = rng.standard_normal(kb + (n, dv))
    return Q.astype(dtype), K.astype(dtype), V.astype(dtype)


def _tol(out, expected):
    return 1e-12 * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matches_reference(shape, simd_path, rng):
    Q, K, V = _qkv(rng, *shape)
    out = topkattn.attention(Q, K, V)
    expected = ref.attention(Q, K, V)
    assert out.shape == expected.shape and out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=0, atol=_tol(out, expected))


@pytest.mark.parametrize("shape", SHAPES)
def test_topk_k_equals_n_is_dense(shape, simd_path, rng):
    Q, K, V = _qkv(rng, *shape)
    n = K.shape[-2]
    dense = topkattn.attention(Q, K, V)
    out, info = topkattn.topk_attention(Q, K, V, k=n, return_info=True)
    np.testing.assert_allclose(out, dense, rtol=0, atol=_tol(out, dense))
    assert (info.k == n).all() and (info.tau == 0).all()
    assert (np.sort(info.indices, axis=-1) == np.arange(n)).all()
    # an eps below every discarded mass also keeps every key
    out_e, info_e = topkattn.topk_attention(Q, K, V, eps=1e-300, return_info=True)
    assert (info_e.k == n).all()
    np.testing.assert_allclose(out_e, dense, rtol=0, atol=_tol(out, dense))


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("eps", [0.3, 1e-2, 1e-6])
def test_topk_eps_certified_and_identity(shape, eps, simd_path, rng):
    Q, K, V = _qkv(rng, *shape, spread=3.0)
    out, info = topkattn.topk_attention(Q, K, V, eps=eps, return_info=True)
    exp_out, exp_k, exp_tau = ref.topk_attention(Q, K, V, eps=eps)
    assert (info.tau <= eps).all()
    np.testing.assert_array_equal(info.k, exp_k)
    assert_rel(info.tau, exp_tau, rtol=1e-9, atol=1e-300, what="tau")
    np.testing.assert_allclose(out, exp_out, rtol=0, atol=_tol(out, exp_out) * 10)
    # the error against dense attention is the head-tail identity tau * ||mu_T - mu_H||
    dense = ref.attention(Q, K, V)
    P = np.exp(ref.scores(Q, K) - ref.scores(Q, K).max(axis=-1, keepdims=True))
    P /= P.sum(axis=-1, keepdims=True)
    tail = np.ones(P.shape[:-1] + (P.shape[-1] + 1,), bool)  # last column: the -1 padding
    np.put_along_axis(tail, info.indices % (P.shape[-1] + 1), False, axis=-1)
    tail = tail[..., :-1]
    Vb = np.broadcast_to(V, P.shape[:-2] + V.shape[-2:])
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_t = np.matmul(np.where(tail, P, 0.0), Vb) / info.tau[..., None]
    identity = info.tau * np.linalg.norm(np.nan_to_num(mu_t) - out, axis=-1)
    err = np.linalg.norm(dense - out, axis=-1)
    np.testing.assert_allclose(err, identity, rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_topk_fixed_k_and_ratio(shape, simd_path, rng):
    Q, K, V = _qkv(rng, *shape)
    n = K.shape[-2]
    for k in sorted({1, 2, max(1, n // 3), n - 1 or 1}):
        out, info = topkattn.topk_attention(Q, K, V, k=k, return_info=True)
        exp_out, _, exp_tau = ref.topk_attention(Q, K, V, k=k)
        np.testing.assert_allclose(out, exp_out, rtol=0, atol=_tol(out, exp_out))
        assert_rel(info.tau, exp_tau, rtol=1e-9, atol=1e-300, what=f"tau k={k}")
        assert (info.k == k).all()
        # the kept set is a top set of the float64 scores, ordered by decreasing score
        s = ref.scores(Q, K)
        s = np.broadcast_to(s, info.indices.shape[:-1] + (n,))
        kept = np.take_along_axis(s, info.indices, axis=-1)
        assert (np.diff(kept, axis=-1) <= 1e-12).all()
        rest = s.copy()
        np.put_along_axis(rest, info.indices, -np.inf, axis=-1)
        assert (kept[..., -1] >= rest.max(axis=-1) - 1e-12 * np.abs(s).max()).all()
        # the output does not depend on whether the info is asked for
        np.testing.assert_array_equal(topkattn.topk_attention(Q, K, V, k=k), out)
    ratio = 0.25
    k = math.ceil(ratio * n)
    np.testing.assert_array_equal(topkattn.topk_attention(Q, K, V, ratio=ratio),
                                  topkattn.topk_attention(Q, K, V, k=k))


@pytest.mark.parametrize("kind", ["gauss", "ties", "masked", "prefix", "deep", "sorted"])
def test_fixed_k_on_long_rows_against_the_reference(kind, simd_path, rng):
    # long rows with k small against n take one band pass above a bound from slice maxima
    # or a sample; ties at the k-th score, masked keys (scattered, or whole slices), a tail
    # far below the maximum and sorted rows must give the reference's kept set and tau
    n, d, L = 2000, 8, 6
    Q = 3.0 * rng.standard_normal((L, d))
    K = rng.standard_normal((n, d))
    mask, scale = None, None
    if kind == "ties":  # many equal scores, all exact: small integers, scale 1
        K = np.round(2 * K)
        Q = np.round(Q / 3)
        scale = 1.0
    elif kind == "masked":
        mask = np.where(rng.random((L, n)) < 0.5, -np.inf, 0.0)
    elif kind == "prefix":  # causal-like rows: whole slices of the row are masked
        mask = np.where(np.arange(n) < np.array([300, 700, 1200, 1900, 1999, 2000])[:, None],
                        0.0, -np.inf)
    elif kind == "deep":
        K[5:] *= 1e-3  # every key but five near 0
        K[:5] = 400.0 * Q[0] / np.linalg.norm(Q[0]) ** 2 * math.sqrt(d)  # scores ~400 for row 0
    elif kind == "sorted":
        s0 = K @ Q[0]
        K = K[np.argsort(s0)]  # row 0's scores increase along the keys
    V = rng.standard_normal((n, 3))
    s = ref.scores(Q, K, scale=scale, mask=mask)
    for k in (1, 3, 17, 60, 200):
        out, info = topkattn.topk_attention(Q, K, V, k=k, scale=scale, mask=mask,
                                            return_info=True)
        exp_out, exp_k, exp_tau = ref.topk_attention(Q, K, V, k=k, scale=scale, mask=mask)
        np.testing.assert_array_equal(info.k, exp_k)
        assert_rel(info.tau, exp_tau, rtol=1e-12, atol=1e-300, what=f"{kind} tau k={k}")
        np.testing.assert_allclose(out, exp_out, rtol=0, atol=_tol(out, exp_out))
        for r in range(L):  # the kept set: the k largest, ties by lower position
            want = np.lexsort((np.arange(n), -s[r]))[:exp_k[r]]
            np.testing.assert_array_equal(np.sort(info.indices[r][:exp_k[r]]), np.sort(want),
                                          err_msg=f"{kind} row {r} k={k}")


def test_ties_keep_lower_positions(simd_path):
    # every score equal: the kept set is the first k positions, in order
    Q = np.ones((1, 4))
    K = np.ones((300, 4))
    V = np.arange(300.0)[:, None]
    out, info = topkattn.topk_attention(Q, K, V, k=7, return_info=True)
    np.testing.assert_array_equal(info.indices[0], np.arange(7))
    assert out[0, 0] == pytest.approx(3.0)
    assert info.tau[0] == pytest.approx(1 - 7 / 300, rel=1e-12)
    _, info = topkattn.topk_attention(Q, K, V, eps=0.5, return_info=True)
    assert info.k[0] == 150 and (info.indices[0] == np.arange(150)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_eps_rows_keeping_most_keys_with_ties(dtype, simd_path, rng):
    # flat rows whose scores (exact multiples of 1/8 in every dtype) tie at the k-th largest:
    # k_eps > n/2, the rows of a group that share one value pass
    n, d, L, eps = 301, 4, 9, 0.05
    K = rng.integers(-2, 3, size=(n, d)).astype(dtype)
    K[-1] = -2  # the lowest score of every row, at the last position: always dropped
    Q = (rng.integers(1, 3, size=(L, d)) * 0.25).astype(dtype)
    V = rng.standard_normal((n, 5)).astype(dtype)
    out, info = topkattn.topk_attention(Q, K, V, eps=eps, return_info=True)
    K64, Q64, V64 = (x.astype(np.float64) for x in (K, Q, V))
    exp_out, exp_k, exp_tau = ref.topk_attention(Q64, K64, V64, eps=eps)
    np.testing.assert_array_equal(info.k, exp_k)
    assert (info.k > n // 2).all() and (info.k < n).all()
    assert_rel(info.tau, exp_tau, rtol=1e-9, atol=1e-300, what="tau")
    tol = {np.float64: 1e-12, np.float32: 1e-6, np.float16: 2e-3}[dtype]
    np.testing.assert_allclose(out.astype(np.float64), exp_out, rtol=0, atol=tol)
    s = ref.scores(Q64, K64)
    for r in range(L):
        # decreasing score, ties by lower position
        order = np.lexsort((np.arange(n), -s[r]))
        np.testing.assert_array_equal(info.indices[r][:info.k[r]], order[:info.k[r]])
    # a dropped key's value row is never read: not even inf reaches the output
    V_inf = V.copy()
    V_inf[-1] = np.inf
    np.testing.assert_array_equal(topkattn.topk_attention(Q, K, V_inf, eps=eps), out)


def test_masked_keys(simd_path, rng):
    Q, K, V = _qkv(rng, (2,), 6, (2,), 200, 8, 3)
    mask = np.zeros((2, 6, 200))
    mask[:, :, ::3] = -np.inf
    mask[1, 2, :199] = -np.inf  # one row with a single live key
    mask[0, 0, 50:] = -5.0      # finite offsets are added to the scores
    out = topkattn.attention(Q, K, V, mask=mask)
    np.testing.assert_allclose(out, ref.attention(Q, K, V, mask=mask), rtol=0, atol=1e-12)
    out_k, info = topkattn.topk_attention(Q, K, V, k=200, mask=mask, return_info=True)
    np.testing.assert_allclose(out_k, out, rtol=0, atol=1e-12)
    live = (mask > -np.inf).sum(axis=-1)
    np.testing.assert_array_equal(info.k, live)  # masked keys are never kept
    assert ((info.indices == -1) == (np.arange(info.indices.shape[-1]) >= live[..., None])).all()
    assert not np.isin(info.indices[0, 1], np.arange(0, 200, 3)).any()
    assert info.k[1, 2] == 1 and info.indices[1, 2, 0] == 199
    out_e, info_e = topkattn.topk_attention(Q, K, V, eps=1e-3, mask=mask, return_info=True)
    exp_out, exp_k, _ = ref.topk_attention(Q, K, V, eps=1e-3, mask=mask)
    np.testing.assert_array_equal(info_e.k, exp_k)
    np.testing.assert_allclose(out_e, exp_out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
@pytest.mark.parametrize("L, dv", [(1, 200), (5, 64), (1, 33), (6, 8)])
def test_value_sums_of_wide_rows_with_zero_weights(dtype, L, dv, simd_path, rng):
    # the one-row value sums (one query, or the rows past a group of four) take eight
    # vectors of columns a step with plain FMAs in blocks without a zero weight and test
    # every weight elsewhere: wide and narrow rows, blocks wholly, partly and not masked
    Q, K, V = _qkv(rng, (2,), L, (2,), 3000, 16, dv, dtype=dtype)
    mask = np.zeros((2, L, 3000))
    mask[0, :, 500:1100] = -np.inf     # whole blocks of zero weights
    mask[1, :, 1::7] = -np.inf         # a zero weight in every block
    mask[1, 0, :2000] = -np.inf        # the rest of that row unmasked
    for m in (None, mask):
        out = topkattn.attention(Q, K, V, mask=m)
        expected = ref.attention(Q.astype(np.float64), K.astype(np.float64),
                                 V.astype(np.float64), mask=m)
        if dtype == np.float16:  # a float16 output: the float64 sums rounded once
            assert out.dtype == np.float16
            np.testing.assert_allclose(out.astype(np.float64), expected, rtol=2.0**-11,
                                       atol=2.0**-25)
        else:
            np.testing.assert_allclose(out, expected, rtol=0, atol=_tol(out, expected))


def test_mask_broadcasts_as_key_padding(rng):
    # a (B, 1, 1, n) padding mask against (B, H, L, d) queries, like a transformer
    Q, K, V = _qkv(rng, (2, 3), 5, (2, 3), 11, 4, 4)
    mask = np.zeros((2, 1, 1, 11))
    mask[1, ..., 7:] = -np.inf
    np.testing.assert_allclose(topkattn.attention(Q, K, V, mask=mask),
                               ref.attention(Q, K, V, mask=mask), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_accuracy_beats_plain_float32(dtype, simd_path, rng):
    Q, K, V = _qkv(rng, (4,), 16, (4,), 3000, 64, 32, spread=4.0, dtype=np.float32)
    expected = ref.attention(Q, K, V)
    s32 = (Q @ np.swapaxes(K, -1, -2)) * np.float32(1 / 8)
    p32 = np.exp(s32 - s32.max(axis=-1, keepdims=True))
    plain = (p32 / p32.sum(axis=-1, keepdims=True)) @ V
    plain_err = np.abs(plain - expected).max()
    out = topkattn.attention(Q, K, V)
    assert out.dtype == np.float32
    assert np.abs(out - expected).max() <= max(plain_err, 2 * np.finfo(np.float32).eps)
    # mixed dtypes compute in float64
    mixed = topkattn.attention(Q.astype(dtype), K, V.astype(np.float64))
    assert mixed.dtype == np.float64


def _adversarial_f32(rng, d, kind, n=64, L=8):
    """float32 Q, K and a scale spreading the scores over about [-10, 10]."""
    if kind == "cancel":  # large products that cancel: k_i = c + noise with q . c = 0
        c = rng.standard_normal(d) * 1e3
        K = c + rng.standard_normal((n, d))
        Q = rng.standard_normal((L, d)) * 10
        if d > 1:
            Q -= np.outer(Q @ c / (c @ c), c)
    elif kind == "range":  # magnitudes from 1e-15 to 1e15 within a row
        K = rng.standard_normal((n, d)) * 10.0 ** rng.uniform(-15, 15, (n, d))
        Q = rng.standard_normal((L, d)) * 10.0 ** rng.uniform(-15, 15, (L, d))
    else:
        K = rng.standard_normal((n, d))
        Q = 5 * rng.standard_normal((L, d))
    Q, K = Q.astype(np.float32), K.astype(np.float32)
    S = Q.astype(np.float64) @ K.astype(np.float64).T
    return Q, K, 10.0 / np.abs(S).max()


@pytest.mark.parametrize("kind", ["plain", "cancel", "range"])
def test_float32_scores_no_worse_than_numpy_float32(kind, simd_path, rng):
    # float32 problems accumulate their scores in float32 (docs/design.md §3). With V the
    # identity the output row is the softmax P, and log(P_i / P_top) = s_i - s_top recovers
    # the score differences up to the float32 rounding of two outputs (< 2.4e-7); they are
    # compared with NumPy's float32 scores (Q @ K.T, float32 BLAS), both against float64
    ours_all, numpy_all = [], []
    for d in (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 127, 128, 129, 255, 257, 512):
        Q, K, scale = _adversarial_f32(rng, d, kind)
        n = K.shape[0]
        S = scale * (Q.astype(np.float64) @ K.astype(np.float64).T)
        P = topkattn.attention(Q, K, np.eye(n, dtype=np.float32), scale=scale)
        rows, top = np.arange(len(S)), S.argmax(axis=1)
        exact = S - S[rows, top][:, None]
        P = P.astype(np.float64)
        ours = np.log(P / P[rows, top][:, None])
        s32 = (Q @ K.T) * np.float32(scale)
        plain = (s32 - s32[rows, top][:, None]).astype(np.float64)
        live = exact > -60  # P far from float32 underflow
        e_ours = np.abs(ours - exact)[live].max()
        e_numpy = np.abs(plain - exact)[live].max()
        # each lane adds ceil(d / W) products, then three float32 and one float64 addition
        # join the lanes (W = 8 or 16): a bound no worse than the d roundings of a
        # sequential float32 dot product; the measured maxima differ by less than 3x
        assert e_ours <= 4 * e_numpy + 3e-7, (d, e_ours, e_numpy)
        ours_all.append(e_ours)
        numpy_all.append(e_numpy)
    assert sum(ours_all) <= 1.25 * sum(numpy_all) + 19 * 3e-7


@pytest.mark.parametrize("n", [1, 63, 64, 65, 3000])
def test_float32_dense_output_no_worse_than_numpy_float32(n, simd_path, rng):
    # dense float32 attention sums the weighted values in float32 within blocks of 64 keys
    # (docs/design.md §3): against float64 its output error is that of NumPy's float32
    # pipeline (scores, softmax and P @ V in float32) within a factor 2 (both add up to 64
    # terms in a float32 chain when n <= 64; NumPy's chain grows with n, ours does not),
    # here on values with a large common part (1e3 + noise) and flat or peaked scores
    for spread in (0.1, 3.0):
        Q = (spread * rng.standard_normal((4, 8, 32))).astype(np.float32)
        K = rng.standard_normal((4, n, 32)).astype(np.float32)
        V = (1e3 + rng.standard_normal((4, n, 16))).astype(np.float32)
        expected = ref.attention(Q, K, V)
        s32 = (Q @ np.swapaxes(K, -1, -2)) * np.float32(1 / math.sqrt(32))
        p32 = np.exp(s32 - s32.max(axis=-1, keepdims=True))
        plain = (p32 / p32.sum(axis=-1, keepdims=True)) @ V
        out = topkattn.attention(Q, K, V)
        ulp = np.spacing(np.float32(1e3))  # the output's own float32 rounding
        e_ours, e_plain = np.abs(out - expected).max(), np.abs(plain - expected).max()
        assert e_ours <= 2 * e_plain + ulp, (e_ours, e_plain)
        if n >= 1000:
            assert e_ours <= e_plain


@pytest.mark.parametrize("sel", [{"k": 10}, {"k": 200}, {"eps": 1e-3}])
def test_float32_topk_output_no_worse_than_numpy_float32(sel, simd_path, rng):
    # float32 Top-k attention sums its kept value rows as dense attention does (float32
    # blocks of 64 kept keys, docs/design.md §3): against the float64 reference with the same
    # kept set, its error is that of a NumPy float32 Top-k pipeline (softmax over the kept
    # float32 scores, weights @ kept rows in float32) within a factor 2, on values with a
    # large common part (1e3 + noise)
    n = 3000
    for spread in (0.5, 3.0):
        Q = (spread * rng.standard_normal((4, 8, 32))).astype(np.float32)
        K = rng.standard_normal((4, n, 32)).astype(np.float32)
        V = (1e3 + rng.standard_normal((4, n, 16))).astype(np.float32)
        out, info = topkattn.topk_attention(Q, K, V, return_info=True, **sel)
        expected, exp_k, _ = ref.topk_attention(Q, K, V, **sel)
        np.testing.assert_array_equal(info.k, exp_k)
        s32 = (Q @ np.swapaxes(K, -1, -2)) * np.float32(1 / math.sqrt(32))
        plain = np.empty_like(out)
        for h in range(4):
            for l in range(8):
                keep = info.indices[h, l, :info.k[h, l]]
                p = np.exp(s32[h, l, keep] - s32[h, l, keep].max())
                plain[h, l] = (p / p.sum()) @ V[h, keep]
        ulp = np.spacing(np.float32(1e3))
        e_ours, e_plain = np.abs(out - expected).max(), np.abs(plain - expected).max()
        assert e_ours <= 2 * e_plain + ulp, (sel, spread, e_ours, e_plain)


def test_float32_rows_independent_of_their_group(rng):
    # a query row's float32 result is the same bit for bit alone, in any group of four and
    # at any position of its batch (decode and prefill share the score kernel's arithmetic)
    Q, K, V = _qkv(rng, (2,), 11, (2,), 301, 37, 9, spread=3.0, dtype=np.float32)
    dense = topkattn.attention(Q, K, V)
    out, info = topkattn.topk_attention(Q, K, V, eps=1e-3, return_info=True)
    perm = rng.permutation(11)
    np.testing.assert_array_equal(topkattn.attention(Q[:, perm], K, V), dense[:, perm])
    for l in (0, 3, 4, 10):
        np.testing.assert_array_equal(topkattn.attention(Q[:, l:l + 1], K, V), dense[:, l:l + 1])
        o1, i1 = topkattn.topk_attention(Q[:, l:l + 1], K, V, eps=1e-3, return_info=True)
        np.testing.assert_array_equal(o1, out[:, l:l + 1])
        np.testing.assert_array_equal(i1.tau, info.tau[:, l:l + 1])
        np.testing.assert_array_equal(i1.k, info.k[:, l:l + 1])


def test_simd_paths_agree(rng):
    Q, K, V = _qkv(rng, (3,), 9, (3,), 777, 19, 5)
    results = {}
    for path in topkattn.build_info()["simd_supported"]:
        topkattn.set_simd(path)
        results[path] = (topkattn.attention(Q, K, V),
                         topkattn.topk_attention(Q, K, V, eps=1e-2, return_info=True))
    base = results["scalar"]
    for path, (dense, (out, info)) in results.items():
        np.testing.assert_allclose(dense, base[0], rtol=0, atol=1e-13)
        np.testing.assert_allclose(out, base[1][0], rtol=0, atol=1e-13)
        np.testing.assert_array_equal(info.k, base[1][1].k)


def test_thread_count_does_not_change_results(rng):
    Q, K, V = _qkv(rng, (8,), 16, (8,), 5000, 32, 16, dtype=np.float32)
    runs = []
    for threads in (1, 2, 5):
        topkattn.set_num_threads(threads)
        out, info = topkattn.topk_attention(Q, K, V, eps=1e-3, return_info=True)
        runs.append((topkattn.attention(Q, K, V), out, info.indices, info.tau))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            np.testing.assert_array_equal(a, b)


def test_long_rows_match_reference(rng):
    # rows longer than the core's chunk size (65536) take the chunked selection paths
    Q, K, V = _qkv(rng, (2,), 1, (2,), 70000, 8, 4, spread=3.0, dtype=np.float32)
    out, info = topkattn.topk_attention(Q, K, V, eps=1e-2, return_info=True)
    exp_out, exp_k, _ = ref.topk_attention(Q, K, V, eps=1e-2)
    np.testing.assert_array_equal(info.k, exp_k)
    np.testing.assert_allclose(out, exp_out, rtol=0, atol=1e-6)
    out_k = topkattn.topk_attention(Q, K, V, k=700)
    np.testing.assert_allclose(out_k, ref.topk_attention(Q, K, V, k=700)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [4097, 8192, 65536])
@pytest.mark.parametrize("kind", ["gauss", "ties", "masked", "far-max"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eps_rows_between_the_whole_row_and_chunk_limits(n, kind, dtype, rng):
    # rows of 4097 .. 65536 keys take the whole-row k_eps selection inside attention (its
    # weights are reused for the output), where k_eps alone takes the band path: the same
    # kept sets, tails and outputs as the float64 reference, with ties broken by position
    d = 8
    Q = (3.0 * rng.standard_normal((4, d))).astype(dtype)
    K = rng.standard_normal((n, d)).astype(dtype)
    V = rng.standard_normal((n, 3)).astype(dtype)
    mask = None
    if kind == "ties":  # scores on a few levels, exact in every dtype
        K = rng.integers(-2, 3, size=(n, d)).astype(dtype)
        Q = (rng.integers(1, 3, size=(4, d)) * 0.5).astype(dtype)
    elif kind == "masked":
        mask = np.where(rng.random((4, n)) < 0.4, -np.inf, 0.0)
    elif kind == "far-max":  # one key far above the rest, where a sample would not look
        K[n // 2 + 1] = 40.0 * Q[0] / np.linalg.norm(Q[0])
    for eps in (0.5, 1e-2, 1e-9):
        out, info = topkattn.topk_attention(Q, K, V, eps=eps, mask=mask, return_info=True)
        K64, Q64, V64 = (x.astype(np.float64) for x in (K, Q, V))
        exp_out, exp_k, exp_tau = ref.topk_attention(Q64, K64, V64, eps=eps, mask=mask)
        np.testing.assert_array_equal(info.k, exp_k, err_msg=f"eps={eps}")
        assert (info.tau <= eps).all()
        # float32 problems are scored in float32 (the reference upcasts first)
        rtol = 1e-9 if dtype == np.float64 else 1e-5
        assert_rel(info.tau, exp_tau, rtol=rtol, atol=1e-300, what=f"tau eps={eps}")
        tol = 1e-12 if dtype == np.float64 else 2e-6
        np.testing.assert_allclose(out.astype(np.float64), exp_out, rtol=0, atol=tol)
        s = ref.scores(Q64, K64) + (0.0 if mask is None else mask)
        for r in range(Q.shape[0]):
            order = np.lexsort((np.arange(n), -s[r]))  # decreasing score, ties by position
            np.testing.assert_array_equal(np.sort(info.indices[r][:info.k[r]]),
                                          np.sort(order[:info.k[r]]), err_msg=f"eps={eps}")


def test_strided_views_and_inputs_unchanged(rng):
    Q, K, V = _qkv(rng, (3,), 8, (3,), 100, 12, 6)
    Qv, Kv, Vv = Q[:, ::-2, :], np.asfortranarray(K)[:, ::2], V[:, ::2, ::-1]
    copies = [a.copy() for a in (Qv, Kv, Vv)]
    out = topkattn.topk_attention(Qv, Kv, Vv, k=10)
    np.testing.assert_allclose(out, ref.topk_attention(Qv, Kv, Vv, k=10)[0], rtol=0, atol=1e-12)
    for a, c in zip((Qv, Kv, Vv), copies):
        np.testing.assert_array_equal(a, c)


@given(n=st.integers(1, 300), d=st.integers(1, 20), L=st.integers(1, 5),
       spread=st.sampled_from([0.01, 1.0, 10.0, 100.0]), seed=st.integers(0, 2**32 - 1),
       eps=st.sampled_from([0.5, 0.1, 1e-3, 1e-9]))
def test_property_eps_row_is_minimal_and_certified(n, d, L, spread, seed, eps):
    rng = np.random.default_rng(seed)
    Q, K, V = _qkv(rng, (), L, (), n, d, 3, spread=spread)
    out, info = topkattn.topk_attention(Q, K, V, eps=eps, return_info=True)
    s = ref.scores(Q, K)
    curve = ref.tv_curve(s)
    for r in range(L):
        k = info.k[r]
        assert curve[r, k] <= eps * (1 + 1e-12)
        assert k == 1 or curve[r, k - 1] > eps * (1 - 1e-12)
    assert (info.tau <= eps).all()
    assert np.isfinite(out).all()


# ------------------------------------------------------------------ attention_error

@pytest.mark.parametrize("shape", SHAPES[1:5])
@pytest.mark.parametrize("sel", [{"eps": 0.05}, {"eps": 1e-4}, {"k": 2}])
def test_attention_error_identity_and_bounds(shape, sel, rng):
    Q, K, V = _qkv(rng, *shape, spread=3.0)
    r = topkattn.attention_error(Q, K, V, **sel)
    dense = ref.attention(Q, K, V)
    sparse, k, tau = ref.topk_attention(Q, K, V, **sel)
    np.testing.assert_allclose(r.error, np.linalg.norm(dense - sparse, axis=-1), rtol=1e-9,
                               atol=1e-15)
    np.testing.assert_array_equal(r.k, k)
    has_tail = r.tau > 1e-6   # the direct difference is accurate to ~1e-16 absolute
    identity = r.tau * np.linalg.norm(np.nan_to_num(r.mu_tail) - r.mu_head, axis=-1)
    np.testing.assert_allclose(r.error[has_tail], identity[has_tail], rtol=1e-10)
    assert (r.error <= r.diam_bound).all() and (r.error <= r.var_bound).all()
    np.testing.assert_allclose(r.mu_head, sparse, rtol=0, atol=1e-12)


def test_attention_error_single_row_and_no_tail(rng):
    K = rng.standard_normal((50, 4))
    V = rng.standard_normal((50, 3))
    q = rng.standard_normal(4)
    r = topkattn.attention_error(q, K, V, k=50)
    assert r.error.shape == () and r.mu_head.shape == (3,)
    assert r.tau == 0 and r.error == 0 and r.diam_bound == 0 and r.var_bound == 0
    assert np.isnan(r.mu_tail).all()
    r = topkattn.attention_error(q, K, V, k=5)
    assert r.tau > 0 and r.error <= r.diam_bound


# ------------------------------------------------------------- dynamic_k, matrix error

def test_dynamic_k():
    assert topkattn.dynamic_k(4, 1.0, 0.5) == 2
    assert topkattn.dynamic_k(65536, 2.0, 0.5) == 512
    assert topkattn.dynamic_k(10, 100.0, 0.5) == 10
    assert topkattn.dynamic_k(1000, 1e-6, 0.5) == 1
    n = np.array([2**8, 2**12, 2**16])
    np.testing.assert_array_equal(topkattn.dynamic_k(n, 1.5, 0.25),
                                  np.ceil(1.5 * n ** 0.25).astype(int))
    for bad, match in [((0, 1.0, 0.5), "n must be"), ((10, -1.0, 0.5), "alpha"),
                       ((10, 1.0, 1.5), "C must"), ((1.5, 1.0, 0.5), "integer")]:
        with pytest.raises((ValueError, TypeError), match=match):
            topkattn.dynamic_k(*bad)


@pytest.mark.parametrize("norm", ["fro", "l1", "rows"])
def test_attention_matrix_error(norm, simd_path, rng):
    X = rng.standard_normal((2, 300, 16)) * 1.5
    for k in (1, 6, topkattn.dynamic_k(300, 1.0, 0.5), 300):
        got = topkattn.attention_matrix_error(X, X, k, norm=norm)
        expected = ref.attention_matrix_error(X, X, k, norm=norm)
        assert_rel(got, expected, rtol=1e-9, atol=1e-15, what=f"k={k}")
    assert (topkattn.attention_matrix_error(X, X, 300, norm=norm) == 0).all()


# ----------------------------------------------------------------------- bad input

BAD = [
    (dict(Q=np.zeros((3, 4), np.int8).astype(np.complex64)), TypeError, "Q must be float32"),
    (dict(Q=np.zeros(4)), ValueError, r"Q must have shape \(\.\.\., L, d\)"),
    (dict(K=np.zeros((10, 5))), ValueError, "same last axis d"),
    (dict(V=np.zeros((9, 2))), ValueError, "same number of keys"),
    (dict(K=np.zeros((0, 4)), V=np.zeros((0, 2))), ValueError, "no keys"),
    (dict(Q=np.zeros((2, 3, 4)), K=np.zeros((5, 10, 4)), V=np.zeros((5, 10, 2))), ValueError,
     "do not broadcast"),
    (dict(mask=np.zeros((3, 9))), ValueError, "does not broadcast"),
    (dict(mask=np.full((3, 10), np.nan)), ValueError, "NaN or \\+inf"),
    (dict(mask=np.ones((3, 10), bool)), TypeError, "not boolean"),
    (dict(mask=np.full((3, 10), -np.inf)), ValueError, "masks every key"),
    (dict(Q=np.full((3, 4), np.nan)), ValueError, r"contain NaN.*index \(0,\)"),
    (dict(scale=float("inf")), ValueError, "scale must be"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD)
def test_bad_input(kwargs, exc, match):
    args = dict(Q=np.zeros((3, 4)), K=np.zeros((10, 4)), V=np.zeros((10, 2)))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        topkattn.attention(**args)
    with pytest.raises(exc, match=match):
        topkattn.topk_attention(**args, k=1)


@pytest.mark.parametrize("sel, match", [
    ({}, "exactly one of k, eps or ratio, got none"),
    ({"k": 2, "eps": 0.1}, "exactly one of k, eps or ratio, got k, eps"),
    ({"k": 0}, r"k must be in \[1, n\]"),
    ({"k": 11}, r"k must be in \[1, n\]"),
    ({"k": 1.5}, "k must be an integer"),
    ({"eps": 1.0}, r"eps must be in the open interval \(0, 1\)"),
    ({"eps": np.zeros((2,)) + 0.1}, "does not broadcast"),
    ({"ratio": 0.0}, r"ratio must be in \(0, 1\]"),
])
def test_bad_selection(sel, match):
    Q, K, V = np.zeros((3, 4)), np.zeros((10, 4)), np.zeros((10, 2))
    with pytest.raises((ValueError, TypeError), match=match):
        topkattn.topk_attention(Q, K, V, **sel)


def test_empty_batch_and_no_queries():
    K, V = np.zeros((10, 4)), np.zeros((10, 2))
    assert topkattn.attention(np.zeros((0, 3, 4)), K, V).shape == (0, 3, 2)
    out, info = topkattn.topk_attention(np.zeros((5, 0, 4)), K, V, k=3, return_info=True)
    assert out.shape == (5, 0, 2) and info.indices.shape == (5, 0, 0)
