"""Certified search (KeyIndex, certified_search, certified_attention) against float64 NumPy
references: every certificate bounds the true TV, for adversarial keys too."""
import doctest
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import topkattn
from topkattn import search as tks
from topkattn.search import KeyIndex, certified_attention, certified_search

SUMMARIES = ("minmax", "ball", "auto")
PROXIES = ("int8", "int4", None)
#: (summary, proxy) pairs an index can have: 4-bit proxies are coded against the centroids
SUMMARY_PROXY = [(s, p) for s in SUMMARIES for p in PROXIES if not (p == "int4" and s == "minmax")]


# ------------------------------------------------------------------ references

def ref_logits(q, K, scale):
    """scale * K q in float64, shape (n,)."""
    return scale * (np.asarray(K, np.float64) @ np.asarray(q, np.float64))


def true_tv(s, kept):
    """TV(P, P_hat) = P(T) from float64 logits, sums correctly rounded (math.fsum)."""
    keep = np.zeros(s.shape[0], bool)
    keep[kept] = True
    m = s.max()
    e = np.exp(s - m)
    return math.fsum(e[~keep]) / math.fsum(e)


def mp_tv(s, kept):
    """The same with mpmath (no underflow), for extreme logits."""
    keep = set(int(i) for i in kept)
    e = [mpmath.e ** mpmath.mpf(float(x)) for x in s]
    tail = mpmath.fsum(e[i] for i in range(len(s)) if i not in keep)
    return tail / mpmath.fsum(e)


def check_row(res_idx, k, tv_bound, keys_scored, q, K, scale, eps, exact_mp=False):
    """All properties of one row's result against the float64 reference."""
    n = K.shape[0]
    idx = np.asarray(res_idx)[:k]
    assert 1 <= k <= n and k <= keys_scored <= n
    assert np.all(np.asarray(res_idx)[k:] == -1)
    assert len(set(idx.tolist())) == k and idx.min() >= 0 and idx.max() < n
    assert 0.0 <= tv_bound <= eps
    s = ref_logits(q, K, scale)
    # by decreasing logit (both sides round the logits; allow a few ulps of the spread)
    tol = 1e-12 * (np.abs(s).max() + 1.0)
    if np.asarray(K).dtype in (np.float32, np.float16):
        # rows scored in full on float32 (or float16) keys come by decreasing score as the
        # float32 kernels of topk_attention compute it: within (ceil(d/8) + 6) 2^-24
        # scale |q|_1 max|k| of the logit (docs/design.md §3), each side
        d = K.shape[-1]
        tol += 2.0 * (np.ceil(d / 8) + 6) * 2.0**-24 * 1.01 * scale * np.abs(
            np.asarray(q, np.float64)).sum() * np.abs(np.asarray(K, np.float64)).max()
    assert np.all(np.diff(s[idx]) <= tol)
    tv = float(mp_tv(s, idx)) if exact_mp else true_tv(s, idx)
    assert tv <= tv_bound, f"true TV {tv!r} above the certificate {tv_bound!r}"
    return s, idx


def clustered(rng, n, d, clusters=8, noise=0.3):
    cent = rng.standard_normal((clusters, d)) * 2.0
    return cent[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d))


# ------------------------------------------------------------------ soundness

