"""Tail mass, log tail mass, KL, tv_curve, k_eps and topk (docs/design.md §2) against the float64
reference and, on extreme rows, against mpmath at 50 digits."""
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import topkattn
from topkattn import reference as ref

from _util import (FLOATS, HUGE_SPREADS, MODERATE_SPREADS, RTOL, assert_rel,
                   check_keps_minimal, exact_curve, k_values, logit_rows, mp_rel_err,
                   random_row, zoo)

EPS_GRID = (1e-300, 1e-200, 1e-30, 1e-12, 1e-6, 1e-3, 0.01, 0.1, 0.5, 0.9, 1 - 1e-9)


# ------------------------------------------------------------ against the reference

@pytest.mark.parametrize("dtype", FLOATS)
def test_tail_mass_log_and_kl_match_reference(dtype, rng):
    for name, x in zoo(rng, dtype):
        n = x.shape[-1]
        ks = np.array(k_values(n))
        xb = np.broadcast_to(x, (ks.size, n))
        assert_rel(topkattn.log_tail_mass(xb, ks), ref.log_tail_mass(xb, ks),
                   what=f"log_tail_mass {name}")
        assert_rel(topkattn.tail_mass(xb, ks), ref.tail_mass(xb, ks), what=f"tail_mass {name}")
        assert_rel(topkattn.kl_truncated(xb, ks), ref.kl_truncated(xb, ks),
                   what=f"kl_truncated {name}")


@pytest.mark.parametrize("dtype", FLOATS)
def test_tv_curve_matches_reference(dtype, rng):
    for name, x in zoo(rng, dtype):
        got = topkattn.tv_curve(x)
        assert got.dtype == np.float64 and got.shape == (x.shape[-1] + 1,)
        assert_rel(got, ref.tv_curve(x), atol=1e-290, what=f"tv_curve {name}")


@pytest.mark.parametrize("dtype", FLOATS)
def test_k_eps_matches_reference(dtype, rng):
    for name, x in zoo(rng, dtype):
        for eps in EPS_GRID:
            k, tau = topkattn.k_eps(x, eps, return_tail=True)
            rk, rtau = ref.k_eps(x, eps, return_tail=True)
            assert k.dtype == np.int64 and tau.dtype == np.float64
            if k != rk:  # only acceptable at an exact boundary tie
                check_keps_minimal(exact_curve(x), eps, k, what=f"{name} eps={eps}")
            else:
                assert_rel(tau, rtau, atol=1e-300, what=f"k_eps tau {name} eps={eps}")
            assert tau <= eps, f"{name}: returned tau {tau!r} > eps {eps!r}"


@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_matches_stable_argsort(dtype, rng):
    for name, x in zoo(rng, dtype):
        for k in k_values(x.shape[-1]):
            got = topkattn.topk(x, k)
            assert got.dtype == np.int64 and got.shape == (k,)
            np.testing.assert_array_equal(got, ref.topk(x, k), err_msg=f"{name} k={k}")


def test_docstring_style_small_values():
    x = np.log(np.array([0.5, 0.3, 0.2]))
    assert_rel(topkattn.tail_mass(x, 1), 0.5, rtol=1e-15)
    assert_rel(topkattn.tail_mass(x, 2), 0.2, rtol=1e-14)
    assert topkattn.tail_mass(x, 3) == 0.0 and topkattn.log_tail_mass(x, 3) == -np.inf
    assert topkattn.tail_mass(x, 0) == 1.0 and topkattn.log_tail_mass(x, 0) == 0.0
    assert topkattn.kl_truncated(x, 0) == np.inf and topkattn.kl_truncated(x, 3) == 0.0
    np.testing.assert_array_equal(topkattn.topk(np.array([1.0, 3.0, 3.0, 2.0]), 3), [1, 2, 3])


# ---------------------------------------------------------- extreme rows vs mpmath

