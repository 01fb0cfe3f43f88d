"""topkattn.sweep: the (n, sigma, eps) sweep against an independent NumPy recomputation."""
import inspect
import sys

import numpy as np
import pytest

import topkattn
from topkattn import sweep

pd = pytest.importorskip("pandas")

SMALL = dict(source="synthetic", n=(64, 301), sigma=(0.0, 0.5, 3.0), eps=(0.1, 0.01), rows=5,
             seed=3, progress=False)


@pytest.fixture(scope="module")
def small():
    return sweep.run(**SMALL)


def _rows(n, sigma, rows, seed):
    """The documented synthetic generation, written out independently."""
    z = np.random.default_rng([seed, n]).standard_normal((rows, n))
    return (z * sigma).astype(np.float32)


def _k_eps_numpy(x, eps):
    """Smallest k with softmax mass outside the top k <= eps, by sorting in float64."""
    s = np.sort(x.astype(np.float64), axis=-1)[..., ::-1]
    w = np.exp(s - s[..., :1])
    tail = np.cumsum(w[..., ::-1], axis=-1)[..., ::-1]  # tail[k] = mass outside top k
    tail = np.concatenate([tail, np.zeros(tail.shape[:-1] + (1,))], axis=-1)
    ok = tail <= eps * tail[..., :1]
    return ok.argmax(axis=-1)


def test_columns_and_grid_order(small):
    assert list(small.columns) == list(sweep.COLUMNS)
    expect = [(n, s, e) for n in SMALL["n"] for s in SMALL["sigma"] for e in SMALL["eps"]]
    got = list(zip(small["n"].tolist(), small["sigma"].tolist(), small["eps"].tolist()))
    assert got == expect
    assert (small["source"] == "synthetic").all()
    assert small["n"].dtype == np.int64


def test_quantiles_ordered_and_in_range(small):
    q25, med, q75 = small["k_eps_q25"], small["k_eps_median"], small["k_eps_q75"]
    assert (q25 <= med).all() and (med <= q75).all()
    assert (q25 >= 1).all() and (q75 <= small["n"]).all()
    np.testing.assert_array_equal(small["rho_median"], med / small["n"])


def test_tail_and_bounds(small):
    tau = small["tau_at_k"]
    assert (tau >= 0).all() and (tau <= small["eps"]).all()
    # a certificate is never below the exact tail, per row and hence per median
    assert (small["gap_bound_at_k"] >= tau).all()
    assert (small["multigap_bound_at_k"] >= tau).all()
    # the multi-gap bound refines the single-gap one (first segment = the gap bound's term)
    assert (small["multigap_bound_at_k"] <= small["gap_bound_at_k"] * (1 + 1e-12)).all()
    assert (small["gap_bound_at_k"] <= 1).all()


def test_rules_at_fitted_sigma(small):
    n = small["n"].to_numpy(dtype=np.float64)
    sf, e = small["sigma_fit"].to_numpy(), small["eps"].to_numpy()
    np.testing.assert_array_equal(small["rho_rule"], topkattn.gaussian_k_eps(n, sf, e) / n)
    np.testing.assert_array_equal(small["rho_finite"],
                                  topkattn.gaussian_k_eps(n, sf, e, finite_n=True) / n)
    assert np.all((small["rho_rule"] >= 0) & (small["rho_rule"] <= 1))


def test_matches_independent_recomputation(small):
    rows, seed = SMALL["rows"], SMALL["seed"]
    for n in SMALL["n"]:
        for sigma in SMALL["sigma"]:
            x = _rows(n, sigma, rows, seed)
            _, s_fit = topkattn.fit_gaussian(x)
            np.testing.assert_allclose(np.std(x.astype(np.float64), axis=1, ddof=1), s_fit,
                                       rtol=1e-9, atol=1e-12)
            for eps in SMALL["eps"]:
                got = small[(small.n == n) & (small.sigma == sigma) & (small.eps == eps)]
                assert len(got) == 1
                got = got.iloc[0]
                k = _k_eps_numpy(x, eps)
                assert got.k_eps_median == np.median(k)
                assert got.k_eps_q25 == np.quantile(k, 0.25)
                assert got.k_eps_q75 == np.quantile(k, 0.75)
                assert got.sigma_fit == pytest.approx(np.mean(s_fit), rel=1e-12, abs=1e-15)
                tau = topkattn.tail_mass(x, k)
                assert got.tau_at_k == pytest.approx(np.median(tau), rel=1e-9, abs=1e-300)
                gap = topkattn.gap_bound(x, k)
                assert got.gap_bound_at_k == pytest.approx(np.median(gap), rel=1e-12)


def test_sigma_zero_is_uniform(small):
    # all logits equal: tau(k) = (n - k)/n, so k_eps = ceil((1 - eps) n) in every row
    # (the grid avoids (1 - eps) n landing on an integer, where rounding decides)
    z = small[small.sigma == 0.0]
    expect = np.ceil((1 - z["eps"]) * z["n"])
    np.testing.assert_array_equal(z["k_eps_median"], expect)
    np.testing.assert_array_equal(z["k_eps_q25"], expect)
    assert (z["sigma_fit"] == 0).all()


