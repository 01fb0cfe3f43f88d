"""k_eps on every path of its C core (docs/design.md §2, k_eps) against the float64 reference
and, at the edges, against mpmath.

Rows of at most 4096 keys (65536 with the AVX2 kernels, where that is faster) take the
whole-row path (every weight, then the selection from the bottom by rounds of pivots; rows
of 256 to 65536 first try one pass over a bracket guessed from a sample, which the pass
itself checks); longer rows the band path, whose single pass also
validates the row (NaN, +inf) and finds its maximum, with the sample's maximum as the
reference of the masses; rows longer than 65536 run that pass in chunks. The rows below aim at what
can go wrong there: ties across pivots and bracket edges, masked keys, a maximum the sample
skips, heavy heads that the sample's estimate of the total misses, subnormal spreads, bad
values the sample does not see, and budgets at both ends.
"""
import math

import mpmath
import numpy as np
import pytest

import topkattn
from topkattn import reference as ref

from _util import check_keps_minimal, exact_curve

EPS = (1e-280, 1e-100, 1e-12, 1e-6, 1e-3, 0.1, 0.5, 1.0 - 2.0 ** -40)
# lengths around the path limits: 4096 (whole row), 65536 (one chunk)
LENGTHS = (1, 2, 25, 1023, 1024, 1025, 2048, 4096, 4097, 16384, 65536, 65537)


def _row(kind, n, rng):
    """One row of a kind (float64; the test casts)."""
    if kind == "gauss":
        x = 2.0 * rng.standard_normal(n)
    elif kind == "ties":  # five levels: ties across every pivot and bracket edge
        x = 0.5 * rng.integers(0, 5, n).astype(np.float64)
    elif kind == "masked":
        x = 3.0 * rng.standard_normal(n)
        x[rng.random(n) < 0.4] = -np.inf
        x[rng.integers(n)] = 0.0
    elif kind == "far-max":  # the maximum, 650 above the rest, where no sample looks
        x = rng.standard_normal(n)
        x[min(1, n - 1)] = 650.0
    elif kind == "head":  # a few keys carry most of the mass
        x = 2.0 * rng.standard_normal(n)
        x[rng.random(n) < 1.0 / 512] = 12.0
    elif kind == "subnormal":  # differences of a few subnormals: all weights round to 1
        x = rng.integers(-1000, 1001, n).astype(np.float64) * 5e-324
    elif kind == "huge-range":
        x = -1e4 * rng.random(n)
    else:
        raise ValueError(kind)
    return x


KINDS = ("gauss", "ties", "masked", "far-max", "head", "subnormal", "huge-range")


def _check_against_reference(x, eps, what):
    k, tau = topkattn.k_eps(x, eps, return_tail=True)
    rk, rtau = ref.k_eps(x, eps, return_tail=True)
    k, tau, rk, rtau = (np.atleast_1d(a) for a in (k, tau, rk, rtau))
    assert np.all(tau <= eps), f"{what}: tau above eps"
    for r in np.flatnonzero(k != rk):  # only acceptable at an exact boundary tie
        check_keps_minimal(exact_curve(x[r]), eps, k[r], what=f"{what} row {r}")
    same = k == rk
    # both sides sum n terms in float64 (the reference pairwise): within 1e-12, or on rows
    # longer than 4096 the recursive-summation bound 2 n 2^-53 (n = 65536, 65535 equal
    # terms: 1.4e-12 off the correctly rounded tail, as before the bracket path took them)
    rel = max(1e-12, 2.0 * x.shape[-1] * 2.0**-53)
    with np.errstate(invalid="ignore"):
        ok = (tau[same] == rtau[same]) | (np.abs(tau[same] - rtau[same])
                                          <= rel * rtau[same] + 1e-300)
    assert ok.all(), f"{what}: tau {tau[same][~ok][:3]} vs {rtau[same][~ok][:3]}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", (np.float32, np.float64, np.float16))
