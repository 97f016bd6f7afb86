"""The helper's serving loop through the ring, with the cpu backend.

Results are checked against independent oracles: OpenSSL's own XTS (one
``cryptography`` XTS context per data unit, not the backend's batched
ECB construction) and the byte-by-byte RAID6 reference in raid6_ref.py.
"""

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kgpu_helper.rings import abi
from kgpu_helper.serve.daemon import Helper, validate
from kgpu_helper.rings.ringdriver import DETACHED, RingDriver, sqe
from kgpu_helper.services import get_backend
from kgpu_helper.rings.transport import ShmTransport

import raid6_ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(7)
KEY64 = bytes(RNG.integers(0, 256, 64, dtype=np.uint8))
KEY32 = bytes(RNG.integers(0, 256, 32, dtype=np.uint8))


def xts_oracle(key, data, sector, step, unit, plain=False, decrypt=False):
    out = bytearray()
    for i in range(len(data) // unit):
        s = (sector + i * step) & (0xFFFFFFFF if plain else (1 << 64) - 1)
        c = Cipher(algorithms.AES(key), modes.XTS(s.to_bytes(16, "little")))
        ctx = c.decryptor() if decrypt else c.encryptor()
        out += ctx.update(bytes(data[i * unit:(i + 1) * unit]))
    return bytes(out)


def attach(d):
    """A ShmTransport attached to the driver ``d`` (it connects on a
    thread while the driver accepts)."""
    box = []
    th = threading.Thread(target=lambda: box.append(ShmTransport(d.sock_path)))
    th.start()
    assert d.wait_attach(5)
    th.join(5)
    return box[0]


class Served:
    """A driver and an in-process Helper (cpu backend) on a thread."""

    def __init__(self, tmp_path, entries=64, backend="cpu", xts_io=None,
                 data_size=4 << 20, **helper_kw):
        self.d = RingDriver(str(tmp_path / "ring.sock"), entries=entries,
                            data_size=data_size, key_slots=4)
        self.d.set_key(0, KEY64)
        self.d.set_key(1, KEY32)
        self.t = attach(self.d)
        be = (get_backend("cpu", threads=2) if backend == "cpu"
              else get_backend(backend))
        self.h = Helper(self.t, be, spin=0, xts_io=xts_io, **helper_kw)
        self.th = threading.Thread(target=self.h.serve)
        self.th.start()

    def run(self, reqs):
        tags = self.d.submit(reqs)
        assert len(tags) == len(reqs)
        got = []
        while len(got) < len(reqs):
            c = self.d.wait(timeout=10)
            assert len(c), "helper answered nothing"
            got.extend(c.tolist())
        by_tag = {g[0]: g for g in got}
        return [by_tag[int(t)] for t in tags]  # (tag, seq, status, ...)

    def buf(self, data):
        off = self.d.buffer(len(data))
        self.d.view(off, len(data))[:] = np.frombuffer(data, np.uint8)
        return off

    def close(self):
        self.h.request_stop()
        self.th.join(10)
        self.h.close()
        self.t.close()
        self.d.close()


@pytest.fixture
def srv(tmp_path):
    s = Served(tmp_path)
    yield s
    s.close()


def test_xts_batch_matches_openssl(srv):
    d = srv.d
    cases = []  # (off_in, off_out, data, key, sector, step, unit, plain, dec)
    reqs = []
    for i in range(12):
        unit = [512, 4096, 1024][i % 3]
        n = unit * (1 + i % 4)
        data = RNG.integers(0, 256, n, dtype=np.uint8).tobytes()
        oin = srv.buf(data)
        oout = oin if i % 2 else d.buffer(n)  # in place and out of place
        key, slot = (KEY64, 0) if i % 4 != 3 else (KEY32, 1)
        plain = i % 5 == 4
        dec = i % 3 == 2
        sector = (1 << 40) + 17 * i if not plain else 0xFFFFFFF0 + i
        step = 1 if i % 6 else 8
        cases.append((oout, data, key, sector, step, unit, plain, dec))
        reqs.append(sqe(abi.SVC_XTS_DEC if dec else abi.SVC_XTS_ENC,
                        in_off=oin, out_off=oout, in_len=n, out_len=n,
                        unit_size=unit, sector=sector, sector_step=step,
                        key_slot=slot, iv_mode=int(plain)))
    res = srv.run(np.concatenate(reqs))
    assert [r[2] for r in res] == [0] * len(reqs)
    for oout, data, key, sector, step, unit, plain, dec in cases:
        want = xts_oracle(key, data, sector, step, unit, plain, dec)
        assert d.view(oout, len(data)).tobytes() == want


def test_xts_single_request_in_place(srv):
    data = RNG.integers(0, 256, 8192, dtype=np.uint8).tobytes()
    off = srv.buf(data)
    (r,) = srv.run(sqe(abi.SVC_XTS_ENC, in_off=off, out_off=off,
                       in_len=8192, out_len=8192, unit_size=512,
                       sector=5, sector_step=1))
    assert r[2] == 0
    assert srv.d.view(off, 8192).tobytes() == xts_oracle(KEY64, data, 5, 1,
                                                         512)


def test_raid6_gen_and_recover_match_reference(srv):
    k, unit = 6, 256
    rows = [RNG.integers(0, 256, unit, dtype=np.uint8).tobytes()
            for _ in range(k)]
    p, q = raid6_ref.pq(rows)
    stripe = b"".join(rows) + bytes(2 * unit)
    o1 = srv.buf(stripe)
    full = b"".join(rows) + p + q
    lost = bytearray(full)
    for f in (1, 4):  # two data blocks lost
        lost[f * unit:(f + 1) * unit] = bytes(unit)
    o2 = srv.buf(bytes(lost))
    lost_dp = bytearray(full)
    for f in (2, k):  # data + P
        lost_dp[f * unit:(f + 1) * unit] = b"\xee" * unit
    o3 = srv.buf(bytes(lost_dp))
    n = (k + 2) * unit
    common = dict(in_len=n, out_len=n, unit_size=unit, ndisks=k + 2)
    res = srv.run(np.concatenate([
        sqe(abi.SVC_RAID6_GEN, in_off=o1, out_off=o1, **common),
        sqe(abi.SVC_RAID6_REC, in_off=o2, out_off=o2, fail_a=1, fail_b=4,
            **common),
        sqe(abi.SVC_RAID6_REC, in_off=o3, out_off=o3, fail_a=k, fail_b=2,
            **common)]))
    assert [r[2] for r in res] == [0, 0, 0]
    for o in (o1, o2, o3):
        assert srv.d.view(o, n).tobytes() == full


def test_raid6_pqd_matches_reference(srv):
    """Read-modify-write through the ring: deltas of data slots 2..4 of a
    7-data stripe (slot 3 unchanged) with the old P and Q give the P and
    Q of the new stripe, batched with a second, smaller request."""
    k, unit = 7, 512
    old = [RNG.integers(0, 256, unit, dtype=np.uint8).tobytes()
           for _ in range(k)]
    new = list(old)
    new[2] = RNG.integers(0, 256, unit, dtype=np.uint8).tobytes()
    new[4] = RNG.integers(0, 256, unit, dtype=np.uint8).tobytes()
    op, oq = raid6_ref.pq(old)
    np_, nq = raid6_ref.pq(new)

    def delta(i):
        return bytes(a ^ b for a, b in zip(old[i], new[i]))
    body = delta(2) + delta(3) + delta(4)
    o1 = srv.buf(body + op + oq)
    o2 = srv.buf(delta(4) + op + oq)  # as if only slot 4 changed
    n1, n2 = 5 * unit, 3 * unit
    new4 = list(old)
    new4[4] = new[4]
    p4, q4 = raid6_ref.pq(new4)
    res = srv.run(np.concatenate([
        sqe(abi.SVC_RAID6_PQD, in_off=o1, out_off=o1, in_len=n1, out_len=n1,
            unit_size=unit, ndisks=k + 2, fail_a=2, fail_b=4),
        sqe(abi.SVC_RAID6_PQD, in_off=o2, out_off=o2, in_len=n2, out_len=n2,
            unit_size=unit, ndisks=k + 2, fail_a=4, fail_b=4)]))
    assert [r[2] for r in res] == [0, 0]
    assert srv.d.view(o1, n1).tobytes() == body + np_ + nq
    assert srv.d.view(o2, n2).tobytes() == delta(4) + p4 + q4


def bad_requests(d):
    off = d.buffer(8192)
    end = d.data_off + d.data_size
    x = dict(in_off=off, out_off=off, in_len=4096, out_len=4096,
             unit_size=512)
    r6 = dict(in_off=off, out_off=off, in_len=6 * 512, out_len=6 * 512,
              unit_size=512, ndisks=6)
    return [
        (sqe(9, **x), -22),                                  # no such service
        (sqe(abi.SVC_XTS_ENC, **{**x, "flags": 1}), -22),    # unknown flag
        (sqe(abi.SVC_XTS_ENC, **{**x, "in_off": 0}), -22),   # in the header
        (sqe(abi.SVC_XTS_ENC, **{**x, "in_off": end - 512, "out_off":
                                 end - 512}), -22),          # runs off the end
        (sqe(abi.SVC_XTS_ENC, **{**x, "in_off": 2**64 - 8}), -22),  # wraps
        (sqe(abi.SVC_XTS_ENC, **{**x, "unit_size": 500}), -22),
        (sqe(abi.SVC_XTS_ENC, **{**x, "in_len": 1000, "out_len": 1000}),
         -22),
        (sqe(abi.SVC_XTS_ENC, **{**x, "out_off": off + 512}), -22),  # overlap
        (sqe(abi.SVC_XTS_ENC, **{**x, "iv_mode": 2}), -22),
        (sqe(abi.SVC_XTS_ENC, **{**x, "key_slot": 99}), -22),
        (sqe(abi.SVC_XTS_ENC, **{**x, "key_slot": 2}), -126),  # empty slot
        (sqe(abi.SVC_RAID6_GEN, **{**r6, "ndisks": 3, "in_len": 1536,
                                   "out_len": 1536}), -22),
        (sqe(abi.SVC_RAID6_GEN, **{**r6, "out_off": off + 512}), -22),
        (sqe(abi.SVC_RAID6_REC, **r6, fail_a=6), -22),
        (sqe(abi.SVC_RAID6_REC, **r6, fail_a=2, fail_b=2), -22),
        # PQD: slots 1..2 of 6 disks are 4 blocks, not 6; a range past
        # the data slots; a range backwards
        (sqe(abi.SVC_RAID6_PQD, **r6, fail_a=1, fail_b=2), -22),
        (sqe(abi.SVC_RAID6_PQD, **r6, fail_a=1, fail_b=4), -22),
        (sqe(abi.SVC_RAID6_PQD, **{**r6, "in_len": 2048, "out_len": 2048},
             fail_a=3, fail_b=2), -22),
        (sqe(abi.SVC_XTS_ENC, **x), 0),                      # a good one
    ]


def test_bad_requests_are_einval_and_helper_survives(srv):
    cases = bad_requests(srv.d)
    res = srv.run(np.concatenate([c for c, _ in cases]))
    assert [r[2] for r in res] == [want for _, want in cases]
    # one at a time too (the small-batch path), and still serving after
    for c, want in cases:
        (r,) = srv.run(c)
        assert r[2] == want


def test_vector_and_scalar_validation_agree(srv):
    cases = bad_requests(srv.d)
    reqs = np.concatenate([c for c, _ in cases] * 2)
    whole = validate(reqs, srv.h.region, srv.h.keys)
    one = [validate(reqs[i:i + 1], srv.h.region, srv.h.keys)[0]
           for i in range(len(reqs))]
    assert list(whole) == one


def test_key_change_is_picked_up(srv):
    data = bytes(4096)
    off = srv.buf(data)
    srv.run(sqe(abi.SVC_XTS_ENC, in_off=off, out_off=off, in_len=4096,
                out_len=4096, unit_size=512))
    new = bytes(range(64))
    srv.d.set_key(0, new)
    srv.d.view(off, 4096)[:] = 0
    srv.run(sqe(abi.SVC_XTS_ENC, in_off=off, out_off=off, in_len=4096,
                out_len=4096, unit_size=512))
    assert srv.d.view(off, 4096).tobytes() == xts_oracle(new, data, 0, 0, 512)
    srv.d.wipe_key(0)
    (r,) = srv.run(sqe(abi.SVC_XTS_ENC, in_off=off, out_off=off, in_len=4096,
                       out_len=4096, unit_size=512))
    assert r[2] == -126


# ------------------------------------------------- the helper as a process

def helper_proc(sock):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "kgpu_helper.cli", "helper", "--backend",
         "cpu", "--cpu-threads", "1", "--ring", "shm:" + sock, "--spin-us",
         "0"], env=env, stderr=subprocess.PIPE, text=True)


