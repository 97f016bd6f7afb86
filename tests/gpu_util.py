"""Skip helper for GPU tests: skip with the reason when CUDA cannot run."""

import functools

import pytest


@functools.lru_cache(maxsize=None)
def _probe():
    from kgpu_helper.services import cuda_available
    return cuda_available()


def require_cuda():
    """Skip the calling test (with the reason) unless the cupy backend runs."""
    ok, why = _probe()
    if not ok:
        pytest.skip(f"no usable CUDA: {why}")


@pytest.fixture(scope="session")
def gpu_backend():
    require_cuda()
    from kgpu_helper.services import get_backend
    return get_backend("cupy")
