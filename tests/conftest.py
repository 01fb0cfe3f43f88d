"""Shared fixtures: every SIMD path this machine runs, thread-count and SIMD restoration,
and the hypothesis profile (bounded, no example database written to disk)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import topkattn

settings.register_profile(
    "topkattn",
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("topkattn")

SIMD_SUPPORTED = topkattn.build_info()["simd_supported"]


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Every test leaves the SIMD path and the thread count as it found them."""
    simd = topkattn.get_simd()
    threads = topkattn.get_num_threads()
    yield
    topkattn.set_simd(simd)
    topkattn.set_num_threads(threads)


@pytest.fixture(params=SIMD_SUPPORTED)
def simd_path(request):
    """Each kernel set this build has and this CPU runs, made active for the test."""
    topkattn.set_simd(request.param)
    assert topkattn.get_simd() == request.param
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)
