"""The calling contract (docs/design.md §7): batch shapes and broadcasting, empty batches, any
strides, inputs never modified, clear errors naming the argument, docstring examples."""
import doctest

import numpy as np
import pytest

import topkattn
import topkattn.core
from topkattn import reference as ref

from _util import FLOATS, assert_rel, random_row

# every function that takes logits, with fixed extra arguments
ROW_FUNCS = {
    "tail_mass": lambda x: topkattn.tail_mass(x, 2),
    "log_tail_mass": lambda x: topkattn.log_tail_mass(x, 2),
    "kl_truncated": lambda x: topkattn.kl_truncated(x, 2),
    "tv_curve": topkattn.tv_curve,
    "k_eps": lambda x: topkattn.k_eps(x, 0.05, return_tail=True),
    "topk": lambda x: topkattn.topk(x, 2),
    "gap_bound": lambda x: topkattn.gap_bound(x, 2),
    "gap_bound_gap": lambda x: topkattn.gap_bound(x, 2, form="gap"),
    "multigap_bound": lambda x: topkattn.multigap_bound(x, 2, cuts=3),
    "multigap_cuts": lambda x: topkattn.multigap_bound(x, 2, cuts=np.array([3, 4])),
    "entropy": topkattn.entropy,
    "effective_support": lambda x: topkattn.effective_support(x, 0.05),
    "fit_gaussian": topkattn.fit_gaussian,
}


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


def _assert_same(a, b, what):
    for u, v in zip(_as_tuple(a), _as_tuple(b)):
        assert np.asarray(u).dtype == np.asarray(v).dtype, what
        np.testing.assert_array_equal(u, v, err_msg=what)


# ------------------------------------------------------------------ batch shapes

@pytest.mark.parametrize("batch", [(), (5,), (2, 3), (2, 1, 3)])
@pytest.mark.parametrize("n", [1, 7, 130])
@pytest.mark.parametrize("dtype", FLOATS)
def test_batch_shapes_match_row_by_row(batch, n, dtype, rng):
    x = (3 * rng.standard_normal(batch + (n,))).astype(dtype)
    x[rng.random(x.shape) < 0.2] = -np.inf
    x[..., 0] = 1.0  # no fully masked row
    k = rng.integers(0, n + 1, batch)
    eps = rng.uniform(1e-6, 0.5, batch)
    thr = rng.uniform(1e-3, 0.5, batch)
    cases = {
        "tail_mass": (topkattn.tail_mass, (k,), ref.tail_mass),
        "log_tail_mass": (topkattn.log_tail_mass, (k,), ref.log_tail_mass),
        "kl_truncated": (topkattn.kl_truncated, (k,), ref.kl_truncated),
        "gap_bound": (topkattn.gap_bound, (k,), None),
        "multigap_bound": (topkattn.multigap_bound, (k,), None),
        "k_eps": (topkattn.k_eps, (eps,), ref.k_eps),
        "effective_support": (topkattn.effective_support, (thr,), None),
        "entropy": (topkattn.entropy, (), ref.entropy),
    }
    for name, (f, args, rf) in cases.items():
        got = f(x, *args)
        assert np.shape(got) == batch, f"{name}: shape {np.shape(got)} != {batch}"
        if batch == ():
            assert np.ndim(got) == 0 and isinstance(got, np.generic), name
        flat = x.reshape(-1, n)
        fargs = [np.reshape(a, -1) for a in args]
        rows = [f(flat[i], *[a[i] for a in fargs]) for i in range(flat.shape[0])]
        np.testing.assert_array_equal(np.reshape(got, -1), np.array(rows), err_msg=name)
        if rf is not None:
            assert_rel(got, rf(x, *args), rtol=1e-12, what=name)
    curve = topkattn.tv_curve(x)
    assert curve.shape == batch + (n + 1,)
    kk = min(3, n)
    idx = topkattn.topk(x, kk)
    assert idx.shape == batch + (kk,) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref.topk(x, kk))
    mu, sd = topkattn.fit_gaussian(x)
    assert np.shape(mu) == batch and np.shape(sd) == batch
    keps, tau = topkattn.k_eps(x, eps, return_tail=True)
    assert np.shape(keps) == batch and np.shape(tau) == batch


