"""Row statistics (docs/design.md §5, §6): entropy, effective support and the Gaussian fit."""
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import topkattn
from topkattn import reference as ref

from _util import FLOATS, assert_rel, logit_rows, random_row, zoo


def _mp_entropy(row):
    e = [mpmath.exp(mpmath.mpf(float(v))) for v in row if v > -np.inf]
    z = mpmath.fsum(e)
    return -mpmath.fsum((t / z) * mpmath.log(t / z) for t in e)


@pytest.mark.parametrize("dtype", FLOATS)
def test_entropy_matches_reference(dtype, rng):
    for name, x in zoo(rng, dtype):
        got = topkattn.entropy(x)
        assert got.dtype == np.float64 and got.shape == ()
        # H in [0, log n]: near 0 (one dominant key) an absolute tolerance of a few ulps of 1
        assert_rel(got, ref.entropy(x), rtol=1e-12, atol=1e-15, what=f"entropy {name}")


def test_entropy_known_values():
    assert_rel(topkattn.entropy(np.zeros(4)), math.log(4), rtol=1e-15)
    assert topkattn.entropy(np.array([3.0])) == 0.0
    assert topkattn.entropy(np.array([-np.inf, 1.0, -np.inf])) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    assert_rel(topkattn.entropy(np.log(p) + 17.0), -np.sum(p * np.log(p)), rtol=1e-14)
    x = np.array([0.0, -1000.0])  # H ~ 1000 e^-1000: indistinguishable from 0
    assert 0.0 <= topkattn.entropy(x) <= 1e-300


@given(row=logit_rows(max_n=40))
def test_entropy_against_mpmath(row):
    exact = _mp_entropy(row)
    got = topkattn.entropy(row)
    assert 0.0 <= got <= math.log(row.size) + 1e-12
    assert abs(mpmath.mpf(float(got)) - exact) <= 1e-12 * exact + 1e-15


def _support_rows(rng, dtype):
    """Rows with no probability within 1e-9 relative of the thresholds used (no near-ties)."""
    out = []
    for n in (1, 3, 8, 9, 17, 100, 129, 1000, 5000):
        for mask_p in (0.0, 0.5):
            out.append(random_row(rng, n, 3.0, mask_p=mask_p, dtype=dtype))
    out.append(np.full(10, 2.0, dtype=dtype))  # ties: P = 0.1 each
    return out


@pytest.mark.parametrize("dtype", FLOATS)
def test_effective_support_matches_reference(dtype, rng):
    for x in _support_rows(rng, dtype):
        m, ls = ref._lse_parts(x)
        p = np.exp((x.astype(np.float64) - m) - ls)
        for thr in (1e-12, 1e-4, 1e-3, 0.01, 0.05, 0.3, 0.9, 1.0):
            if np.any(np.abs(p[p > 0] / thr - 1) < 1e-9):
                continue  # a genuine rounding tie: either count is right
            got = topkattn.effective_support(x, thr)
            assert got.dtype == np.int64
            assert got == ref.effective_support(x, thr), f"n={x.size} thr={thr}"


def test_effective_support_known_values():
    x = np.log(np.array([0.7, 0.2, 0.1]))
    assert topkattn.effective_support(x, 0.15) == 2
    assert topkattn.effective_support(x, 0.05) == 3
    assert topkattn.effective_support(x, 0.8) == 0
    assert topkattn.effective_support(np.array([4.0, -np.inf]), 1.0) == 1
    # per-row thresholds broadcast over the batch
    xb = np.stack([x, x, x])
    np.testing.assert_array_equal(topkattn.effective_support(xb, [0.05, 0.15, 0.8]), [3, 2, 0])
    # uniform rows: |S_eps| = n exactly at eps = 1/n is a tie; above it none qualifies
    assert topkattn.effective_support(np.zeros(8), 0.2) == 0
    assert topkattn.effective_support(np.zeros(8), 0.1) == 8


@pytest.mark.parametrize("dtype", FLOATS)
def test_fit_gaussian_matches_reference(dtype, rng):
    for name, x in zoo(rng, dtype):
        mu, sd = topkattn.fit_gaussian(x)
        rmu, rsd = ref.fit_gaussian(x)
        finite = x[np.isfinite(x)].astype(np.float64)
        scale = float(np.max(np.abs(finite)))
        assert_rel(mu, rmu, rtol=1e-12, atol=1e-13 * scale, what=f"mu {name}")
        assert_rel(sd, rsd, rtol=1e-10, atol=1e-12 * scale, what=f"sigma {name}")


def test_fit_gaussian_known_values():
    mu, sd = topkattn.fit_gaussian(np.array([1.0, 2.0, 3.0]))
    assert (mu, sd) == (2.0, 1.0)
    mu, sd = topkattn.fit_gaussian(np.array([-np.inf, 5.0, -np.inf]))
    assert (mu, sd) == (5.0, 0.0)  # one unmasked key: sigma 0
    mu, sd = topkattn.fit_gaussian(np.array([[1.0, 3.0, -np.inf], [0.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(mu, [2.0, 0.0])
    assert_rel(sd, [math.sqrt(2.0), 0.0], rtol=1e-15)
    # a large offset must not cost the spread its digits
    rng = np.random.default_rng(2)
    y = 1e6 + rng.standard_normal(10_000)
    assert_rel(topkattn.fit_gaussian(y)[1], np.std(y, ddof=1), rtol=1e-9)


@given(row=logit_rows(max_n=200), data=st.data())
def test_fit_gaussian_property(row, data):
    mu, sd = topkattn.fit_gaussian(row)
    finite = row[np.isfinite(row)].astype(np.float64)
    assert finite.min() - 1e-9 * abs(finite.min()) <= mu <= finite.max() + 1e-9 * abs(finite.max())
    assert sd >= 0.0
    rmu, rsd = ref.fit_gaussian(row)
    scale = float(np.max(np.abs(finite)))
    assert abs(mu - rmu) <= 1e-12 * scale + 1e-300
    assert abs(sd - rsd) <= 1e-10 * rsd + 1e-12 * scale
