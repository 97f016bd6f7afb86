"""Compute services: AES-XTS and RAID6, arrays in, arrays out.

    from kgpu_helper.services import KeyTable, get_backend

    be = get_backend()                 # "cupy" when CUDA works, else "cpu"
    keys = KeyTable([key_hex])          # dm-crypt key: K1 || K2
    ct = be.xts_encrypt(keys, data, sectors, unit_size=512)
    p, q = be.raid6_gen(chunks)         # chunks: (k, n) uint8

The interface is :class:`~kgpu_helper.services.interface.Backend`; the
backends are ``cpu`` (numpy and OpenSSL, always there) and ``cupy`` (CUDA
kernels from ``kgpu_helper/cuda``). The environment variable
``KGPU_BACKEND`` (auto, cupy, cpu) overrides the default choice.
Importing this package never imports CuPy.

May import cuda (the kernels' sources) and nothing else of kgpu_helper:
the services know no ring.
"""

import os

from kgpu_helper.services.interface import (IV_MODES, UNIT_SIZES, Backend,
                                             BackendUnavailable, KeyTable)

BACKENDS = ("auto", "cupy", "cpu")

__all__ = ["BACKENDS", "IV_MODES", "UNIT_SIZES", "Backend",
           "BackendUnavailable", "KeyTable", "cuda_available",
           "get_backend"]


def cuda_available():
    """(True, "") if the cupy backend can run here, else (False, reason)."""
    try:
        from kgpu_helper.services import cupy_backend
    except Exception as e:  # noqa: BLE001 - any import failure means no
        return False, f"cannot import the cupy backend: {e}"
    return cupy_backend.probe()


def get_backend(name=None, **options):
    """A backend by name: ``auto`` (default), ``cupy`` or ``cpu``.

    ``auto`` picks ``cupy`` when CuPy imports and a CUDA device answers,
    otherwise ``cpu``. Naming ``cupy`` where it cannot run raises
    :class:`BackendUnavailable` with the reason. ``options`` go to the
    backend's constructor (``threads=`` for cpu, ``device=`` for cupy).
    """
    if name is None:
        name = os.environ.get("KGPU_BACKEND", "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, "
                         f"got {name!r}")
    if name in ("auto", "cupy"):
        ok, why = cuda_available()
        if ok:
            from kgpu_helper.services.cupy_backend import CupyBackend
            return CupyBackend(**options)
        if name == "cupy":
            raise BackendUnavailable(f"the cupy backend cannot run: {why}")
    from kgpu_helper.services.cpu import CpuBackend
    return CpuBackend(**options)