@settings(max_examples=150)
@given(n=st.integers(1, 300), d=st.integers(1, 17), bs=st.integers(1, 70),
       summary=st.sampled_from(SUMMARIES), proxy=st.sampled_from(PROXIES),
       dtype=st.sampled_from([np.float32, np.float64, np.float16]),
       spread=st.sampled_from([0.1, 1.0, 4.0, 30.0]),
       eps=st.sampled_from([0.5, 1e-1, 1e-2, 1e-4, 1e-9]), kind=st.sampled_from(["gauss", "clustered"]),
       reorder=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_certificate_bounds_true_tv(n, d, bs, summary, proxy, dtype, spread, eps, kind, reorder, seed):
    rng = np.random.default_rng(seed)
    K = (rng.standard_normal((n, d)) if kind == "gauss" else clustered(rng, n, d)).astype(dtype)
    q = (spread * rng.standard_normal(d)).astype(dtype)
    if proxy == "int4" and summary == "minmax":
        summary = "ball"
    index = KeyIndex(K, block_size=bs, summary=summary, proxy=proxy, reorder=reorder)
    res = certified_search(q, index, eps)
    check_row(res.indices, int(res.k), float(res.tv_bound), int(res.keys_scored), q, K,
              1 / np.sqrt(d), eps)
    assert res.confidence == 1.0 and not res.certified_mc


@pytest.mark.parametrize("summary,proxy", SUMMARY_PROXY)
def test_all_keys_equal(summary, proxy):
    K = np.tile(np.linspace(-1, 1, 8), (200, 1))
    q = np.arange(8.0)
    for eps in (0.5, 0.1, 1e-3):
        res = certified_search(q, KeyIndex(K, block_size=16, summary=summary, proxy=proxy), eps)
        # every key has probability 1/200: the certified set has >= (1 - eps) 200 keys
        assert res.k >= math.ceil((1 - eps) * 200 - 1e-9)
        check_row(res.indices, int(res.k), float(res.tv_bound), int(res.keys_scored), q, K,
                  1 / np.sqrt(8), eps)


@pytest.mark.parametrize("summary,proxy", SUMMARY_PROXY)
def test_hidden_outlier(summary, proxy):
    """One key aligned with q and huge, in a block of otherwise tiny keys that point away:
    it holds almost all the mass and must be found and kept."""
    rng = np.random.default_rng(3)
    n, d = 2048, 16
    K = 0.01 * rng.standard_normal((n, d))
    q = rng.standard_normal(d)
    K[1000:1064] = -0.01 * q  # a block pointing away from q
    K[1037] = 5.0 * q / np.linalg.norm(q)
    for eps in (1e-1, 1e-6):
        index = KeyIndex(K, block_size=64, summary=summary, proxy=proxy, reorder=False)
        res = certified_search(q, index, eps)
        assert res.indices[0] == 1037
        check_row(res.indices, int(res.k), float(res.tv_bound), int(res.keys_scored), q, K,
                  1 / np.sqrt(d), eps)


@pytest.mark.parametrize("proxy", PROXIES)
@pytest.mark.parametrize("key_scale,q_scale", [(1e-150, 1e150), (1e-20, 1.0), (1e20, 1e-20),
                                               (1e120, 1e-120), (1.0, 1e-30)])
def test_tiny_and_huge_norms(key_scale, q_scale, proxy):
    rng = np.random.default_rng(5)
    K = clustered(rng, 500, 12) * key_scale
    q = 3.0 * rng.standard_normal(12) * q_scale
    for eps in (1e-1, 1e-3):
        res = certified_search(q, KeyIndex(K, block_size=32, proxy=proxy), eps)
        check_row(res.indices, int(res.k), float(res.tv_bound), int(res.keys_scored), q, K,
                  1 / np.sqrt(12), eps)


@pytest.mark.parametrize("proxy", PROXIES)
def test_extreme_logits_against_mpmath(proxy):
    """Logits spread over thousands: tails far below float64's range, checked with mpmath."""
    rng = np.random.default_rng(7)
    K = clustered(rng, 120, 6, noise=1.0)
    q = 400.0 * rng.standard_normal(6)
    for eps in (1e-2, 1e-200, 1e-300):
        res = certified_search(q, KeyIndex(K, block_size=8, proxy=proxy), eps)
        check_row(res.indices, int(res.k), float(res.tv_bound), int(res.keys_scored), q, K,
                  1 / np.sqrt(6), eps, exact_mp=True)


@pytest.mark.parametrize("proxy", PROXIES)
def test_eps_to_zero_scores_everything(proxy):
    rng = np.random.default_rng(11)
    K = rng.standard_normal((700, 10))
    res = certified_search(rng.standard_normal(10), KeyIndex(K, block_size=50, proxy=proxy), 1e-300)
    assert res.k == 700 and res.keys_scored == 700 and res.tv_bound == 0.0
    assert sorted(res.indices.tolist()) == list(range(700))


def test_keys_scored_never_exceeds_n_and_kept_within_scored():
    rng = np.random.default_rng(12)
    K = rng.standard_normal((3, 257, 9))
    Q = 5 * rng.standard_normal((3, 20, 9))
    for proxy in PROXIES:
        for method, delta in (("delta", None), ("mc", 0.1)):
            res = certified_search(Q, KeyIndex(K, block_size=16, proxy=proxy), 1e-2,
                                   method=method, delta=delta, mc_samples=8)
            assert np.all(res.keys_scored <= 257) and np.all(res.k <= res.keys_scored)
            assert np.all(res.tv_bound <= 1e-2)


def test_structure_pays_on_clustered_keys():
    """With clustered keys and peaked queries both index kinds score fewer than n keys, the
    proxies far fewer than the block summaries alone."""
    rng = np.random.default_rng(13)
    n, d = 8192, 16
    K = clustered(rng, n, d, clusters=32, noise=0.2)
    q = 4.0 * K[123]
    blocks = certified_search(q, KeyIndex(K, proxy=None), 1e-2)
    proxies = certified_search(q, KeyIndex(K), 1e-2)
    s = ref_logits(q, K, 0.25)
    k_eps = int(topkattn.k_eps(s, 1e-2))
    assert k_eps <= proxies.keys_scored < blocks.keys_scored < n
    assert proxies.keys_scored <= 2 * k_eps + 64


def _int4_codes(index):
    """The 4-bit codes of every stored key as integers in [-8, 7], shape (heads, n, d)."""
    d, hb = index.d, (index.d + 1) // 2
    z = index._pz[:, :index.n].astype(np.int64)
    both = np.concatenate([z & 15, z >> 4], axis=-1)  # dimension t, then hb + t
    return both[..., :d] - 8, hb


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("d", [1, 7, 32, 33, 128])
def test_int4_proxies_bound_every_key(d, dtype):
    """Each stored key lies within its error bound of centroid + step * code (the bound the
    search adds to q.c + s q.z), computed here in float64 from the stored arrays; outliers
    (clamped codes) and appended keys included."""
    rng = np.random.default_rng(d)
    K = clustered(rng, 2 * 600, d).reshape(2, 600, d)
    K[:, 5] *= 40.0  # deviations far past the step's range: clamped codes
    index = KeyIndex(K[:, :500].astype(dtype), block_size=24, proxy="int4")
    index.append(K[:, 500:].astype(dtype))
    z, hb = _int4_codes(index)
    assert index._pz.shape[-1] == hb and index._pz.dtype == np.uint8
    keys = index._keys[:, :index.n].astype(np.float64)
    blocks = np.arange(index.n) // index.block_size
    ctr = index._ctr[:, blocks].astype(np.float64)
    rec = ctr + index._pscale[:, :index.n, None].astype(np.float64) * z
    err = np.linalg.norm(keys - rec, axis=-1)
    assert np.all(err <= index._perr[:, :index.n])
    if d > 1:  # a real code, not every key on its centroid
        assert np.mean(np.abs(z)) > 1.0
    if d % 2:  # the padding nibble of odd d is zero
        assert np.all(index._pz[:, :index.n, -1] >> 4 == 0)


def test_int4_proxies_prune_clustered_keys_with_half_the_code_bytes():
    rng = np.random.default_rng(13)
    n, d = 8192, 64
    K = clustered(rng, n, d, clusters=32, noise=0.2)
    q = 1.5 * K[123]
    s = ref_logits(q, K, 1 / 8)
    k_eps = int(topkattn.k_eps(s, 1e-2))
    i8 = certified_search(q, KeyIndex(K), 1e-2)
    i4 = certified_search(q, KeyIndex(K, proxy="int4"), 1e-2)
    blocks = certified_search(q, KeyIndex(K, proxy=None), 1e-2)
    for res in (i8, i4):
        check_row(res.indices, int(res.k), float(res.tv_bound), int(res.keys_scored), q, K,
                  1 / 8, 1e-2)
        assert not res.full_scoring
    assert k_eps <= i4.keys_scored <= 2 * k_eps + 64 and i4.keys_scored < blocks.keys_scored
    # the code bytes of a proxy: d / 2 + 8 against d + 8
    codes4 = i4.bytes_read - blocks_and_keys_bytes(i4, n, d)
    codes8 = i8.bytes_read - blocks_and_keys_bytes(i8, n, d)
    assert codes4 == i4.proxies_read * (d // 2 + 8) and codes8 == i8.proxies_read * (d + 8)


def blocks_and_keys_bytes(res, n, d):
    """Bytes of a streaming row other than its proxies: the centroids, radii and second
    moments of every block (blocks of 64), the exact keys it scored (float64) and the kept
    positions."""
    return (n // 64) * (4 * d + 24) + int(res.keys_scored) * 8 * d + int(res.k) * 8


def test_int4_groups_stream_on_clustered_keys():
    """Four peaked queries over 65536 clustered keys (d = 128, the benchmark's layout: runs
    of 32-256 keys near one of 128 centres): with 4-bit proxies the group streams (the first
    look used to rank its sample by the bound and switch it to full scoring), scores few
    keys, and every certificate holds."""
    rng = np.random.default_rng(0)
    n, d = 65536, 128
    cent = rng.standard_normal((n // 512, d)).astype(np.float32)
    lens = rng.integers(32, 257, size=n // 32 + 1)
    labels = np.repeat(rng.integers(0, len(cent), size=lens.size), lens)[:n]
    K = cent[labels] + 0.35 * rng.standard_normal((n, d), dtype=np.float32)
    Q = 1.5 * (cent[labels[rng.integers(0, n, 8)]]
               + 0.35 * rng.standard_normal((8, d), dtype=np.float32))[:4]
    res = certified_search(Q, KeyIndex(K, proxy="int4"), 1e-2)
    assert not res.full_scoring.any()
    assert np.all(res.keys_scored < n // 20) and np.all(res.proxies_read < n)
    for i in range(4):
        check_row(res.indices[i], int(res.k[i]), float(res.tv_bound[i]),
                  int(res.keys_scored[i]), Q[i], K, 1 / np.sqrt(d), 1e-2)


def test_int4_proxies_need_the_centroids():
    K = np.ones((100, 4))
    with pytest.raises(ValueError, match="summary"):
        KeyIndex(K, summary="minmax", proxy="int4")
    with pytest.raises(ValueError, match="proxy"):
        KeyIndex(K, proxy="int2")
    assert KeyIndex(K, proxy="int4").nbytes == KeyIndex(K).nbytes - 100 * 2
    with pytest.raises(ValueError, match="dimensions"):
        KeyIndex(np.ones((1, (1 << 19) + 1), np.float32), proxy="int4")


# ------------------------------------------------------------------ batches, output

def test_batched_rows_match_single_rows():
    """A row's result depends only on its group of queries (up to four rows of its head, by
    row number), never on the other heads; a row whose group did not switch to full scoring
    gives what it gives alone (when alone it does not switch either)."""
    rng = np.random.default_rng(17)
    K = clustered(rng, 2 * 3 * 1500, 8).reshape(2, 3, 1500, 8)
    Q = 3 * rng.standard_normal((2, 3, 5, 8))
    eps = np.array([1e-1, 1e-2, 1e-3, 0.3, 1e-6])
    index = KeyIndex(K, block_size=32)
    res = certified_search(Q, index, eps)
    assert res.indices.shape[:-1] == (2, 3, 5) and res.k.shape == (2, 3, 5)
    compared = 0
    for a in range(2):
        for b in range(3):
            single = KeyIndex(K[a, b], block_size=32)
            head = certified_search(Q[a, b], single, eps)
            for l in range(5):
                k = int(head.k[l])
                assert res.k[a, b, l] == k
                np.testing.assert_array_equal(res.indices[a, b, l, :k], head.indices[l, :k])
                assert res.tv_bound[a, b, l] == head.tv_bound[l]
                assert res.full_scoring[a, b, l] == head.full_scoring[l]
                one = certified_search(Q[a, b, l], single, eps[l])
                if not res.full_scoring[a, b, l] and not one.full_scoring:
                    compared += 1
                    assert int(one.k) == k
                    np.testing.assert_array_equal(res.indices[a, b, l, :k], one.indices)
                    assert res.tv_bound[a, b, l] == one.tv_bound
                check_row(res.indices[a, b, l], k, float(res.tv_bound[a, b, l]),
                          int(res.keys_scored[a, b, l]), Q[a, b, l], K[a, b], 1 / np.sqrt(8),
                          eps[l])
    assert compared > 0


@pytest.mark.parametrize("vdtype", [np.float32, np.float64, np.float16])
def test_attention_output_of_the_kept_set(vdtype):
    rng = np.random.default_rng(19)
    K = clustered(rng, 2 * 400, 8).reshape(2, 400, 8)
    V = rng.standard_normal((2, 400, 5)).astype(vdtype)
    Q = 2 * rng.standard_normal((2, 7, 8))
    eps = 1e-2
    out, info = certified_attention(Q, KeyIndex(K, block_size=16), V, eps, return_info=True)
    assert out.shape == (2, 7, 5) and out.dtype == np.float64
    for h in range(2):
        for l in range(7):
            k = int(info.k[h, l])
            idx = info.indices[h, l, :k]
            s = ref_logits(Q[h, l], K[h], 1 / np.sqrt(8))
            p = np.exp(s[idx] - s[idx].max())
            want = (p / p.sum()) @ V[h][idx].astype(np.float64)
            np.testing.assert_allclose(out[h, l], want, rtol=1e-10, atol=1e-12)
            # output-level certificate (docs/design.md §3): |Attn - Attn_S| <= tau diam(V)
            pf = np.exp(s - s.max())
            full = (pf / pf.sum()) @ V[h].astype(np.float64)
            vv = V[h].astype(np.float64)
            diam = np.sqrt(((vv[:, None, :] - vv[None, :, :]) ** 2).sum(-1)).max()
            assert np.linalg.norm(full - out[h, l]) <= info.tv_bound[h, l] * diam + 1e-12
    np.testing.assert_array_equal(certified_search(Q, KeyIndex(K, block_size=16), eps, V=V).output,
                                  out)


def test_float32_attention_output_dtype():
    rng = np.random.default_rng(20)
    K = rng.standard_normal((100, 4)).astype(np.float32)
    V = rng.standard_normal((100, 3)).astype(np.float32)
    out = certified_attention(rng.standard_normal((2, 4)).astype(np.float32), KeyIndex(K), V, 0.1)
    assert out.shape == (2, 3) and out.dtype == np.float32


@pytest.mark.parametrize("n", [300, 5000])
def test_float32_queries_search_as_their_float64_values(n):
    # float32 queries reach the core as they are: every result equals that of the same
    # values passed as float64 (the core converts each value exactly)
    rng = np.random.default_rng(21)
    K = rng.standard_normal((2, n, 16)).astype(np.float32)
    V = rng.standard_normal((2, n, 5)).astype(np.float32)
    Q = (3.0 * rng.standard_normal((2, 6, 16))).astype(np.float32)
    index = KeyIndex(K)
    a = certified_search(Q, index, 1e-2, V=V)
    b = certified_search(Q.astype(np.float64), index, 1e-2, V=V)
    for f in ("indices", "k", "tv_bound", "keys_scored", "bytes_read", "full_scoring"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.output.dtype == np.float32 and b.output.dtype == np.float64
    np.testing.assert_array_equal(a.output, b.output.astype(np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        Qb = Q.copy()
        Qb[1, 3, 7] = bad
        with pytest.raises(ValueError, match="Q contains NaN or inf"):
            certified_attention(Qb, index, V, 1e-2)
    # rows whose L1 norm overflows float32 but not float64 are fine
    big = np.full((2, 1, 16), 3e38, np.float32)
    assert np.isfinite(certified_search(big, KeyIndex(np.full((2, 8, 16), 1e-300)), 0.5).tv_bound).all()


# ------------------------------------------------------------------ MC-Search

def test_mc_failure_rate_within_delta():
    """Clustered keys, block summaries only (loose bounds, so that the MC estimate is what
    certifies most rows): over many seeds the certificate fails on at most a delta fraction
    of the rows, and MC scores fewer keys than the deterministic search."""
    rng = np.random.default_rng(23)
    n, d = 4096, 16
    K = clustered(rng, n, d, clusters=16, noise=0.5)
    index = KeyIndex(K, block_size=64, proxy=None)
    Q = 0.5 * K[rng.integers(0, n, 8)]
    S = [ref_logits(q, K, 1 / np.sqrt(d)) for q in Q]
    delta, eps = 0.2, 0.1
    rows = fails = mc_rows = 0
    for seed in range(30):
        res = certified_search(Q, index, eps, method="mc", delta=delta, seed=seed, mc_samples=64)
        assert res.confidence == pytest.approx(1 - delta) and res.delta == delta
        for i in range(len(Q)):
            k = int(res.k[i])
            rows += 1
            mc_rows += bool(res.certified_mc[i])
            fails += true_tv(S[i], res.indices[i, :k]) > res.tv_bound[i]
            assert res.tv_bound[i] <= eps and res.keys_scored[i] <= n
    assert mc_rows >= rows // 4, "the MC estimate certified too few rows to test it"
    # binomial(rows, delta): mean + 3 sd
    assert fails <= delta * rows + 3 * math.sqrt(rows * delta * (1 - delta))
    det = certified_search(Q, index, eps)
    mc = certified_search(Q, index, eps, method="mc", delta=delta, mc_samples=64)
    assert mc.keys_scored.sum() < det.keys_scored.sum()


def test_mc_deterministic_given_seed():
    rng = np.random.default_rng(29)
    K = rng.standard_normal((2048, 8))
    index = KeyIndex(K, proxy=None)
    Q = rng.standard_normal((6, 8))
    a = certified_search(Q, index, 0.05, method="mc", delta=0.1, seed=5, mc_samples=32)
    b = certified_search(Q, index, 0.05, method="mc", delta=0.1, seed=5, mc_samples=32)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.tv_bound, b.tv_bound)
    np.testing.assert_array_equal(a.keys_scored, b.keys_scored)


# ------------------------------------------------------------------ threads, SIMD, append

def _fields(res):
    return (res.indices, res.k, res.tv_bound, res.keys_scored, res.blocks_scored,
            res.proxies_read, res.bytes_read, res.certified_mc, res.output)


@pytest.mark.parametrize("method", ["delta", "mc"])
def test_same_results_for_any_thread_count(method):
    rng = np.random.default_rng(31)
    K = clustered(rng, 4 * 1024, 16).reshape(4, 1024, 16)
    V = rng.standard_normal((4, 1024, 4))
    Q = 3 * rng.standard_normal((4, 16, 16))
    index = KeyIndex(K, block_size=32)
    kw = dict(method=method, delta=0.1 if method == "mc" else None, seed=3, mc_samples=16)
    topkattn.set_num_threads(1)
    one = certified_search(Q, index, 1e-2, V=V, **kw)
    topkattn.set_num_threads(3)
    many = certified_search(Q, index, 1e-2, V=V, **kw)
    for x, y in zip(_fields(one), _fields(many)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_one_group_over_a_long_row_is_the_same_for_any_thread_count(dtype):
    # fewer groups than threads over more than 2 * 65536 keys: the groups run on the calling
    # thread and a full pass splits its keys over the threads (by chunks whose scores do
    # not depend on the split); the results equal those of one thread, and are sound
    rng = np.random.default_rng(41)
    n, d = 140_001, 8
    K = rng.standard_normal((1, n, d)).astype(dtype)
    V = rng.standard_normal((1, n, 3)).astype(np.float32)
    Q = 2.0 * rng.standard_normal((1, 3, d))
    index = KeyIndex(K)
    try:
        topkattn.set_num_threads(1)
        one = certified_search(Q, index, 1e-2, V=V)
        topkattn.set_num_threads(2)
        two = certified_search(Q, index, 1e-2, V=V)
    finally:
        topkattn.set_num_threads(0)
    assert one.full_scoring.all()  # Gaussian keys: every key scored in one pass
    for x, y in zip(_fields(one), _fields(two)):
        np.testing.assert_array_equal(x, y)
    scale = 1.0 / np.sqrt(d)
    for i in range(3):
        k = int(one.k[0, i])
        assert k > 2 * 16384  # the kept rows of V are summed by chunks, on every thread
        s, idx = check_row(one.indices[0, i], k, float(one.tv_bound[0, i]),
                           int(one.keys_scored[0, i]), Q[0, i], K[0], scale, 1e-2)
        w = np.exp(s[idx] - s.max())
        want = (w @ V[0, idx].astype(np.float64)) / w.sum()
        np.testing.assert_allclose(one.output[0, i], want, rtol=0, atol=2e-6)


def test_every_simd_path_is_sound_and_agrees(simd_path):
    rng = np.random.default_rng(37)
    K = clustered(rng, 3000, 24).astype(np.float32)
    Q = 3 * rng.standard_normal((6, 24)).astype(np.float32)
    index = KeyIndex(K)
    res = certified_search(Q, index, 1e-2)
    topkattn.set_simd("scalar")
    base = certified_search(Q, index, 1e-2)
    for i in range(6):
        check_row(res.indices[i], int(res.k[i]), float(res.tv_bound[i]),
                  int(res.keys_scored[i]), Q[i], K, 1 / np.sqrt(24), 1e-2)
        assert abs(int(res.k[i]) - int(base.k[i])) <= 1
        assert abs(int(res.keys_scored[i]) - int(base.keys_scored[i])) <= 8


@pytest.mark.parametrize("summary,proxy", SUMMARY_PROXY)
@pytest.mark.parametrize("n0", [64, 100, 1])
def test_append_equals_building_at_once(summary, proxy, n0):
    rng = np.random.default_rng(41)
    K = clustered(rng, 2 * 700, 8).reshape(2, 700, 8).astype(np.float32)
    grown = KeyIndex(K[:, :n0], block_size=32, summary=summary, proxy=proxy, reorder=False)
    for a, b in ((n0, 300), (300, 301), (301, 700)):
        if b > a:
            grown.append(K[:, a:b])
    whole = KeyIndex(K, block_size=32, summary=summary, proxy=proxy, reorder=False)
    assert grown.n == whole.n == 700 and grown.nbytes == whole.nbytes
    if proxy:  # a block that grew has its proxies recomputed (4-bit: against its new centroid)
        for name in ("_pz", "_pscale", "_perr"):
            np.testing.assert_array_equal(getattr(grown, name)[:, :700],
                                          getattr(whole, name)[:, :700])
    Q = 2 * rng.standard_normal((2, 4, 8))
    for x, y in zip(_fields(certified_search(Q, grown, 1e-3)),
                    _fields(certified_search(Q, whole, 1e-3))):
        np.testing.assert_array_equal(x, y)


def test_reserve_keeps_appends_in_place_and_results_unchanged():
    rng = np.random.default_rng(42)
    K = clustered(rng, 2 * 600, 8).reshape(2, 600, 8).astype(np.float32)
    plain = KeyIndex(K[:, :200], block_size=32)
    roomy = KeyIndex(K[:, :200], block_size=32)
    assert roomy.capacity == 200
    assert roomy.reserve(500) is roomy and roomy.capacity == 500
    roomy.reserve(100)                                   # never shrinks
    assert roomy.capacity == 500 and roomy.n == 200
    keys = roomy._keys
    for a in range(200, 500, 7):
        plain.append(K[:, a:min(a + 7, 500)])
        roomy.append(K[:, a:min(a + 7, 500)])
    assert roomy._keys is keys and roomy.capacity == 500   # no reallocation
    assert plain.n == roomy.n == 500 and plain.nbytes == roomy.nbytes
    Q = 2 * rng.standard_normal((2, 4, 8))
    for x, y in zip(_fields(certified_search(Q, plain, 1e-3)),
                    _fields(certified_search(Q, roomy, 1e-3))):
        np.testing.assert_array_equal(x, y)
    roomy.append(K[:, 500:])                             # past the reserve: grows
    assert roomy.n == 600 and roomy.capacity >= 600
    for bad in (-1, 2.5, True, "9"):
        with pytest.raises(ValueError, match="capacity must be an integer >= 0"):
            roomy.reserve(bad)


@pytest.mark.parametrize("reorder", [True, False])
def test_capacity_at_construction_is_reserve_without_the_copy(reorder):
    """KeyIndex(K, capacity=c) gives the index of KeyIndex(K).reserve(c): the same room,
    the same searches before and after appends up to c, which never reallocate."""
    rng = np.random.default_rng(44)
    K = clustered(rng, 2 * 600, 8).reshape(2, 600, 8).astype(np.float32)
    plain = KeyIndex(K[:, :200], block_size=32, reorder=reorder).reserve(500)
    built = KeyIndex(K[:, :200], block_size=32, reorder=reorder, capacity=500)
    assert built.capacity == 500 and built.n == 200 and built.nbytes == plain.nbytes
    np.testing.assert_array_equal(built._perm, plain._perm)
    np.testing.assert_array_equal(built._keys, plain._keys)
    Q = 2 * rng.standard_normal((2, 4, 8))
    for x, y in zip(_fields(certified_search(Q, plain, 1e-3)),
                    _fields(certified_search(Q, built, 1e-3))):
        np.testing.assert_array_equal(x, y)
    keys = built._keys
    for a in range(200, 500, 60):
        plain.append(K[:, a:a + 60])
        built.append(K[:, a:a + 60])
    assert built._keys is keys and built.capacity == 500   # no reallocation
    for x, y in zip(_fields(certified_search(Q, plain, 1e-3)),
                    _fields(certified_search(Q, built, 1e-3))):
        np.testing.assert_array_equal(x, y)
    assert KeyIndex(K[:, :200], capacity=10).capacity == 200   # at least n
    for bad in (-1, 2.5, True, "9"):
        with pytest.raises(ValueError, match="capacity must be an integer >= 0"):
            KeyIndex(K[:, :200], capacity=bad)


def test_append_after_reordering_is_sound():
    rng = np.random.default_rng(43)
    K = clustered(rng, 1500, 8)
    index = KeyIndex(K[:1000], block_size=32)
    nb0 = index.nbytes
    index.append(K[1000:])
    assert index.n == 1500 and index.nbytes > nb0
    q = 3 * K[1200]
    res = certified_search(q, index, 1e-3)
    s, idx = check_row(res.indices, int(res.k), float(res.tv_bound), int(res.keys_scored), q, K,
                       1 / np.sqrt(8), 1e-3)
    assert 1200 in idx


def test_inputs_are_not_modified():
    rng = np.random.default_rng(47)
    K = rng.standard_normal((300, 6))
    V = rng.standard_normal((300, 2))
    Q = rng.standard_normal((3, 6))
    copies = [a.copy() for a in (K, V, Q)]
    index = KeyIndex(K)
    certified_attention(Q, index, V, 1e-2)
    index.append(K[:10])
    for a, b in zip((K, V, Q), copies):
        np.testing.assert_array_equal(a, b)


def test_non_contiguous_inputs():
    rng = np.random.default_rng(53)
    K = rng.standard_normal((400, 12))[::-1, ::2]
    Q = rng.standard_normal((8, 12))[::2, ::2]
    V = rng.standard_normal((400, 6))[:, ::2]
    out, info = certified_attention(Q, KeyIndex(K), V, 1e-2, return_info=True)
    out2 = certified_attention(np.ascontiguousarray(Q), KeyIndex(np.ascontiguousarray(K)),
                               np.ascontiguousarray(V), 1e-2)
    np.testing.assert_array_equal(out, out2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_values_are_read_where_they_lie(dtype, monkeypatch):
    """V as views of a longer cache (heads apart, rows wider than d_v, broadcast heads, rows
    reversed): the same output as a contiguous copy, and the views with adjacent values in
    each row are not copied."""
    rng = np.random.default_rng(54)
    H, n, d, dv, cap = 3, 700, 16, 8, 900
    K = rng.standard_normal((H, n, d))
    K[:, :40] *= 3.0                                  # a few heavy keys: most stream
    Q = rng.standard_normal((H, 5, d))
    big = rng.standard_normal((H, cap, 2 * dv)).astype(dtype)
    index = KeyIndex(K)
    views = {"heads apart": (big[:, :n, :dv], True),
             "every other value": (big[:, :n, ::2], False),
             "one row broadcast per head": (np.broadcast_to(big[:1, :n, :dv], (H, n, dv)),
                                            True),
             "reversed rows": (big[:, n - 1::-1, :dv], False)}
    copies = []
    real = np.ascontiguousarray
    monkeypatch.setattr(np, "ascontiguousarray",
                        lambda a, *args, **kw: copies.append(a.shape) or real(a, *args, **kw))
    for name, (V, in_place) in views.items():
        copies.clear()
        out, info = certified_attention(Q, index, V, 1e-2, return_info=True)
        copied = [c for c in copies if c == V.shape]
        assert (not copied) == in_place, name
        want = certified_attention(Q, index, real(V), 1e-2)
        np.testing.assert_array_equal(out, want, err_msg=name)
        # and the output is the kept set's softmax over those values (float64 reference)
        for h in range(H):
            for r in range(Q.shape[1]):
                kept = info.indices[h, r][info.indices[h, r] >= 0]
                s = (K[h, kept] @ Q[h, r]) / np.sqrt(d)
                p = np.exp(s - s.max())
                ref = (p / p.sum()) @ V[h, kept].astype(np.float64)
                np.testing.assert_allclose(out[h, r], ref, rtol=2e-3 if dtype == np.float16
                                           else 1e-5, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------ bad input

def test_bad_input_messages():
    K = np.ones((10, 4))
    index = KeyIndex(K)
    q = np.ones(4)
    cases = [
        (lambda: KeyIndex(np.ones(4)), ValueError, "K must have shape"),
        (lambda: KeyIndex(np.ones((0, 4))), ValueError, "n >= 1"),
        (lambda: KeyIndex(np.ones((3, 4), np.int8)), TypeError, "K must be float32"),
        (lambda: KeyIndex([[1, 2], [3, 4]]), None, None),
        (lambda: KeyIndex(np.ones((3, 4), np.complex64)), TypeError, "K must be float32"),
        (lambda: KeyIndex(K, block_size=0), ValueError, "block_size"),
        (lambda: KeyIndex(K, summary="box"), ValueError, "summary"),
        (lambda: KeyIndex(K, proxy="pq"), ValueError, "proxy"),
        (lambda: KeyIndex(np.array([[np.nan, 1.0]])), ValueError, "K contains NaN"),
        (lambda: certified_search(q, index, 0.0), ValueError, "eps must be in"),
        (lambda: certified_search(q, index, 1.0), ValueError, "eps must be in"),
        (lambda: certified_search(np.ones(5), index, 0.1), ValueError, "q must have shape"),
        (lambda: certified_search(q, K, 0.1), TypeError, "index must be a KeyIndex"),
        (lambda: certified_search(q, index, 0.1, method="mc"), ValueError, "needs delta"),
        (lambda: certified_search(q, index, 0.1, method="mc", delta=1.5), ValueError, "delta"),
        (lambda: certified_search(q, index, 0.1, delta=0.1), ValueError, "only used"),
        (lambda: certified_search(q, index, 0.1, method="beam"), ValueError, "method"),
        (lambda: certified_search(q, index, 0.1, seed=-1), ValueError, "seed"),
        (lambda: certified_search(q, index, 0.1, scale=-1.0), ValueError, "scale"),
        (lambda: certified_search(q * np.inf, index, 0.1), ValueError, "q contains NaN or inf"),
        (lambda: certified_search(q * 1e300, index, 0.1, scale=1e10), ValueError, "overflow"),
        (lambda: certified_search(q, index, 0.1, V=np.ones((9, 2))), ValueError, "V must have"),
        (lambda: certified_attention(q, index, None, 0.1), ValueError, "V is required"),
        (lambda: index.append(np.ones((2, 5))), ValueError, "new_keys must have shape"),
        (lambda: certified_search(q, index, [0.1, 0.2]), ValueError, "broadcast"),
    ]
    for fn, exc, msg in cases:
        if exc is None:
            fn()  # lists of integers are accepted (converted to float64)
            continue
        with pytest.raises(exc, match=msg):
            fn()


def test_docstring_examples():
    result = doctest.testmod(tks, verbose=False, report=True)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ streaming search

def stream_keys(rng, n, d, clusters=64, noise=0.25):
    """Keys in contiguous runs near one of `clusters` centres (the case the streaming
    search is built for); the query is peaked on the centre of key 7."""
    cent = rng.standard_normal((clusters, d))
    lab = np.repeat(rng.integers(0, clusters, n // 48 + 1), 48)[:n]
    K = cent[lab] + noise * rng.standard_normal((n, d))
    q = 2.0 * np.sqrt(d) * K[7] / np.linalg.norm(K[7])
    return K, q


def check_stream(K, q, index, eps=1e-2, streamed=True):
    n, d = K.shape
    res = certified_search(q, index, eps)
    check_row(res.indices, int(res.k), float(res.tv_bound), int(res.keys_scored), q, K,
              1 / np.sqrt(d), eps)
    if streamed:  # the bounds let keys go unscored: the certificate rests on them
        assert int(res.keys_scored) < n
    return res


@pytest.mark.parametrize("case", ["ties", "tiny", "huge", "odd_d", "wide_d", "ragged_n",
                                  "sinks", "far_keys"])
def test_streaming_search_is_sound_on_adversarial_keys(simd_path, case):
    rng = np.random.default_rng(101)
    n, d = 64 * 40 + 37, 16
    if case == "odd_d":
        d = 13
    if case == "wide_d":
        d = 67
    if case == "ragged_n":
        n = 64 * 33 + 1
    K, q = stream_keys(rng, n, d)
    if case == "ties":  # whole runs of identical keys, the query's among them
        K[:512] = K[7]
        K[3000:3100] = K[7]
    if case == "tiny":
        K, q = K * 1e-20, q * 1e20
    if case == "huge":
        K, q = K * 1e20, q * 1e-20
    if case == "sinks":  # keys that hold most of the mass, far from the query's cluster
        K[:4] = 3.0 * q / np.linalg.norm(q) * np.sqrt(d)
    if case == "far_keys":  # keys with logits of -1e4 (masked in effect)
        K[100:900] = -1e4 * q / (q @ q) * np.sqrt(d)
    for dtype in (np.float32, np.float64):
        Kc = K.astype(dtype)
        check_stream(Kc, q.astype(dtype), KeyIndex(Kc))
        check_stream(Kc, q.astype(dtype), KeyIndex(Kc, summary="minmax"))


def test_streaming_search_after_append(simd_path):
    """Keys appended after the build (not reordered, a ragged last block) hold the query's
    cluster: the search must find and certify them."""
    rng = np.random.default_rng(5)
    K, _ = stream_keys(rng, 5000, 24)
    index = KeyIndex(K[:3001])
    index.append(K[3001:4500])
    index.append(K[4500:])
    q = 2.0 * np.sqrt(24) * K[4700] / np.linalg.norm(K[4700])
    res = check_stream(K, q, index)
    assert 4700 in set(res.indices[: int(res.k)].tolist())


@pytest.mark.parametrize("d", [16, 1000, 4096])
def test_int8_codes_at_the_extremes(simd_path, d):
    """Codes of +-127 against query codes at their largest: the int32 dot products reach
    d * ymax * 127 (just below 2^31); an overflow would wrap the aligned key's bound far
    below its logit and leave it unscored, and the certificate would fail."""
    rng = np.random.default_rng(d)
    n = 640
    sign = np.where(rng.standard_normal(d) >= 0, 1.0, -1.0)
    K = 0.5 * np.sign(rng.standard_normal((n, d)))     # every code is +-127
    K[rng.integers(0, n, 40)] = -sign                   # anti-aligned keys
    K[333] = sign                                       # the one aligned key
    q = 0.05 * sign                                     # every query code at +-ymax
    index = KeyIndex(K)
    res = certified_search(q, index, 1e-2)
    check_row(res.indices, int(res.k), float(res.tv_bound), int(res.keys_scored), q, K,
              1 / np.sqrt(d), 1e-2)
    assert int(res.indices[0]) == 333


def test_streaming_search_pays_on_clustered_keys():
    """Peaked queries on clustered keys: few keys scored (close to k_eps), proxies of far
    blocks never read, a kept set close to k_eps."""
    rng = np.random.default_rng(17)
    n, d = 16384, 32
    K, _ = stream_keys(rng, n, d, clusters=128, noise=0.2)
    index = KeyIndex(K.astype(np.float32))
    for i in (7, 5000, 12345):
        q = 3.0 * np.sqrt(d) * K[i] / np.linalg.norm(K[i])
        res = check_stream(K.astype(np.float32), q, index)
        k_eps = int(topkattn.k_eps(ref_logits(q, K.astype(np.float32), 1 / np.sqrt(d)), 1e-2))
        assert int(res.keys_scored) <= 1.5 * k_eps + 16
        assert int(res.k) <= 1.2 * k_eps + 1
        assert int(res.proxies_read) < 0.75 * n
        nblk = int(res.blocks_scored)  # blocks whose proxies were read
        assert 64 * (nblk - 1) < int(res.proxies_read) <= 64 * nblk


def test_streaming_search_scores_everything_when_nothing_can_be_skipped():
    """Gaussian keys and a flat query: almost every key matters, so every key is scored in
    one pass (and the certificate is the exact tail)."""
    rng = np.random.default_rng(3)
    n, d = 8192, 32
    K = rng.standard_normal((n, d)).astype(np.float32)
    q = 0.5 * rng.standard_normal(d).astype(np.float32)
    res = check_stream(K, q, KeyIndex(K), streamed=False)
    assert int(res.keys_scored) == n and int(res.blocks_scored) == n // 64


@pytest.mark.parametrize("spread", [0.3, 1.0, 4.0])
def test_attention_output_is_the_same_with_and_without_the_kept_set(spread):
    """Without return_info the kept set is not sorted; with many kept keys the output is
    summed in stored order either way, so both calls give the same output bit for bit, and
    it is the softmax over the kept set of the info's indices (few or many kept keys:
    flat and peaked queries)."""
    rng = np.random.default_rng(int(spread * 10))
    K = rng.standard_normal((2, 3000, 16))
    V = rng.standard_normal((2, 3000, 6)).astype(np.float32)
    Q = spread * rng.standard_normal((2, 3, 16))
    index = KeyIndex(K.astype(np.float32))
    out, info = certified_attention(Q, index, V, 1e-2, return_info=True)
    assert certified_attention(Q, index, V, 1e-2).tobytes() == out.tobytes()
    for h in range(2):
        for l in range(3):
            k = int(info.k[h, l])
            idx = info.indices[h, l, :k]
            s = ref_logits(Q[h, l], K[h].astype(np.float32), 1 / 4)
            p = np.exp(s[idx] - s[idx].max())
            want = (p / p.sum()) @ V[h][idx].astype(np.float64)
            np.testing.assert_allclose(out[h, l], want, rtol=2e-6, atol=1e-6)


def _asan_loaded():
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not hasattr(__import__("resource"), "getrusage"), reason="needs getrusage")
@pytest.mark.skipif(_asan_loaded(), reason="under AddressSanitizer every allocation (the "
                    "results' arrays too) gets fresh memory while freed blocks sit in its "
                    "quarantine: page faults do not measure the scratch's reuse")
def test_repeated_searches_touch_no_new_memory():
    """Scratch persists across calls (per-thread arenas that outlive the call, up to 256 MiB
    each): once warm, a search repeated on an index of 200,000 keys faults in no new page
    (a fresh scratch allocation per call would fault in megabytes)."""
    import resource
    rng = np.random.default_rng(5)
    c = rng.standard_normal((64, 16)).astype(np.float32) * 2
    K = c[rng.integers(0, 64, 200_000)] + 0.3 * rng.standard_normal((200_000, 16)).astype(np.float32)
    index = KeyIndex(K)
    q = c[:2]
    threads = topkattn.get_num_threads()
    topkattn.set_num_threads(1)  # the calling thread's arena (a worker may skip a warm-up call)
    try:
        first = certified_search(q, index, 1e-2)
        certified_search(q, index, 1e-2)
        # the fewest faults of three rounds of three calls: a stray fault of the interpreter
        # (an allocator returning memory) can land in one round, scratch allocated per call
        # would fault in hundreds of pages in every round
        faults = None
        for _ in range(3):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(3):
                again = certified_search(q, index, 1e-2)
            got = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            faults = got if faults is None else min(faults, got)
    finally:
        topkattn.set_num_threads(threads)
    np.testing.assert_array_equal(again.indices, first.indices)
    assert faults < 30, faults


@pytest.mark.parametrize("spread", [0.2, 0.6, 1.5])
def test_large_rows_with_most_keys_kept(spread):
    """Rows of 20,000 keys where the bounds cannot skip much (flat queries): every key is
    scored and the kept set is picked by the bucketed weighted selection (sets of 4,096 or
    more); it must be the exact top set by logit, certified against float64 scoring, and
    no larger than needed beyond rounding (k_eps of a slightly smaller eps)."""
    rng = np.random.default_rng(int(spread * 100))
    K = rng.standard_normal((20_000, 32))
    q = spread * rng.standard_normal((2, 32))
    eps = 1e-2
    res = certified_search(q, KeyIndex(K), eps)
    for r in range(2):
        k = int(res.k[r])
        s, idx = check_row(res.indices[r], k, float(res.tv_bound[r]), int(res.keys_scored[r]),
                           q[r], K, 1 / np.sqrt(32), eps)
        assert np.sort(idx).tolist() == np.sort(np.argsort(-s, kind="stable")[:k]).tolist()
        assert k <= int(topkattn.k_eps(s, eps * 0.999)), (k, int(topkattn.k_eps(s, eps)))


# ------------------------------------------------------------------ building the index

def _block_radius(keys, bs):
    """Mean over full blocks of the largest distance of a key to its block's mean."""
    nb = keys.shape[0] // bs
    blocks = keys[:nb * bs].reshape(nb, bs, -1)
    return float(np.mean(np.linalg.norm(blocks - blocks.mean(1, keepdims=True), axis=2).max(1)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_index_order_in_place_and_on_a_copy(dtype):
    from topkattn import _core
    rng = np.random.default_rng(5)
    K = clustered(rng, 3 * 5000, 12).astype(dtype).reshape(3, 5000, 12)
    K0 = K.copy()
    perm = _core.index_order(K, 32)
    np.testing.assert_array_equal(K, K0)  # not touched without in_place
    for h in range(3):
        np.testing.assert_array_equal(np.sort(perm[h]), np.arange(5000))
    work = K.copy()
    np.testing.assert_array_equal(_core.index_order(work, 32, True), perm)
    np.testing.assert_array_equal(work, np.take_along_axis(K, perm[:, :, None], axis=1))
    with pytest.raises(ValueError, match="keys"):
        _core.index_order(K[:, ::2], 32, True)  # in place needs a contiguous, writable array
    # the order makes blocks tight: clusters end up in their own blocks
    assert _block_radius(work[0].astype(np.float64), 32) < 0.5 * _block_radius(K0[0].astype(np.float64), 32)


def test_index_build_is_the_same_for_any_thread_count():
    rng = np.random.default_rng(8)
    K = clustered(rng, 70_000, 24).astype(np.float32)[None]  # past the serial top levels
    built = []
    try:
        for threads in (1, 2, 3):
            topkattn.set_num_threads(threads)
            ix = KeyIndex(K, block_size=64)
            built.append([np.array(a) for a in ix._tuple() if isinstance(a, np.ndarray)])
    finally:
        topkattn.set_num_threads(0)
    for other in built[1:]:
        for x, y in zip(built[0], other):
            np.testing.assert_array_equal(x, y)
    ix_keys, ix_perm = built[0][0], built[0][1]
    np.testing.assert_array_equal(ix_keys[0], K[0][ix_perm[0]])


# ------------------------------------------------------------------ block masses

def _segments(rng, n, d, centres, noise=0.35):
    """Keys in runs of 32-256 positions, each run near one of `centres` random centres (the
    layout of a long cache; the benchmark's clustered keys)."""
    cent = rng.standard_normal((centres, d))
    lens = rng.integers(32, 257, size=n // 32 + 1)
    labels = np.repeat(rng.integers(0, centres, size=lens.size), lens)[:n]
    return cent[labels] + noise * rng.standard_normal((n, d))


@pytest.mark.parametrize("dtype,scale", [(np.float32, 1.0), (np.float32, 1e-30),
                                         (np.float32, 1e30), (np.float64, 1.0),
                                         (np.float64, 1e-30), (np.float64, 1e30),
                                         (np.float16, 1.0)])
@pytest.mark.parametrize("bs", [16, 64, 200])
def test_block_moments_bound_each_block(dtype, scale, bs):
    """_mom[h, b] holds upper bounds on the largest eigenvalue of sum_i e_i e_i^T and on
    ||sum_i e_i||, e_i = k_i - ctr over the block's stored keys (float64 reference), also for
    blocks rebuilt by append; the eigenvalue bound stays within 2.5x (the trace would be
    16x off here)."""
    rng = np.random.default_rng(21)
    K = (scale * _segments(rng, 3000, 64, 12)).astype(dtype)
    ix = KeyIndex(K[:2500], block_size=bs)
    ix.append(K[2500:])
    keys = np.asarray(ix._keys)[0, :ix.n].astype(np.float64)
    ratios = []
    for b in range(-(-ix.n // bs)):
        e = (keys[b * bs:(b + 1) * bs] - np.asarray(ix._ctr)[0, b].astype(np.float64)) / scale
        lam = np.linalg.eigvalsh(e @ e.T)[-1] * (1 + 1e-12)  # in units of scale^2
        lam_b, s_b = ix._mom[0, b] / (scale * scale, scale)
        assert lam_b >= lam, (b, lam_b, lam)
        assert s_b >= np.linalg.norm(e.sum(0)) * (1 - 1e-12), b
        ratios.append(lam_b / lam)
    assert max(ratios) < 2.5


def test_block_moments_of_equal_keys_and_of_large_blocks():
    K = np.ones((300, 8), np.float32)
    ix = KeyIndex(K, block_size=64)
    np.testing.assert_array_equal(ix._mom[0, :5, 0], 0.0)  # every key on its centroid
    big = KeyIndex(np.random.default_rng(2).standard_normal((3000, 8)), block_size=1000)
    assert np.isinf(big._mom[0, :3]).all()  # not computed past 256 keys a block: not used


@pytest.mark.parametrize("method", ["delta", "mc"])
@pytest.mark.parametrize("outliers", [0.0, 3.0, 8.0])
def test_block_mass_bounds_keep_certificates_sound(method, outliers):
    """Clustered keys (where the blocks' mass bounds decide what is read), with a key every
    97 positions pushed far off its cluster (a block whose mass sits in one key); queries of
    several norms near a key, or near an outlier: every certificate >= the true TV."""
    rng = np.random.default_rng(int(outliers * 10) + (method == "mc"))
    n, d = 20000, 64
    K = _segments(rng, n, d, 40)
    K[::97] += outliers * rng.standard_normal((len(K[::97]), d))
    for scale in (0.5, 1.5, 3.0):
        Q = scale * K[np.r_[rng.integers(0, n, 3), 97 * rng.integers(0, n // 97, 1)]]
        index = KeyIndex(K.astype(np.float32))
        res = certified_search(Q.astype(np.float32), index, 1e-2, method=method,
                               delta=1e-9 if method == "mc" else None)
        for l in range(len(Q)):
            check_row(res.indices[l], int(res.k[l]), float(res.tv_bound[l]),
                      int(res.keys_scored[l]), Q[l].astype(np.float32), K.astype(np.float32),
                      1 / np.sqrt(d), 1e-2)


def test_block_mass_bounds_read_less_and_score_near_k_eps():
    """Clustered keys, d = 128 (the benchmark's layout): streaming rows score at most
    1.5 k_eps + 64 keys and read the proxies of at most a third of the keys."""
    rng = np.random.default_rng(4)
    n, d = 65536, 128
    K = _segments(rng, n, d, n // 512).astype(np.float32)
    Q = (1.5 * (K[rng.integers(0, n, 8)] + 0.35 * rng.standard_normal((8, d)))).astype(np.float32)
    res = certified_search(Q, KeyIndex(K), 1e-2)
    keps = topkattn.k_eps(Q.astype(np.float64) @ K.T.astype(np.float64) / np.sqrt(d), 1e-2)
    assert not res.full_scoring.any()
    assert (res.keys_scored <= 1.5 * keps + 64).all(), (res.keys_scored, keps)
    assert res.proxies_read.mean() <= n / 3, res.proxies_read


def test_index_order_repairs_loose_blocks():
    """Runs of keys near shared centres: after the repair passes at most 12% of the blocks
    have a radius above 1.5x the median (16-29% with the median splits alone)."""
    from topkattn import _core
    for n, d, centres in ((16384, 32, 32), (32768, 64, 64), (20000, 16, 40)):
        rng = np.random.default_rng(3)
        K = _segments(rng, n, d, centres).astype(np.float32)[None]
        perm = _core.index_order(K, 64)
        np.testing.assert_array_equal(np.sort(perm[0]), np.arange(n))
        W = K[0][perm[0]].astype(np.float64)
        B = W[:n // 64 * 64].reshape(n // 64, 64, d)
        r = np.linalg.norm(B - B.mean(1, keepdims=True), axis=2).max(1)
        assert np.mean(r > 1.5 * np.median(r)) <= 0.12, (n, d)


@pytest.mark.parametrize("n", [6000, 70000])
@pytest.mark.parametrize("ties", [False, True])
def test_float32_rows_scored_in_full_sum_their_kept_values(ties, n):
    """Rows that switch to full scoring and keep between 1/8 and 1/2 of the keys (float32
    keys and values: their kept rows and weights gathered in one pass, or, with ties at
    the threshold, by the general path; over 65536 keys the weights placed at the keys'
    positions, directly when the kept set is not reported): the output is the kept set's
    softmax-weighted mean of V (float64 reference), the same with and without the report,
    and the certificate bounds the true TV."""
    rng = np.random.default_rng(71)
    H, d, dv = 2, 32, 24
    K = rng.standard_normal((H, n, d), dtype=np.float32)
    if ties:
        K[:, 1::2] = K[:, ::2]  # every score appears twice: ties at any threshold
    V = rng.standard_normal((H, n, dv), dtype=np.float32)
    Q = (3.0 * rng.standard_normal((H, 6, d))).astype(np.float32)
    index = KeyIndex(K)
    eps = 1e-2
    out, info = certified_attention(Q, index, V, eps, return_info=True)
    assert info.full_scoring.all()
    kfrac = info.k / n
    assert np.any((kfrac > 1 / 8) & (kfrac <= 1 / 2)), kfrac
    np.testing.assert_array_equal(out, certified_attention(Q, index, V, eps))
    scale = 1.0 / np.sqrt(d)
    for h in range(H):
        for r in range(Q.shape[1]):
            kept = info.indices[h, r][info.indices[h, r] >= 0]
            assert kept.size == info.k[h, r]
            s = ref_logits(Q[h, r], K[h], scale)
            assert true_tv(s, kept) <= info.tv_bound[h, r] <= eps
            w = np.exp(s[kept] - s[kept].max())
            want = (w / w.sum()) @ V[h, kept].astype(np.float64)
            np.testing.assert_allclose(out[h, r], want, rtol=1e-5, atol=1e-6)


def _mass_bound_ref(dot, rad, mom, qn2, g, cab, c1060, eta, inv_m):
    """The block mass bound of docs/design.md §4 in mpmath: base + log(1 + (|q'| sigma +
    phi(R) lambda |q'|^2) / m) with exact e^R and log (not above ub = the per-key bound)."""
    mpmath.mp.prec = 80
    rr = qn2 * rad
    R = mpmath.mpf(rr) * (1 + mpmath.mpf(g))
    base = mpmath.mpf(dot) + cab + c1060 + eta
    ub = mpmath.mpf(dot) + rr * (1 + mpmath.mpf(g)) + cab + c1060 + eta
    phi = (mpmath.exp(R) - 1 - R) / R**2 if R >= 1 else mpmath.e - 2
    S = 1 + (qn2 * mpmath.mpf(mom[1]) + phi * mom[0] * mpmath.mpf(qn2) ** 2) * inv_m
    return min(base + mpmath.log(S), ub)


def test_block_mass_bounds_kernels(simd_path):
    """The kernel of the block bounds (per-key ub and block mass um) of every kernel set:
    the scalar set's values bit for bit, um <= ub, and um never below the bound computed
    exactly (mpmath) and at most 0.1 above it; blocks whose moments are not finite or whose
    radius term reaches 700 keep ub."""
    rng = np.random.default_rng(72)
    m = 1203
    dot = rng.uniform(-60.0, 60.0, m)
    rad = rng.uniform(0.0, 12.0, m) * np.where(rng.random(m) < 0.05, 100.0, 1.0)
    rad[:40] = rng.uniform(0.15, 0.6, 40)                 # R < 1 (over log_up's 0.07)
    # moments a block of 64 keys within the radius can have (lambda <= 64 r^2, sigma <= 64 r)
    mom = np.stack([rng.uniform(0.0, 0.3, m) * 64 * rad**2, rng.uniform(0.0, 0.2, m) * 64 * rad],
                   axis=1)
    mom[50:60, 0] = np.inf
    mom[60:70, 1] = np.inf
    rad[70:75] = 699.9 / 1.7                               # R just under 700
    rad[75:80] = 700.1 / 1.7                               # and just over
    args = (1.7, 2.0**-45, 1e-9, 1e-300, 1e-7, 1.0 / 64)
    ub, um = tks._core.mass_bounds(dot, rad, mom, *args)
    topkattn.set_simd("scalar")
    ub0, um0 = tks._core.mass_bounds(dot, rad, mom, *args)
    np.testing.assert_array_equal(ub, ub0)
    np.testing.assert_array_equal(um, um0)
    assert np.all(um <= ub)
    keeps = ~np.isfinite(mom).all(1) | (1.7 * rad * (1 + 2.0**-45) >= 700.0)
    np.testing.assert_array_equal(um[keeps], ub[keeps])
    assert np.all(um[:40] < ub[:40])                      # (small radii: a real bound)
    assert np.mean(um[~keeps] < ub[~keeps]) > 0.5
    for b in list(range(0, 80)) + list(rng.choice(np.arange(80, m), 150, replace=False)):
        if keeps[b]:
            continue
        ref = _mass_bound_ref(dot[b], rad[b], mom[b], *args)
        assert um[b] >= ref, (b, um[b], float(ref))
        assert um[b] <= ref + 0.1, (b, um[b], float(ref))


@pytest.mark.parametrize("layout", ["two uneven groups", "more groups than threads"])
def test_streaming_rows_finished_by_any_thread_are_the_same(layout):
    """Groups whose rows stream (over 1024 keys) with rows of uneven cost: a thread whose
    groups are done finishes the other groups' published rows (group_slot; with two groups
    of four rows on two threads, one of them usually does). Every result, kept set and
    output equals one thread's, call after call, and every certificate holds."""
    rng = np.random.default_rng(73)
    d = 32
    if layout == "two uneven groups":
        H, n = 1, 24_000
        K = np.stack([clustered(rng, n, d) for _ in range(H)]).astype(np.float32)
        pick = K[:, rng.integers(0, n, 8)]
        Q = np.concatenate([pick[:, :4] * 2.0, pick[:, 4:] * 0.7], axis=1)  # peaked | broad
    else:
        H, n = 3, 24_000
        K = np.stack([clustered(rng, n, d) for _ in range(H)]).astype(np.float32)
        Q = np.concatenate([K[:, rng.integers(0, n, 7)] * 2.0,          # near keys: streaming
                            rng.standard_normal((H, 5, d))], axis=1)   # flat: full scoring
    Q = Q.astype(np.float32)
    V = rng.standard_normal((H, n, 8)).astype(np.float32)
    index = KeyIndex(K)
    try:
        topkattn.set_num_threads(1)
        one = certified_search(Q, index, 1e-2, V=V)
        out1 = certified_attention(Q, index, V, 1e-2)
        assert not one.full_scoring.all()
        for threads in (2, 3, 4, 2, 2):
            topkattn.set_num_threads(threads)
            many = certified_search(Q, index, 1e-2, V=V)
            for x, y in zip(_fields(one), _fields(many)):
                np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(certified_attention(Q, index, V, 1e-2), out1)
    finally:
        topkattn.set_num_threads(0)
    scale = 1.0 / np.sqrt(d)
    for h in range(H):
        for r in range(Q.shape[1]):
            kept = one.indices[h, r][one.indices[h, r] >= 0]
            assert true_tv(ref_logits(Q[h, r], K[h], scale), kept) <= one.tv_bound[h, r] <= 1e-2
