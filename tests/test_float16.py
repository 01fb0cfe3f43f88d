"""float16 inputs: the C core converts them exactly, so every result equals the one of the
same values given as float32, bit for bit, on every SIMD path. Attention outputs of
float16 operands are float16: the float64 result rounded once. (The reference tests of
test_distribution, test_bounds, test_stats and test_inputs run over float16 as well,
through FLOATS.)"""
import numpy as np
import pytest

import topkattn
from topkattn import reference as ref

from _util import assert_rel


def _rows(rng):
    """float16 batches: gaussian rows with masks, ties, a wide range, a long row past the
    chunk length, and lengths that are not multiples of any vector width."""
    out = []
    for shape in [(3, 1), (4, 7), (5, 33), (3, 129), (2, 1025), (1, 70_001)]:
        x = (3.0 * rng.standard_normal(shape)).astype(np.float16)
        x[rng.random(shape) < 0.1] = -np.inf
        x[:, 0] = 1.5
        out.append(x)
    out.append(np.round(4 * rng.random((4, 300))).astype(np.float16))  # heavy ties
    out.append(rng.uniform(-6e4, 6e4, (3, 200)).astype(np.float16))  # the whole range
    out.append((rng.standard_normal((3, 64)) * 1e-6).astype(np.float16))  # subnormals
    return out


def _everything(x):
    n = x.shape[-1]
    k = np.minimum(np.arange(x.shape[0]) * 3 + 1, n)
    res = {
        "log_tail_mass": topkattn.log_tail_mass(x, k),
        "tail_mass": topkattn.tail_mass(x, k),
        "kl_truncated": topkattn.kl_truncated(x, k),
        "tv_curve": topkattn.tv_curve(x) if n < 5000 else np.zeros(1),
        "gap_bound": topkattn.gap_bound(x, k),
        "gap_bound_gap": topkattn.gap_bound(x, k, form="gap"),
        "multigap": topkattn.multigap_bound(x, k, cuts=5),
        "multigap_linear": topkattn.multigap_bound(x, k, cuts=5, spacing="linear"),
        "entropy": topkattn.entropy(x),
        "fit_gaussian": np.stack(topkattn.fit_gaussian(x)),
        "topk": topkattn.topk(x, min(n, 10)),
        "effective_support": topkattn.effective_support(x, 1e-3),
    }
    for eps in (1e-300, 1e-9, 0.01, 0.3):
        kk, tau = topkattn.k_eps(x, eps, return_tail=True)
        res[f"k_eps{eps}"] = kk
        res[f"k_eps_tau{eps}"] = tau
    return res


def test_float16_logits_give_the_float32_results_bit_for_bit(simd_path, rng):
    for x in _rows(rng):
        for view in (x, x[:, ::-1], np.asfortranarray(x)):  # contiguous, reversed, strided
            got, want = _everything(view), _everything(view.astype(np.float32))
            for name in want:
                np.testing.assert_array_equal(got[name], want[name],
                                              err_msg=f"{name} on {x.shape} ({simd_path})")


def test_float16_logits_match_the_reference(rng):
    x = (2.0 * rng.standard_normal((6, 500))).astype(np.float16)
    k = np.arange(6) * 40 + 1
    assert_rel(topkattn.log_tail_mass(x, k), ref.log_tail_mass(x, k), rtol=1e-12)
    np.testing.assert_array_equal(topkattn.k_eps(x, 0.01), ref.k_eps(x, 0.01))
    np.testing.assert_array_equal(topkattn.topk(x, 7), ref.topk(x, 7))
    tau = ref.tail_mass(x, k)
    assert (topkattn.gap_bound(x, k) >= tau).all()
    assert (topkattn.multigap_bound(x, k, cuts=4) >= tau).all()


def test_float16_errors_name_the_argument():
    x = np.zeros((2, 4), np.float16)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"logits.*NaN"):
        topkattn.k_eps(x, 0.1)
    x[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"\+inf"):
        topkattn.tail_mass(x, 1)


def _qkv(rng, n=300, d=24, dv=8, L=5, heads=(2,)):
    Q = (2.0 * rng.standard_normal(heads + (L, d))).astype(np.float16)
    K = rng.standard_normal(heads + (n, d)).astype(np.float16)
    V = rng.standard_normal(heads + (n, dv)).astype(np.float16)
    return Q, K, V


