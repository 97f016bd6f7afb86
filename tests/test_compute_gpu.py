"""The cupy backend against the CPU backend, byte for byte (gpu tier)."""

import numpy as np
import pytest

from gpu_util import require_cuda
from kgpu_helper.services import KeyTable
from kgpu_helper.services.cpu import CpuBackend

pytestmark = pytest.mark.gpu

MiB = 1 << 20


@pytest.fixture(scope="module")
def gpu():
    require_cuda()
    from kgpu_helper.services import get_backend
    return get_backend("cupy")


@pytest.fixture(scope="module")
def cpu():
    return CpuBackend(threads=8)


def random_keys(rng, n):
    return KeyTable([rng.bytes(int(rng.choice([32, 64]))) for _ in range(n)])


def random_batch(rng, nbytes, unit_size, nslots):
    n = max(1, nbytes // unit_size)
    data = rng.integers(0, 256, (n, unit_size), dtype=np.uint8)
    sectors = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    sectors[: min(n, 2)] = [2**64 - 1, 0][: min(n, 2)]
    slots = rng.integers(0, nslots, n).astype(np.int32)
    return data, sectors, slots


@pytest.mark.parametrize("unit_size", [16, 48, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("units", [1, 3, 33, 1000])
def test_xts_shapes(gpu, cpu, unit_size, units):
    rng = np.random.default_rng(units * 7 + unit_size)
    keys = random_keys(rng, 5)
    data, sectors, slots = random_batch(rng, units * unit_size, unit_size, 5)
    for mode in ("plain64", "plain"):
        want = cpu.xts_encrypt(keys, data, sectors, slots,
                               unit_size=unit_size, iv_mode=mode)
        got = gpu.xts_encrypt(keys, data, sectors, slots,
                              unit_size=unit_size, iv_mode=mode)
        assert np.array_equal(got, want), mode
        back = gpu.xts_decrypt(keys, want, sectors, slots,
                               unit_size=unit_size, iv_mode=mode)
        assert np.array_equal(back, data), mode


@pytest.mark.parametrize("nbytes", [4096, 1 * MiB, 48 * MiB])
def test_xts_large_mixed(gpu, cpu, nbytes):
    rng = np.random.default_rng(nbytes)
    keys = random_keys(rng, 3)
    for unit_size in (512, 4096):
        data, sectors, slots = random_batch(rng, nbytes, unit_size, 3)
        want = cpu.xts_encrypt(keys, data, sectors, slots,
                               unit_size=unit_size)
        assert np.array_equal(gpu.xts_encrypt(
            keys, data, sectors, slots, unit_size=unit_size), want)
        assert np.array_equal(gpu.xts_decrypt(
            keys, want, sectors, slots, unit_size=unit_size), data)
        # one slot for the whole batch (the kernels' fast path)
        want1 = cpu.xts_encrypt(keys, data, sectors, unit_size=unit_size)
        assert np.array_equal(gpu.xts_encrypt(
            keys, data, sectors, unit_size=unit_size), want1)


def test_xts_device_arrays_in_place_and_raw(gpu, cpu):
    import cupy as cp
    rng = np.random.default_rng(9)
    keys = random_keys(rng, 2)
    data, sectors, slots = random_batch(rng, 256 * 512, 512, 2)
    want = cpu.xts_encrypt(keys, data, sectors, slots)
    d = cp.asarray(data)
    gpu.xts_encrypt(keys, d, cp.asarray(sectors), cp.asarray(slots), out=d)
    assert np.array_equal(d.get(), want)
    ivs = np.zeros((len(sectors), 2), np.uint64)
    ivs[:, 0] = sectors
    ivs[:, 1] = rng.integers(0, 2**63, len(sectors), dtype=np.uint64)
    ivb = ivs.view(np.uint8)
    want_raw = cpu.xts_encrypt(keys, data, None, slots, iv_mode="raw",
                               ivs=ivb)
    got_raw = gpu.xts_encrypt(keys, data, None, slots, iv_mode="raw",
                              ivs=ivb)
    assert np.array_equal(got_raw, want_raw)


def test_xts_key_change_and_equal_halves(gpu, cpu):
    rng = np.random.default_rng(11)
    keys = random_keys(rng, 2)
    data, sectors, _ = random_batch(rng, 64 * 512, 512, 1)
    gpu.xts_encrypt(keys, data, sectors)
    half = rng.bytes(32)
    keys.set(0, half + half)  # the cached device schedule must follow
    assert np.array_equal(gpu.xts_encrypt(keys, data, sectors),
                          cpu.xts_encrypt(keys, data, sectors))


def test_pipeline_matches(gpu, cpu):
    rng = np.random.default_rng(12)
    keys = random_keys(rng, 2)
    pipe = gpu.pipeline(depth=3)
    jobs = []
    for j in range(7):
        data, sectors, slots = random_batch(rng, (j + 1) * 64 * 1024, 512, 2)
        hin = gpu.empty_host(data.shape)
        hin[:] = data
        hout = gpu.empty_host(data.shape)
        pipe.xts(j % 2 == 1, keys, hin, sectors, hout, slots)
        jobs.append((j % 2 == 1, data, sectors, slots, hout))
    k, n = 8, 1 << 20
    rdata = gpu.empty_host((k + 2, n))
    rdata[:k] = rng.integers(0, 256, (k, n), dtype=np.uint8)
    pipe.raid6_gen(rdata[:k], rdata[k], rdata[k + 1])
    pipe.wait()
    for dec, data, sectors, slots, hout in jobs:
        fn = cpu.xts_decrypt if dec else cpu.xts_encrypt
        assert np.array_equal(hout, fn(keys, data, sectors, slots))
    good = rdata.copy()
    p, q = cpu.raid6_gen(np.ascontiguousarray(good[:k]))
    assert np.array_equal(good[k], p) and np.array_equal(good[k + 1], q)
    rdata[2] = 0
    rdata[5] = 0
    pipe.raid6_recover(rdata, [2, 5])
    pipe.wait()
    assert np.array_equal(rdata, good)


@pytest.mark.parametrize("k", list(range(2, 31)))
def test_raid6_gen_all_k(gpu, cpu, k):
    rng = np.random.default_rng(k)
    n = 16 * int(rng.integers(1, 5000))
    data = rng.integers(0, 256, (k, n), dtype=np.uint8)
    p, q = gpu.raid6_gen(data)
    wp, wq = cpu.raid6_gen(data)
    assert np.array_equal(p, wp) and np.array_equal(q, wq)
    blocks = np.vstack([data, p[None], q[None]])
    for failed in ([0, k - 1], [k - 1, k], [0, k + 1], [k, k + 1], [1]):
        if max(failed) >= k + 2 or len(set(failed)) < len(failed):
            continue
        b = blocks.copy()
        b[failed] = 0
        gpu.raid6_recover(b, failed)
        assert np.array_equal(b, blocks), failed


def test_raid6_large(gpu, cpu):
    rng = np.random.default_rng(2)
    k, n = 8, 8 * MiB
    data = rng.integers(0, 256, (k, n), dtype=np.uint8)
    p, q = gpu.raid6_gen(data)
    wp, wq = cpu.raid6_gen(data)
    assert np.array_equal(p, wp) and np.array_equal(q, wq)
    blocks = np.vstack([data, p[None], q[None]])
    b = blocks.copy()
    b[[3, 6]] = 0
    gpu.raid6_recover(b, [3, 6])
    assert np.array_equal(b, blocks)


@pytest.mark.parametrize("start,rows", [(0, 1), (0, 2), (3, 5), (0, 30),
                                        (13, 17), (29, 1)])
def test_raid6_pqd(gpu, cpu, start, rows):
    """P/Q delta update (RAID6_PQD) against the CPU backend, which the
    unit tier checks against the per-byte reference; host and device
    arrays, and the pipeline."""
    import cupy as cp
    rng = np.random.default_rng(start * 31 + rows)
    n = 16 * int(rng.integers(1, 5000))
    delta = rng.integers(0, 256, (rows, n), dtype=np.uint8)
    p0 = rng.integers(0, 256, n, dtype=np.uint8)
    q0 = rng.integers(0, 256, n, dtype=np.uint8)
    wp, wq = cpu.raid6_pqd(delta, p0.copy(), q0.copy(), start)
    p, q = gpu.raid6_pqd(delta, p0.copy(), q0.copy(), start)
    assert np.array_equal(p, wp) and np.array_equal(q, wq)
    dp, dq = cp.asarray(p0), cp.asarray(q0)
    gpu.raid6_pqd(cp.asarray(delta), dp, dq, start)
    assert np.array_equal(dp.get(), wp) and np.array_equal(dq.get(), wq)
    pipe = gpu.pipeline(depth=2)
    hd = gpu.empty_host(delta.shape)
    hd[:] = delta
    hp, hq = gpu.empty_host((n,)), gpu.empty_host((n,))
    hp[:], hq[:] = p0, q0
    pipe.raid6_pqd(hd, hp, hq, start)
    pipe.wait()
    assert np.array_equal(hp, wp) and np.array_equal(hq, wq)