def test_parameters_broadcast_against_the_batch(rng):
    x = rng.standard_normal((2, 3, 50))
    for k in (np.array([1, 5, 9]), np.array([[4], [7]]), np.int64(3), 3.0, [[1, 2, 3], [4, 5, 6]]):
        full = np.broadcast_to(np.asarray(k, dtype=np.int64), (2, 3))
        for f in (topkattn.tail_mass, topkattn.kl_truncated, topkattn.gap_bound,
                  topkattn.multigap_bound):
            np.testing.assert_array_equal(f(x, k), f(x, full))
        assert_rel(topkattn.tail_mass(x, k), ref.tail_mass(x, full), rtol=1e-12)
    for eps in (np.array([0.01, 0.1, 0.5]), np.array([[1e-9], [0.2]]), 0.3):
        full = np.broadcast_to(np.asarray(eps), (2, 3))
        np.testing.assert_array_equal(topkattn.k_eps(x, eps), topkattn.k_eps(x, full))
        np.testing.assert_array_equal(topkattn.k_eps(x, eps), ref.k_eps(x, full))
    thr = np.array([[0.01], [0.2]])
    np.testing.assert_array_equal(topkattn.effective_support(x, thr),
                                  topkattn.effective_support(x, np.broadcast_to(thr, (2, 3))))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0, 5), (0, 0, 1)])
def test_empty_batches(shape):
    x = np.zeros(shape)
    b = shape[:-1]
    n = shape[-1]
    assert topkattn.tail_mass(x, 1).shape == b
    assert topkattn.log_tail_mass(x, 0).shape == b
    assert topkattn.kl_truncated(x, 1).shape == b
    assert topkattn.tv_curve(x).shape == b + (n + 1,)
    k, tau = topkattn.k_eps(x, 0.1, return_tail=True)
    assert k.shape == b and tau.shape == b and k.dtype == np.int64
    assert topkattn.topk(x, 1).shape == b + (1,)
    assert topkattn.gap_bound(x, 1).shape == b
    assert topkattn.multigap_bound(x, 1, cuts=2).shape == b
    assert topkattn.entropy(x).shape == b
    assert topkattn.effective_support(x, 0.5).shape == b
    mu, sd = topkattn.fit_gaussian(x)
    assert mu.shape == b and sd.shape == b
    assert topkattn.tail_mass(x, np.zeros(b, dtype=np.int64)).shape == b
    assert topkattn.block_bound(np.zeros(b + (4,)), [1, 2, 3, 4], 1.0, 2.0).shape == b


def test_lists_and_integer_lists_are_accepted():
    assert_rel(topkattn.tail_mass([0.0, 0.0, 0.0, 0.0], 1), 0.75, rtol=1e-15)
    assert_rel(topkattn.tail_mass([[3, 1], [2, 2]], 1), ref.tail_mass(np.array([[3.0, 1], [2, 2]]), 1))
    np.testing.assert_array_equal(topkattn.topk([1, 5, 3], 2), [1, 2])


# ---------------------------------------------------------------- strides, copies

def _views(rng, dtype):
    base = (3 * rng.standard_normal((6, 2 * 45 + 1))).astype(dtype)
    mask = rng.random(base.shape) < 0.1
    mask[:, ::3] = False  # every view keeps live keys
    base[mask] = -np.inf
    base3 = (3 * rng.standard_normal((4, 5, 137))).astype(dtype)
    return {
        "every-other": base[:, ::2],
        "reversed": base[:, ::-1],
        "reversed-rows-and-keys": base[::-1, ::-3],
        "transposed": np.ascontiguousarray(base.T).T,
        "transposed-view": base.T[:40].T,
        "fortran-3d": np.asfortranarray(base3),
        "swapped-3d": base3.transpose(2, 0, 1).transpose(1, 2, 0),
        "narrow-strided": base[:, 5:17:3],
        "offset-slice": base[1:5, 3:50],
        "readonly": np.array(base, copy=True),
    }


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("fname", list(ROW_FUNCS))
def test_any_strides_give_the_contiguous_result(dtype, fname, rng):
    f = ROW_FUNCS[fname]
    for vname, v in _views(rng, dtype).items():
        if vname == "readonly":
            v.flags.writeable = False
        if fname in ("topk", "multigap_cuts") and v.shape[-1] < 4:
            continue  # k = 2 and cuts up to 4 need that many keys
        snapshot = v.copy()
        got = f(v)
        contiguous = np.ascontiguousarray(v)
        _assert_same(got, f(contiguous), f"{fname} on {vname}")
        np.testing.assert_array_equal(v, snapshot, err_msg=f"{fname} modified {vname}")