def test_deterministic_for_a_seed(small):
    pd.testing.assert_frame_equal(sweep.run(**SMALL), small)
    other = sweep.run(**{**SMALL, "seed": SMALL["seed"] + 1})
    assert not other["sigma_fit"].equals(small["sigma_fit"])


def test_cell_does_not_depend_on_rest_of_grid(small):
    one = sweep.run(**{**SMALL, "n": [301], "sigma": [3.0], "eps": [0.01]})
    full = small[(small.n == 301) & (small.sigma == 3.0) & (small.eps == 0.01)]
    pd.testing.assert_frame_equal(one, full.reset_index(drop=True))


def test_chunked_generation_is_identical(monkeypatch):
    args = dict(source="synthetic", n=[200], sigma=[1.0, 2.0], eps=[0.05], rows=7, seed=11,
                progress=False)
    whole = sweep.run(**args)
    monkeypatch.setattr(sweep, "_CHUNK_VALUES", 450)  # 2 rows of 200 per chunk
    pd.testing.assert_frame_equal(sweep.run(**args), whole)


def test_scalars_and_repeated_values():
    a = sweep.run("synthetic", n=128, sigma=1.0, eps=0.1, rows=3, progress=False)
    b = sweep.run("synthetic", n=[128, 128], sigma=[1.0, 1.0], eps=[0.1, 0.1], rows=3,
                  progress=False)
    assert len(a) == 1
    pd.testing.assert_frame_equal(a, b)
    c = sweep.run("synthetic", n=[np.int64(128)], sigma=[np.float32(1.0)], eps=[0.1],
                  rows=np.int32(3), progress=False)
    pd.testing.assert_frame_equal(a, c)


def test_defaults_are_the_documented_grid():
    d = {k: v.default for k, v in inspect.signature(sweep.run).parameters.items()}
    assert d["source"] == "bert"
    assert tuple(d["eps"]) == (1e-1, 1e-2, 1e-3)
    assert (d["n"], d["sigma"], d["rows"], d["model"], d["texts"]) == (None,) * 5
    assert tuple(sweep.SYNTHETIC_DEFAULTS["n"]) == (1024, 4096, 16384, 65536)
    assert tuple(sweep.SYNTHETIC_DEFAULTS["sigma"]) == (0.5, 1.0, 2.0, 3.0, 4.0)
    assert sweep.SYNTHETIC_DEFAULTS["rows"] == 64
    assert (d["seed"], d["progress"]) == (0, True)


def test_synthetic_defaults_fill_in(monkeypatch):
    seen = {}
    monkeypatch.setattr(sweep, "_run_synthetic", lambda *a: seen.update(args=a))
    sweep.run("synthetic", progress=False)
    eps, n, sigma, rows, seed, _ = seen["args"]
    assert (n, sigma, rows, seed) == (list(sweep.SYNTHETIC_DEFAULTS["n"]),
                                      list(sweep.SYNTHETIC_DEFAULTS["sigma"]), 64, 0)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(source="gpt"), ValueError, "available sources: bert, synthetic"),
    (dict(source="synthetic", model="x"), ValueError, "model apply to source='bert' only"),
    (dict(source="bert"), ValueError, "n, sigma, rows apply to source='synthetic' only"),
    (dict(source=None), ValueError, "unknown source"),
    (dict(eps=[0.0]), ValueError, r"eps must contain values in the open interval \(0, 1\)"),
    (dict(eps=[1.0]), ValueError, "eps"),
    (dict(eps=[float("nan")]), ValueError, "eps"),
    (dict(eps=[]), ValueError, "eps must not be empty"),
    (dict(eps="0.1"), TypeError, "eps must be a number or a sequence"),
    (dict(n=[1]), ValueError, "n must contain integers >= 2"),
    (dict(n=[64.5]), TypeError, "n must contain integers"),
    (dict(n=[True]), TypeError, "n must contain integers"),
    (dict(n=[[64, 128]]), ValueError, "flat sequence"),
    (dict(sigma=[-1.0]), ValueError, "sigma must contain values finite and >= 0"),
    (dict(sigma=[float("inf")]), ValueError, "sigma"),
    (dict(sigma=["1"]), TypeError, "sigma must contain real numbers"),
    (dict(rows=0), ValueError, "rows must be >= 1"),
    (dict(rows=2.0), TypeError, "rows must be an integer"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(source="synthetic", n=[64], sigma=[1.0], eps=[0.1], rows=2, progress=False)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sweep.run(**args)


def test_progress_bar_on_stderr(capsys):
    pytest.importorskip("tqdm")
    sweep.run("synthetic", n=[64], sigma=[1.0], eps=[0.1], rows=2, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "topkattn sweep" in err
    sweep.run("synthetic", n=[64], sigma=[1.0], eps=[0.1], rows=2, progress=False)
    assert capsys.readouterr() == ("", "")


def test_progress_without_tqdm(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "tqdm" or m.startswith("tqdm.")] + ["tqdm"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import tqdm...` fail
    df = sweep.run("synthetic", n=[64], sigma=[1.0], eps=[0.1], rows=2, progress=True)
    assert len(df) == 1
    assert capsys.readouterr() == ("", "")
