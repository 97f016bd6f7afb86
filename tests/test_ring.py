"""The ring transport and the user-space ring driver (no helper logic)."""

import threading
import time

import numpy as np
import pytest

from kgpu_helper.rings import abi
from kgpu_helper.rings.ringdriver import DETACHED, RingDriver, sqe
from kgpu_helper.rings.transport import (KernelTransport, Region, ShmTransport,
                                   TransportError)


@pytest.fixture
def drv(tmp_path):
    d = RingDriver(str(tmp_path / "ring.sock"), entries=8,
                   data_size=1 << 20, key_slots=4)
    yield d
    d.close()


def attach(d):
    """A ShmTransport attached to ``d`` (the driver accepts meanwhile)."""
    box = []
    th = threading.Thread(target=lambda: box.append(
        ShmTransport(d.sock_path)))
    th.start()
    assert d.wait_attach(5)
    th.join(5)
    return box[0]


def test_region_layout_matches_header(drv):
    r = drv.region
    h = r.hdr
    assert int(h["magic"]) == abi.MAGIC
    assert r.entries == 8 and r.nkeys == 4
    assert r.data_off % 4096 == 0 and r.data_size == 1 << 20
    assert int(h["region_size"]) == r.buf.size
    assert int(h["cq_off"]) >= int(h["sq_off"]) + 8 * abi.SQE.itemsize
    # a corrupt header is refused with the reason
    bad = bytearray(r.buf[:8192].tobytes())
    bad[0] ^= 1
    with pytest.raises(TransportError, match="magic"):
        Region(bad)


def test_no_module_and_no_driver_are_clear_errors(tmp_path):
    with pytest.raises(TransportError, match="module is not loaded"):
        KernelTransport(str(tmp_path / "kgpu"))
    with pytest.raises(TransportError, match="no ring driver"):
        ShmTransport(str(tmp_path / "nothing.sock"))


def test_second_helper_is_busy(drv):
    t = attach(drv)
    err = []

    def second():
        try:
            ShmTransport(drv.sock_path)
        except TransportError as e:
            err.append(str(e))
    th = threading.Thread(target=second)
    th.start()
    # the driver answers while it waits: until the second one has its
    # answer (a single 0.5 s wait missed a thread that connected later)
    end = time.monotonic() + 5
    while th.is_alive() and time.monotonic() < end:
        drv.wait(timeout=0.05)
    th.join(5)
    assert err and "busy" in err[0]
    t.close()


def test_back_pressure_and_wrap_around(drv):
    t = attach(drv)
    reqs = np.concatenate([sqe(abi.SVC_NOP) for _ in range(20)])
    tags = drv.submit(reqs)
    assert len(tags) == 8 and drv.space() == 0
    assert len(drv.submit(reqs)) == 0  # full: the caller must wait
    seen = 0
    for _ in range(10):  # indexes wrap the 8-entry ring many times
        got = t.drain()
        assert len(got) > 0
        c = np.zeros(len(got), abi.CQE)
        c["seq"], c["tag"] = got["seq"], got["tag"]
        t.post(c)
        done = drv.wait(timeout=2)
        assert (done["status"] == 0).all()
        seen += len(done)
        drv.submit(reqs[:len(done)])
    assert seen >= 80 and drv.bad_completions == 0
    t.close()


def test_entries_split_across_the_ring_end(drv):
    """Batches that straddle the end of the 8-entry rings, and batches of
    one (the byte-copy paths), come through field for field."""
    t = attach(drv)
    for start_n, n in ((5, 5), (3, 1), (1, 7), (6, 4)):
        # move the indexes to `start_n` past a multiple of the ring size
        pre = np.concatenate([sqe(abi.SVC_NOP) for _ in range(start_n)])
        drv.submit(pre)
        got = t.drain()
        c = np.zeros(len(got), abi.CQE)
        c["seq"], c["tag"] = got["seq"], got["tag"]
        t.post(c)
        drv.wait(timeout=2)
        reqs = np.concatenate([sqe(abi.SVC_XTS_ENC, in_off=4096 * i,
                                   in_len=512 + i, sector=(1 << 63) + i,
                                   key_slot=i, unit_size=512)
                               for i in range(n)])
        tags = drv.submit(reqs)
        got = t.drain()
        assert len(got) == n
        assert list(got["tag"]) == list(tags)
        for f in ("in_off", "in_len", "sector", "key_slot", "service"):
            assert (got[f] == reqs[f]).all(), f
        c = np.zeros(n, abi.CQE)
        c["seq"], c["tag"] = got["seq"], got["tag"]
        c["status"] = -np.arange(n)
        t.post(c)
        done = []
        while len(done) < n:
            done.extend(drv.wait(timeout=2).tolist())
        assert sorted((d[0], d[2]) for d in done) == sorted(
            (int(tg), -i) for i, tg in enumerate(tags))
    assert drv.bad_completions == 0
    t.close()


def test_driver_drops_bad_completions(drv):
    t = attach(drv)
    drv.submit(np.concatenate([sqe(abi.SVC_NOP), sqe(abi.SVC_NOP)]))
    got = t.drain()
    c = np.zeros(3, abi.CQE)
    c["tag"] = [got["tag"][0], got["tag"][1], 7]
    c["seq"] = [got["seq"][0], got["seq"][1] + 99, 5]  # wrong seq, stray tag
    t.post(c)
    done = drv.wait(timeout=2)
    assert len(done) == 1 and drv.bad_completions == 2
    t.close()


def test_detach_hands_back_in_flight_and_resets(drv):
    t = attach(drv)
    drv.submit(np.concatenate([sqe(abi.SVC_NOP)] * 3))
    t.drain()
    t.close()  # like kill -9: the fd goes away
    done = drv.wait(timeout=2)
    assert len(done) == 3 and (done["status"] == DETACHED).all()
    assert not drv.attached() and drv.space() == 8
    idx = drv.region.idx
    assert [idx[i] for i in (abi.SQ_TAIL_OFF // 4, abi.SQ_HEAD_OFF // 4,
                             abi.CQ_TAIL_OFF // 4,
                             abi.CQ_HEAD_OFF // 4)] == [0, 0, 0, 0]
    t = attach(drv)  # a new helper starts clean
    drv.submit(sqe(abi.SVC_NOP))
    assert len(t.drain()) == 1
    t.close()
