"""The Gaussian score model (docs/design.md §5): Phi, Phi_c and their inverses deep in the tails,
the model tail mass and the k_eps rule, against mpmath at 50 digits."""
import mpmath
import numpy as np
import pytest

import topkattn
from topkattn import reference as ref

from _util import assert_rel

RTOL_NORM = 1e-14


def _max_rel_err(got, exact_fn, args):
    worst, where = 0.0, None
    for g, a in zip(np.asarray(got).reshape(-1), args):
        e = exact_fn(a)
        if mpmath.isinf(e) or e == 0:
            assert g == float(e), f"at {a!r}: {g!r} vs {e}"
            continue
        r = float(abs(mpmath.mpf(float(g)) - e) / abs(e))
        if r > worst:
            worst, where = r, a
    return worst, where


X_GRID = np.concatenate([np.linspace(-37.0, 37.0, 149),
                         np.random.default_rng(1).uniform(-37.0, 37.0, 150),
                         [-1e-300, 0.0, 1e-300, 5e-324, 1e-9, -1e-9, 0.5, -8.3, 8.3]])
P_GRID = np.concatenate([np.logspace(-300, np.log10(0.5), 200),
                         1 - np.logspace(-16, np.log10(0.5), 100),
                         [5e-324, 1e-310, 0.25, 0.3, 0.5 - 1e-12, 0.5, 0.5 + 1e-12, 0.75, 0.9999]])


@pytest.mark.parametrize("name", ["norm_cdf", "norm_sf"])
def test_cdf_and_sf_against_mpmath(name):
    f = getattr(topkattn, name)
    exact = getattr(ref, "mp_" + name)
    got = f(X_GRID)
    assert got.dtype == np.float64 and got.shape == X_GRID.shape
    worst, where = _max_rel_err(got, exact, X_GRID)
    assert worst <= RTOL_NORM, f"{name}: relative error {worst:.3g} at x = {where!r}"


@pytest.mark.parametrize("name", ["norm_ppf", "norm_isf"])
def test_ppf_and_isf_against_mpmath(name):
    f = getattr(topkattn, name)
    exact = getattr(ref, "mp_" + name)
    got = f(P_GRID)
    worst, where = _max_rel_err(got, exact, P_GRID)
    assert worst <= RTOL_NORM, f"{name}: relative error {worst:.3g} at p = {where!r}"


def test_norm_special_values_and_broadcasting():
    assert topkattn.norm_cdf(-np.inf) == 0.0 and topkattn.norm_cdf(np.inf) == 1.0
    assert topkattn.norm_sf(-np.inf) == 1.0 and topkattn.norm_sf(np.inf) == 0.0
    assert topkattn.norm_cdf(0.0) == 0.5 and topkattn.norm_sf(0.0) == 0.5
    assert topkattn.norm_ppf(0.0) == -np.inf and topkattn.norm_ppf(1.0) == np.inf
    assert topkattn.norm_isf(0.0) == np.inf and topkattn.norm_isf(1.0) == -np.inf
    assert topkattn.norm_ppf(0.5) == 0.0
    for bad in (-0.1, 1.5, np.nan):
        assert np.isnan(topkattn.norm_ppf(bad)) and np.isnan(topkattn.norm_isf(bad))
    assert np.isnan(topkattn.norm_cdf(np.nan))
    x = np.linspace(-5, 5, 12).reshape(3, 4)
    assert topkattn.norm_cdf(x).shape == (3, 4)
    assert_rel(topkattn.norm_cdf(x) + topkattn.norm_sf(x), np.ones((3, 4)), rtol=2e-16)
    # round trips on the side where the probability keeps its relative accuracy
    lo = -np.abs(x)
    assert_rel(topkattn.norm_ppf(topkattn.norm_cdf(lo)), lo, rtol=1e-14, atol=1e-15)
    assert_rel(topkattn.norm_isf(topkattn.norm_sf(-lo)), -lo, rtol=1e-14, atol=1e-15)
    # scalars come back as NumPy scalars, like NumPy reductions
    assert np.ndim(topkattn.norm_cdf(1.0)) == 0


@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.0, 2.0, 4.0, 8.0])
def test_gaussian_tail_mass_against_mpmath(sigma):
    rho = np.concatenate([np.logspace(-12, 0, 50), [1e-300, 1e-100, 0.5, 1 - 1e-9]])
    got = topkattn.gaussian_tail_mass(rho, sigma)
    worst, where = _max_rel_err(got, lambda r: ref.mp_gaussian_tail_mass(r, sigma), rho)
    assert worst <= 1e-13, f"sigma={sigma}: relative error {worst:.3g} at rho = {where!r}"
    assert topkattn.gaussian_tail_mass(0.0, sigma) == 1.0
    assert topkattn.gaussian_tail_mass(1.0, sigma) == 0.0
    # sigma = 0: every key has the same mass, tau = 1 - rho
    assert_rel(topkattn.gaussian_tail_mass(rho[:50], 0.0), 1 - rho[:50], rtol=1e-14)


