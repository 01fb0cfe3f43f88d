"""Certified bounds (docs/design.md §2): single-gap (both forms), multi-gap and blockwise.

A bound is a certificate: it must never be below the exact tau (computed here with
mpmath from the exact input values). Beyond that, each bound is compared with its float64
twin in topkattn.reference, allowing only the outward rounding the contract asks for.
"""
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import topkattn
from topkattn import reference as ref

from _util import (FLOATS, HUGE_SPREADS, MODERATE_SPREADS, assert_rel, exact_curve, k_values,
                   logit_rows, random_row, zoo)


def _outward_ok(got, expected, n, extra=0):
    """expected (1 - 1e-12) <= got <= expected (1 + 1e-12 + slack): outward rounding only,
    with a slack that may grow with the number of summed terms."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    slack = 1e-12 + (n + extra + 256) * 2.0**-48
    lo_ok = got >= expected * (1 - 1e-12)
    hi_ok = got <= np.minimum(1.0, expected * (1 + slack))
    return lo_ok & hi_ok


def _assert_outward(got, expected, n, what, extra=0):
    ok = _outward_ok(got, expected, n, extra)
    if not ok.all():
        i = np.argwhere(~np.asarray(ok).reshape(-1))[0, 0]
        raise AssertionError(f"{what}: {np.asarray(got).reshape(-1)[i]!r} vs reference "
                             f"{np.asarray(expected).reshape(-1)[i]!r} (entry {i})")


def _assert_certifies(bounds, curve, what, ks=None):
    """bounds[i] >= exact tau(ks[i]) for every i (exact comparison in mpmath)."""
    ks = range(len(curve)) if ks is None else ks
    for b, k in zip(np.asarray(bounds).reshape(-1), ks):
        assert 0.0 <= b <= 1.0, f"{what}: bound {b!r} outside [0, 1]"
        assert mpmath.mpf(float(b)) >= curve[int(k)], (
            f"{what}: k={k}: bound {float(b)!r} < exact tau {mpmath.nstr(curve[int(k)], 25)}")


# ------------------------------------------------------------ against the reference

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("form", ["mass", "gap"])
def test_gap_bound_matches_reference(dtype, form, rng):
    for name, x in zoo(rng, dtype):
        n = x.shape[-1]
        ks = np.array(k_values(n))
        xb = np.broadcast_to(x, (ks.size, n))
        got = topkattn.gap_bound(xb, ks, form=form)
        assert got.dtype == np.float64 and got.shape == (ks.size,)
        _assert_outward(got, ref.gap_bound(xb, ks, form=form), n, f"gap_bound {form} {name}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("cuts,spacing", [(1, "geometric"), (3, "geometric"), (8, "geometric"),
                                          (8, "linear"), (50, "linear"), (1000, "geometric")])
def test_multigap_bound_matches_reference(dtype, cuts, spacing, rng):
    for name, x in zoo(rng, dtype):
        n = x.shape[-1]
        ks = np.array(k_values(n))
        xb = np.broadcast_to(x, (ks.size, n))
        got = topkattn.multigap_bound(xb, ks, cuts=cuts, spacing=spacing)
        _assert_outward(got, ref.multigap_bound(xb, ks, cuts=cuts, spacing=spacing), n,
                        f"multigap {cuts} {spacing} {name}", extra=cuts)


@pytest.mark.parametrize("dtype", FLOATS)
def test_multigap_explicit_cuts_match_reference(dtype, rng):
    for name, x in zoo(rng, dtype):
        n = x.shape[-1]
        ks = np.array(k_values(n))
        xb = np.broadcast_to(x, (ks.size, n))
        cut_sets = [np.arange(1, n + 1), np.array([n]), np.unique(rng.integers(1, n + 1, 5))]
        for cuts in cut_sets:
            got = topkattn.multigap_bound(xb, ks, cuts=cuts)
            _assert_outward(got, ref.multigap_bound(xb, ks, cuts=cuts), n,
                            f"multigap cuts={cuts[:6]} {name}", extra=cuts.size)


def test_multigap_cut_schedule():
    """The documented spacing: geometric lengths ceil(span^(j/J)), linear ceil(span j/J)."""
    assert ref.multigap_cuts(10, 110, 2, "geometric") == [20, 110]
    assert ref.multigap_cuts(0, 100, 4, "linear") == [25, 50, 75, 100]
    assert ref.multigap_cuts(3, 5, 8, "geometric") == [5]
    assert ref.multigap_cuts(2, 9, np.array([1, 2, 4, 9, 10])) == [4, 9]
    # a row whose logits halve the mass at each rank: the bound depends on where the cuts are
    x = -np.arange(200.0) * 0.05
    for cuts, spacing in [(2, "geometric"), (4, "linear"), (7, "geometric")]:
        got = topkattn.multigap_bound(x, 10, cuts=cuts, spacing=spacing)
        _assert_outward(got, ref.multigap_bound(x, 10, cuts=cuts, spacing=spacing), 200,
                        f"schedule {cuts} {spacing}", extra=cuts)
    assert topkattn.multigap_bound(x, 10, cuts=2) != topkattn.multigap_bound(x, 10, cuts=3)


def test_bound_special_values():
    x = np.array([2.0, -np.inf, 1.0, 0.5, -np.inf])
    for f in (lambda k: topkattn.gap_bound(x, k), lambda k: topkattn.gap_bound(x, k, "gap"),
              lambda k: topkattn.multigap_bound(x, k)):
        assert f(0) == 1.0
        assert f(3) == 0.0 and f(4) == 0.0 and f(5) == 0.0  # k >= n' keeps everything
    # single gap with only the gap: (n'-k) e^-D / (k + (n'-k) e^-D)
    y = np.array([5.0, 0.0, 0.0, -1.0])
    d = math.exp(-5.0)
    assert_rel(topkattn.gap_bound(y, 1, form="gap"), 3 * d / (1 + 3 * d), rtol=1e-12)
    assert_rel(topkattn.gap_bound(y, 1), 3 * d / (1 + 3 * d), rtol=1e-12)
    assert_rel(topkattn.gap_bound(y, 2, form="gap"), 2 / 4, rtol=1e-12)  # tie: gap 0


# ----------------------------------------------------------------- certificates

def _all_bounds(row, cuts, spacing, explicit):
    n = row.size
    ks = np.arange(n + 1)
    xb = np.broadcast_to(row, (n + 1, n))
    return {
        "gap_bound(mass)": topkattn.gap_bound(xb, ks),
        "gap_bound(gap)": topkattn.gap_bound(xb, ks, form="gap"),
        f"multigap({cuts},{spacing})": topkattn.multigap_bound(xb, ks, cuts=cuts, spacing=spacing),
        f"multigap(cuts={explicit.tolist()})": topkattn.multigap_bound(xb, ks, cuts=explicit),
        "multigap(every rank)": topkattn.multigap_bound(xb, ks, cuts=np.arange(1, n + 1)),
        "multigap(n linear)": topkattn.multigap_bound(xb, ks, cuts=n, spacing="linear"),
    }


@st.composite
def _cut_args(draw, n):
    cuts = draw(st.integers(1, n + 3))
    spacing = draw(st.sampled_from(["geometric", "linear"]))
    explicit = np.array(sorted(draw(st.sets(st.integers(1, n), min_size=1, max_size=n))),
                        dtype=np.int64)
    return cuts, spacing, explicit


@settings(max_examples=150)
@given(row=logit_rows(max_n=40), data=st.data())
def test_bounds_certify_tau(row, data):
    """Every bound >= exact tau for every k (moderate spreads: tau stays above 1e-200)."""
    curve = exact_curve(row)
    cuts, spacing, explicit = data.draw(_cut_args(row.size))
    bounds = _all_bounds(row, cuts, spacing, explicit)
    for name, b in bounds.items():
        _assert_certifies(b, curve, name)
    # orderings: the gap-only form is the loosest, more cuts never hurt, every rank is exact
    n = row.size
    slack = 1 + 1e-12 + (2 * n + 300) * 2.0**-48
    mass, gap, every = bounds["gap_bound(mass)"], bounds["gap_bound(gap)"], bounds["multigap(every rank)"]
    assert np.all(mass <= gap * slack)
    for name, b in bounds.items():
        if name.startswith("multigap"):
            assert np.all(b <= mass * slack), name
    curve_f = np.array([float(c) for c in curve])
    assert np.all(every <= curve_f * slack), "every-rank multigap is not tight"
    assert np.all(bounds["multigap(n linear)"] <= curve_f * slack), "n linear segments not tight"


@settings(max_examples=40)
@given(row=logit_rows(min_n=129, max_n=1500), data=st.data())
def test_bounds_certify_tau_long_rows(row, data):
    """Rows past the small-row cut-off (sampled rank selection), a few k per row."""
    curve = exact_curve(row)
    n = row.size
    n_live = int(np.isfinite(row).sum())
    ks = np.array(sorted({0, 1, n_live - 1, n_live, n,
                          data.draw(st.integers(0, n)), data.draw(st.integers(0, n))}
                         & set(range(n + 1))))
    xb = np.broadcast_to(row, (ks.size, n))
    cuts, spacing, explicit = data.draw(_cut_args(n))
    for name, b in {
        "gap_bound(mass)": topkattn.gap_bound(xb, ks),
        "gap_bound(gap)": topkattn.gap_bound(xb, ks, form="gap"),
        "multigap": topkattn.multigap_bound(xb, ks, cuts=cuts, spacing=spacing),
        "multigap(explicit)": topkattn.multigap_bound(xb, ks, cuts=explicit),
    }.items():
        _assert_certifies(b, curve, name, ks)


@settings(max_examples=100)
@given(row=logit_rows(max_n=30, spreads=HUGE_SPREADS), data=st.data())
def test_bounds_certify_tau_huge_spreads(row, data):
    """Spreads of 1e3 to 1e4: tails far below the head, down to and past float64 underflow.
    A certificate must still never be below the exact tau."""
    curve = exact_curve(row)
    cuts, spacing, explicit = data.draw(_cut_args(row.size))
    for name, b in _all_bounds(row, cuts, spacing, explicit).items():
        _assert_certifies(b, curve, name)


# Fixed rows that put the tail at and past the edge of the float64 range.

def test_multigap_certifies_when_lower_segments_lie_708_below_the_max():
    """Segments starting more than ~708 below the row maximum must still be counted."""
    x = np.array([0.0, -700.0] + [-710.0] * 1000)
    exact = ref.mp_tail_mass(x, 1)  # e^-700 (1 + 1000 e^-10) ~ 1.045 e^-700
    for cuts in (np.array([2]), np.arange(1, x.size + 1)):
        b = topkattn.multigap_bound(x, 1, cuts=cuts)
        assert mpmath.mpf(float(b)) >= exact, (
            f"cuts={cuts[:3]}...: bound {float(b)!r} < exact tau {mpmath.nstr(exact, 17)}")


def test_bounds_positive_when_tau_underflows():
    """tau = e^-800 / (1 + e^-800) > 0: a bound of 0 claims no mass is discarded."""
    x = np.array([0.0, -800.0])
    exact = ref.mp_tail_mass(x, 1)
    assert exact > 0
    for name, b in [("gap_bound(mass)", topkattn.gap_bound(x, 1)),
                    ("gap_bound(gap)", topkattn.gap_bound(x, 1, form="gap")),
                    ("multigap_bound", topkattn.multigap_bound(x, 1))]:
        assert mpmath.mpf(float(b)) >= exact, f"{name} = {float(b)!r} < exact tau {mpmath.nstr(exact, 5)}"


FAR_TAIL_ROWS = [
    (np.array([-160.82, -180.259, -770.239]), 2),
    (np.array([-270.785, -273.109, -965.225]), 2),
    (np.array([-860.75025959, -241.91857501, -639.08026332, -612.67468675, -639.08026332,
               -241.91857501, -241.91857501, -219.48992663, -639.08026332, -860.75025959,
               -612.67468675, -241.91857501, -639.08026332, -219.48992663, -612.67468675,
               -639.08026332, -612.67468675, -639.08026332, -860.75025959, -219.48992663,
               -860.75025959]), 19),
]


@pytest.mark.parametrize("x,k", FAR_TAIL_ROWS, ids=["n3-a", "n3-b", "n21"])
def test_gap_bound_certifies_far_tail_in_normal_range(x, k):
    """tau ~ 1e-265 to 1e-302 (normal doubles): the outward rounding must cover the
    rounding of logit differences of ~600 and of exp/log at such arguments."""
    exact = ref.mp_tail_mass(x, k)
    b = topkattn.gap_bound(x, k)
    assert mpmath.mpf(float(b)) >= exact, f"bound {float(b)!r} < exact tau {mpmath.nstr(exact, 17)}"


# ------------------------------------------------------------------ block bound

def _block_case(rng, n, nblocks, spread, log_space, tight):
    """A row split into blocks; some scored, the rest summarised by upper bounds that
    really are >= their logits (equal to the block max when `tight`)."""
    x = random_row(rng, n, spread, nlevels=int(rng.integers(1, 4)) if rng.random() < 0.3 else None)
    edges = np.unique(np.concatenate([[0, n], rng.integers(0, n + 1, nblocks - 1)]))
    blocks = [np.arange(a, b) for a, b in zip(edges[:-1], edges[1:])]
    scored_mask = rng.random(len(blocks)) < 0.4
    scored_mask[rng.integers(len(blocks))] = True
    scored = np.concatenate([b for b, s in zip(blocks, scored_mask) if s])
    unscored = [b for b, s in zip(blocks, scored_mask) if not s]
    u = np.array([x[b].max() + (0.0 if tight else rng.exponential(2.0)) for b in unscored]
                 + [-np.inf, 3.0])  # an empty block, in either spelling
    sizes = np.array([b.size for b in unscored] + [0, 0], dtype=np.int64)
    order = scored[np.argsort(-x[scored], kind="stable")]
    kept = order[: int(rng.integers(0, order.size + 1))]
    mp = mpmath
    e = {i: mp.exp(mp.mpf(float(x[i]))) for i in range(n)}
    A = mp.fsum(e[i] for i in kept)
    Zs = mp.fsum(e[i] for i in scored)
    U_true = mp.fsum(e[i] for b in unscored for i in b)
    if log_space:
        a = float(mp.log(A)) if A > 0 else -np.inf
        z = float(mp.log(Zs))
        if kept.size == scored.size:
            a = z
        A_in, Z_in = (mp.exp(mp.mpf(a)) if a > -np.inf else mp.mpf(0)), mp.exp(mp.mpf(z))
    else:
        a, z = float(A), float(Zs)
        if kept.size == scored.size:
            a = z
        A_in, Z_in = mp.mpf(a), mp.mpf(z)
    # the tau the certificate speaks about: kept mass and scored mass as given
    tau = 1 - A_in / (Z_in + U_true)
    return u, sizes, a, z, tau


@pytest.mark.parametrize("log_space", [False, True])
def test_block_bound_certifies_and_matches_reference(log_space, rng):
    for trial in range(300):
        n = int(rng.integers(1, 200))
        # linear masses e^x must stay finite; log space takes any spread
        spread = float(rng.choice([1e-3, 1.0, 5.0, 30.0] + ([200.0, 1e3] if log_space else [])))
        u, sizes, a, z, tau = _block_case(rng, n, int(rng.integers(1, 12)), spread, log_space,
                                          tight=trial % 2 == 0)
        b = topkattn.block_bound(u, sizes, a, z, log_space=log_space)
        assert b.dtype == np.float64 and b.shape == ()
        assert mpmath.mpf(float(b)) >= tau, f"trial {trial}: bound {float(b)!r} < tau {tau}"
        r = ref.block_bound(u, sizes, a, z, log_space=log_space)
        la, lz = (a, z) if log_space else (math.log(a) if a > 0 else -np.inf, math.log(z))
        mag = abs(lz) + (abs(la) if la > -np.inf else 0) + float(np.max(np.abs(u[np.isfinite(u)]),
                                                                       initial=0.0)) + u.size + 16
        assert r * (1 - 1e-12) <= b <= r * (1 + 1e-12) + mag * 2.0**-46, \
            f"trial {trial}: {b!r} vs reference {r!r}"


def test_block_bound_batched_and_example():
    assert_rel(topkattn.block_bound([0.0], [10], 90.0, 100.0), 1 - 90 / 110, rtol=1e-12)
    rng = np.random.default_rng(5)
    u = rng.normal(size=(3, 4, 6))
    sizes = rng.integers(0, 20, size=(3, 4, 6))
    z = np.exp(rng.normal(size=(3, 4)) + 2)
    a = z * rng.uniform(0, 1, size=(3, 4))
    got = topkattn.block_bound(u, sizes, a, z)
    assert got.shape == (3, 4)
    want = ref.block_bound(u, sizes, a, z)
    assert np.all(got >= want * (1 - 1e-12)) and np.all(got <= want * (1 + 1e-10) + 1e-12)
    shared = topkattn.block_bound(u, sizes[0, 0], a, z)  # one size per block for every row
    assert_rel(shared, ref.block_bound(u, np.broadcast_to(sizes[0, 0], u.shape), a, z),
               rtol=1e-10, atol=1e-12)
    # kept == scored and nothing unscored: nothing discarded (up to outward rounding)
    assert 0.0 <= topkattn.block_bound([-np.inf], [0], 5.0, 5.0) <= 1e-12
    assert topkattn.block_bound([0.0], [3], 0.0, 2.0) == 1.0  # nothing kept
    # log space never overflows
    b = topkattn.block_bound([900.0], [10], 1000.0, 1000.5, log_space=True)
    exact = 1 - mpmath.exp(1000) / (mpmath.exp(1000.5) + 10 * mpmath.exp(900))
    assert mpmath.mpf(float(b)) >= exact and float(b) <= float(exact) * (1 + 1e-9)


def test_block_bound_before_anything_is_scored():
    """log_space with nothing scored yet (Z_s = A = 0, log -inf): the bound is 1, quietly."""
    assert topkattn.block_bound([1.0, 2.0], [5, 3], -np.inf, -np.inf, log_space=True) == 1.0
    got = topkattn.block_bound(np.zeros((2, 2)), [1, 1], [-np.inf, 0.0], [-np.inf, 0.0],
                               log_space=True)
    assert got[0] == 1.0 and abs(got[1] - 2 / 3) <= 1e-12
