"""The GPU-resident XTS path (kgpu_helper.serve.resident) through the shm
ring: byte-exact against the cryptography package and the cpu backend for
4 KiB requests with several key slots, key rotation mid-stream, spilled
requests (large, nop, invalid) answered by the serving loop, and a stop
with requests in flight answering each request at most once."""

import os
import threading

import numpy as np
import pytest

import test_daemon as td
from gpu_util import require_cuda
from kgpu_helper.rings import abi
from kgpu_helper.rings.ringdriver import RingDriver, sqe

pytestmark = pytest.mark.gpu

# as `kgpu helper --resident` does, before CUDA starts (collection imports
# this before any test runs): no lazy kernel loading next to the
# persistent kernel (resident.ResidentXts._preload)
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

RNG = np.random.default_rng(11)
KEYS = {0: td.KEY64, 1: td.KEY32, 2: bytes(RNG.integers(0, 256, 64,
                                                        dtype=np.uint8)),
        3: bytes(RNG.integers(0, 256, 32, dtype=np.uint8))}


class ResServed:
    """A driver, an in-process Helper (cupy) with the resident path, the
    serving loop on a thread."""

    def __init__(self, tmp_path, blocks=4, max_bytes=16 << 10, fault_at=0,
                 servers=2):
        from kgpu_helper.serve.daemon import Helper
        from kgpu_helper.serve.resident import ResidentXts
        from kgpu_helper.services import get_backend

        self.d = RingDriver(str(tmp_path / "ring.sock"), entries=64,
                            data_size=8 << 20, key_slots=4)
        for s, k in KEYS.items():
            self.d.set_key(s, k)
        self.t = td.attach(self.d)
        self.h = Helper(self.t, get_backend("cupy"), spin=0)
        try:
            self.res = ResidentXts(self.t, self.h.gpus[0].be, blocks=blocks,
                                   max_bytes=max_bytes, spin_us=0,
                                   fault_at=fault_at, servers=servers)
            self.res.start()
        except BaseException:
            # leave nothing registered with CUDA for the next test's region
            self.h.close()
            self.t.close()
            self.d.close()
            raise
        self.h.t = self.res.spill
        self.th = threading.Thread(target=self.h.serve)
        self.th.start()
        self.final = None

    def run(self, reqs, timeout=20):
        tags = self.d.submit(reqs)
        assert len(tags) == len(reqs)
        got = []
        while len(got) < len(reqs):
            c = self.d.wait(timeout=timeout)
            assert len(c), f"nothing answered: {self.res.debug()}"
            got.extend(c.tolist())
        by_tag = {g[0]: g for g in got}
        assert len(by_tag) == len(got) == len(reqs)  # each exactly once
        return [by_tag[int(t)] for t in tags]

    def close(self):
        self.h.request_stop()
        self.th.join(10)
        self.final = self.res.stop()
        self.h.close()
        self.t.close()
        self.d.close()


@pytest.fixture
def rsrv(tmp_path):
    require_cuda()
    s = ResServed(tmp_path)
    yield s
    if s.final is None:
        s.close()


def _xts(d, n, unit, sector, slot, dec=False, plain=False, step=1):
    data = RNG.integers(0, 256, n, dtype=np.uint8).tobytes()
    off = d.buffer(n)
    d.view(off, n)[:] = np.frombuffer(data, np.uint8)
    req = sqe(abi.SVC_XTS_DEC if dec else abi.SVC_XTS_ENC, in_off=off,
              out_off=off, in_len=n, out_len=n, unit_size=unit,
              sector=sector, sector_step=step, key_slot=slot,
              iv_mode=int(plain))
    return req, off, data


def _want(key, data, sector, step, unit, plain, dec):
    return td.xts_oracle(key, data, sector, step, unit, plain, dec)


