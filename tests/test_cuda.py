"""The optional CUDA core: GPU results against the CPU core on the same inputs, and the
dispatch, opt-in and build logic (these run everywhere).

GPU tests need torch with a visible CUDA device and the topkattn._cuda extension; they skip
otherwise. They switch on the unverified CUDA path (TOPKATTN_CUDA_UNVERIFIED=1) for their
own duration only.
"""
import importlib.util
import os
import shutil
import subprocess

import numpy as np
import pytest

import topkattn
from topkattn import _gpu

from _util import assert_rel, check_keps_minimal, exact_curve, zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import torch
    HAVE_CUDA = torch.cuda.is_available()
except ImportError:
    torch = None
    HAVE_CUDA = False

gpu = pytest.mark.skipif(not (HAVE_CUDA and _gpu._cuda is not None),
                         reason="needs a visible CUDA device, torch and topkattn._cuda")


# ----------------------------------------------------------------- CPU-only: dispatch

class FakeCudaArray:
    """Claims to live on CUDA device 0 through DLPack; holds no data."""
    shape = (4,)

    def __dlpack_device__(self):
        return (2, 0)


class FakeCaiArray:
    shape = (4,)
    __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_detection_is_cheap_and_exact():
    assert not _gpu.is_gpu_array(np.zeros(3))
    assert not _gpu.is_gpu_array(np.float64(1.0))
    assert not _gpu.is_gpu_array([1.0, 2.0])
    assert not _gpu.is_gpu_array(None)
    assert _gpu.is_gpu_array(FakeCudaArray())
    assert _gpu.is_gpu_array(FakeCaiArray())
    if torch is not None:
        assert not _gpu.is_gpu_array(torch.zeros(3))
    assert _gpu.any_gpu(np.zeros(2), FakeCudaArray())
    assert not _gpu.any_gpu(np.zeros(2), [1.0])


def test_cpu_dlpack_device_is_not_gpu():
    class CpuDl:
        def __dlpack_device__(self):
            return (1, 0)
    assert not _gpu.is_gpu_array(CpuDl())


@pytest.mark.parametrize("call", [
    lambda x: topkattn.tail_mass(x, 1),
    lambda x: topkattn.log_tail_mass(x, 1),
    lambda x: topkattn.k_eps(x, 0.1),
    lambda x: topkattn.topk(x, 1),
    lambda x: topkattn.topk_attention(x, x, x, k=1),
])
def test_gpu_arrays_refused_without_opt_in(call, monkeypatch):
    monkeypatch.delenv(_gpu.ENV_OPT_IN, raising=False)
    with pytest.raises(TypeError) as exc:
        call(FakeCudaArray())
    msg = str(exc.value)
    assert "GPU array" in msg and ".cpu()" in msg
    if _gpu._cuda is not None:
        assert "not yet verified" in msg and _gpu.ENV_OPT_IN + "=1" in msg
    else:
        assert "without its CUDA core" in msg


def test_opt_in_dispatches_to_the_gpu_module(monkeypatch):
    """With the opt-in, GPU arrays reach _gpu; NumPy inputs never do."""
    calls = []
    for name in ("tail_mass", "log_tail_mass", "k_eps", "topk", "topk_attention"):
        monkeypatch.setattr(_gpu, name, lambda *a, _n=name, **kw: calls.append(_n) or _n)
    monkeypatch.setenv(_gpu.ENV_OPT_IN, "1")
    x = FakeCudaArray()
    assert topkattn.tail_mass(x, 1) == "tail_mass"
    assert topkattn.log_tail_mass(x, 1) == "log_tail_mass"
    assert topkattn.k_eps(x, 0.1) == "k_eps"
    assert topkattn.topk(x, 1) == "topk"
    assert topkattn.topk_attention(np.zeros((1, 2)), x, x, k=1) == "topk_attention"
    assert calls == ["tail_mass", "log_tail_mass", "k_eps", "topk", "topk_attention"]
    row = np.array([0.0, 1.0, 2.0])
    assert int(topkattn.k_eps(row, 0.5)) == 1
    assert float(topkattn.tail_mass(row, 3)) == 0.0
    assert len(calls) == 5


