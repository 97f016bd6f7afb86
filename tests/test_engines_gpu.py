"""Two GPU engines on ONE GPU (device 0 twice), through the ring: issue
12's failover test for a host with a single GPU. Engine 1's launches
start raising mid-stream; engine 0 and the CPU carry its work, and each
request is answered exactly once with the bytes the oracles give (XTS:
OpenSSL per data unit; RAID6: the byte-by-byte reference)."""

import numpy as np
import pytest

import raid6_ref
import test_daemon as td
import test_engines as te
from gpu_util import require_cuda
from kgpu_helper.rings import abi
from kgpu_helper.serve import daemon
from kgpu_helper.rings.ringdriver import sqe

pytestmark = pytest.mark.gpu


class Flaky:
    """``inner`` with its launch methods raising from the ``fail_at``-th
    launch on (counted in ``state``, shared between proxies)."""

    LAUNCHES = ("one", "many", "launch_xts", "launch_gen", "launch_recover")

    def __init__(self, inner, state):
        self._inner, self._state = inner, state

    def __getattr__(self, name):
        f = getattr(self._inner, name)
        if name not in self.LAUNCHES:
            return f
        st = self._state

        def launch(*a, **kw):
            st["launches"] += 1
            if st["fail_at"] is not None and st["launches"] >= st["fail_at"]:
                st["raised"] += 1
                raise RuntimeError("injected launch failure")
            return f(*a, **kw)
        return launch


def raid_case(d, i, k=6, unit=512):
    rows = [td.RNG.integers(0, 256, unit, dtype=np.uint8).tobytes()
            for _ in range(k)]
    p, q = raid6_ref.pq(rows)
    n = (k + 2) * unit
    off = d.buffer(n)
    d.view(off, n)[:] = np.frombuffer(b"".join(rows) + bytes(2 * unit),
                                      np.uint8)
    req = sqe(abi.SVC_RAID6_GEN, in_off=off, out_off=off, in_len=n,
              out_len=n, unit_size=unit, ndisks=k + 2)
    return req, off, b"".join(rows) + p + q


@pytest.mark.parametrize("xts_io", ["auto", "copy"])
@pytest.mark.parametrize("depth", [1, 32])
def test_two_engines_one_gpu_failover(tmp_path, monkeypatch, xts_io, depth):
    require_cuda()
    from kgpu_helper.services import get_backend
    monkeypatch.setattr(daemon, "CHUNK_REQS", 4)
    s = td.Served(tmp_path, backend="cupy", xts_io=xts_io,
                  data_size=64 << 20, report_every=0,
                  gpus=[get_backend("cupy", device=0)])
    try:
        h, d = s.h, s.d
        assert len(h.gpus) == 2
        assert h.gpus[0].be is not h.gpus[1].be
        assert h.gpus[0].be.device.id == h.gpus[1].be.device.id == 0
        e1 = h.gpus[1]
        state = {"launches": 0, "fail_at": None, "raised": 0}
        e1.be = Flaky(e1.be, state)
        if e1.batch is not None:
            e1.batch = Flaky(e1.batch, state)
        sizes = [4096, 65536, 512 * 3, 262144, 8192]
        cases = []
        for i in range(240):
            if i % 7 == 3:
                cases.append(raid_case(d, i))
            else:
                cases.append(te.xts_case(d, sizes[i % len(sizes)], i))
        reqs = [c[0] for c in cases]
        # the first half with both engines well, then engine 1 breaks
        first = te.closed_loop(d, reqs[:120], depth=depth, timeout=120)
        served1 = h.accts[1].reqs
        assert h.accts[0].reqs > 0 and served1 > 0, h.report()
        state["fail_at"] = state["launches"] + 3
        rest = te.closed_loop(d, reqs[120:], depth=depth, timeout=120)
        answers = first + rest
        assert all(len(x) == 1 and x[0][0] == 0 for x in answers), answers
        for _req, off, want in cases:
            assert d.view(off, len(want)).tobytes() == want
        assert state["raised"] >= 1
        assert e1.broken and "injected" in e1.broken
        assert h.gpus[0].broken is None
        a0, a1 = h.accts
        # engine 1 served nothing after its failure; engine 0 carried on
        assert a1.reqs <= served1 + 4 * 2
        assert a0.reqs + a1.reqs + h.cpu_acct.reqs == len(cases)
        assert a0.reqs > len(cases) // 2
        assert a0.q_reqs == a1.q_reqs == 0
        print("\n" + "\n".join(h.report()))
    finally:
        s.close()