def _spin_until(cond, timeout=30):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"


def _stop_with_work_in_flight(d, p, reqs):
    """Submit ``reqs`` to the helper process ``p``, let it take them and
    stop it (SIGSTOP) before it answered them all. A kill sent at once
    races its work: a test thread held off the CPU for the 20 ms or so
    that a 4 MiB XTS request takes would kill a helper that has answered
    everything, and nothing would come back DETACHED. Caught too late,
    the helper goes on and the batch is sent again."""
    idx = d.region.idx
    sq_head, cq_tail = abi.SQ_HEAD_OFF // 4, abi.CQ_TAIL_OFF // 4
    for _ in range(20):
        head0, cq0 = int(idx[sq_head]), int(idx[cq_tail])
        assert len(d.submit(reqs)) == len(reqs)
        _spin_until(lambda: idx[sq_head] != head0)     # taken
        p.send_signal(signal.SIGSTOP)
        _, st = os.waitpid(p.pid, os.WUNTRACED)         # every thread
        assert os.WIFSTOPPED(st), st
        if (int(idx[cq_tail]) - cq0) & 0xFFFFFFFF < len(reqs):
            return                                      # not all answered
        p.send_signal(signal.SIGCONT)
        got = []
        while len(got) < len(reqs):
            got.extend(d.wait(timeout=20).tolist())
        assert [g[2] for g in got] == [0] * len(reqs)
    pytest.fail("the helper answered every batch before it was stopped")