def test_inputs_are_never_modified(rng):
    x = random_row(rng, 300, 4.0, mask_p=0.2).reshape(3, 100)
    k = np.array([1, 50, 99])
    eps = np.array([0.1, 1e-5, 0.5])
    thr = np.array([0.01, 0.02, 0.03])
    cuts = np.array([3, 10, 40])
    u, sizes = np.array([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]]), np.array([3, 4])
    a, z = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.5, 3.5])
    arrays = [x, k, eps, thr, cuts, u, sizes, a, z]
    before = [arr.copy() for arr in arrays]
    calls = [
        lambda: topkattn.tail_mass(x, k), lambda: topkattn.log_tail_mass(x, k),
        lambda: topkattn.kl_truncated(x, k), lambda: topkattn.tv_curve(x),
        lambda: topkattn.k_eps(x, eps, return_tail=True), lambda: topkattn.topk(x, 7),
        lambda: topkattn.gap_bound(x, k), lambda: topkattn.gap_bound(x, k, form="gap"),
        lambda: topkattn.multigap_bound(x, k, cuts=cuts), lambda: topkattn.multigap_bound(x, k),
        lambda: topkattn.entropy(x), lambda: topkattn.effective_support(x, thr),
        lambda: topkattn.fit_gaussian(x), lambda: topkattn.block_bound(u, sizes, a, z),
        lambda: topkattn.block_bound(u, sizes, np.log(a), np.log(z), log_space=True),
    ]
    for i, call in enumerate(calls):
        call()
        for arr, b in zip(arrays, before):
            np.testing.assert_array_equal(arr, b, err_msg=f"call {i} modified an input")


def test_big_endian_is_handled_or_refused(rng):
    x = rng.standard_normal((2, 20))
    xb = x.astype(">f8")
    try:
        got = topkattn.tail_mass(xb, 3)
    except TypeError as e:
        assert "logits" in str(e)
    else:
        np.testing.assert_array_equal(got, topkattn.tail_mass(x, 3))


# ----------------------------------------------------------------------- errors

def _with(value, where, shape=(3, 4)):
    x = np.zeros(shape)
    x[where] = value
    return x


@pytest.mark.parametrize("fname", list(ROW_FUNCS))
def test_nan_names_the_row(fname):
    f = ROW_FUNCS[fname]
    with pytest.raises(ValueError, match=r"logits contains NaN at batch index \(2,\)"):
        f(_with(np.nan, (2, 1)))
    with pytest.raises(ValueError, match=r"logits contains NaN at batch index \(1, 2\)"):
        f(_with(np.nan, (1, 2, 3), shape=(2, 3, 4)))
    with pytest.raises(ValueError, match=r"logits contains NaN"):
        f(np.array([0.0, np.nan, 1.0, 2.0], dtype=np.float32))


@pytest.mark.parametrize("fname", list(ROW_FUNCS))
def test_posinf_and_fully_masked_rows(fname):
    f = ROW_FUNCS[fname]
    with pytest.raises(ValueError, match=r"logits contains \+inf at batch index \(1,\)"):
        f(_with(np.inf, (1, 3)))
    x = np.zeros((3, 4))
    x[2] = -np.inf
    with pytest.raises(ValueError, match=r"logits has a fully masked row at batch index \(2,\)"):
        f(x)


