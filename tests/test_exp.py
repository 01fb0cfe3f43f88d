"""The vector exp of every kernel set (vd_exp, csrc/cpu/kernels.inc) against mpmath.

Every sum of exponentials in the core (tail masses, k_eps, attention weights, the
certificates' sums) goes through this function, and the certificates' rounding padding
assumes its stated bound: a relative error below 3.1 * 2^-53 on [-708, 709], exactly 0
below -708, for -inf and for NaN."""
import math

import mpmath
import numpy as np
import pytest

from topkattn import _core

BOUND = 3.1 * 2.0**-53
LN2_32 = math.log(2.0) / 32


def rel_errors(x, got):
    mpmath.mp.prec = 130
    out = np.empty(len(x))
    for i, (xi, gi) in enumerate(zip(x.tolist(), got.tolist())):
        want = mpmath.exp(mpmath.mpf(xi))
        out[i] = float(abs(mpmath.mpf(gi) - want) / want)
    return out


def test_table_is_correctly_rounded():
    mpmath.mp.prec = 130
    tab = _core.exp2_table()
    assert tab.shape == (32,) and tab[0] == 1.0
    for j, v in enumerate(tab.tolist()):
        want = mpmath.power(2, mpmath.mpf(j) / 32)
        err = abs(mpmath.mpf(v) - want)
        for other in (math.nextafter(v, math.inf), math.nextafter(v, -math.inf)):
            assert err <= abs(mpmath.mpf(other) - want), j


def grid(rng):
    parts = [
        rng.uniform(-708.0, 709.0, 6000),                       # the whole range
        rng.uniform(-40.0, 5.0, 3000),                          # where softmax weights live
        rng.standard_normal(1000) * 1e-3,                       # around 0, |r| small
        # just either side of the reduction's rounding points (m + 1/2) ln2/32
        (np.arange(-3000, 3000) * 10.85 + 0.5) * LN2_32 + rng.uniform(-1e-12, 1e-12, 6000),
        # m ln2/32 exactly (r = 0 up to the split) and tiny inputs
        np.arange(-200, 200) * LN2_32,
        np.array([0.0, -0.0, 5e-324, -5e-324, 2.0**-1000, 1e-300, -708.0, -707.999999,
                  709.0, 708.99999, 708.4, 1.0, -1.0, 0.5, math.log(2.0), -math.log(2.0)]),
    ]
    x = np.concatenate(parts)
    return x[(x >= -708.0) & (x <= 709.0)]


def test_relative_error_within_the_stated_bound(simd_path, rng):
    x = grid(rng)
    got = _core.vexp(x)
    err = rel_errors(x, got)
    worst = int(np.argmax(err))
    assert err[worst] < BOUND, (simd_path, x[worst], err[worst] / 2.0**-53)
    # and it is not a loose bound: the worst case is some ulps, not far below
    assert err.max() > 0.25 * 2.0**-53


def test_flush_and_clamp(simd_path):
    x = np.array([-708.0000001, -709.0, -745.2, -1e308, -np.inf, np.nan, 709.5, 1e308, np.inf])
    got = _core.vexp(x)
    assert (got[:6] == 0.0).all(), got
    top = _core.vexp(np.array([709.0]))[0]
    assert (got[6:] == top).all() and math.isfinite(top)  # clamped to e^709, never inf


def test_every_lane_and_length(simd_path, rng):
    # lengths around the vector width: the tail of a row runs through the same code
    for n in range(1, 20):
        x = rng.uniform(-30, 30, n)
        got = _core.vexp(x)
        assert got.shape == (n,)
        np.testing.assert_allclose(got, np.exp(x), rtol=4 * 2.0**-53, atol=0)


def test_does_not_modify_its_input():
    x = np.linspace(-5, 5, 11)
    before = x.copy()
    _core.vexp(x)
    assert (x == before).all()
