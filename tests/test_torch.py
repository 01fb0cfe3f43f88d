"""topkattn.torch: the Top-k forward against a float64 NumPy reference and the C core's
selection, the kept-set backward against gradcheck and against autograd of plain torch ops,
the simulated approximate selector, argument checking, and the import without torch."""
import doctest
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import topkattn  # noqa: E402
import topkattn.torch as tkt  # noqa: E402


# ----------------------------------------------------------------- NumPy reference

def ref_bias(L, n, causal, mask):
    """(L, n) additive float64 bias: 0 / -inf from a bool mask and the causal rule."""
    b = np.zeros((L, n))
    if mask is not None:
        m = np.asarray(mask)
        b = b + (np.where(m, 0.0, -np.inf) if m.dtype == bool else m.astype(np.float64))
    if causal:
        i = np.arange(L)[:, None] + (n - L)
        b = np.where(np.arange(n)[None, :] > i, -np.inf, b)
    return b


def ref_keep_row(s, k=None, ratio=None, eps=None):
    """Indices kept in one row of float64 scores: stable sort by decreasing score."""
    live = np.flatnonzero(s > -np.inf)
    order = live[np.argsort(-s[live], kind="stable")]
    if k is not None:
        kk = min(k, live.size)
    elif ratio is not None:
        kk = max(1, min(live.size, math.ceil(ratio * live.size)))
    else:
        p = np.exp(s[order] - s[order[0]])
        p /= p.sum()
        tail = np.cumsum(p[::-1])[::-1]  # tail[j] = mass of ranks j..end
        kk = max(1, int(np.count_nonzero(tail > eps)))
    return order[:kk]


def ref_topk_attention(qa, ka, va, causal=False, mask=None, scale=None, **budget):
    """Float64 Top-k attention of (B, H, L, d) arrays, row by row."""
    q, keys, v = (np.asarray(t, dtype=np.float64) for t in (qa, ka, va))
    L, n, d = q.shape[-2], keys.shape[-2], q.shape[-1]
    c = 1.0 / math.sqrt(d) if scale is None else scale
    s = c * np.einsum("...ld,...nd->...ln", q, keys) + ref_bias(L, n, causal, mask)
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for idx in np.ndindex(*s.shape[:-1]):
        row = s[idx]
        kept = ref_keep_row(row, **budget)
        w = np.exp(row[kept] - row[kept].max())
        out[idx] = (w / w.sum()) @ v[idx[:-1]][kept]
    return out