def test_nan_reports_the_lowest_row_whatever_the_threads():
    x = np.zeros((64, 2048), dtype=np.float32)
    x[40, 7] = np.nan
    x[5, 100] = np.nan
    x[50, 3] = np.inf
    for t in (1, 2, 4):
        topkattn.set_num_threads(t)
        with pytest.raises(ValueError, match=r"NaN at batch index \(5,\)"):
            topkattn.tail_mass(x, 3)
        with pytest.raises(ValueError, match=r"NaN at batch index \(5,\)"):
            topkattn.k_eps(x, 0.1)


X34 = np.arange(12.0).reshape(3, 4)

ERROR_CASES = [
    # k
    ("k<0", lambda: topkattn.tail_mass(X34, -1), ValueError, r"k must be in \[0, n\]"),
    ("k>n", lambda: topkattn.kl_truncated(X34, 5), ValueError, r"k must be in \[0, n\]"),
    ("k>n-row", lambda: topkattn.gap_bound(X34, [1, 2, 5]), ValueError, r"k must be in \[0, n\]"),
    ("k-huge", lambda: topkattn.multigap_bound(X34, 2**62), ValueError, r"k must be in"),
    ("k-uint64", lambda: topkattn.tail_mass(X34, np.uint64(2**64 - 1)), ValueError, r"k must"),
    ("k-frac", lambda: topkattn.tail_mass(X34, 1.5), TypeError, r"k must be an integer"),
    ("k-nan", lambda: topkattn.log_tail_mass(X34, np.nan), TypeError, r"k must be an integer"),
    ("k-bool", lambda: topkattn.tail_mass(X34, True), TypeError, r"k must be an integer"),
    ("k-str", lambda: topkattn.tail_mass(X34, "2"), TypeError, r"k must be an integer"),
    ("k-shape", lambda: topkattn.tail_mass(X34, [1, 2]), ValueError, r"k with shape \(2,\)"),
    ("topk-k<0", lambda: topkattn.topk(X34, -1), ValueError, r"k must be in \[0, n\]"),
    ("topk-k>n", lambda: topkattn.topk(X34, 5), ValueError, r"k must be in \[0, n\]"),
    ("topk-k-float", lambda: topkattn.topk(X34, 2.0), TypeError, r"k must be an int"),
    ("topk-k-bool", lambda: topkattn.topk(X34, True), TypeError, r"k must be an int"),
    ("topk-k-array", lambda: topkattn.topk(X34, np.array([1, 2, 3])), TypeError, r"k must be an int"),
    # eps
    ("eps=0", lambda: topkattn.k_eps(X34, 0.0), ValueError, r"eps must be in the open interval"),
    ("eps=1", lambda: topkattn.k_eps(X34, 1.0), ValueError, r"eps must be in the open interval"),
    ("eps<0", lambda: topkattn.k_eps(X34, -0.2), ValueError, r"eps must be in the open interval"),
    ("eps>1", lambda: topkattn.k_eps(X34, 2.0), ValueError, r"eps must be in the open interval"),
    ("eps-nan", lambda: topkattn.k_eps(X34, np.nan), ValueError, r"eps must be in the open interval"),
    ("eps-one-bad", lambda: topkattn.k_eps(X34, [0.1, 0.0, 0.2]), ValueError, r"eps must be"),
    ("eps-shape", lambda: topkattn.k_eps(X34, [0.1, 0.2]), ValueError, r"eps with shape \(2,\)"),
    # dtype and shape of the logits
    ("int64", lambda: topkattn.tail_mass(np.arange(4), 1), TypeError, r"logits must be float32, float64 or float16, got int64"),
    ("int32", lambda: topkattn.k_eps(np.arange(4, dtype=np.int32), 0.1), TypeError, r"logits must be float32, float64 or float16"),
    ("bool", lambda: topkattn.entropy(np.ones(4, dtype=bool)), TypeError, r"logits must be float32, float64 or float16"),
    ("complex", lambda: topkattn.tv_curve(np.ones(4, dtype=complex)), TypeError, r"logits must be float32, float64 or float16"),
    ("object", lambda: topkattn.topk(np.array([1.0, 2.0], dtype=object), 1), TypeError, r"logits must be float32, float64 or float16"),
    ("longdouble", lambda: topkattn.gap_bound(np.ones(4, dtype=np.longdouble), 1), TypeError, r"logits must be float32, float64 or float16"),
    ("str", lambda: topkattn.fit_gaussian(np.array(["a", "b"])), TypeError, r"logits must be float32, float64 or float16"),
    ("empty-axis", lambda: topkattn.tail_mass(np.zeros((3, 0)), 0), ValueError, r"logits has an empty last axis"),
    ("empty-axis-tv", lambda: topkattn.tv_curve(np.zeros(0)), ValueError, r"logits has an empty last axis"),
    ("0-d", lambda: topkattn.tail_mass(np.float64(1.0), 0), ValueError, r"logits must have at least one axis"),
    ("0-d-array", lambda: topkattn.entropy(np.array(1.0)), ValueError, r"logits must have at least one axis"),
    # form, spacing, cuts
    ("form", lambda: topkattn.gap_bound(X34, 1, form="tight"), ValueError, r"form must be 'mass' or 'gap'"),
    ("spacing", lambda: topkattn.multigap_bound(X34, 1, spacing="log"), ValueError, r"spacing must be"),
    ("cuts=0", lambda: topkattn.multigap_bound(X34, 1, cuts=0), ValueError, r"cuts must be >= 1"),
    ("cuts<0", lambda: topkattn.multigap_bound(X34, 1, cuts=-4), ValueError, r"cuts must be >= 1"),
    ("cuts-order", lambda: topkattn.multigap_bound(X34, 1, cuts=[3, 2]), ValueError, r"cuts must be strictly increasing"),
    ("cuts-dup", lambda: topkattn.multigap_bound(X34, 1, cuts=[2, 2]), ValueError, r"cuts must be strictly increasing"),
    ("cuts-0", lambda: topkattn.multigap_bound(X34, 1, cuts=[0, 2]), ValueError, r"cuts must be .*\[1, n\]"),
    ("cuts>n", lambda: topkattn.multigap_bound(X34, 1, cuts=[2, 5]), ValueError, r"cuts must be .*\[1, n\]"),
    ("cuts-float", lambda: topkattn.multigap_bound(X34, 1, cuts=2.5), TypeError, r"cuts must be an int"),
    ("cuts-float-array", lambda: topkattn.multigap_bound(X34, 1, cuts=np.array([1.0, 2.0])), TypeError, r"cuts must be"),
    ("cuts-bool", lambda: topkattn.multigap_bound(X34, 1, cuts=True), TypeError, r"cuts must be"),
    ("cuts-2d", lambda: topkattn.multigap_bound(X34, 1, cuts=[[1, 2]]), ValueError, r"cuts must be .*1-D"),
    # threshold
    ("thr=0", lambda: topkattn.effective_support(X34, 0.0), ValueError, r"threshold must be in \(0, 1\]"),
    ("thr<0", lambda: topkattn.effective_support(X34, -0.5), ValueError, r"threshold must be in \(0, 1\]"),
    ("thr>1", lambda: topkattn.effective_support(X34, 1.5), ValueError, r"threshold must be in \(0, 1\]"),
    ("thr-nan", lambda: topkattn.effective_support(X34, np.nan), ValueError, r"threshold must be in \(0, 1\]"),
    ("thr-shape", lambda: topkattn.effective_support(X34, [0.1, 0.2]), ValueError, r"threshold with shape"),
    # block bound
    ("kept>scored", lambda: topkattn.block_bound([0.0], [3], 10.0, 5.0), ValueError, r"kept_mass must not exceed scored_mass"),
    ("kept>scored-log", lambda: topkattn.block_bound([0.0], [3], 2.0, 1.0, log_space=True), ValueError, r"kept_mass must not exceed"),
    ("kept<0", lambda: topkattn.block_bound([0.0], [3], -1.0, 5.0), ValueError, r"kept_mass must be >= 0"),
    ("scored=0", lambda: topkattn.block_bound([0.0], [3], 0.0, 0.0), ValueError, r"scored_mass > 0"),
    ("kept-nan", lambda: topkattn.block_bound([0.0], [3], np.nan, 5.0), ValueError, r"kept_mass"),
    ("kept-nan-log", lambda: topkattn.block_bound([0.0], [3], np.nan, 5.0, log_space=True), ValueError, r"kept_mass and scored_mass must not be NaN"),
    ("all-zero-log", lambda: topkattn.block_bound([-np.inf], [0], -np.inf, -np.inf, log_space=True), ValueError, r"scored_mass"),
    ("sizes<0", lambda: topkattn.block_bound([0.0, 1.0], [3, -1], 1.0, 5.0), ValueError, r"block_sizes must be >= 0"),
    ("sizes-float", lambda: topkattn.block_bound([0.0], [2.5], 1.0, 5.0), TypeError, r"block_sizes must be integers"),
    ("sizes-shape", lambda: topkattn.block_bound([0.0, 1.0], [1, 2, 3], 1.0, 5.0), ValueError, r"block_sizes"),
    ("upper-nan", lambda: topkattn.block_bound([np.nan], [3], 1.0, 5.0), ValueError, r"block_upper must not contain NaN"),
    ("upper-inf", lambda: topkattn.block_bound([np.inf], [3], 1.0, 5.0), ValueError, r"block_upper must not contain NaN or \+inf"),
    ("upper-0d", lambda: topkattn.block_bound(1.0, [3], 1.0, 5.0), ValueError, r"block_upper must have a last axis"),
    ("mass-shape", lambda: topkattn.block_bound(np.zeros((2, 3)), [1, 1, 1], [1.0, 1.0, 1.0], 5.0), ValueError, r"kept_mass with shape"),
]


