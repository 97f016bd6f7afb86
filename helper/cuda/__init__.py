"""CUDA sources (.cu) and the one loader that compiles and caches them.

    from kgpu_helper.cuda import get_kernel
    kern = get_kernel("xts", "xts_encrypt")          # xts.cu
    kern = get_kernel("raid6", "raid6_gen_k8", RAID6_K=8)

Each ``.cu`` file here holds templated ``__device__`` implementations and
``extern "C"`` entry points. A (file, defines) pair is compiled once per
process and device with NVRTC through ``cupy.RawModule``; CuPy also keeps
the compiled binary in its on-disk kernel cache (``~/.cupy/kernel_cache``,
or ``CUPY_CACHE_DIR``), keyed by the full source text and options, so a
changed ``.cu`` file is compiled again. CuPy is imported only when a
kernel is asked for, so this package imports on machines without CUDA.

The bottom of the helper's layers: imports nothing of kgpu_helper.
"""

import functools
import os

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
OPTIONS = ("--std=c++17",)


def source(name):
    """The text of ``<name>.cu``."""
    with open(os.path.join(SOURCE_DIR, f"{name}.cu")) as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _module(name, defines, device_id):
    import cupy

    opts = OPTIONS + tuple(f"-D{k}={v}" for k, v in defines)
    with cupy.cuda.Device(device_id):
        mod = cupy.RawModule(code=source(name), options=opts)
        mod.compile()
    return mod


def get_module(name, **defines):
    """The compiled ``cupy.RawModule`` of ``<name>.cu`` for the current
    device, with ``-D`` macros from ``defines``."""
    import cupy

    key = tuple(sorted((k, str(v)) for k, v in defines.items()))
    return _module(name, key, cupy.cuda.Device().id)


def get_kernel(name, function, **defines):
    """One ``extern "C"`` entry point of ``<name>.cu`` as a RawKernel."""
    return get_module(name, **defines).get_function(function)