def test_sigterm_finishes_the_batch_and_restart_after_kill9(tmp_path):
    d = RingDriver(str(tmp_path / "ring.sock"), entries=64,
                   data_size=16 << 20, key_slots=2)
    d.set_key(0, KEY64)
    try:
        p = helper_proc(d.sock_path)
        assert d.wait_attach(30)
        n = 4 << 20
        off = d.buffer(n)
        big = sqe(abi.SVC_XTS_ENC, in_off=off, out_off=off, in_len=n,
                  out_len=n, unit_size=4096, sector_step=1)
        d.submit(big)
        # the helper takes the request, then is told to stop: it must
        # finish and post that one before it detaches
        _spin_until(lambda: d.region.idx[abi.SQ_HEAD_OFF // 4] == 1)
        p.send_signal(signal.SIGTERM)
        got = []
        while not got or d.attached():
            got.extend(d.wait(timeout=20).tolist())
        assert p.wait(20) == 0, p.stderr.read()
        assert [g[2] for g in got] == [0]
        assert "stopping" in p.stderr.read()

        # kill -9 with work in flight: the driver gets it back, a new
        # helper attaches and serves
        p = helper_proc(d.sock_path)
        assert d.wait_attach(30)
        _stop_with_work_in_flight(d, p, np.concatenate([big,
                                                        sqe(abi.SVC_NOP)]))
        p.kill()
        p.wait(10)
        got = []
        while d.attached() or d.inflight():
            got.extend(d.wait(timeout=20).tolist())
        assert DETACHED in [g[2] for g in got]
        p = helper_proc(d.sock_path)
        assert d.wait_attach(30)
        d.submit(sqe(abi.SVC_NOP))
        c = d.wait(timeout=20)
        assert list(c["status"]) == [0]
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0
    finally:
        d.close()


def test_key_slot_read_only_when_stable():
    """The key slots' sequence count (uapi/kgpu.h): a slot caught with an
    odd generation (the kernel rewriting it) is not cached; once even, the
    key is loaded, and a later change is picked up."""
    from kgpu_helper.serve.daemon import KeyCache

    slots = np.zeros(2, dtype=abi.KEY_SLOT)
    cache = KeyCache(slots)
    key = bytes(range(64))
    slots["generation"][1] = 1                # writer in the middle
    slots["key_len"][1] = 64
    slots["key"][1] = np.frombuffer(key, np.uint8)
    cache.refresh([1])
    assert not cache.loaded[1]
    slots["generation"][1] = 2                # stable
    cache.refresh([1])
    assert cache.loaded[1] and cache.table.key(1) == key
    slots["generation"][1] = 3                # wiped
    slots["key_len"][1] = 0
    slots["generation"][1] = 4
    cache.refresh([1])
    assert not cache.loaded[1]


def test_backend_failure_answers_eio_and_helper_keeps_serving(srv):
    """A backend that raises must not take the helper (and the requests
    it drained) down: those requests are answered -EIO, which sends them
    to the kernel's CPU, and the next batch is served."""
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise MemoryError("simulated backend failure")

    cpu = srv.h.cpu.be            # the CpuEngine's backend
    good = cpu.raid6_gen
    k, unit = 4, 512
    off = srv.buf(bytes((k + 2) * unit))
    gen = sqe(abi.SVC_RAID6_GEN, in_off=off, out_off=off,
              in_len=(k + 2) * unit, out_len=(k + 2) * unit,
              unit_size=unit, ndisks=k + 2, fail_a=abi.RAID6_NONE,
              fail_b=abi.RAID6_NONE)
    data = bytes(4096)
    xoff = srv.buf(data)
    xts = sqe(abi.SVC_XTS_ENC, in_off=xoff, out_off=xoff, in_len=4096,
              out_len=4096, unit_size=512, sector=1, sector_step=1)
    nop = sqe(abi.SVC_NOP)
    cpu.raid6_gen = broken
    try:
        res = srv.run(np.concatenate([nop, xts, gen]))
        assert calls
        assert [r[2] for r in res] == [0, 0, -errno.EIO]
        (r,) = srv.run(gen)            # one at a time: the same answer
        assert r[2] == -errno.EIO
    finally:
        cpu.raid6_gen = good
    (r,) = srv.run(gen)
    assert r[2] == 0 and srv.th.is_alive()