@pytest.mark.parametrize("name,call,exc,match", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_is_refused_clearly(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_valid_edge_values_are_accepted():
    x = np.array([[1.0, 2.0, 3.0]])
    assert topkattn.effective_support(x, 1.0)[0] == 0  # threshold 1 is allowed
    assert topkattn.tail_mass(x, 3.0)[0] == 0.0  # integral floats are integers
    assert topkattn.tail_mass(x, np.int8(0))[0] == 1.0
    assert topkattn.topk(x, np.int32(3)).tolist() == [[2, 1, 0]]
    assert topkattn.k_eps(x, np.nextafter(0.0, 1.0))[0] == 3
    assert topkattn.k_eps(x, np.nextafter(1.0, 0.0))[0] == 1
    np.testing.assert_array_equal(topkattn.topk(np.array([1.0]), 1), [0])


# ------------------------------------------------------------------- docstrings

@pytest.mark.parametrize("module", [topkattn.core, topkattn])
def test_docstring_examples(module):
    result = doctest.testmod(module, verbose=False, report=True)
    assert result.attempted > 0, f"no examples found in {module.__name__}"
    assert result.failed == 0, f"{result.failed} docstring examples failed in {module.__name__}"


def test_core_exports_its_numbers():
    """Statuses, attention modes, search summaries and methods come from the C core, so the
    Python layer never restates them."""
    from topkattn import _core
    statuses = {k: v for k, v in vars(_core).items() if k.startswith("STATUS_")}
    assert statuses["STATUS_OK"] == 0 and len(set(statuses.values())) == len(statuses)
    for name in ("ERR_NAN", "ERR_POSINF", "ERR_ALL_MASKED", "ERR_NOMEM", "ERR_ARG",
                 "ERR_INTERNAL", "ERR_CUDA"):
        assert "STATUS_" + name in statuses
    assert len({_core.MODE_DENSE, _core.MODE_TOPK, _core.MODE_ROW_ERROR}) == 3
    assert _core.SUMMARY_MINMAX & _core.SUMMARY_BALL == 0
    assert _core.METHOD_DELTA != _core.METHOD_MC