def test_float16_attention_is_the_float64_result_rounded_once(simd_path, rng):
    Q, K, V = _qkv(rng)
    Q64, K64, V64 = (a.astype(np.float64) for a in (Q, K, V))
    out = topkattn.attention(Q, K, V)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, topkattn.attention(Q64, K64, V64).astype(np.float16))
    for sel in ({"eps": 1e-3}, {"eps": 0.2}, {"k": 17}, {"ratio": 0.5}):
        o16, i16 = topkattn.topk_attention(Q, K, V, return_info=True, **sel)
        o64, i64 = topkattn.topk_attention(Q64, K64, V64, return_info=True, **sel)
        assert o16.dtype == np.float16
        # float16 problems are scored in float64 on the exactly converted operands
        np.testing.assert_array_equal(o16, o64.astype(np.float16))
        for f in ("indices", "k", "tau"):
            np.testing.assert_array_equal(getattr(i16, f), getattr(i64, f), err_msg=f"{f} {sel}")
        # float32 problems accumulate their scores in float32 lanes: close, not equal
        o32 = topkattn.topk_attention(*(a.astype(np.float32) for a in (Q, K, V)), **sel)
        assert o32.dtype == np.float32
        np.testing.assert_allclose(o32, o64, rtol=1e-4, atol=1e-5, err_msg=str(sel))
    e16 = topkattn.attention_error(Q, K, V, eps=0.01)
    e64 = topkattn.attention_error(Q64, K64, V64, eps=0.01)
    for f in ("error", "tau", "mu_head", "mu_tail", "diam_bound", "var_bound", "k"):
        np.testing.assert_array_equal(getattr(e16, f), getattr(e64, f), err_msg=f)


def test_float16_attention_matches_the_reference(rng):
    Q, K, V = _qkv(rng, n=129, d=7, dv=3)
    out = topkattn.topk_attention(Q, K, V, eps=1e-2)
    exp_out, _, _ = ref.topk_attention(Q, K, V, eps=1e-2)
    # one rounding to float16 (half a unit, 2^-11 relative) from the float64 result
    np.testing.assert_allclose(out.astype(np.float64), exp_out, rtol=2.0 ** -11, atol=2.0 ** -25)


@pytest.mark.parametrize("other, want", [(np.float32, np.float32), (np.float64, np.float64)])
def test_mixed_dtypes_go_to_the_widest(other, want, rng):
    Q, K, V = _qkv(rng, n=50)
    for ops in [(Q, K.astype(other), V), (Q.astype(other), K, V), (Q, K, V.astype(other))]:
        out = topkattn.attention(*ops)
        assert out.dtype == want
        np.testing.assert_array_equal(out, topkattn.attention(*(a.astype(want) for a in ops)))


def test_float16_key_index_gives_the_float32_results(simd_path, rng):
    K = rng.standard_normal((2, 900, 16)).astype(np.float16)
    V = rng.standard_normal((2, 900, 4)).astype(np.float16)
    Q = (1.5 * rng.standard_normal((2, 6, 16))).astype(np.float16)
    for summary in ("minmax", "ball"):
        i16 = topkattn.KeyIndex(K, block_size=32, summary=summary)
        i32 = topkattn.KeyIndex(K.astype(np.float32), block_size=32, summary=summary)
        assert i16.dtype == np.float16 and i16.nbytes < i32.nbytes
        new = rng.standard_normal((2, 50, 16)).astype(np.float16)
        i16.append(new)
        i32.append(new.astype(np.float32))
        V2 = np.concatenate([V, rng.standard_normal((2, 50, 4)).astype(np.float16)], axis=1)
        for eps in (1e-4, 0.05):
            r16 = topkattn.certified_search(Q, i16, eps, V=V2)
            r32 = topkattn.certified_search(Q.astype(np.float32), i32, eps,
                                            V=V2.astype(np.float32))
            for f in ("indices", "k", "tv_bound", "keys_scored", "blocks_scored"):
                np.testing.assert_array_equal(getattr(r16, f), getattr(r32, f), err_msg=f)
            assert (r16.bytes_read < r32.bytes_read).all()  # half the bytes per exact key
            assert r16.output.dtype == np.float16
            np.testing.assert_array_equal(r16.output, r32.output.astype(np.float16))
            # the certificate holds for the float16 keys' exact tail
            s = np.einsum("hld,hnd->hln", Q.astype(np.float64),
                          np.concatenate([K, new], axis=1).astype(np.float64)) / 4.0
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            kept = np.zeros(p.shape, bool)
            for h in range(2):
                for q in range(6):
                    ii = r16.indices[h, q]
                    kept[h, q, ii[ii >= 0]] = True
            tau = np.where(kept, 0.0, p).sum(axis=-1) / p.sum(axis=-1)
            assert (r16.tv_bound >= tau * (1 - 1e-12)).all() and (r16.tv_bound <= eps).all()