def test_resident_4k_matches_openssl_and_cpu_backend(rsrv):
    from kgpu_helper.services import KeyTable, get_backend
    cpu = get_backend("cpu", threads=1)
    d = rsrv.d
    cases, reqs = [], []
    for i in range(24):
        slot = i % 4
        unit = [512, 4096, 1024, 2048][(i // 4) % 4]
        dec, plain = i % 2 == 1, i % 5 == 3
        sector = ([7, 2**64 - 3, 0xFFFFFFF0, 123456789][i % 4] + i) % 2**64
        step = 8 if i % 7 == 2 else 1
        req, off, data = _xts(d, 4096, unit, sector, slot, dec, plain, step)
        cases.append((off, data, slot, sector, step, unit, plain, dec))
        reqs.append(req)
    res = rsrv.run(np.concatenate(reqs))
    assert [r[2] for r in res] == [0] * len(reqs)
    # every one served by the resident kernel, and labelled so
    assert all(r[3] == abi.CQE_RESIDENT for r in res)
    for off, data, slot, sector, step, unit, plain, dec in cases:
        got = d.view(off, 4096).tobytes()
        assert got == _want(KEYS[slot], data, sector, step, unit, plain, dec)
        if not plain:
            sec = (np.arange(4096 // unit, dtype=np.uint64) * np.uint64(step)
                   + np.uint64(sector))
            fn = cpu.xts_decrypt if dec else cpu.xts_encrypt
            ref = fn(KeyTable([KEYS[slot]]), np.frombuffer(data, np.uint8),
                     sec, unit_size=unit)
            assert got == bytes(np.asarray(ref))
    st = rsrv.res.stats()
    assert st["served"] == len(reqs) and st["spilled"] == 0, st
    # each server expands a slot once, on its first request that uses it
    assert 1 <= st["key_expansions"] <= 4 * rsrv.res.nsrv


@pytest.mark.parametrize("blocks,servers", [(1, 1), (2, 2), (8, 1), (8, 2),
                                            (16, 2), (4, 8)])
def test_resident_first_request_spilled(tmp_path, blocks, servers):
    """As `kgpu bench ring` starts: a 64 KiB request first (spilled to the
    serving loop), then small ones, at several block counts (8 blocks once
    left that first request unanswered)."""
    require_cuda()
    s = ResServed(tmp_path, blocks=blocks, servers=servers)
    try:
        d = s.d
        big, boff, bdata = _xts(d, 65536, 512, 9, 0)
        (r,) = s.run(big, timeout=10)
        assert r[2] == 0
        assert d.view(boff, 65536).tobytes() == _want(KEYS[0], bdata, 9, 1,
                                                       512, False, False)
        reqs, cases = [], []
        for i in range(min(3 * blocks * servers + 5, 60)):  # 64 entries
            req, off, data = _xts(d, 4096, 4096, 300 + i, i % 4, i % 2 == 1)
            reqs.append(req)
            cases.append((off, data, 300 + i, i % 4, i % 2 == 1))
        res = s.run(np.concatenate(reqs), timeout=10)
        assert [x[2] for x in res] == [0] * len(reqs)
        for off, data, sector, slot, dec in cases:
            assert d.view(off, 4096).tobytes() == _want(
                KEYS[slot], data, sector, 1, 4096, False, dec)
        st = s.res.stats()
        assert st["served"] == len(reqs) and st["spilled"] == 1, st
    finally:
        s.close()
    assert s.final["stopped"], s.final


def test_resident_gpu_fault_fails_over(tmp_path):
    """A fault injected into the resident kernel half-way through a
    request (it traps after writing half the data): the helper notices,
    takes the ring over and every request is answered exactly once, the
    held one -EIO, the rest correct (by the CPU once the GPU is gone). In
    a child process: the fault ends the CUDA context."""
    require_cuda()
    import json
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, os.path.join(here,
                                                     "resident_fault.py"),
                        str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["answered_once"] == got["submitted"], got
    assert got["bad_completions"] == 0 and got["unknown_answers"] == 0, got
    assert got["wrong_data"] == 0, got
    assert got["eio"] >= 1, got
    assert got["fault"] and got["failover"]["held_eio"] >= 1, got
    assert got["after_ok"] == got["after"], got


def test_resident_one_at_a_time(rsrv):
    d = rsrv.d
    for i in range(20):
        req, off, data = _xts(d, 4096, 512, 1000 + i, i % 2, dec=i % 3 == 0)
        (r,) = rsrv.run(req)
        assert r[2] == 0
        assert d.view(off, 4096).tobytes() == _want(
            KEYS[i % 2], data, 1000 + i, 1, 512, False, i % 3 == 0)


def test_resident_key_rotation_mid_stream(rsrv):
    d = rsrv.d
    key = KEYS[2]
    for rot in range(4):
        reqs, cases = [], []
        for i in range(12):
            # one large request per round: spilled to the batched path,
            # whose own key cache must follow too
            n = 65536 if i == 5 else 4096
            req, off, data = _xts(d, n, 512, 50 * i + rot, 2, i % 2 == 1)
            reqs.append(req)
            cases.append((off, data, 50 * i + rot, i % 2 == 1))
        # every request submitted after a change must use the new key
        res = rsrv.run(np.concatenate(reqs))
        assert [r[2] for r in res] == [0] * len(reqs)
        for off, data, sector, dec in cases:
            assert d.view(off, len(data)).tobytes() == _want(
                key, data, sector, 1, 512, False, dec)
        key = bytes(RNG.integers(0, 256, 64 if rot % 2 else 32,
                                 dtype=np.uint8))
        d.set_key(2, key)
    # a wiped slot: the GPU leaves the request to the serving loop, which
    # answers -EINVAL; set again, it works again
    d.wipe_key(2)
    req, off, data = _xts(d, 4096, 512, 5, 2)
    (r,) = rsrv.run(req)
    assert r[2] != 0
    d.set_key(2, KEYS[2])
    req, off, data = _xts(d, 4096, 512, 5, 2)
    (r,) = rsrv.run(req)
    assert r[2] == 0
    assert d.view(off, 4096).tobytes() == _want(KEYS[2], data, 5, 1, 512,
                                                 False, False)
    st = rsrv.res.stats()
    assert st["key_expansions"] >= 4 and st["spilled"] >= 1, st


def test_resident_spills_what_it_does_not_take(rsrv):
    d = rsrv.d
    big, boff, bdata = _xts(d, 65536, 512, 77, 0)
    small, soff, sdata = _xts(d, 4096, 512, 78, 1)
    bad = sqe(abi.SVC_XTS_ENC, in_off=d.data_off + d.data_size + 4096,
              out_off=d.data_off + d.data_size + 4096, in_len=4096,
              out_len=4096, unit_size=512)
    res = rsrv.run(np.concatenate([big, sqe(abi.SVC_NOP), small, bad]))
    assert [r[2] for r in res[:3]] == [0, 0, 0] and res[3][2] != 0
    # only the small one was the resident kernel's: the spilled ones were
    # answered by the serving loop, and labelled as such
    assert res[2][3] == abi.CQE_RESIDENT
    assert all(r[3] & abi.CQE_RESIDENT == 0 for r in (res[0], res[1], res[3]))
    assert d.view(boff, 65536).tobytes() == _want(KEYS[0], bdata, 77, 1, 512,
                                                   False, False)
    assert d.view(soff, 4096).tobytes() == _want(KEYS[1], sdata, 78, 1, 512,
                                                  False, False)
    st = rsrv.res.stats()
    assert st["spilled"] == 3 and st["served"] == 1, st


def test_resident_stop_with_requests_in_flight(rsrv):
    d = rsrv.d
    reqs = [_xts(d, 4096, 512, i, 0)[0] for i in range(48)]
    tags = d.submit(np.concatenate(reqs))
    rsrv.close()  # stops while they are being served
    st = rsrv.final
    assert st["stopped"], st
    # every request before the stop point was answered exactly once; the
    # rest were left in the SQ (the kernel module redoes those on its CPU)
    assert st["served"] + st["spilled"] <= len(tags)