def qkv(seed, B=2, H=3, L=7, n=None, d=5, dv=4, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    n = L if n is None else n
    q = torch.randn(B, H, L, d, generator=g, dtype=dtype)
    k = torch.randn(B, H, n, d, generator=g, dtype=dtype)
    v = torch.randn(B, H, n, dv, generator=g, dtype=dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


BUDGETS = [dict(k=1), dict(k=3), dict(k=6), dict(ratio=0.3), dict(ratio=0.75), dict(eps=0.3),
           dict(eps=0.05)]


# ----------------------------------------------------------------- forward

@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_numpy_reference(budget, causal, tied):
    q, k, v = qkv(1, L=9, n=11)
    if tied:  # integer queries and keys on a few levels: many exactly equal scores
        q, k = q.round().clamp(-1, 1), k.round().clamp(-1, 1)
    got = tkt.topk_attention(q, k, v, is_causal=causal, **budget)
    want = ref_topk_attention(q.numpy(), k.numpy(), v.numpy(), causal=causal, **budget)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-13)


def test_forward_with_masks_and_scale():
    q, k, v = qkv(2, L=6, n=10)
    g = torch.Generator().manual_seed(3)
    bmask = torch.rand(6, 10, generator=g) < 0.7
    bmask[:, 0] = True  # every row keeps a key
    fmask = torch.randn(2, 3, 6, 10, generator=g, dtype=torch.float64)
    for mask in (bmask, fmask):
        got = tkt.topk_attention(q, k, v, 3, attn_mask=mask, is_causal=True, scale=0.7)
        m = mask.numpy() if mask.dtype == torch.bool else None
        want = np.empty(got.shape)
        for b in range(2):
            for h in range(3):
                mm = m if m is not None else mask[b, h].numpy()
                want[b, h] = ref_topk_attention(q[b, h].numpy(), k[b, h].numpy(),
                                                v[b, h].numpy(), causal=True, mask=mm,
                                                scale=0.7, k=3)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("budget,causal", [(dict(k=1), True), (dict(k=5), True),
                                          (dict(eps=0.1), True), (dict(ratio=0.2), False)],
                         ids=str)
def test_forward_matches_c_core_topk_attention(budget, causal):
    # the C core's topkattn.topk_attention (float64, per-row fused) on the same problem;
    # its ratio counts all n keys, so ratio is compared without a mask
    q, k, v = qkv(4, L=33, n=40, d=8, dv=5)
    got = tkt.topk_attention(q, k, v, is_causal=causal, **budget)
    mask = ref_bias(33, 40, causal, None)
    want = topkattn.topk_attention(q.numpy(), k.numpy(), v.numpy(), mask=mask, **budget)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_ties_keep_lower_index():
    # keys 0..5 all equal: every query scores them alike, so top-2 must be keys 0 and 1
    n, d = 6, 3
    k = torch.ones(1, 1, n, d, dtype=torch.float64)
    q = torch.randn(1, 1, 4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = torch.arange(n, dtype=torch.float64).reshape(1, 1, n, 1)
    out = tkt.topk_attention(q, k, v, 2)
    np.testing.assert_allclose(out.numpy(), 0.5, rtol=0, atol=1e-15)  # mean of v_0, v_1
    s = torch.tensor([[2.0, 5.0, 5.0, 5.0, 1.0]])
    assert tkt.topk_select(s, 2).tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_matches_c_core(dtype):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(40, 300, generator=g, dtype=torch.float64) * 3
    s[:, ::7] = s[:, 1::7][:, : s[:, ::7].shape[1]]  # exact ties
    s = s.to(dtype)
    s[3, 10:] = -math.inf  # a row with 10 live keys
    s[20:] = torch.randint(0, 4, (20, 300), generator=g).to(dtype)  # four levels: many ties
    s[25, ::2] = -math.inf
    for k in (1, 5, 64, 299, 300):
        keep = tkt.topk_select(s, k)
        idx = topkattn.topk(s.numpy(), k)
        for r in range(s.shape[0]):
            live = int(torch.isfinite(s[r]).sum())
            want = set(idx[r, : min(k, live)].tolist())
            assert set(torch.nonzero(keep[r]).flatten().tolist()) == want, (k, r)


def test_eps_selection_matches_k_eps():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(64, 500, generator=g, dtype=torch.float64) * 2.5
    for eps in (0.5, 0.1, 1e-3):
        keep = tkt.topk_select(s, eps=eps)
        k_c, tau_c = topkattn.k_eps(s.numpy(), eps, return_tail=True)
        np.testing.assert_array_equal(keep.sum(-1).numpy(), k_c)
        assert np.all(tau_c <= eps)
        # the kept set is the top-k_eps set
        for r in range(0, 64, 9):
            want = set(topkattn.topk(s[r].numpy(), int(k_c[r])).tolist())
            assert set(torch.nonzero(keep[r]).flatten().tolist()) == want


@pytest.mark.parametrize("causal", [False, True])
def test_all_keys_is_dense_attention(causal):
    q, k, v = qkv(7, L=12, d=8, dv=8)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for budget in (dict(k=12), dict(k=100), dict(ratio=1.0)):
        got = tkt.topk_attention(q, k, v, is_causal=causal, **budget)
        torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-13)


def test_decoding_query_sees_every_key():
    # L = 1 query with causal=True attends to all n keys (bottom-right alignment)
    q, k, v = qkv(8, L=1, n=9)
    got = tkt.topk_attention(q, k, v, 9, is_causal=True)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-13)


def test_float32_close_to_float64():
    q, k, v = qkv(9, L=16, d=8, dv=8, dtype=torch.float32)
    got = tkt.topk_attention(q, k, v, 4, is_causal=True)
    want = ref_topk_attention(q.numpy(), k.numpy(), v.numpy(), causal=True, k=4)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- backward

def _min_gap(scores, k):
    """Smallest gap between the k-th and (k+1)-th live score over all rows (inf if none)."""
    gaps = []
    for row in scores.reshape(-1, scores.shape[-1]):
        v = torch.sort(row[torch.isfinite(row)], descending=True).values
        if v.numel() > k:
            gaps.append(float(v[k - 1] - v[k]))
    return min(gaps, default=math.inf)