def _extreme_rows():
    rng = np.random.default_rng(7)
    rows = []
    # tau ~ 1e-30, 1e-300 and e^-5000 (only representable in log space)
    rows.append(("tau1e-30", np.concatenate([np.zeros(5), -72.0 + rng.uniform(-1, 0, 20)]), 5))
    rows.append(("tau1e-300", np.concatenate([10.0 + rng.uniform(0, 0.1, 3),
                                              10.0 - 690.0 - rng.uniform(0, 1, 50)]), 3))
    rows.append(("tau-e-5000", np.concatenate([[0.0, -1.0, -2.0],
                                               -5000.0 - rng.uniform(0, 3, 30)]), 3))
    rows.append(("huge-offset", 1e4 + np.concatenate([[0.0, -0.5], -800.0 - rng.uniform(0, 1, 9)]),
                 2))
    # spreads from 1e-3 to 1e4
    for spread in (1e-3, 1e-1, 1.0, 30.0, 1e3, 1e4):
        rows.append((f"spread{spread:g}", rng.uniform(-spread, 0.0, 60), 7))
    # ties, also at the k-th position
    ties = np.repeat([3.0, 1.0, 1.0, 0.5, 0.0], [2, 5, 5, 7, 20])
    rng.shuffle(ties)
    for k in (1, 2, 3, 7, 12, 13, 15, 19, 38):
        rows.append((f"ties-k{k}", ties.copy(), k))
    rows.append(("all-tied", np.full(50, -3.25), 17))
    # masked keys
    m = rng.normal(size=40) * 4
    m[rng.random(40) < 0.5] = -np.inf
    for k in (1, 5, int(np.isfinite(m).sum()) - 1, int(np.isfinite(m).sum()), 40):
        rows.append((f"masked-k{k}", m.copy(), k))
    rows.append(("n1", np.array([2.5]), 1))
    rows.append(("n1-k0", np.array([-7.0]), 0))
    rows.append(("one-live", np.array([-np.inf, -np.inf, 4.0, -np.inf]), 1))
    rows.append(("float32-tail", np.concatenate([[3.0], 3.0 - 85.0 + rng.uniform(-1, 0, 30)])
                 .astype(np.float32), 1))
    return rows


EXTREME = _extreme_rows()


@pytest.mark.parametrize("name,x,k", EXTREME, ids=[r[0] for r in EXTREME])
def test_extreme_rows_against_mpmath(name, x, k):
    exact_log = ref.mp_log_tail_mass(x, k)
    exact_tau = ref.mp_tail_mass(x, k)
    exact_kl = ref.mp_kl_truncated(x, k)
    lt = topkattn.log_tail_mass(x, k)
    if mpmath.isinf(exact_log):
        assert lt == -np.inf
    else:
        err = float(abs(mpmath.mpf(float(lt)) - exact_log))
        # absolute error ~ rounding of the largest logit difference involved
        assert err <= 1e-13 * max(1.0, abs(float(exact_log))) + 1e-15 * float(abs(exact_log) + 1), \
            f"log tau {lt!r} vs {mpmath.nstr(exact_log, 20)}"
    tau = topkattn.tail_mass(x, k)
    if exact_tau > mpmath.mpf("1e-300"):
        assert mp_rel_err(tau, exact_tau) <= 1e-12, f"tau {tau!r} vs {mpmath.nstr(exact_tau, 20)}"
    else:
        assert 0.0 <= tau <= 1e-299
    kl = topkattn.kl_truncated(x, k)
    if exact_kl > mpmath.mpf("1e-300"):
        assert mp_rel_err(kl, exact_kl) <= 1e-12, f"KL {kl!r} vs {mpmath.nstr(exact_kl, 20)}"
    else:  # below the normal range KL ~ tau underflows
        assert 0.0 <= kl <= 1e-299


@pytest.mark.parametrize("name,x,k", EXTREME, ids=[r[0] for r in EXTREME])
def test_extreme_rows_k_eps_against_mpmath(name, x, k):
    curve = exact_curve(x)
    for eps in EPS_GRID + (float(curve[k]) if 0 < float(curve[k]) < 1 else 0.5,):
        kk, tau = topkattn.k_eps(x, eps, return_tail=True)
        check_keps_minimal(curve, eps, kk, what=f"{name} eps={eps!r}")
        if curve[kk] > mpmath.mpf("1e-290"):
            assert mp_rel_err(tau, curve[kk]) <= 1e-12, f"{name}: tau {tau!r}"
        assert tau <= eps


def test_million_key_row():
    rng = np.random.default_rng(3)
    x = (3.0 * rng.standard_normal(10**6)).astype(np.float32)
    x[rng.integers(0, 10**6, 1000)] = -np.inf
    x[:50] = x.max()  # a tie at the head
    ks = np.array([0, 1, 49, 50, 51, 1000, 250_000, 999_000, 10**6])
    xb = np.broadcast_to(x, (ks.size, x.size))
    assert_rel(topkattn.log_tail_mass(xb, ks), ref.log_tail_mass(xb, ks), rtol=1e-11,
               what="log_tail_mass n=1e6")
    assert_rel(topkattn.kl_truncated(xb, ks), ref.kl_truncated(xb, ks), rtol=1e-11,
               what="kl n=1e6")
    curve = ref.tv_curve(x)
    assert_rel(topkattn.tv_curve(x), curve, rtol=1e-11, atol=1e-290, what="tv_curve n=1e6")
    for eps in (1e-12, 1e-3, 0.05, 0.5):
        k, tau = topkattn.k_eps(x, eps, return_tail=True)
        rk, rtau = ref.k_eps(x, eps, return_tail=True)
        assert k == rk, f"eps={eps}: k_eps {k} != reference {rk}"
        assert_rel(tau, rtau, rtol=1e-10, what=f"tau at k_eps eps={eps}")
    np.testing.assert_array_equal(topkattn.topk(x, 1000), ref.topk(x, 1000))


