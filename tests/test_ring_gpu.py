"""The helper's GPU path through the ring (cupy backend): the same
oracle checks as test_daemon.py, plus requests large enough to take the
direct copies from the registered region, and chunking over streams.
Each test runs with the XTS data path chosen by default (zero-copy where
the device allows it) and with KGPU_XTS_IO=copy."""

import numpy as np
import pytest

import test_daemon as td
from kgpu_helper.rings import abi
from kgpu_helper.rings.ringdriver import sqe

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["auto", "copy"])
def gsrv(tmp_path, request):
    s = td.Served(tmp_path, backend="cupy", xts_io=request.param)
    s.d_size = s.d.data_size
    if request.param == "copy":
        assert not s.h.gpus[0].zero_copy
    yield s
    s.close()


def test_gpu_xts_small_and_large(gsrv):
    assert gsrv.h.gpus and gsrv.h._registered
    d = gsrv.d
    cases, reqs = [], []
    for i, n in enumerate([4096, 8192, 65536, 1 << 20, 512 * 3, 262144]):
        data = td.RNG.integers(0, 256, n, dtype=np.uint8).tobytes()
        oin = gsrv.buf(data)
        oout = oin if i % 2 else d.buffer(n)
        dec = i % 3 == 1
        cases.append((oout, data, 1000 * i, dec))
        reqs.append(sqe(abi.SVC_XTS_DEC if dec else abi.SVC_XTS_ENC,
                        in_off=oin, out_off=oout, in_len=n, out_len=n,
                        unit_size=512, sector=1000 * i, sector_step=1))
    res = gsrv.run(np.concatenate(reqs))
    assert [r[2] for r in res] == [0] * len(reqs)
    assert all(r[3] & abi.CQE_CPU == 0 for r in res)
    for oout, data, sector, dec in cases:
        assert d.view(oout, len(data)).tobytes() == td.xts_oracle(
            td.KEY64, data, sector, 1, 512, decrypt=dec)


def test_gpu_raid6(gsrv):
    test_daemon_raid6 = td.test_raid6_gen_and_recover_match_reference
    test_daemon_raid6(gsrv)


def test_gpu_bad_requests(gsrv):
    td.test_bad_requests_are_einval_and_helper_survives(gsrv)


def _xts_case(gsrv, n, unit, sector, step=1, slot=0, plain=False, dec=False,
              in_place=True, misalign=0):
    d = gsrv.d
    data = td.RNG.integers(0, 256, n, dtype=np.uint8).tobytes()
    oin = d.buffer(n + 16) + misalign
    d.view(oin, n)[:] = np.frombuffer(data, np.uint8)
    oout = oin if in_place else d.buffer(n)
    req = sqe(abi.SVC_XTS_DEC if dec else abi.SVC_XTS_ENC, in_off=oin,
              out_off=oout, in_len=n, out_len=n, unit_size=unit,
              sector=sector, sector_step=step, key_slot=slot,
              iv_mode=int(plain))
    key = td.KEY64 if slot == 0 else td.KEY32
    want = td.xts_oracle(key, data, sector, step, unit, plain, dec)
    return req, oout, want


def test_gpu_xts_one_request_at_a_time(gsrv):
    """Batches of one (the latency path): every shape of request."""
    cases = [dict(n=4096, unit=512, sector=7),
             dict(n=4096, unit=4096, sector=2**64 - 1, dec=True),
             dict(n=8192, unit=512, sector=0xFFFFFFFF, plain=True,
                  in_place=False),
             dict(n=1 << 20, unit=512, sector=12345, slot=1, dec=True),
             dict(n=3 * 1024, unit=1024, sector=99, step=8, slot=1),
             dict(n=4096, unit=512, sector=3, misalign=8),  # copy path
             dict(n=4096, unit=512, sector=3, misalign=8, in_place=False)]
    for c in cases:
        gsrv.d.reset_buffers()
        req, oout, want = _xts_case(gsrv, **c)
        (r,) = gsrv.run(req)
        assert r[2] == 0 and r[3] & abi.CQE_CPU == 0, c
        assert gsrv.d.view(oout, len(want)).tobytes() == want, c


def test_gpu_xts_large_batch(gsrv):
    """More requests of one unit size than travel inside the launch
    arguments (a descriptor table), plus a few of other unit sizes."""
    reqs, checks = [], []
    rng = np.random.default_rng(5)
    for i in range(60):
        unit = 512 if i < 45 else [4096, 1024][i % 2]
        req, oout, want = _xts_case(
            gsrv, n=unit * int(rng.integers(1, 5)), unit=unit,
            sector=int(rng.integers(0, 2**63)), step=[1, 8][i % 2],
            slot=i % 2, plain=i % 7 == 0, dec=i % 5 == 0,
            in_place=i % 3 == 0)
        reqs.append(req)
        checks.append((oout, want))
    res = gsrv.run(np.concatenate(reqs))
    assert [r[2] for r in res] == [0] * len(reqs)
    assert all(r[3] & abi.CQE_CPU == 0 for r in res)
    for oout, want in checks:
        assert gsrv.d.view(oout, len(want)).tobytes() == want


def test_gpu_raid6_pqd(gsrv):
    """RAID6_PQD (read-modify-write) through the ring on the GPU."""
    td.test_raid6_pqd_matches_reference(gsrv)
    assert gsrv.h.stats[("gpu", abi.SVC_RAID6_PQD)] == 2