@pytest.mark.parametrize("budget,causal", [(dict(k=2), False), (dict(k=3), True),
                                          (dict(ratio=0.5), True), (dict(eps=0.2), False)],
                         ids=str)
def test_gradcheck(budget, causal):
    q, k, v = qkv(11, B=1, H=2, L=5, n=6, d=3, dv=2, grad=True)
    s = tkt.attention_scores(q, k, is_causal=causal).detach()
    if "k" in budget:
        # a perturbation of 1e-6 must not change the kept set
        assert _min_gap(s, budget["k"]) > 1e-4

    def f(q, k, v):
        return tkt.topk_attention(q, k, v, is_causal=causal, **budget)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_with_float_mask():
    q, k, v = qkv(12, B=1, H=1, L=4, n=7, d=3, dv=3, grad=True)
    mask = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(
        lambda q, k, v: tkt.topk_attention(q, k, v, 3, attn_mask=mask, scale=1.3),
        (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def masked_softmax_attention(q, k, v, keep, scale):
    """The same computation in plain torch ops, differentiated by autograd."""
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.softmax(s.masked_fill(~keep, -math.inf), -1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_autograd_of_torch_ops(dtype):
    q, k, v = qkv(13, L=24, d=8, dv=6, dtype=dtype, grad=True)
    g = torch.randn(2, 3, 24, 6, dtype=dtype, generator=torch.Generator().manual_seed(2))
    out = tkt.topk_attention(q, k, v, 5, is_causal=True)
    grads = torch.autograd.grad(out, (q, k, v), g)
    keep = tkt.topk_select(tkt.attention_scores(q, k, is_causal=True), 5)
    ref = masked_softmax_attention(q, k, v, keep, 1 / math.sqrt(8))
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


def test_no_gradient_outside_kept_set():
    # one query, k = 2: only the two kept keys/values receive gradient
    q, k, v = qkv(14, B=1, H=1, L=1, n=8, grad=True)
    out = tkt.topk_attention(q, k, v, 2)
    out.sum().backward()
    keep = tkt.topk_select(tkt.attention_scores(q, k), 2)[0, 0, 0]
    assert keep.sum() == 2
    assert torch.all(k.grad[0, 0][~keep] == 0) and torch.all(v.grad[0, 0][~keep] == 0)
    assert torch.all(v.grad[0, 0][keep] != 0) and torch.all(k.grad[0, 0][keep].abs().sum(-1) > 0)


def test_only_some_inputs_require_grad():
    q, k, v = qkv(15)
    v.requires_grad_(True)
    out = tkt.topk_attention(q, k, v, 2, is_causal=True)
    (gv,) = torch.autograd.grad(out.square().sum(), (v,))
    assert gv.shape == v.shape and torch.isfinite(gv).all()


# ----------------------------------------------------------------- simulated selector

def test_simulated_selector_extremes():
    g = torch.Generator().manual_seed(20)
    s = torch.randn(50, 40, generator=g, dtype=torch.float64)
    exact = tkt.topk_select(s, 8)
    assert torch.equal(tkt.simulated_selector(s, 1.0, 8, generator=g), exact)
    sel0 = tkt.simulated_selector(s, 0.0, 8, generator=g)
    assert torch.all(sel0.sum(-1) == 8) and not (sel0 & exact).any()


def test_simulated_selector_precision_and_size():
    g = torch.Generator().manual_seed(21)
    s = torch.randn(4000, 64, generator=g)
    s[:5, 10:] = -math.inf  # rows with 10 live keys: k = 10 keeps all of them
    exact = tkt.topk_select(s, 12)
    for p in (0.25, 0.6, 0.9):
        sel = tkt.simulated_selector(s, p, 12, generator=g)
        assert torch.equal(sel.sum(-1), exact.sum(-1))
        assert not (sel & torch.isinf(s)).any()
        prec = tkt.retrieval_precision(sel, exact)
        assert torch.all(prec[:5] == 1.0)
        # randomised rounding: mean precision p up to sampling noise (sd < 0.01 here)
        assert abs(float(prec[5:].mean()) - p) < 0.03, (p, float(prec.mean()))


def test_simulated_selector_reproducible_and_short_outside():
    s = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))
    a = tkt.simulated_selector(s, 0.5, 4, generator=torch.Generator().manual_seed(9))
    b = tkt.simulated_selector(s, 0.5, 4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    # k = 8 of 10 with precision 0: only 2 keys outside, so at least 6 come from inside
    sel = tkt.simulated_selector(s, 0.0, 8, generator=torch.Generator().manual_seed(1))
    exact = tkt.topk_select(s, 8)
    assert torch.all(sel.sum(-1) == 8) and torch.all((sel & exact).sum(-1) == 6)


def test_simulated_selector_ratio_on_causal_rows():
    # causal rows see 1..200 keys: each keeps as many as its exact ratio set
    q, k, _ = qkv(23, B=4, H=2, L=200, d=8)
    s = tkt.attention_scores(q, k, is_causal=True)
    exact = tkt.topk_select(s, ratio=0.1)
    sel = tkt.simulated_selector(s, 0.7, ratio=0.1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sel.sum(-1), exact.sum(-1)) and not (sel & torch.isinf(s)).any()
    hits = float((sel & exact).sum()) / float(exact.sum())
    assert abs(hits - 0.7) < 0.03, hits


def test_kept_set_attention_with_simulated_selector():
    q, k, v = qkv(22, L=10, grad=True)
    gen = torch.Generator().manual_seed(4)
    out = tkt.kept_set_attention(
        q, k, v, lambda s: tkt.simulated_selector(s, 0.5, ratio=0.3, generator=gen),
        is_causal=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


def test_attention_entropy_matches_core():
    s = torch.randn(10, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3
    s[2, 50:] = -math.inf
    np.testing.assert_allclose(tkt.attention_entropy(s).numpy(), topkattn.entropy(s.numpy()),
                               rtol=1e-12)


# ----------------------------------------------------------------- arguments

def test_bad_arguments():
    q, k, v = qkv(30)
    with pytest.raises(ValueError, match="exactly one of k, ratio and eps"):
        tkt.topk_attention(q, k, v)
    with pytest.raises(ValueError, match="exactly one"):
        tkt.topk_attention(q, k, v, 2, ratio=0.5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        tkt.topk_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        tkt.topk_attention(q, k, v, 2.0)
    with pytest.raises(ValueError, match="ratio must be in"):
        tkt.topk_attention(q, k, v, ratio=0.0)
    with pytest.raises(ValueError, match="eps must be in"):
        tkt.topk_attention(q, k, v, eps=1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        tkt.topk_attention(q.float(), k, v, 2)
    with pytest.raises(ValueError, match="last dimension"):
        tkt.topk_attention(q[..., :2], k, v, 2)
    with pytest.raises(ValueError, match="number of keys"):
        tkt.topk_attention(q, k, v[..., :3, :], 2)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        tkt.topk_attention(q.numpy(), k, v, 2)
    with pytest.raises(ValueError, match="every key masked"):
        tkt.topk_attention(q, k, v, 2, attn_mask=torch.zeros(7, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        tkt.topk_attention(q, k, v, 2, attn_mask=torch.ones(3, 7, dtype=torch.bool))
    bad = q.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        tkt.topk_attention(bad, k, v, 2)
    with pytest.raises(ValueError, match="precision"):
        tkt.simulated_selector(torch.zeros(3, 4), 1.5, 2)
    with pytest.raises(ValueError, match="selector must return a bool"):
        tkt.kept_set_attention(q, k, v, lambda s: s)


def test_inputs_not_modified():
    q, k, v = qkv(31, grad=True)
    copies = [t.detach().clone() for t in (q, k, v)]
    mask = torch.ones(7, 7, dtype=torch.bool)
    tkt.topk_attention(q, k, v, 3, attn_mask=mask, is_causal=True).sum().backward()
    for t, c in zip((q, k, v), copies):
        assert torch.equal(t.detach(), c)
    assert mask.all()


def test_docstring_examples():
    result = doctest.testmod(tkt, verbose=False, report=True)
    assert result.attempted > 0 and result.failed == 0


def test_package_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import topkattn\n"
            "try:\n"
            "    import topkattn.torch\n"
            "except ImportError as e:\n"
            "    print('IMPORTERROR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "IMPORTERROR" in res.stdout and "pip install torch" in res.stdout
