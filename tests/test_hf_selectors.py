"""The key selectors of the hooked attention (topkattn.hf.selectors) on their own, against
plain NumPy loops: no model, no torch."""
import numpy as np
import pytest

from topkattn.hf import selectors as sel


def _rows(rng, shape, masked=0.2):
    s = rng.normal(0.0, 2.0, size=shape)
    s[rng.random(shape) < masked] = -np.inf
    s[..., 0] = np.where(np.isfinite(s).any(-1), s[..., 0], 0.0)  # a visible key per row
    return s


def _order(row):
    """Positions by decreasing value, ties to the lower position (a plain loop)."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))


def _tail(row, keep):
    p = np.exp(row - row[np.isfinite(row)].max())
    p /= p.sum()
    return float(p[~keep].sum())


def test_logsumexp_against_the_definition():
    rng = np.random.default_rng(0)
    x = _rows(rng, (5, 9))
    x[2] = -np.inf
    want = [np.log(np.exp(r).sum()) if np.isfinite(r).any() else -np.inf for r in x]
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(sel.logsumexp(x), want, rtol=1e-13)


def test_rank_is_stable_and_ascending():
    keys = np.array([[3.0, 1.0, 3.0, -np.inf, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    want = [sorted(range(5), key=lambda i: (k[i], i)) for k in keys]
    got = sel.rank(keys)
    for r, order in zip(got, want):
        assert [int(np.flatnonzero(r == j)[0]) for j in range(5)] == order


def _forced(row, sink, recent):
    visible = [i for i in range(len(row)) if np.isfinite(row[i])]
    return set(visible[:sink]) | set(visible[len(visible) - recent:] if recent else [])


@pytest.mark.parametrize("sink, recent", [(0, 0), (1, 0), (0, 3), (2, 2), (40, 0)])
def test_forced_selection_with_eps_is_the_smallest_certified_set(sink, recent):
    rng = np.random.default_rng(1)
    s = _rows(rng, (3, 4, 30))
    eps = 0.05
    keep = sel.forced_selection(s, sink, recent, eps=eps)
    for row, kept in zip(s.reshape(-1, 30), keep.reshape(-1, 30)):
        forced = _forced(row, sink, recent)
        rest = [i for i in _order(row) if np.isfinite(row[i]) and i not in forced]
        want = None
        for j in range(len(rest) + 1):
            m = np.zeros(30, bool)
            m[list(forced) + rest[:j]] = True
            if _tail(row, m) <= eps:
                want = m
                break
        assert want is not None
        np.testing.assert_array_equal(kept, want)


@pytest.mark.parametrize("sink, recent, k", [(0, 0, 5), (2, 1, 5), (3, 3, 4), (0, 0, 40)])
def test_forced_selection_with_k_keeps_the_forced_keys_then_the_top(sink, recent, k):
    rng = np.random.default_rng(2)
    s = _rows(rng, (6, 25))
    keep = sel.forced_selection(s, sink, recent, k=np.full(6, k))
    for row, kept in zip(s, keep):
        forced = _forced(row, sink, recent)
        rest = [i for i in _order(row) if np.isfinite(row[i]) and i not in forced]
        want = np.zeros(25, bool)
        want[list(forced) + rest[:max(0, k - len(forced))]] = True
        np.testing.assert_array_equal(kept, want)


@pytest.mark.parametrize("precision", [0.0, 0.3, 0.75, 1.0])
def test_simulated_selection_keeps_a_fraction_of_the_exact_set(precision):
    rng = np.random.default_rng(3)
    s = _rows(rng, (40, 64), masked=0.1)
    visible = np.isfinite(s)
    exact = sel.forced_selection(s, 0, 0, k=np.full(40, 8))
    keep = sel.simulated_selection(exact, visible, precision, np.random.default_rng(0))
    k = exact.sum(-1)
    hit = (keep & exact).sum(-1)
    assert np.array_equal(keep.sum(-1), k)                  # the same budget
    assert not (keep & ~visible).any()
    assert np.all((hit == np.floor(precision * k)) | (hit == np.ceil(precision * k)))
    if precision == 1.0:
        assert np.array_equal(keep, exact)
    assert abs(hit.sum() / k.sum() - precision) < 0.1


def _block_reference(q, K, s, mask, k, scale, bs):
    """One query row: blocks by decreasing min/max bound (ties: lower block) until they
    hold k visible keys, then the k best scored of their keys."""
    n = len(s)
    starts = list(range(0, n, bs))
    ub = []
    for b in starts:
        blk = K[b:b + bs]
        bound = scale * np.maximum(q * blk.min(0), q * blk.max(0)).sum()
        ub.append(bound + (mask[b:b + bs].max() if mask is not None else 0.0))
    cand, count = [], 0
    for b in sorted(range(len(starts)), key=lambda i: (-ub[i], i)):
        if count >= k:
            break
        idx = [i for i in range(starts[b], min(starts[b] + bs, n)) if np.isfinite(s[i])]
        cand += idx
        count += len(idx)
    best = sorted(cand, key=lambda i: (-s[i], i))[:k]
    out = np.zeros(n, bool)
    out[best] = True
    return out, ub


@pytest.mark.parametrize("n, bs", [(64, 8), (70, 16), (33, 64)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_block_selection_against_a_loop(n, bs, with_mask):
    rng = np.random.default_rng(4)
    B, Hkv, g, L, d = 2, 2, 2, 3, 5
    q5 = rng.normal(size=(B, Hkv, g, L, d))
    k5 = rng.normal(size=(B, Hkv, 1, n, d)) + np.linspace(-2, 2, n)[:, None]
    scale = 0.7
    mask = None
    s = scale * np.einsum("bhgld,bhxnd->bhgln", q5, k5)
    if with_mask:
        mask = np.where(rng.random((B, 1, 1, L, n)) < 0.2, -np.inf, 0.0)
        mask[..., 0] = 0.0
        s = s + mask
    exact = sel.forced_selection(s, 0, 0, k=np.full(s.shape[:-1], 6))
    keep = sel.block_selection(q5, k5, s, mask, exact, scale, bs)
    for pos in np.ndindex(*s.shape[:-1]):
        b, h = pos[0], pos[1]
        m = None if mask is None else np.broadcast_to(mask, s.shape)[pos]
        want, ub = _block_reference(q5[pos], k5[b, h, 0], s[pos], m, int(exact[pos].sum()),
                                    scale, bs)
        np.testing.assert_array_equal(keep[pos], want)
        for j, start in enumerate(range(0, n, bs)):        # the bounds are upper bounds
            assert s[pos][start:start + bs].max() <= ub[j] + 1e-12