@pytest.mark.parametrize("n", [1.0, 1e3, 1e5, 1e9])
@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0, 2.5, 6.0])
def test_gaussian_k_eps_rule_against_mpmath(n, sigma):
    eps = np.concatenate([np.logspace(-12, -0.01, 30), [0.5, 0.9]])
    got = topkattn.gaussian_k_eps(n, sigma, eps)
    worst, where = _max_rel_err(got, lambda e: ref.mp_gaussian_k_eps(n, sigma, e), eps)
    assert worst <= 1e-13, f"n={n} sigma={sigma}: relative error {worst:.3g} at eps = {where!r}"
    assert np.all((got >= 0) & (got <= n))


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 100_000, 10**7])
@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
def test_gaussian_k_eps_finite_n_is_sane(n, sigma):
    eps = np.logspace(-12, -0.01, 40)
    k = topkattn.gaussian_k_eps(n, sigma, eps, finite_n=True)
    assert k.dtype == np.float64 and k.shape == eps.shape
    assert np.all(np.isfinite(k)), k
    assert np.all((k >= 0) & (k <= n)), k
    assert np.all(np.diff(k) <= 0), f"not non-increasing in eps: {k}"


@pytest.mark.parametrize("sigma", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_gaussian_k_eps_finite_n_close_to_rule_for_small_sigma(sigma):
    eps = np.logspace(-12, np.log10(0.5), 30)
    k = topkattn.gaussian_k_eps(100_000, sigma, eps, finite_n=True)
    rule = np.array([float(ref.mp_gaussian_k_eps(100_000, sigma, e)) for e in eps])
    assert np.all(np.abs(k / rule - 1) <= 0.02), np.abs(k / rule - 1).max()


def test_gaussian_k_eps_finite_n_sigma_zero_is_exact():
    """Equal scores: tau(k) = (n - k)/n, so the smallest k is n - floor(eps n)."""
    for n, eps in [(1000, 0.0105), (1000, 0.5), (10, 0.05), (1, 0.3), (12345, 1e-3)]:
        assert topkattn.gaussian_k_eps(n, 0.0, eps, finite_n=True) == n - np.floor(eps * n)


def test_gaussian_broadcasting():
    n = np.array([[100.0], [1e4]])
    eps = np.array([1e-3, 1e-2, 0.1])
    k = topkattn.gaussian_k_eps(n, 1.5, eps)
    assert k.shape == (2, 3)
    assert_rel(k, ref.gaussian_k_eps(n, 1.5, eps), rtol=1e-12)
    kf = topkattn.gaussian_k_eps(n, np.array([0.5, 1.0, 2.0]), eps, finite_n=True)
    assert kf.shape == (2, 3)
    t = topkattn.gaussian_tail_mass(np.array([0.01, 0.1]), np.array([[1.0], [2.0]]))
    assert t.shape == (2, 2)
    assert_rel(t, ref.gaussian_tail_mass(np.array([0.01, 0.1]), np.array([[1.0], [2.0]])),
               rtol=1e-13)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: topkattn.gaussian_tail_mass(1.5, 1.0), ValueError, "rho"),
    (lambda: topkattn.gaussian_tail_mass(-0.1, 1.0), ValueError, "rho"),
    (lambda: topkattn.gaussian_tail_mass(np.nan, 1.0), ValueError, "rho"),
    (lambda: topkattn.gaussian_tail_mass(0.1, -1.0), ValueError, "sigma"),
    (lambda: topkattn.gaussian_tail_mass(0.1, np.inf), ValueError, "sigma"),
    (lambda: topkattn.gaussian_tail_mass(0.1, np.nan), ValueError, "sigma"),
    (lambda: topkattn.gaussian_k_eps(0, 1.0, 0.1), ValueError, "n must"),
    (lambda: topkattn.gaussian_k_eps(np.inf, 1.0, 0.1), ValueError, "n must"),
    (lambda: topkattn.gaussian_k_eps(np.nan, 1.0, 0.1), ValueError, "n must"),
    (lambda: topkattn.gaussian_k_eps(100, -0.5, 0.1), ValueError, "sigma"),
    (lambda: topkattn.gaussian_k_eps(100, np.inf, 0.1, finite_n=True), ValueError, "sigma"),
    (lambda: topkattn.gaussian_k_eps(100, 1.0, 0.0), ValueError, "eps"),
    (lambda: topkattn.gaussian_k_eps(100, 1.0, 1.0), ValueError, "eps"),
    (lambda: topkattn.gaussian_k_eps(100, 1.0, np.nan, finite_n=True), ValueError, "eps"),
    (lambda: topkattn.gaussian_k_eps([100, 10], 1.0, [0.1, 0.2, 0.3]), ValueError, None),
])
def test_gaussian_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
