"""Certified search by groups of queries: the switch to full scoring (one pass over the keys
for up to four queries of a head, the kept set and exact tail of topk_attention(eps)) and
the per-stage profile, against float64 NumPy references."""
import threading

import numpy as np
import pytest

import topkattn
from topkattn import search as tks
from topkattn.search import KeyIndex, certified_attention, certified_search

from test_search import check_row, ref_logits, stream_keys


def dense_output(s, V):
    p = np.exp(s - s.max())
    return (p / p.sum()) @ np.asarray(V, np.float64)


def diameter(V):
    """max |v_i - v_j| over pairs of rows (by chunks of rows: no n x n x d array)."""
    v = np.asarray(V, np.float64)
    sq = (v * v).sum(1)
    best = 0.0
    for i in range(0, v.shape[0], 512):
        d2 = sq[i:i + 512, None] + sq[None, :] - 2.0 * v[i:i + 512] @ v.T
        best = max(best, float(d2.max()))
    return np.sqrt(best) * (1 + 1e-12) + 1e-12


def check_attention_rows(Q, K, V, out, info, eps, scale, diam=None):
    """Every row: certificate >= true TV (float64), output = softmax over the kept set,
    output within tv_bound * diam(V) of the dense attention (docs/design.md §3)."""
    L = Q.shape[0]
    diam = diameter(V) if diam is None else diam
    for l in range(L):
        k = int(info.k[l])
        s, idx = check_row(info.indices[l], k, float(info.tv_bound[l]),
                           int(info.keys_scored[l]), Q[l], K, scale, eps)
        p = np.exp(s[idx] - s[idx].max())
        want = (p / p.sum()) @ np.asarray(V, np.float64)[idx]
        # float32 (or float16) keys scored in full: the weights come from float32-accumulated
        # scores (relative error ~ 1e-6 at these sizes, as in topk_attention)
        tol = 1e-9 if out.dtype == np.float64 else 1e-6
        if np.asarray(K).dtype != np.float64 and info.full_scoring is not None \
                and info.full_scoring[l]:
            tol = 2e-5
        np.testing.assert_allclose(out[l], want, rtol=tol, atol=tol)
        full = dense_output(s, V)
        assert np.linalg.norm(full - out[l]) <= float(info.tv_bound[l]) * diam + 1e-9


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("L", [1, 3, 6])
def test_full_scoring_is_sound_with_the_kept_set_of_topk_attention(simd_path, dtype, L):
    """Gaussian keys, flat queries: the sample shows that most keys matter, so every group
    switches to full scoring. Each row keeps the k_eps set (the smallest certified size, or
    one more key at a boundary the padding crosses), the certificate bounds the true TV and
    the output is that of the kept set, for any group size (1 to 4 rows, ragged groups)."""
    rng = np.random.default_rng(L)
    n, d = 3000, 16
    K = rng.standard_normal((n, d)).astype(dtype)
    V = rng.standard_normal((n, 5))
    Q = (0.7 * rng.standard_normal((L, d))).astype(dtype)
    index = KeyIndex(K)
    diam = diameter(V)
    for eps in (1e-1, 1e-2, 1e-4):
        out, info = certified_attention(Q, index, V, eps, return_info=True)
        assert info.full_scoring.shape == (L,) and info.full_scoring.dtype == np.bool_
        assert info.full_scoring.all()
        assert np.all(info.keys_scored == n) and np.all(info.blocks_scored == -(-n // 64))
        check_attention_rows(Q, K, V, out, info, eps, 1 / np.sqrt(d), diam)
        S = ref_logits(Q.T, K, 1 / np.sqrt(d)).T  # (L, n)
        # no certified set is smaller than k_eps; the selection aims a little inside eps
        # (by the padding of the float32 scores of float32 keys too)
        lo = topkattn.k_eps(S, eps * (1 + 1e-9))
        hi = topkattn.k_eps(S, eps * (1 - 1e-3))
        assert np.all(lo <= info.k) and np.all(info.k <= hi + 1)


def test_full_scoring_over_many_keys_sums_float32_values_in_position_order():
    """Float32 keys and values over more than 65536 keys, rows scored in full keeping from
    an eighth to most of the keys: their kept value rows are summed in position order (the
    weights placed at the keys' positions first); each output is the kept set's softmax
    (float64 reference, float32 accuracy), as topk_attention's for the same eps."""
    rng = np.random.default_rng(23)
    n, d = 70000, 16
    K = rng.standard_normal((n, d)).astype(np.float32)
    V = rng.standard_normal((n, 3)).astype(np.float32)
    Q = (np.array([0.5, 2.5, 3.5, 4.5])[:, None] * rng.standard_normal((4, d))).astype(np.float32)
    index = KeyIndex(K)
    eps = 1e-2
    out, info = certified_attention(Q, index, V, eps, return_info=True)
    assert info.full_scoring.all()
    assert np.sum(info.k > n // 8) >= 2 and info.k.min() < n // 8 and info.k.max() > n // 2
    check_attention_rows(Q, K, V, out, info, eps, 1 / np.sqrt(d),
                         diam=2.0 * np.linalg.norm(V, axis=1).max())
    ref = topkattn.topk_attention(Q, K, V, eps=eps)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)  # kept sets within a few keys


def test_the_decision_goes_both_ways_and_is_made_per_group():
    """Clustered keys: peaked queries stream (few keys scored), flat ones switch. When the
    first row of a group asks for full scoring, the whole group switches (one decision for
    the group); otherwise each row decides on its own sample."""
    rng = np.random.default_rng(3)
    n, d = 8192, 32
    K, _ = stream_keys(rng, n, d, clusters=64, noise=0.2)
    K = K.astype(np.float32)
    V = rng.standard_normal((n, 4))
    peaked = np.stack([3.0 * np.sqrt(d) * K[i] / np.linalg.norm(K[i]) for i in (7, 900, 4000)])
    flat = 0.05 * rng.standard_normal((3, d))
    index = KeyIndex(K)
    eps = 1e-2
    # rows 0-3: one group, peaked, peaked, flat, peaked; rows 4-7: flat, peaked, peaked,
    # peaked (the first row decides for its group); rows 8-9: peaked
    Q = np.stack([peaked[0], peaked[1], flat[0], peaked[2], flat[1], peaked[0], peaked[1],
                  peaked[2], peaked[1], peaked[0]])
    out, info = certified_attention(Q, index, V, eps, return_info=True)
    np.testing.assert_array_equal(info.full_scoring, [False, False, True, False] + [True] * 4
                                  + [False, False])
    assert np.all(info.keys_scored[~info.full_scoring] < n // 4)
    assert np.all(info.keys_scored[info.full_scoring] == n)
    check_attention_rows(Q, K, V, out, info, eps, 1 / np.sqrt(d))
    # a group of flat rows switches at once; the same rows alone do too (a group of one
    # switches when half of the keys would be candidates)
    out, info = certified_attention(flat, index, V, eps, return_info=True)
    assert info.full_scoring.all()
    check_attention_rows(flat, K, V, out, info, eps, 1 / np.sqrt(d))
    for q in flat:
        assert bool(certified_search(q, index, eps).full_scoring)
    # the other methods never switch (the flag says so)
    for kw in (dict(method="mc", delta=0.1), dict(use_proxy=False)):
        assert not certified_search(Q, index, eps, **kw).full_scoring.any()


def test_extreme_eps_in_full_scoring_keeps_adding_keys():
    """eps far below the underflow of e^-708: the exact tail is padded past eps, so the row
    is certified by the sorted search certificate (keys added until it holds)."""
    rng = np.random.default_rng(8)
    n, d = 2000, 8
    K = rng.standard_normal((n, d))
    Q = 0.2 * rng.standard_normal((4, d))
    for eps in (1e-200, 1e-300):
        info = certified_search(Q, KeyIndex(K), eps)
        assert info.full_scoring.all()
        for l in range(4):
            check_row(info.indices[l], int(info.k[l]), float(info.tv_bound[l]),
                      int(info.keys_scored[l]), Q[l], K, 1 / np.sqrt(d), eps, exact_mp=False)


def test_full_scoring_after_append_covers_every_key():
    """Keys appended after the build (a ragged last block) are scored by the group's pass:
    the certificate is over all n keys, for several heads."""
    rng = np.random.default_rng(9)
    H, n, d = 2, 2500, 12
    K = rng.standard_normal((H, n, d)).astype(np.float32)
    V = rng.standard_normal((H, n, 3)).astype(np.float32)
    index = KeyIndex(K[:, :1001])
    index.append(K[:, 1001:2222])
    index.append(K[:, 2222:])
    Q = (0.5 * rng.standard_normal((H, 5, d))).astype(np.float32)
    K[:, 2400] = 8.0 * Q[:, 1]  # an appended key holds much of row 1's mass
    index2 = KeyIndex(K[:, :1001])
    index2.append(K[:, 1001:])
    for ix in (index, index2):
        out, info = certified_attention(Q, ix, V, 1e-2, return_info=True)
        assert info.n == n and info.full_scoring[:, 2:].all()
        for h in range(H):
            Kh = K[h] if ix is index2 else np.asarray(index._keys[h, :n])[np.argsort(index._perm[h, :n])]
            check_attention_rows(Q[h], Kh, V[h], out[h], _row(info, h), 1e-2, 1 / np.sqrt(d))
    assert 2400 in set(_row(certified_search(Q, index2, 1e-2), 1).indices[1].tolist())


def _row(info, h):
    """The SearchResult fields of head h."""
    class R:
        pass
    r = R()
    for name in ("indices", "k", "tv_bound", "keys_scored", "full_scoring"):
        setattr(r, name, getattr(info, name)[h])
    return r


def check_as_alone(info, l, q, index, eps):
    """Row l of a group's result is exactly the row's search alone (kept set, certificate,
    keys scored, proxies used); returns the row's own result."""
    one = certified_search(q, index, eps)
    k = int(one.k)
    assert info.k[l] == k and info.tv_bound[l] == one.tv_bound
    np.testing.assert_array_equal(np.sort(info.indices[l, :k]), np.sort(one.indices))
    assert info.keys_scored[l] == one.keys_scored
    assert info.proxies_read[l] == one.proxies_read
    return one


def test_any_row_of_a_group_over_many_keys_can_switch_the_group_at_its_first_look():
    """Over 32768 keys or more every row of a group first looks at a quarter of its sample;
    one flat row among peaked ones switches its whole group before any row reads the rest
    of its sample (one pass for the four queries), a group of peaked rows streams, and
    every row's certificate holds against float64."""
    rng = np.random.default_rng(21)
    n, d = 32768, 64
    K, _ = stream_keys(rng, n, d, clusters=64, noise=0.2)
    K = K.astype(np.float32)
    V = rng.standard_normal((n, 3))
    peaked = np.stack([3.0 * np.sqrt(d) * K[i] / np.linalg.norm(K[i])
                       for i in (11, 5000, 20000, 31000)])
    flat = 0.05 * rng.standard_normal(d)
    index = KeyIndex(K)
    eps = 1e-2
    Q = np.stack([peaked[0], peaked[1], flat, peaked[2]] + list(peaked))
    out, info = certified_attention(Q, index, V, eps, return_info=True)
    np.testing.assert_array_equal(info.full_scoring, [True] * 4 + [False] * 4)
    assert np.all(info.keys_scored[:4] == n) and np.all(info.keys_scored[4:] < n // 8)
    # the rows before the flat one read a quarter of their sample (1/32 of the blocks with
    # the highest bounds and every 32nd block: at most 2/32 of the proxies), the row after
    # it none: the look of the flat row decided
    assert np.all(info.proxies_read[:2] > 0) and np.all(info.proxies_read[:2] <= n // 16)
    assert info.proxies_read[3] == 0
    check_attention_rows(Q, K, V, out, info, eps, 1 / np.sqrt(d),
                         diam=2.0 * np.linalg.norm(V, axis=1).max())
    # the streaming group reads its rows' expansions in shared passes over the blocks; each
    # row reads, scores and keeps what it does alone
    for l in range(4, 8):
        check_as_alone(info, l, Q[l], index, eps)


def test_a_group_whose_rows_read_most_proxies_computes_them_in_one_pass():
    """Keys in arrival order (no reordering, as the decode indexes keep them): the blocks'
    bounds skip few keys, every row's first look predicts it to read most proxies, and the
    group computes every key's level in one pass over the codes (its bytes count for every
    row) before searching on: each row then gives exactly what it gives alone (kept set,
    certificate, keys scored, proxies used), and every certificate holds against float64."""
    rng = np.random.default_rng(22)
    n, d = 32768, 64
    K, _ = stream_keys(rng, n, d, clusters=64, noise=0.2)
    K = K.astype(np.float32)
    V = rng.standard_normal((n, 3))
    index = KeyIndex(K, reorder=False)
    Q = np.stack([4.0 * np.sqrt(d) * K[i] / np.linalg.norm(K[i])
                  for i in (11, 5000, 20000, 31000)])
    eps = 1e-2
    out, info = certified_attention(Q, index, V, eps, return_info=True)
    assert not info.full_scoring.any()
    assert np.all(info.bytes_read >= n * (d + 8))      # every proxy, in the shared pass
    assert info.proxies_read.min() < 0.9 * n           # more than the search then used
    check_attention_rows(Q, K, V, out, info, eps, 1 / np.sqrt(d),
                         diam=2.0 * np.linalg.norm(V, axis=1).max())
    for l in range(4):
        one = check_as_alone(info, l, Q[l], index, eps)
        if one.proxies_read < 0.9 * n:                 # alone: only the proxies it used
            assert one.bytes_read < n * (d + 8)


def test_two_threads_on_one_index_give_the_serial_results():
    """Searches (streaming and switching groups) from two Python threads at once on one
    index give what they give one after the other."""
    rng = np.random.default_rng(10)
    n, d = 6000, 16
    K, _ = stream_keys(rng, n, d, clusters=32, noise=0.2)
    V = rng.standard_normal((n, 4))
    index = KeyIndex(K)
    Qs = [np.concatenate([3.0 * K[rng.integers(0, n, 3)], 0.1 * rng.standard_normal((5, d))])
          for _ in range(2)]
    want = [certified_attention(q, index, V, 1e-2, return_info=True) for q in Qs]
    assert any(w[1].full_scoring.any() and not w[1].full_scoring.all() for w in want)
    got = [[], []]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                got[i].append(certified_attention(Qs[i], index, V, 1e-2, return_info=True))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        for out, info in got[i]:
            assert out.tobytes() == want[i][0].tobytes()
            np.testing.assert_array_equal(info.indices, want[i][1].indices)
            np.testing.assert_array_equal(info.tv_bound, want[i][1].tv_bound)
            np.testing.assert_array_equal(info.full_scoring, want[i][1].full_scoring)


def test_same_results_for_any_thread_count_with_switching_groups():
    rng = np.random.default_rng(12)
    K = rng.standard_normal((3, 2048, 16))
    V = rng.standard_normal((3, 2048, 4))
    Q = rng.standard_normal((3, 7, 16)) * np.array([4.0, 0.3, 2.0, 0.1, 3.0, 1.0, 0.2])[:, None]
    index = KeyIndex(K)
    topkattn.set_num_threads(1)
    one = certified_search(Q, index, 1e-2, V=V)
    topkattn.set_num_threads(3)
    many = certified_search(Q, index, 1e-2, V=V)
    for name in ("indices", "k", "tv_bound", "keys_scored", "bytes_read", "output",
                 "full_scoring"):
        np.testing.assert_array_equal(getattr(one, name), getattr(many, name))


def test_stage_profile():
    """The private profile gives the search's results with per-stage seconds and bytes that
    add up: codes = proxies read x (d + 8); a switching group's full pass (n d itemsize)
    shared out over its rows; kept positions 8 bytes each; V rows of the kept keys (or all
    of V shared by the rows of a fully scored group that keep many keys)."""
    rng = np.random.default_rng(13)
    n, d = 8192, 32
    K, _ = stream_keys(rng, n, d, clusters=64, noise=0.2)
    K = K.astype(np.float32)
    V = rng.standard_normal((n, 6)).astype(np.float32)
    peaked = np.stack([3.0 * np.sqrt(d) * K[i] / np.linalg.norm(K[i]) for i in (5, 77, 3000, 4000)])
    Q = np.concatenate([peaked, 0.05 * rng.standard_normal((3, d))])
    out, info = certified_attention(Q, KeyIndex(K), V, 1e-2, return_info=True)
    info2, sec, nby = tks._stage_profile(Q, KeyIndex(K), V, 1e-2)
    assert sec.shape == nby.shape == (7, len(tks._STAGES)) and tks._STAGES[0] == "codes"
    assert np.all(sec >= 0) and np.all(nby >= 0) and sec.sum() > 0
    np.testing.assert_array_equal(info2.k, info.k)
    np.testing.assert_array_equal(info2.tv_bound, info.tv_bound)
    np.testing.assert_array_equal(info2.full_scoring, info.full_scoring)
    np.testing.assert_allclose(info2.output, out, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(info.full_scoring, [False] * 4 + [True] * 3)
    np.testing.assert_array_equal(nby[:, 0], info.proxies_read * (d + 8))
    np.testing.assert_array_equal(nby[:, 3], 8.0 * info.k)
    # V: the kept rows of a streaming row; the rows of the switching group keep many keys
    # and read all of V once between them
    np.testing.assert_array_equal(nby[:4, 4], 4.0 * 6 * info.k[:4])
    assert np.all(info.k[4:] > n // 2)
    np.testing.assert_allclose(nby[4:, 4], 4.0 * 6 * n / 3)
    stream = ~info.full_scoring
    np.testing.assert_array_equal(nby[stream, 2], 4.0 * d * info.keys_scored[stream])
    # the group of rows 4-6: its first row scored one sampled key, then the shared pass
    assert nby[4:, 2].sum() == pytest.approx(4.0 * d * (n + 1))
    np.testing.assert_allclose(nby.sum(1) - nby[:, 4], info.bytes_read)
    with pytest.raises(ValueError, match="V is required"):
        tks._stage_profile(Q, KeyIndex(K), None, 1e-2)
    with pytest.raises(TypeError, match="unexpected"):
        tks._stage_profile(Q, KeyIndex(K), V, 1e-2, bogus=1)


def test_small_key_sets_are_scored_in_full_without_a_sample():
    """Groups of two or more queries over at most 1024 keys (a short context) are scored in
    full at once (no proxy read); a single query still samples and streams when it pays."""
    rng = np.random.default_rng(14)
    n, d = 1000, 16
    K, q = stream_keys(rng, n, d, clusters=16, noise=0.2)
    V = rng.standard_normal((n, 3))
    Q = np.stack([q, 3.0 * K[500], q, 3.0 * K[900], q])  # groups of 4 and 1
    out, info = certified_attention(Q, KeyIndex(K), V, 1e-2, return_info=True)
    np.testing.assert_array_equal(info.full_scoring, [True] * 4 + [False])
    assert np.all(info.proxies_read[:4] == 0) and info.proxies_read[4] > 0
    assert info.keys_scored[4] < n
    check_attention_rows(Q, K, V, out, info, 1e-2, 1 / np.sqrt(d))


def test_a_group_sharing_the_codes_pass_keeps_streaming():
    """Keys in arrival order (as a KV cache grows: blocks too loose to skip any) and four
    peaked queries: every row reads every proxy, in one pass over the codes shared by the
    group, and scores a few keys. The group's switch on its rows' looks together must not
    count that shared pass once per row (it did, and such groups went to full scoring)."""
    rng = np.random.default_rng(3)
    n, d = 40000, 64
    K = rng.standard_normal((n, d)).astype(np.float32)
    index = KeyIndex(K[:4096], reorder=False)
    index.append(K[4096:])
    targets = [123, 9000, 25000, 39000]
    Q = np.stack([4.0 * np.sqrt(d) * K[i] / np.linalg.norm(K[i]) for i in targets])
    Q = Q.astype(np.float32)
    res = certified_search(Q, index, 1e-2)
    assert not res.full_scoring.any()
    assert np.all(res.proxies_read == n)
    keps = topkattn.k_eps(Q.astype(np.float64) @ K.T.astype(np.float64) / np.sqrt(d), 1e-2)
    assert np.all(res.keys_scored <= 2 * keps + 64), (res.keys_scored, keps)
    for l, i in enumerate(targets):
        check_row(res.indices[l], int(res.k[l]), float(res.tv_bound[l]),
                  int(res.keys_scored[l]), Q[l], K, 1 / np.sqrt(d), 1e-2)
        assert int(res.indices[l][0]) == i