def test_opt_in_value_must_be_exactly_one(monkeypatch):
    for value in ("0", "yes", "true", ""):
        monkeypatch.setenv(_gpu.ENV_OPT_IN, value)
        assert not _gpu.cuda_enabled()
        with pytest.raises(TypeError):
            topkattn.k_eps(FakeCudaArray(), 0.1)


def test_mixed_cpu_and_gpu_operands_are_refused(monkeypatch):
    monkeypatch.setenv(_gpu.ENV_OPT_IN, "1")
    with pytest.raises(TypeError, match="Q must be a GPU array"):
        topkattn.topk_attention(np.zeros((1, 2)), FakeCudaArray(), FakeCudaArray(), k=1)


def test_info_reports_build_and_device():
    info = _gpu.info()
    assert info["built"] == (_gpu._cuda is not None)
    assert info["verified"] is False
    if not info["built"]:
        assert info["devices"] == 0 and info["device"] is None
    elif HAVE_CUDA:
        assert info["devices"] >= 1 and "sm_" in info["device"]
    else:
        assert info["devices"] == 0 and info["error"]


@pytest.mark.parametrize("bshape,shape", [
    ((2, 3), (2, 3)), ((2, 3), (3,)), ((2, 3), (1, 3)), ((2, 3), (2, 1)), ((2, 3), ()),
    ((4,), (4,)), ((), ()), ((2, 1, 5), (5,)),
])
def test_batch_offsets_match_numpy_broadcasting(bshape, shape):
    """The per-batch element offsets address the same elements as np.broadcast_to."""
    base = np.arange(int(np.prod(shape + (3, 2), dtype=np.int64)), dtype=np.float64)
    a = base.reshape(shape + (3, 2))[..., ::1, :]
    strides = tuple(s // a.itemsize for s in a.strides[:-2])
    off = _gpu._batch_offsets(shape, strides, bshape)
    want = np.broadcast_to(a, bshape + (3, 2)).reshape(-1, 3, 2)[:, 0, 0]
    assert np.array_equal(base[off], want)


def test_batch_offsets_of_strided_views():
    base = np.arange(6 * 5 * 3 * 2, dtype=np.float64).reshape(6, 5, 3, 2)
    a = base[::2, ::-2]  # positive and negative batch strides
    strides = tuple(s // a.itemsize for s in a.strides[:-2])
    first = (a.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // 8
    off = first + _gpu._batch_offsets(a.shape[:-2], strides, a.shape[:-2])
    assert np.array_equal(base.reshape(-1)[off], a.reshape(-1, 3, 2)[:, 0, 0])


def test_row_labels():
    """Both cores label a bad row through the same C formatter (csrc/pyerr.c)."""
    x = np.zeros((2, 3, 4))
    x[1, 2, 0] = np.nan
    with pytest.raises(ValueError) as exc:
        topkattn.tail_mass(x, 1)
    assert str(exc.value) == "logits contains NaN at batch index (1, 2)"
    y = np.zeros((3, 4))
    y[2, 1] = np.inf
    with pytest.raises(ValueError) as exc:
        topkattn.k_eps(y, 0.1)
    assert str(exc.value) == "logits contains +inf at batch index (2,) (use -inf for masked keys)"
    z = np.zeros(4)
    z[0] = np.nan
    with pytest.raises(ValueError) as exc:
        topkattn.tail_mass(z, 1)
    assert str(exc.value) == "logits contains NaN"


# ----------------------------------------------------------------- CPU-only: the build

def _load_setup():
    spec = importlib.util.spec_from_file_location("topkattn_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the build runs only under __main__
    return mod


def test_cuda_mode_values():
    s = _load_setup()
    assert s.cuda_mode({}) == "auto"
    assert s.cuda_mode({"TOPKATTN_CUDA": "AUTO"}) == "auto"
    assert s.cuda_mode({"TOPKATTN_CUDA": "0"}) == "0"
    assert s.cuda_mode({"TOPKATTN_CUDA": "1"}) == "1"
    with pytest.raises(ValueError, match="TOPKATTN_CUDA"):
        s.cuda_mode({"TOPKATTN_CUDA": "sometimes"})


def test_want_cuda_decisions():
    s = _load_setup()
    found = lambda env: "/opt/cuda/bin/nvcc"  # noqa: E731
    missing = lambda env: None  # noqa: E731
    assert s.want_cuda({}, found) == (True, "/opt/cuda/bin/nvcc", None)
    build, nvcc, warning = s.want_cuda({}, missing)
    assert not build and nvcc is None and "nvcc not found" in warning
    assert s.want_cuda({"TOPKATTN_CUDA": "0"}, found) == (False, None, None)
    assert s.want_cuda({"TOPKATTN_CUDA": "1"}, found)[0]
    with pytest.raises(RuntimeError, match="TOPKATTN_CUDA=1 but nvcc was not found"):
        s.want_cuda({"TOPKATTN_CUDA": "1"}, missing)


def test_find_nvcc_order(tmp_path):
    s = _load_setup()
    home, onpath = tmp_path / "home", tmp_path / "path"
    for d in (home / "bin", onpath):
        d.mkdir(parents=True)
        f = d / "nvcc"
        f.write_text("#!/bin/sh\n")
        f.chmod(0o755)
    assert s.find_nvcc({"CUDA_HOME": str(home), "PATH": str(onpath)}) == str(home / "bin" / "nvcc")
    assert s.find_nvcc({"PATH": str(onpath)}) == str(onpath / "nvcc")
    empty = tmp_path / "empty"
    empty.mkdir()
    got = s.find_nvcc({"PATH": str(empty)})
    assert got in (None, "/usr/local/cuda/bin/nvcc")


def test_gencode_list_is_short_and_explicit():
    s = _load_setup()
    joined = " ".join(s.CUDA_GENCODE)
    assert "code=sm_80" in joined and "code=sm_90" in joined
    assert len(s.CUDA_GENCODE) <= 4
    assert not any("native" in g or "all" in g for g in s.CUDA_GENCODE)


def _needed_libs(path):
    if not shutil.which("ldd"):
        pytest.skip("ldd not available")
    return subprocess.run(["ldd", path], capture_output=True, text=True, check=False).stdout


def test_cpu_extension_never_links_the_cuda_runtime():
    libs = _needed_libs(topkattn._core.__file__)
    assert "cuda" not in libs.lower()


@pytest.mark.skipif(_gpu._cuda is None, reason="topkattn._cuda not built")
def test_cuda_extension_needs_no_shared_cuda_runtime():
    """The runtime is linked statically: only the driver is needed where it runs."""
    libs = _needed_libs(_gpu._cuda.__file__)
    assert "libcudart" not in libs


# ----------------------------------------------------------------- GPU against CPU

@pytest.fixture
def cuda_on(monkeypatch):
    monkeypatch.setenv(_gpu.ENV_OPT_IN, "1")


def _dev(a, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(a)).cuda()
    return t if dtype is None else t.to(dtype)


def _np(t):
    return t.detach().float().cpu().numpy() if t.dtype in (torch.bfloat16, torch.float16) \
        else t.detach().cpu().numpy()


GPU_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16] if torch else []


def _rows_for(rng, dtype):
    """zoo rows in the GPU dtype, and the exactly representable float64 twins for the CPU."""
    out = []
    for name, row in zoo(rng, np.float64):
        t = _dev(row, dtype)
        out.append((name, t, _np(t).astype(np.float64)))
    return out


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_tail_mass_matches_cpu(dtype, rng, cuda_on):
    for name, t, row in _rows_for(rng, dtype):
        n = row.shape[0]
        ks = np.array(sorted({0, 1, 2, n // 3, n // 2, n - 1, n} & set(range(n + 1))))
        lt_gpu = topkattn.log_tail_mass(t.expand(len(ks), n), torch.from_numpy(ks).cuda())
        assert lt_gpu.is_cuda and lt_gpu.dtype == torch.float64
        lt_cpu = topkattn.log_tail_mass(np.broadcast_to(row, (len(ks), n)), ks)
        assert_rel(lt_gpu.cpu().numpy(), lt_cpu, rtol=1e-9, atol=1e-12, what=f"{name} {dtype}")
        tau = topkattn.tail_mass(t, int(ks[len(ks) // 2]))
        assert_rel(tau.cpu().numpy(), topkattn.tail_mass(row, int(ks[len(ks) // 2])), rtol=1e-9,
                   atol=1e-15, what=name)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_k_eps_matches_cpu(dtype, rng, cuda_on):
    for name, t, row in _rows_for(rng, dtype):
        for eps in (0.5, 1e-2, 1e-6, 1e-300):
            k_gpu, tau_gpu = topkattn.k_eps(t, eps, return_tail=True)
            k_cpu, tau_cpu = topkattn.k_eps(row, eps, return_tail=True)
            if int(k_gpu) != int(k_cpu):  # only an exact boundary tie may round either way
                check_keps_minimal(exact_curve(row), eps, int(k_gpu), what=f"{name} eps={eps}")
            else:
                assert_rel(float(tau_gpu), float(tau_cpu), rtol=1e-9, atol=1e-300, what=name)
            assert float(tau_gpu) <= eps


@gpu
def test_k_eps_long_rows_and_batches(rng, cuda_on):
    x = (3.0 * rng.standard_normal((3, 1 << 20))).astype(np.float32)
    x[1, ::7] = -np.inf
    eps = np.array([1e-1, 1e-3, 1e-8])
    k_gpu = topkattn.k_eps(_dev(x), torch.from_numpy(eps).cuda())
    assert np.array_equal(k_gpu.cpu().numpy(), topkattn.k_eps(x, eps))


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_topk_matches_cpu(dtype, rng, cuda_on):
    for name, t, row in _rows_for(rng, dtype):
        n = row.shape[0]
        for k in sorted({0, 1, 2, n // 2, n}):
            got = topkattn.topk(t, k)
            assert got.dtype == torch.int64 and tuple(got.shape) == (k,)
            assert np.array_equal(got.cpu().numpy(), topkattn.topk(row, k)), f"{name} k={k}"


@gpu
def test_strided_and_batched_inputs(rng, cuda_on):
    base = (2.0 * rng.standard_normal((4, 300, 6))).astype(np.float32)
    base[:, ::5] = 1.0  # ties
    t = _dev(base).transpose(1, 2)  # (4, 6, 300) with element stride 6
    x = base.transpose(0, 2, 1)
    assert np.array_equal(topkattn.topk(t, 17).cpu().numpy(), topkattn.topk(x, 17))
    assert np.array_equal(topkattn.k_eps(t, 0.05).cpu().numpy(), topkattn.k_eps(x, 0.05))
    assert_rel(topkattn.log_tail_mass(t, 40).cpu().numpy(), topkattn.log_tail_mass(x, 40),
               rtol=1e-9, atol=1e-12)
    # a 2-D view whose elements are 6 apart: used in place, no copy
    t2, x2 = _dev(base[0]).T, base[0].T
    assert t2.stride() == (1, 6)
    assert np.array_equal(topkattn.topk(t2, 9).cpu().numpy(), topkattn.topk(x2, 9))
    assert np.array_equal(topkattn.k_eps(t2, 1e-4).cpu().numpy(), topkattn.k_eps(x2, 1e-4))


@gpu
def test_bad_rows_raise_like_the_cpu_core(cuda_on):
    x = np.zeros((2, 3, 8), dtype=np.float32)
    x[1, 1, 3] = np.nan
    x[1, 2, 0] = np.inf
    x[0, 2, :] = -np.inf
    for fn in (lambda a: topkattn.tail_mass(a, 2), lambda a: topkattn.k_eps(a, 0.1),
               lambda a: topkattn.topk(a, 2)):
        with pytest.raises(ValueError) as cpu_err:
            fn(x)
        with pytest.raises(ValueError) as gpu_err:
            fn(_dev(x))
        assert str(gpu_err.value) == str(cpu_err.value)


@gpu
def test_results_stay_on_the_callers_stream_and_inputs_unchanged(rng, cuda_on):
    x = _dev(rng.standard_normal((8, 1000)).astype(np.float32))
    before = x.clone()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        k = topkattn.k_eps(x, 0.01)
    s.synchronize()
    assert torch.equal(x, before)
    assert np.array_equal(k.cpu().numpy(), topkattn.k_eps(x.cpu().numpy(), 0.01))


def _grid(rng, shape, lo=-3, hi=3):
    """Values on a coarse grid: float32 scores are then exact, so CPU and GPU keep the same
    sets (ties included) and differ only by the rounding of the weighted sums."""
    return (rng.integers(lo, hi + 1, shape) * 0.25).astype(np.float32)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("sel", [{"k": 1}, {"k": 7}, {"ratio": 0.1}, {"eps": 1e-2}, {"eps": 0.3}])
def test_topk_attention_matches_cpu(dtype, sel, rng, cuda_on):
    Q, K, V = _grid(rng, (2, 3, 5, 16)), _grid(rng, (2, 1, 300, 16)), _grid(rng, (2, 1, 300, 12))
    mask = np.where(rng.random((5, 300)) < 0.2, -np.inf, 0.0)
    for m in (None, mask):
        out, info = topkattn.topk_attention(_dev(Q, dtype), _dev(K, dtype), _dev(V, dtype),
                                            scale=0.25, mask=m, return_info=True, **sel)
        ref, rinfo = topkattn.topk_attention(Q.astype(np.float64), K.astype(np.float64),
                                             V.astype(np.float64), scale=0.25, mask=m,
                                             return_info=True, **sel)
        assert out.dtype == dtype and tuple(out.shape) == ref.shape
        assert np.array_equal(info.k.cpu().numpy(), rinfo.k)
        assert np.array_equal(info.indices.cpu().numpy(), rinfo.indices)
        assert_rel(info.tau.cpu().numpy(), rinfo.tau, rtol=1e-5, atol=1e-12)
        tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3,
               torch.bfloat16: 1e-2}[dtype]
        assert_rel(_np(out), ref, rtol=tol, atol=tol)


@gpu
def test_topk_attention_decode_long(rng, cuda_on):
    Q, K, V = _grid(rng, (4, 1, 64)), _grid(rng, (4, 50_000, 64)), _grid(rng, (4, 50_000, 64))
    out = topkattn.topk_attention(_dev(Q), _dev(K), _dev(V), k=500, scale=0.125)
    ref = topkattn.topk_attention(Q, K, V, k=500, scale=0.125)
    assert_rel(out.cpu().numpy(), ref, rtol=1e-4, atol=1e-5)


@gpu
def test_topk_attention_errors(rng, cuda_on):
    Q, K, V = _grid(rng, (3, 8)), _grid(rng, (20, 8)), _grid(rng, (20, 4))
    mask = np.zeros((3, 20))
    mask[1] = -np.inf
    with pytest.raises(ValueError, match="masks every key") as gpu_err:
        topkattn.topk_attention(_dev(Q), _dev(K), _dev(V), k=2, mask=mask)
    with pytest.raises(ValueError) as cpu_err:
        topkattn.topk_attention(Q, K, V, k=2, mask=mask)
    assert str(gpu_err.value) == str(cpu_err.value)
    with pytest.raises(TypeError, match="one dtype"):
        topkattn.topk_attention(_dev(Q), _dev(K).double(), _dev(V), k=2)
    with pytest.raises(ValueError, match=r"k must be in \[1, n\]"):
        topkattn.topk_attention(_dev(Q), _dev(K), _dev(V), k=21)


@gpu
def test_build_info_sees_the_device():
    info = _gpu.info()
    assert info["built"] and info["devices"] >= 1
    assert torch.cuda.get_device_name(0) in info["device"]


# ----------------------------------------------------------------- CPU-only: the kernels' logic
#
# csrc/cuda/emu runs the row kernels (tail mass, k_eps, Top-k, the attention row kernel) on
# the host, one emulated block of 64 threads per row (fibers, barriers, warp shuffles through
# a buffer). This checks their selection logic, index arithmetic and synchronisation points
# against the CPU core where no GPU exists; it says nothing about the GPU itself.

# 64 threads keep the suite fast; TOPKATTN_EMU_NT=512 runs the block size the GPU uses
EMU_NT = int(os.environ.get("TOPKATTN_EMU_NT", "64"))
NO_STATUS = np.uint64(2**64 - 1)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    import ctypes
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not available for the host emulation of the kernels")
    out = str(tmp_path_factory.mktemp("emu") / "emu.so")
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", f"-DTKC_NT={EMU_NT}",
           "-I", os.path.join(ROOT, "csrc", "cuda"),
           os.path.join(ROOT, "csrc", "cuda", "emu", "emu.cpp"), "-o", out]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0 and "c++20" in res.stderr.lower():
        pytest.skip("the host emulation needs a C++20 compiler")
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(out)
    assert lib.emu_threads() == EMU_NT
    return lib


def _emu_call(lib, fn, x, *rest):
    import ctypes
    x2 = x.reshape(-1, x.shape[-1])
    status = np.full(1, NO_STATUS, dtype=np.uint64)
    getattr(lib, fn)(ctypes.c_int(0 if x2.dtype == np.float32 else 1), _ptr(x2),
                     ctypes.c_int64(x2.shape[0]), ctypes.c_int64(x2.shape[1]),
                     ctypes.c_int64(x2.strides[0]), ctypes.c_int64(x2.strides[1]),
                     *rest, _ptr(status))
    return int(status[0])


def _ptr(a):
    import ctypes
    return ctypes.c_void_p(a.ctypes.data) if a is not None else None


def _emu_rows(rng, dtype):
    keep = ("normal-1", "normal-2", "normal-33", "normal-129", "ties-130", "masked-130",
            "ties-masked-130", "sorted-130", "tiny-spread-130", "big-spread-130",
            "all-equal-130", "one-live-300", "ties-2000")
    return [(name, row) for name, row in zoo(rng, dtype) if name in keep]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_k_eps_matches_cpu(emu, dtype, rng):
    for name, row in _emu_rows(rng, dtype):
        for eps in (0.3, 1e-3) + ((1e-300,) if dtype == np.float64 else ()):
            e, k, tau = np.array([eps]), np.zeros(1, np.int64), np.zeros(1)
            assert _emu_call(emu, "emu_keps", row, _ptr(e), _ptr(k), _ptr(tau)) == NO_STATUS
            k_cpu, tau_cpu = topkattn.k_eps(row, eps, return_tail=True)
            if k[0] != k_cpu:
                check_keps_minimal(exact_curve(row), eps, int(k[0]), what=f"{name} eps={eps}")
            else:
                assert_rel(tau[0], tau_cpu, rtol=1e-9, atol=1e-300, what=f"{name} eps={eps}")
            assert tau[0] <= eps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_tail_mass_matches_cpu(emu, dtype, rng):
    for name, row in _emu_rows(rng, dtype):
        n = row.shape[0]
        ks = np.array(sorted({0, 1, n // 3, n - 1, n} & set(range(n + 1))), dtype=np.int64)
        x = np.ascontiguousarray(np.broadcast_to(row, (len(ks), n)))
        lt, kl = np.zeros(len(ks)), np.zeros(len(ks))
        assert _emu_call(emu, "emu_tail", x, _ptr(ks), _ptr(lt), _ptr(kl)) == NO_STATUS
        assert_rel(lt, topkattn.log_tail_mass(x, ks), rtol=1e-9, atol=1e-12, what=name)
        assert_rel(kl, topkattn.kl_truncated(x, ks), rtol=1e-9, atol=1e-12, what=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_topk_matches_cpu(emu, dtype, rng):
    import ctypes
    for name, row in _emu_rows(rng, dtype):
        n = row.shape[0]
        for k in sorted({1, n // 2, n}):
            idx = np.full(k, -7, dtype=np.int64)
            assert _emu_call(emu, "emu_topk", row, ctypes.c_int64(k), _ptr(idx)) == NO_STATUS
            assert np.array_equal(idx, topkattn.topk(row, k)), f"{name} k={k}"


def test_emulated_strided_rows_and_bad_rows(emu, rng):
    import ctypes
    base = rng.standard_normal((200, 3))
    x = base.T  # rows 8 bytes * 3 apart
    k = np.zeros(3, np.int64)
    e = np.full(3, 0.01)
    assert _emu_call(emu, "emu_keps", x, _ptr(e), _ptr(k), None) == NO_STATUS
    assert np.array_equal(k, topkattn.k_eps(x, 0.01))
    bad = np.zeros((4, 50))
    bad[3, 7] = np.nan
    bad[2, 9] = np.inf
    bad[2, 3] = np.nan  # the first bad element of the row decides its code
    bad[1, :] = -np.inf
    e4, k4, idx = np.full(4, 0.01), np.zeros(4, np.int64), np.zeros(6, np.int64)
    status = _emu_call(emu, "emu_keps", bad, _ptr(e4), _ptr(k4), None)
    assert status == (1 << 4) | 3  # the lowest bad row: row 1, fully masked
    status = _emu_call(emu, "emu_topk", bad[2:], ctypes.c_int64(3), _ptr(idx))
    assert status == (0 << 4) | 1  # row 2 (0 here): NaN comes before +inf


@pytest.mark.parametrize("sel", ["k", "eps"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_attention_rows_match_cpu(emu, sel, dtype, rng):
    """The attention row kernel on exact (grid) scores: kept sets, k, tau and outputs."""
    import ctypes
    batch, L, n, d, dv = 2, 3, 150, 8, 70  # dv spans two 64-wide output tiles
    Q, K, V = _grid(rng, (batch, L, d)), _grid(rng, (batch, n, d)), _grid(rng, (batch, n, dv))
    mask = np.where(rng.random((L, n)) < 0.3, -np.inf, 0.0)
    scores = (np.einsum("bld,bnd->bln", Q.astype(np.float64), K.astype(np.float64)) * 0.5
              + mask).astype(dtype)
    rows = batch * L
    kreq = np.array([1, 5, 40, 150, 2, 77], dtype=np.int64) if sel == "k" else None
    eps = np.array([0.5, 1e-2, 1e-4, 0.2, 1e-6, 3e-2]) if sel == "eps" else None
    W = n if sel == "eps" else int(kreq.max())
    idx = np.zeros((rows, W), dtype=np.int64)
    out = np.zeros((rows, dv), dtype=dtype)
    k_out, tau = np.zeros(rows, np.int64), np.zeros(rows)
    Vd = V.astype(dtype)
    v_off = np.arange(batch, dtype=np.int64) * n * dv
    status = np.full(1, NO_STATUS, dtype=np.uint64)
    emu.emu_attn_rows(ctypes.c_int(0 if dtype == np.float32 else 1), _ptr(scores),
                      ctypes.c_int64(batch), ctypes.c_int64(L), ctypes.c_int64(n), _ptr(Vd),
                      _ptr(v_off), ctypes.c_int64(dv), _ptr(kreq), _ptr(eps), _ptr(idx),
                      ctypes.c_int64(W), _ptr(out), _ptr(k_out), _ptr(tau), _ptr(status))
    assert int(status[0]) == NO_STATUS
    kw = {"k": kreq.reshape(batch, L)} if sel == "k" else {"eps": eps.reshape(batch, L)}
    ref, info = topkattn.topk_attention(Q.astype(np.float64), K.astype(np.float64),
                                        V.astype(np.float64), scale=0.5, mask=mask,
                                        return_info=True, **kw)
    assert np.array_equal(k_out, info.k.reshape(-1))
    kmax = info.indices.shape[-1]
    assert np.array_equal(idx[:, :kmax], info.indices.reshape(rows, kmax))
    assert (idx[:, kmax:] == -1).all() if kmax < W else True
    assert_rel(tau, info.tau.reshape(-1), rtol=1e-5, atol=1e-12)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert_rel(out, ref.reshape(rows, dv), rtol=tol, atol=tol)
