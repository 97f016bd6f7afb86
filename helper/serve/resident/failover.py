"""Failover of the resident XTS path: when the persistent kernel dies
(a GPU fault), what the serving loop must answer and from where it takes
the ring over (:func:`failover_plan`, read from host memory only), and the
spill ring as a Transport (:class:`SpillTransport`), through which the
serving loop serves what the kernel does not take and, after a failover,
the ring itself.
"""

import os

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.rings.transport import Transport, TransportError
from kgpu_helper.serve.resident.layout import (
    _MASK32, CTL_FWD, CTL_SPILL_CQ_TAIL, CTL_SPILL_HEAD, CTL_SPILL_TAIL,
    SPILL_SQ_BYTE, ST_DONE, ST_IDLE, ST_SPILL, _i32, server_words,
    spill_rings)

def failover_plan(region, ctl, servers, sq_start, cq_start):
    """What the serving loop must do to take the ring over from a resident
    kernel that died (a GPU fault), from host memory only (a faulted
    context's device memory cannot be read).

    ``ctl``: the control block (uint8); ``sq_start``/``cq_start``: sq_head
    and cq_tail when the kernel started. Returns ``(new_head, held,
    forward)``: the SQ index from which the loop reads the ring itself;
    the SQEs the kernel's blocks held and did not answer (their data may
    be half written: answer them -EIO); the spill answers the kernel did
    not move to the CQ yet (post them as they are).

    A block's words (claim, state) and CTL_FWD are posted stores written
    as the kernel goes; a request whose CQE was published just before the
    fault, with its block's last store lost, is recognised by its (seq,
    tag) among the CQ's recent entries, so nothing is answered twice.
    """
    r = region
    idx = r.idx
    sq_tail = int(idx[abi.SQ_TAIL_OFF // 4])
    cq_tail = int(idx[abi.CQ_TAIL_OFF // 4])
    w = ctl[:SPILL_SQ_BYTE].view(np.uint32)
    n_cq = min(_i32(cq_tail - cq_start), r.entries)
    cq = r.read(r.cq_off, abi.CQE, (cq_tail - n_cq) & r.mask, n_cq) \
        if n_cq > 0 else np.zeros(0, abi.CQE)
    answered = set(zip(cq["seq"].tolist(), cq["tag"].tolist()))
    entries = r.entries
    sp_tail = int(w[CTL_SPILL_TAIL])
    n_sp = min(sp_tail, entries)  # the spill ring starts at 0
    sq_sp, scq = spill_rings(ctl, entries)
    i = np.arange(sp_tail - n_sp, sp_tail, dtype=np.int64) & (entries - 1)
    spilled = set(zip(sq_sp["seq"][i].tolist(), sq_sp["tag"][i].tolist()))

    held = []
    last = None  # the furthest claim, relative to sq_start
    for claim, state in server_words(ctl, servers).tolist():
        if state == ST_IDLE:
            continue
        rel = _i32(claim - sq_start)
        if last is None or rel > last:
            last = rel
        if state == ST_DONE or _i32(sq_tail - claim) <= 0:
            continue  # answered, or not published yet: the loop reads it
        q = r.read(r.sq_off, abi.SQE, claim & r.mask, 1)
        key = (int(q["seq"][0]), int(q["tag"][0]))
        if key in answered or (state == ST_SPILL and key in spilled):
            continue
        held.append(q)
    new_head = sq_start if last is None else (sq_start + last + 1) & _MASK32
    if _i32(new_head - sq_tail) > 0:
        new_head = sq_tail  # claims past the tail: nothing published there
    fwd, sp_cq_tail = int(w[CTL_FWD]), int(w[CTL_SPILL_CQ_TAIL])
    n_fw = _i32(sp_cq_tail - fwd)
    forward = np.zeros(0, abi.CQE)
    if 0 < n_fw <= entries:
        j = np.arange(fwd, fwd + n_fw, dtype=np.int64) & (entries - 1)
        forward = scq[j].copy()
        keep = [(int(c["seq"]), int(c["tag"])) not in answered
                for c in forward]
        forward = forward[np.array(keep, bool)]
    held = np.concatenate(held) if held else np.zeros(0, abi.SQE)
    return new_head, held, forward


class SpillTransport(Transport):
    """The spill ring of ``ctl`` (a uint8 array: the control block) as a
    Transport for the serving loop: ``drain`` takes what the GPU spilled,
    ``post`` answers it on the spill CQ (the GPU moves the answers into the
    ring's CQ: no doorbell here). ``fileno`` is the eventfd the host
    thread signals; ``hangup()`` says whether the ring's other side went
    away (the host thread saw it)."""

    name = "resident-spill"

    def __init__(self, region, ctl, entries, efd, hangup=lambda: False):
        self.region = region
        self.ctl = ctl
        self.w = ctl[:SPILL_SQ_BYTE].view(np.uint32)
        self.entries = entries
        self.mask = entries - 1
        self.sq, self.cq = spill_rings(ctl, entries)
        self.efd = efd
        self.hangup = hangup
        self.head = int(self.w[CTL_SPILL_HEAD])
        self.cq_tail = int(self.w[CTL_SPILL_CQ_TAIL])
        #: set by the watchdog: called (in the serving loop's thread) to
        #: take the ring over after a fault of the resident kernel
        self.on_fault = None
        #: after a failover: the ring's own transport, served directly
        self.real = None

    def fileno(self):
        return self.efd if self.real is None else self.real.fileno()

    def _check_fault(self):
        if self.real is None and self.on_fault is not None:
            self.on_fault()

    def take_over(self, real):
        """From now on: what is left in the spill SQ, then the ring itself
        (``real``, its sq_head already set); answers go to the ring's CQ."""
        self.real = real
        self.on_fault = None

    def _spill_left(self):
        return (int(self.w[CTL_SPILL_TAIL]) - self.head) & _MASK32

    def pending(self):
        self._check_fault()
        if self.real is not None:
            return self._spill_left() + self.real.pending()
        return self._spill_left()

    def _wait_fd(self, timeout):
        super()._wait_fd(timeout)
        self._clear()

    def _clear(self):
        if self.real is not None:
            clear = getattr(self.real, "_clear", None)
            if clear is not None:
                clear()
            return
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        if self.hangup():
            raise TransportError("the ring's other side went away")

    def drain(self):
        self._check_fault()
        if self.real is not None:
            left = self._drain_spill()
            more = self.real.drain()
            return np.concatenate([left, more]) if len(left) else more
        return self._drain_spill()

    def _drain_spill(self):
        tail = int(self.w[CTL_SPILL_TAIL])  # then the entries (TSO)
        n = (tail - self.head) & _MASK32
        if n == 0:
            return np.zeros(0, abi.SQE)
        if n > self.entries:
            raise TransportError(f"spill ring corrupt: {n} entries on a ring "
                                 f"of {self.entries}")
        i = np.arange(self.head, self.head + n, dtype=np.int64) & self.mask
        out = self.sq[i].copy()
        self.head = tail
        self.w[CTL_SPILL_HEAD] = tail
        return out

    def post(self, cqes):
        n = len(cqes)
        if n == 0:
            return
        if self.real is not None:
            self.real.post(cqes)
            return
        i = np.arange(self.cq_tail, self.cq_tail + n, dtype=np.int64) \
            & self.mask
        self.cq[i] = cqes
        self.cq_tail = (self.cq_tail + n) & _MASK32
        self.w[CTL_SPILL_CQ_TAIL] = self.cq_tail  # after the entries (TSO)

    def close(self):
        pass
