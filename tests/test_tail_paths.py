"""tail_mass on rows longer than a chunk (65536 logits): one validating pass with the largest
sampled logit as the masses' reference, or, when that pass cannot decide, the checked path.
Every way out of the one-pass path against the float64 reference (and mpmath where the tail
is deep), plus errors, masks and thread-count independence; and short rows (129 to 4096
logits) whose sampled bracket misses the k-th largest."""
import mpmath
import numpy as np
import pytest

import topkattn
from topkattn import reference as ref

from _util import assert_rel

N = 70_001  # past one chunk, not a multiple of it


def _check(x, ks, what):
    x = np.asarray(x)
    ks = np.asarray(ks)
    xb = np.broadcast_to(x, (ks.size, x.size))
    assert_rel(topkattn.log_tail_mass(xb, ks), ref.log_tail_mass(xb, ks), rtol=1e-12,
               atol=1e-15, what=f"{what}: log_tail_mass")
    assert_rel(topkattn.kl_truncated(xb, ks), ref.kl_truncated(xb, ks), rtol=1e-11,
               atol=1e-300, what=f"{what}: kl_truncated")


def _ks(n):
    return [1, 2, 7, n // 100, n // 2, n - 2, n - 1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sigma", [0.5, 3.0, 30.0])
def test_gaussian_rows(dtype, sigma, rng):
    x = (rng.standard_normal(N) * sigma).astype(dtype)
    _check(x, _ks(N), f"N(0, {sigma}^2)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_maximum_far_above_every_sampled_logit(dtype, rng):
    """A few logits hundreds above the rest at positions the evenly spaced sample skips:
    the pass finds a maximum more than 600 above its reference and hands the row back."""
    x = rng.standard_normal(N).astype(dtype)
    for pos, v in ((1, 650.0), (N - 2, 900.0), (3, 450.0)):
        x[pos] = v
    _check(x, [1, 2, 3, 4, 100, N // 2], "outliers")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_heavy_ties_across_the_bracket(dtype, rng):
    """Few distinct values: the sampled bracket collapses onto one value, or the k-th
    logit is tied with thousands of others."""
    x = rng.integers(0, 4, N).astype(dtype)
    _check(x, [1, N // 4, N // 2, N - 3], "four levels")
    y = np.zeros(N, dtype)
    y[rng.choice(N, 50, replace=False)] = 1.0
    _check(y, [1, 49, 50, 51, N // 2], "two levels")


@pytest.mark.parametrize("gap", [100.0, 599.0, 601.0, 750.0, 3000.0])
def test_deep_tails_against_mpmath(gap, rng):
    """A head of k logits and a tail gap below: the tail's largest logit within 600 of the
    maximum stays on the one-pass path, further down goes to the separate tail pass."""
    k = 60
    x = np.concatenate([5.0 + rng.standard_normal(k),
                        5.0 - gap - np.abs(rng.standard_normal(N - k))])
    rng.shuffle(x)
    for kk in (k - 1, k, k + 1):
        exact = ref.mp_log_tail_mass(x, kk)
        got = topkattn.log_tail_mass(x, kk)
        assert float(abs(mpmath.mpf(float(got)) - exact)) <= 1e-13 * abs(float(exact)) + 1e-14, \
            (gap, kk, got, mpmath.nstr(exact, 20))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_logits(dtype, rng):
    """-inf logits (masked keys): k up to and past the number of live logits."""
    x = rng.standard_normal(N).astype(dtype)
    dead = rng.random(N) < 0.6
    x[dead] = -np.inf
    live = int(np.count_nonzero(~dead))
    _check(x, [1, live // 3, live - 1, live, live + 1, N - 1], "60% masked")
    assert topkattn.tail_mass(x, live) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("pos", [0, 5, N - 1])
def test_nan_and_posinf_are_errors_wherever_they_are(bad, pos, rng):
    x = rng.standard_normal(N)
    x[pos] = bad
    short = np.array([0.0, bad])
    with pytest.raises(ValueError) as want:
        topkattn.tail_mass(short, 1)
    with pytest.raises(ValueError) as got:
        topkattn.tail_mass(x, 10)
    assert str(got.value) == str(want.value)


def test_sorted_and_reversed_rows(rng):
    x = np.sort(rng.standard_normal(N) * 4)
    _check(x, _ks(N), "increasing")
    _check(x[::-1].copy(), _ks(N), "decreasing")


def test_same_result_for_any_thread_count(rng):
    x = (rng.standard_normal((3, 2 * N)) * 2).astype(np.float32)
    ks = np.array([10, 1000, N])
    before = topkattn.get_num_threads()
    try:
        topkattn.set_num_threads(1)
        one = topkattn.log_tail_mass(x, ks)
        topkattn.set_num_threads(2)
        two = topkattn.log_tail_mass(x, ks)
    finally:
        topkattn.set_num_threads(before)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(topkattn.log_tail_mass(x[1], ks[1]), one[1])


def _sample_positions(n, k):
    """The positions the bracket of a row of n logits samples for the k-th largest (rows.c:
    sample_size and row_sample)."""
    kk = min(k, n - k) + 1
    ns = int(min(max(2.0 * np.cbrt(kk * n), 64.0), 8192.0, n // 4))
    return np.minimum(((np.arange(ns) + 0.5) * n / ns).astype(np.int64), n - 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [200, 512, 1000, 4096])
def test_short_rows_whose_sample_misleads_the_bracket(n, dtype, rng):
    """Rows of 129 to 4096 logits take every weight first, then one pass over a bracket from
    the evenly spaced sample. Where the sampled logits are all high (or all low) and the rest
    the other way, the k-th largest lies outside the bracket and the band path decides."""
    for k in (3, n // 8, n // 2, n - 5):
        at = _sample_positions(n, k)
        for high in (True, False):
            x = rng.standard_normal(n)
            x[at] += 12.0 if high else -12.0
            _check(x.astype(dtype), [k], f"n={n} k={k} sample {'high' if high else 'low'}")