def test_k_eps_every_path_against_reference(kind, dtype, simd_path):
    # every kernel set: where the whole-row path ends depends on the set (4096 logits, or
    # 65536 with AVX2), so the band path's single-chunk rows run under the others
    rng = np.random.default_rng(sum(map(ord, kind)) + np.dtype(dtype).itemsize)
    for n in LENGTHS:
        if dtype == np.float16 and kind in ("far-max", "huge-range", "subnormal"):
            continue  # out of float16's range, or all zero in it
        x = np.stack([_row(kind, n, rng) for _ in range(2)]).astype(dtype)
        if not np.isfinite(x.astype(np.float64)).any(axis=-1).all():
            continue
        for eps in EPS:
            _check_against_reference(x, eps, f"{kind} n={n} {np.dtype(dtype).name} eps={eps!r}")


def _sampled(n):
    """The positions the whole-row path's bracket guess samples (rows.c, BR_SAMPLE = 32)."""
    return ((2 * np.arange(32) + 1) * n) // 64


def _band_sampled(n, grow=1):
    """The positions the band path's sample reads (rows.c, keps_band_ref: 2 sqrt(n) logits,
    at most 4096 and n / 4; with grow = 4 the larger sample, at most 16384)."""
    ns = max(16, min(int(2.0 * np.sqrt(n)), 4096, n // 4))
    if grow > 1:
        ns = max(ns, min(grow * ns, 16384, n // 4))
    return ((np.arange(ns) + 0.5) * (n / ns)).astype(np.int64)


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("n", (65537, 200003, 1 << 20))
def test_k_eps_long_rows_resampled_or_headed(n, dtype):
    """Rows past the whole-row path, whose first sample leaves the bracket wide (drawn
    again, larger), leaves Z uncertain (the exact mass above the sample's largest logit
    first), or lies about the row on purpose."""
    rng = np.random.default_rng(n)
    rows = [2.0 * rng.standard_normal(n),             # a wide bracket: sampled again
            8.0 * rng.standard_normal(n),             # a heavy head the sample misses
            np.abs(3.0 * rng.standard_normal(n)) ** 1.5]
    x = 5.0 * rng.standard_normal(n)                  # heavy head, masked keys
    x[rng.random(n) < 0.3] = -np.inf
    rows.append(x)
    # both samples see only light, skewed logits while every other key is heavier: more
    # keys above the sample's largest than the head's pass gathers
    x = np.full(n, -11.0) + 0.01 * rng.random(n)
    for grow in (1, 4):
        at = _band_sampled(n, grow)
        x[at] = -40.0 + 10.0 * rng.random(at.size) ** 8
    rows.append(x)
    # a few keys far above a sample that sees none of them
    x = rng.standard_normal(n)
    x[rng.integers(0, n, 5)] = 25.0
    rows.append(x)
    x = np.stack(rows).astype(dtype)
    for eps in (1e-9, 1e-6, 1e-3, 1e-2, 0.1, 0.5):
        _check_against_reference(x, eps, f"n={n} {np.dtype(dtype).name} eps={eps!r}")


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("n", (256, 300, 512, 1000, 4096, 8191, 65536))
def test_k_eps_when_the_bracket_guess_misses(n, dtype):
    """Rows whose sampled logits lie about the rest, so that the guessed bracket misses the
    crossing on either side (the rounds must take over), or holds it only by a little."""
    rng = np.random.default_rng(n)
    at = _sampled(n)
    rows = []
    # the sample sees only a far tail while many keys sit just below the guessed lower
    # edge: the mass below it passes the budget
    x = np.full(n, -11.0)
    x[at] = -40.0
    x[rng.integers(n)] = 0.0
    rows.append(x)
    # the sample sees only heavy keys, the rest are light: the crossing is above the guessed
    # upper edge
    x = np.full(n, -40.0) + rng.random(n)
    x[at] = -2.0 + 0.1 * rng.random(32)
    x[0] = 0.0
    rows.append(x)
    # the sample's weights mislead by a factor near the guess's margins
    for f in (1.5, 2.0, 3.0):
        x = 2.0 * rng.standard_normal(n)
        x[at] += np.log(f)
        rows.append(x)
    # ties exactly at sampled values and bin edges of half a logit below the maximum
    x = 0.5 * rng.integers(-20, 1, n).astype(np.float64)
    x[at] = 0.5 * rng.integers(-20, 1, 32)
    rows.append(x)
    x = np.stack(rows).astype(dtype)
    for eps in (1e-9, 1e-6, 1e-3, 1e-2, 0.1, 0.5):
        _check_against_reference(x, eps, f"n={n} {np.dtype(dtype).name} eps={eps!r}")


@pytest.mark.parametrize("n", (1500, 5000))
def test_long_rows_at_the_edges_against_mpmath(n):
    """Ties across the bracket, subnormal spreads and a deep tail, against 50-digit tails;
    eps also set exactly at a tau(j) (a boundary tie) and just next to it."""
    rng = np.random.default_rng(n)
    rows = {
        "ties": 0.25 * rng.integers(0, 9, n).astype(np.float64),
        "subnormal": rng.integers(-50, 51, n).astype(np.float64) * 5e-324,
        "deep": np.concatenate([[0.0], -745.0 - rng.random(n - 1)]),
        "gauss": 3.0 * rng.standard_normal(n),
    }
    for name, x in rows.items():
        curve = exact_curve(x)
        eps_list = [1e-250, 1e-30, 1e-3, 0.3]
        for j in (int(0.9 * n), n // 2, 3):
            t = float(curve[j])
            if 1e-280 < t < 1.0:
                eps_list += [t, math.nextafter(t, 0.0), math.nextafter(t, 1.0)]
        for eps in eps_list:
            k, tau = topkattn.k_eps(x, eps, return_tail=True)
            check_keps_minimal(curve, eps, k, what=f"{name} eps={eps!r}")
            assert tau <= eps
            if curve[int(k)] > mpmath.mpf("1e-290"):
                assert float(abs(mpmath.mpf(float(tau)) - curve[int(k)]) / curve[int(k)]) <= 1e-12


def test_single_key_and_budgets_at_both_ends():
    for dtype in (np.float16, np.float32, np.float64):
        x = np.array([[-3.0], [0.0], [5e-324 if dtype == np.float64 else 1.0]], dtype=dtype)
        for eps in (1e-300, 1e-280, 0.5, 1.0 - 2.0 ** -53):
            k, tau = topkattn.k_eps(x, eps, return_tail=True)
            assert k.tolist() == [1, 1, 1] and tau.tolist() == [0.0, 0.0, 0.0]
    x = 2.0 * np.random.default_rng(0).standard_normal(5000)
    assert topkattn.k_eps(x, 1.0 - 2.0 ** -53) == 1
    assert topkattn.k_eps(x, 1e-300) == ref.k_eps(x, 1e-300)


@pytest.mark.parametrize("n", (1025, 4097, 65536, 140000))
@pytest.mark.parametrize("bad", (np.nan, np.inf))
def test_bad_values_the_sample_skips_are_reported(n, bad):
    """The band path validates rows in its own pass: a NaN or +inf at a position no sample
    reads is still an error naming the first such row, whatever the thread count."""
    x = np.random.default_rng(1).standard_normal((5, n)).astype(np.float32)
    x[3, 1] = bad
    x[4, n - 1] = bad
    before = x.copy()
    for threads in (1, 2):
        topkattn.set_num_threads(threads)
        try:
            with pytest.raises(ValueError, match=r"logits.*\(3,\)"):
                topkattn.k_eps(x, 1e-3)
        finally:
            topkattn.set_num_threads(0)
    np.testing.assert_array_equal(x, before)
    y = np.full((2, n), -np.inf)
    y[0, 5] = 1.0
    with pytest.raises(ValueError, match=r"fully masked.*\(1,\)"):
        topkattn.k_eps(y, 1e-3)


def test_results_do_not_depend_on_threads_or_strides():
    rng = np.random.default_rng(7)
    x = np.concatenate([2.0 * rng.standard_normal((6, 4096)),
                        0.5 * rng.integers(0, 5, (6, 4096))]).astype(np.float32)
    eps = np.geomspace(1e-9, 0.3, 12)
    out = []
    for threads in (1, 2):
        topkattn.set_num_threads(threads)
        try:
            out.append(topkattn.k_eps(x, eps, return_tail=True))
        finally:
            topkattn.set_num_threads(0)
    np.testing.assert_array_equal(out[0][0], out[1][0])
    assert out[0][1].tobytes() == out[1][1].tobytes()
    wide = np.zeros((12, 8192), dtype=np.float32)
    wide[:, ::2] = x
    k, tau = topkattn.k_eps(wide[:, ::2], eps, return_tail=True)
    np.testing.assert_array_equal(k, out[0][0])
    assert tau.tobytes() == out[0][1].tobytes()