# ------------------------------------------------------------------- TV identity

@pytest.mark.parametrize("dtype", FLOATS)
def test_tv_identity(dtype, rng):
    """tau = 1 - exp(-KL) for any row and k, to 1e-12 relative."""
    for trial in range(40):
        n = int(rng.integers(1, 3000))
        x = random_row(rng, n, spread=float(rng.choice([0.01, 1, 5, 30, 200])),
                       mask_p=float(rng.choice([0, 0.5])), dtype=dtype,
                       nlevels=int(rng.integers(1, 5)) if trial % 3 == 0 else None)
        ks = rng.integers(0, n + 1, 16)
        xb = np.broadcast_to(x, (ks.size, n))
        tau = topkattn.tail_mass(xb, ks)
        kl = topkattn.kl_truncated(xb, ks)
        assert_rel(tau, -np.expm1(-kl), rtol=1e-12, what=f"TV identity n={n}")
        # log space too: log tau = log(-expm1(-KL)) where tau underflows in linear space
        # (only where KL is a normal number: below that the right side loses digits)
        normal = kl > 1e-300
        with np.errstate(divide="ignore"):
            assert_rel(topkattn.log_tail_mass(xb, ks)[normal], np.log(-np.expm1(-kl[normal])),
                       rtol=1e-12, atol=1e-15, what="log TV identity")


# ------------------------------------------------------------------ properties

@given(row=logit_rows(max_n=40), data=st.data())
def test_k_eps_is_minimal(row, data):
    curve = exact_curve(row)
    # eps on the grid, random, and exactly at a tau(k) (an exact boundary tie)
    j = data.draw(st.integers(0, row.size))
    cands = [float(curve[j])] if 0 < float(curve[j]) < 1 else []
    cands.append(data.draw(st.sampled_from(EPS_GRID)))
    cands.append(data.draw(st.floats(1e-300, 1.0, exclude_max=True, exclude_min=True)))
    for eps in cands:
        k, tau = topkattn.k_eps(row, eps, return_tail=True)
        check_keps_minimal(curve, eps, k, what=f"eps={eps!r}")
        assert tau <= eps
        if curve[k] > mpmath.mpf("1e-290"):
            assert mp_rel_err(tau, curve[k]) <= 1e-12


@settings(max_examples=60)
@given(row=logit_rows(min_n=129, max_n=3000, spreads=MODERATE_SPREADS + (1e3,)), data=st.data())
def test_k_eps_is_minimal_long_rows(row, data):
    """Rows past the small-row cut-off exercise the sampled-bracket path."""
    ls = ref._log_suffix(row)
    j = data.draw(st.integers(0, row.size))
    eps_list = [data.draw(st.sampled_from(EPS_GRID)),
                data.draw(st.floats(1e-250, 1.0, exclude_max=True, exclude_min=True))]
    tj = math.exp(ls[j] - ls[0])
    if 0 < tj < 1:
        eps_list.append(tj)
    for eps in eps_list:
        k, tau = topkattn.k_eps(row, eps, return_tail=True)
        rk = ref.k_eps(row, eps)
        if k != rk:
            check_keps_minimal(exact_curve(row), eps, k, what=f"eps={eps!r}")
        assert tau <= eps


@given(row=logit_rows(max_n=2500, spreads=MODERATE_SPREADS + HUGE_SPREADS), data=st.data())
def test_topk_agrees_with_stable_argsort(row, data):
    k = data.draw(st.integers(0, row.size))
    np.testing.assert_array_equal(topkattn.topk(row, k), ref.topk(row, k))


@given(row=logit_rows(max_n=300, spreads=MODERATE_SPREADS + HUGE_SPREADS))
def test_tv_curve_is_tail_mass_and_non_increasing(row):
    n = row.size
    curve = topkattn.tv_curve(row)
    tau = topkattn.tail_mass(np.broadcast_to(row, (n + 1, n)), np.arange(n + 1))
    assert curve[0] == 1.0 and curve[-1] == 0.0
    assert np.all(np.diff(curve) <= 0.0), "tv_curve increases somewhere"
    big = tau > 1e-290
    assert_rel(curve[big], tau[big], what="tv_curve vs tail_mass")
    assert np.all(curve[~big] <= 1e-290)
    n_live = int(np.isfinite(row).sum())
    assert np.all(curve[n_live:] == 0.0)


