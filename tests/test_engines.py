"""Several engines behind one helper (issue 12), without a GPU: fake
engines that run the cpu backend but complete when told (or late), so
that the scheduler's choices and the failover can be watched through
the ring. test_engines_gpu.py runs the same failover on two real GPU
engines sharing one GPU.

- the scheduler sends a chunk to the engine with the least work in
  flight: an idle engine is preferred, a slow one gets fewer chunks;
- an engine whose launches start raising mid-stream is taken out of
  service; the other engine and the CPU carry its work, and every
  request is answered exactly once with the right bytes;
- per-engine accounting adds up to what was served.
"""

import time

import numpy as np
import pytest

import test_daemon as td
from kgpu_helper.rings import abi
from kgpu_helper.serve import daemon
from kgpu_helper.serve.batch import cqes
from kgpu_helper.rings.ringdriver import sqe


class FakeChunk:
    def __init__(self, eng, svc, reqs, ready_at):
        self.eng, self.svc, self.reqs = eng, svc, reqs
        self.ready_at = ready_at

    def done(self):
        return (not self.eng.hold) and time.perf_counter() >= self.ready_at

    def wait(self, spin=0.0):
        while not self.done():
            time.sleep(1e-4)

    def finish(self):
        return self.eng.finish(self)


class FakeEngine:
    """The cpu backend dressed as a GPU engine: work runs at finish();
    a chunk is done ``delay`` s after submit (never while ``hold``);
    submit raises from its ``fail_at``-th call on (a launch that fails)."""

    def __init__(self, cpu, name, delay=0.0, fail_at=None):
        self.cpu, self._name = cpu, name
        self.delay, self.fail_at = delay, fail_at
        self.hold = False
        self.broken = None
        self.streams = []
        self.submits = 0
        self.chunks = []  # submitted chunk sizes, in order

    def name(self):
        return self._name

    def submit(self, svc, reqs, row=None):
        self.submits += 1
        if self.fail_at is not None and self.submits >= self.fail_at:
            raise RuntimeError(f"{self._name}: launch failed")
        self.chunks.append(len(reqs))
        return FakeChunk(self, svc, reqs, time.perf_counter() + self.delay)

    def finish(self, ch):
        return cqes(ch.reqs, self.cpu.run(ch.svc, ch.reqs))


def with_engines(s, engines):
    """Put ``engines`` behind an idle helper (before anything is sent)."""
    h = s.h
    h.gpus = list(engines)
    h.accts = [daemon.EngineAccount(h._label(i, g))
               for i, g in enumerate(h.gpus)]
    h._acct_of = {id(g): a for g, a in zip(h.gpus, h.accts)}


def xts_case(d, n, i):
    """An out-of-place XTS request of ``n`` bytes and its expected output."""
    data = td.RNG.integers(0, 256, n, dtype=np.uint8).tobytes()
    oin = d.buffer(n)
    d.view(oin, n)[:] = np.frombuffer(data, np.uint8)
    oout = d.buffer(n)
    dec = i % 3 == 1
    req = sqe(abi.SVC_XTS_DEC if dec else abi.SVC_XTS_ENC, in_off=oin,
              out_off=oout, in_len=n, out_len=n, unit_size=512,
              sector=977 * i, sector_step=1)
    want = td.xts_oracle(td.KEY64, data, 977 * i, 1, 512, decrypt=dec)
    return req, oout, want


def closed_loop(d, reqs, depth, timeout=30):
    """Send ``reqs`` keeping ``depth`` in flight; returns, per request,
    every completion that answered it (tag and seq must match)."""
    answers = [[] for _ in reqs]
    by_tag = {}  # tag -> (index, seq) of the request it carries now
    nxt = 0
    end = time.monotonic() + timeout
    while nxt < len(reqs) or by_tag:
        assert time.monotonic() < end, "requests left unanswered"
        while nxt < len(reqs) and len(by_tag) < depth:
            tags = d.submit(reqs[nxt])
            if not len(tags):
                break
            t = int(tags[0])
            by_tag[t] = (nxt, int(d.seq_of[t]))
            nxt += 1
        for c in d.wait(timeout=5):
            t, seq = int(c["tag"]), int(c["seq"])
            i, want_seq = by_tag.pop(t)
            assert seq == want_seq
            answers[i].append((int(c["status"]), int(c["flags"])))
    # nothing more may come: a late duplicate would show here
    time.sleep(0.05)
    assert len(d.reap()) == 0
    assert d.bad_completions == 0
    return answers


@pytest.fixture
def srv(tmp_path):
    s = td.Served(tmp_path, entries=64, report_every=0)
    yield s
    s.close()


def _one_per_chunk(monkeypatch):
    monkeypatch.setattr(daemon, "CHUNK_REQS", 1)


