"""xts.cu's batched kernels (one launch over a table of requests) against
the CPU backend, byte for byte, on device memory and zero-copy on
registered host memory (gpu tier)."""

import numpy as np
import pytest

from kgpu_helper.services import KeyTable
from test_compute_gpu import cpu, gpu  # noqa: F401 - the same fixtures

pytestmark = pytest.mark.gpu


def make_batch(rng, n, unit, nslots, size_units=(1, 9)):
    """n requests over one buffer: inputs packed at 16-byte-aligned
    offsets (not page-aligned), each in place or to its own output."""
    reqs, pos = [], 16 * int(rng.integers(0, 64))
    for i in range(n):
        nb = unit * int(rng.integers(*size_units))
        in_off = pos
        pos += nb + 16 * int(rng.integers(0, 4))
        if rng.random() < 0.5:
            out_off = in_off
        else:
            out_off = pos
            pos += nb + 16 * int(rng.integers(0, 4))
        plain = bool(rng.random() < 0.3)
        sector = int(rng.integers(0, 2**64 - 1, dtype=np.uint64,
                                  endpoint=True))
        if i == 0:
            sector = 2**64 - 3  # wraps inside the request
        if plain and i == 1:
            sector = 0xFFFFFFFE  # 32-bit wrap
        step = int(rng.choice([1, 1, 8, 0xFFFFFFFF]))
        slot = int(rng.integers(0, nslots))
        reqs.append((in_off, out_off, nb, sector, step, slot, plain))
    return reqs, pos + 4096


def expected(cpu, keys, buf, reqs, unit, decrypt):
    out = buf.copy()
    fn = cpu.xts_decrypt if decrypt else cpu.xts_encrypt
    for in_off, out_off, nb, sector, step, slot, plain in reqs:
        k = np.arange(nb // unit, dtype=np.uint64)
        sec = np.uint64(sector) + k * np.uint64(step)
        if plain:
            sec &= np.uint64(0xFFFFFFFF)
        slots = np.full(len(k), slot, np.int32)
        out[out_off:out_off + nb] = fn(keys, buf[in_off:in_off + nb], sec,
                                       slots, unit_size=unit)
    return out


def launch(gpu, keys, base, reqs, unit, decrypt, stream):
    import cupy as cp
    from kgpu_helper.services.cupy_backend import XTS_INLINE, xts_descs
    b = gpu.xts_batch()
    if len(reqs) == 1:
        in_off, out_off, nb, sector, step, slot, plain = reqs[0]
        b.one(decrypt, keys, base, base, in_off, out_off, nb, unit, sector,
              step, slot, plain, stream.ptr)
        return None
    cols = list(zip(*reqs))
    descs, units = xts_descs(*cols, unit_size=unit)
    d_descs = None
    if len(reqs) > XTS_INLINE:
        d_descs = cp.asarray(descs.view(np.uint8))
    b.many(decrypt, keys, base, base, descs, units, unit, stream.ptr,
           d_descs.data.ptr if d_descs is not None else 0)
    return d_descs


CASES = [(1, 512), (1, 4096), (5, 512), (32, 1024), (33, 512), (200, 4096),
         (300, 16), (7, 48), (64, 2048)]


@pytest.mark.parametrize("decrypt", [False, True])
@pytest.mark.parametrize("n,unit", CASES)
def test_batch_device_memory(gpu, cpu, n, unit, decrypt):
    import cupy as cp
    rng = np.random.default_rng(n * 131 + unit + decrypt)
    keys = KeyTable([rng.bytes(64), rng.bytes(32), rng.bytes(64)])
    reqs, size = make_batch(rng, n, unit, 3)
    host = rng.integers(0, 256, size, dtype=np.uint8)
    want = expected(cpu, keys, host, reqs, unit, decrypt)
    st = cp.cuda.Stream(non_blocking=True)
    with gpu.device:
        dev = cp.asarray(host)
        keep = launch(gpu, keys, dev.data.ptr, reqs, unit, decrypt, st)
        st.synchronize()
        got = dev.get()
    del keep
    assert np.array_equal(got, want)


@pytest.mark.parametrize("n,unit", [(1, 512), (1, 4096), (12, 512),
                                    (100, 4096), (40, 16)])
def test_batch_zero_copy(gpu, cpu, n, unit):
    import cupy as cp
    with gpu.device:
        if cp.cuda.runtime.deviceGetAttribute(91, gpu.device.id) != 1:
            pytest.skip("the device cannot use host pointers of registered "
                        "memory")
    rng = np.random.default_rng(n + unit)
    keys = KeyTable([rng.bytes(32), rng.bytes(64)])
    for decrypt in (False, True):
        reqs, size = make_batch(rng, n, unit, 2)
        host = np.zeros(size + 8192, np.uint8)
        h = host[4096 - host.ctypes.data % 4096:][:size]  # page-aligned
        h[:] = rng.integers(0, 256, size, dtype=np.uint8)
        want = expected(cpu, keys, h, reqs, unit, decrypt)
        st = cp.cuda.Stream(non_blocking=True)
        with gpu.device:
            cp.cuda.runtime.hostRegister(h.ctypes.data, h.nbytes, 3)
            try:
                keep = launch(gpu, keys, h.ctypes.data, reqs, unit, decrypt,
                              st)
                st.synchronize()
            finally:
                cp.cuda.runtime.hostUnregister(h.ctypes.data)
        del keep
        assert np.array_equal(h, want), decrypt
