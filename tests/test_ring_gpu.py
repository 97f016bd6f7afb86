"""The helper's GPU path through the ring (cupy backend): the same
oracle checks as test_daemon.py, plus requests large enough to take the
direct copies from the registered region, and chunking over streams."""

import numpy as np
import pytest

import test_daemon as td
from kgpu_helper import abi
from kgpu_helper.ringdriver import sqe

pytestmark = pytest.mark.gpu


@pytest.fixture
def gsrv(tmp_path):
    s = td.Served(tmp_path, backend="cupy")
    s.d_size = s.d.data_size
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