def test_idle_engine_is_preferred(srv, monkeypatch):
    """While engine 0 holds a chunk, every new chunk goes to engine 1."""
    _one_per_chunk(monkeypatch)
    a = FakeEngine(srv.h.cpu, "A")
    b = FakeEngine(srv.h.cpu, "B")
    h = srv.h
    h.request_stop()
    srv.th.join(10)
    with_engines(srv, [a, b])
    a.hold = True
    cases = [xts_case(srv.d, 4096, i) for i in range(6)]
    ready, pend = h.dispatch(np.concatenate([c[0] for c in cases[:1]]))
    assert not ready and len(pend) == 1 and a.chunks == [1]
    for c in cases[1:]:
        ready, pend2 = h.dispatch(c[0])
        assert not ready and len(pend2) == 1
        for ch in pend2:
            assert ch.eng is b
            h._finish(ch)  # B is quick: done before the next one comes
    assert a.chunks == [1] and b.chunks == [1] * 5
    assert h.accts[0].q_reqs == 1 and h.accts[1].q_reqs == 0
    assert h.accts[1].reqs == 5 and h.accts[1].bytes == 5 * 4096
    a.hold = False
    h._finish(pend[0])
    assert h.accts[0].q_bytes == 0 and h.accts[0].reqs == 1
    # idle again: ties are taken in turn
    for c in cases:
        _, p = h.dispatch(c[0])
        for ch in p:
            h._finish(ch)
    assert len(a.chunks) == 1 + 3 and len(b.chunks) == 5 + 3


def test_queue_depth_not_round_robin(srv, monkeypatch):
    """A slow engine (chunks take 20 ms) gets far fewer chunks than a
    quick one; round-robin would have given it half."""
    _one_per_chunk(monkeypatch)
    slow = FakeEngine(srv.h.cpu, "slow", delay=0.02)
    quick = FakeEngine(srv.h.cpu, "quick")
    with_engines(srv, [slow, quick])
    cases = [xts_case(srv.d, 4096, i) for i in range(300)]
    answers = closed_loop(srv.d, [c[0] for c in cases], depth=8)
    assert all(a == [(0, 0)] for a in answers)
    for _req, oout, want in cases:
        assert srv.d.view(oout, len(want)).tobytes() == want
    ns, nq = sum(slow.chunks), sum(quick.chunks)
    assert ns + nq == len(cases)
    assert ns < 0.2 * len(cases), (ns, nq)
    a0, a1 = srv.h.accts
    assert (a0.reqs, a1.reqs) == (ns, nq)
    assert a0.bytes + a1.bytes == 4096 * len(cases)
    assert a0.q_reqs == a1.q_reqs == 0


@pytest.mark.parametrize("depth", [1, 16])
def test_engine_fails_mid_stream(srv, monkeypatch, depth):
    """Engine A's launches raise from its 6th chunk on: B and the CPU
    carry the rest; each request is answered once, with the right bytes;
    the accounting adds up."""
    _one_per_chunk(monkeypatch)
    a = FakeEngine(srv.h.cpu, "A", delay=0.001, fail_at=6)
    b = FakeEngine(srv.h.cpu, "B", delay=0.001)
    with_engines(srv, [a, b])
    cases = [xts_case(srv.d, [4096, 8192, 512 * 3][i % 3], i)
             for i in range(120)]
    answers = closed_loop(srv.d, [c[0] for c in cases], depth=depth)
    assert all(len(x) == 1 and x[0][0] == 0 for x in answers)
    for _req, oout, want in cases:
        assert srv.d.view(oout, len(want)).tobytes() == want
    assert a.broken and "launch failed" in a.broken
    assert b.broken is None
    assert len(a.chunks) == 5 and a.submits == 6
    # the chunk whose launch failed went to B (the live engine), not the CPU
    assert len(b.chunks) == len(cases) - 5
    h = srv.h
    total = sum(x.reqs for x in h.accts) + h.cpu_acct.reqs
    assert total == len(cases)
    assert h.accts[0].reqs == 5
    assert sum(x.bytes for x in h.accts) + h.cpu_acct.bytes == sum(
        len(c[2]) for c in cases)
    lines = h.report()
    assert lines[0].startswith("engine 0 (A): 5 requests")
    assert lines[-1].startswith("cpu: ")


def test_all_engines_fail_cpu_carries(srv, monkeypatch):
    """Both engines fail: the CPU answers the rest (CQE_CPU)."""
    _one_per_chunk(monkeypatch)
    a = FakeEngine(srv.h.cpu, "A", fail_at=3)
    b = FakeEngine(srv.h.cpu, "B", fail_at=4)
    with_engines(srv, [a, b])
    cases = [xts_case(srv.d, 4096, i) for i in range(40)]
    answers = closed_loop(srv.d, [c[0] for c in cases], depth=4)
    assert all(len(x) == 1 and x[0][0] == 0 for x in answers)
    for _req, oout, want in cases:
        assert srv.d.view(oout, len(want)).tobytes() == want
    assert a.broken and b.broken
    ncpu = sum(1 for x in answers if x[0][1] & abi.CQE_CPU)
    h = srv.h
    assert ncpu == h.cpu_acct.reqs == len(cases) - len(a.chunks) - len(
        b.chunks)
    assert ncpu > 0