@given(row=logit_rows(max_n=40, spreads=MODERATE_SPREADS + HUGE_SPREADS), data=st.data())
def test_log_tail_mass_against_mpmath(row, data):
    k = data.draw(st.integers(0, row.size))
    exact = ref.mp_log_tail_mass(row, k)
    got = topkattn.log_tail_mass(row, k)
    if mpmath.isinf(exact):
        assert got == -np.inf
    else:
        # rounding of logit differences of size up to the row's spread
        finite = row[np.isfinite(row)].astype(np.float64)
        scale = float(np.max(np.abs(finite))) + 1.0
        assert float(abs(mpmath.mpf(float(got)) - exact)) <= 1e-13 * abs(float(exact)) + 4e-16 * scale
    kl = topkattn.kl_truncated(row, k)
    exact_kl = ref.mp_kl_truncated(row, k)
    if not mpmath.isinf(exact_kl) and exact_kl > mpmath.mpf("1e-300"):
        finite = row[np.isfinite(row)].astype(np.float64)
        scale = float(np.ptp(finite)) + 1.0
        assert mp_rel_err(kl, exact_kl) <= 1e-13 + 4e-16 * scale


@settings(max_examples=80)
@given(row=logit_rows(min_n=129, max_n=4000), data=st.data())
def test_tail_mass_long_rows_against_reference(row, data):
    """Past the small-row cut-off the k-th logit is found from a sampled bracket."""
    n = row.size
    ks = np.array([data.draw(st.integers(0, n)) for _ in range(4)] + [1, n // 2])
    xb = np.broadcast_to(row, (ks.size, n))
    assert_rel(topkattn.log_tail_mass(xb, ks), ref.log_tail_mass(xb, ks), rtol=1e-12,
               atol=1e-15, what="log_tail_mass")
    assert_rel(topkattn.kl_truncated(xb, ks), ref.kl_truncated(xb, ks), rtol=1e-12,
               what="kl_truncated")


def test_k_eps_tail_never_exceeds_eps_at_boundary_ties():
    """eps set exactly to a tau(j) (rounded to double): the returned tau must stay <= eps,
    as documented, and k_eps must be minimal."""
    x = np.array([-0.11595200002193451, 2.148822546005249, -2.0071191787719727,
                  -1.5591155290603638, 2.5374631881713867, -0.39216795563697815,
                  -0.7179213166236877, 0.1551448404788971, -1.3789949417114258,
                  2.6638827323913574, -2.4983253479003906, -0.30119600892066956,
                  0.6939055919647217], dtype=np.float32)
    rng = np.random.default_rng(4)
    rows = [x] + [(2 * rng.standard_normal(int(rng.integers(2, 20)))).astype(np.float32)
                  for _ in range(40)]
    for row in rows:
        curve = exact_curve(row)
        for j in range(1, row.size):
            eps = float(curve[j])
            k, tau = topkattn.k_eps(row, eps, return_tail=True)
            check_keps_minimal(curve, eps, k, what=f"eps=tau({j})")
            assert tau <= eps, f"row {row.tolist()} eps={eps!r}: k={k}, tau={tau!r} > eps"


@pytest.mark.parametrize("gap", [0.0, 30.0, 590.0, 599.5, 600.5, 650.0, 800.0, 5000.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_rows_with_a_deep_tail_against_mpmath(gap, dtype):
    """Past the small-row cut-off the head and tail sums come from the selection's own band
    pass, relative to the row maximum, while the tail's largest logit is within 600 of it,
    and from a separate pass relative to the tail's own largest logit further down: both
    sides of that switch, with ties at the k-th logit, against mpmath."""
    rng = np.random.default_rng(int(gap * 10) + (dtype == np.float32))
    n, k = 3000, 40
    head = 5.0 + rng.normal(size=k - 3)
    head = np.concatenate([head, [2.0, 2.0, 2.0, 2.0]])          # ties across the k-th place
    tail = 2.0 - gap - np.abs(rng.normal(size=n - head.size)) * 3
    x = np.concatenate([head, tail]).astype(dtype)
    rng.shuffle(x)
    for kk in (k - 2, k, k + 1, k + 3):
        exact = ref.mp_log_tail_mass(x, kk)
        got = topkattn.log_tail_mass(x, kk)
        assert float(abs(mpmath.mpf(float(got)) - exact)) <= 1e-13 * abs(float(exact)) + 1e-14, \
            (gap, kk, got, mpmath.nstr(exact, 20))
        exact_kl = ref.mp_kl_truncated(x, kk)
        if exact_kl > mpmath.mpf("1e-300"):
            assert mp_rel_err(topkattn.kl_truncated(x, kk), exact_kl) <= 1e-12
