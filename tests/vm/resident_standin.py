"""The GPU-resident path's host side on kgpu.ko's ring, in a guest with no
GPU: a Python thread stands in for resident.cu's persistent kernel.

    python3 resident_standin.py OUT_DIR

What ResidentXts sets up around its kernel, minus CUDA: the helper's
KernelTransport on /dev/kgpu, the C host thread on it
(resident.host_thread: KGPU_IOC_COMPLETE, poll() on /dev/kgpu, sq_head
written by the host thread), a control block with the spill rings
(resident.ctl_bytes) and the unchanged serving loop (daemon.Helper, cpu
backend) serving the spill ring (resident.SpillTransport).

The stand-in does what the kernel does, one request at a time, in the
same order: claim the next SQ index, wait until sq_tail passes it (never
writing sq_head: resident.cu's write_sq_head is 0 on this ring), copy
the SQE, check it (resident.check) and its key slot (the serving loop's
KeyCache), compute what it may take in place (the cpu backend, through
the serving loop's CpuEngine) and publish its CQE and then cq_tail; copy
the rest to the spill SQ; move the spill CQ's answers into the CQ. It is
the CQ's only producer, as the kernel is, and its own CQEs carry no
flags: the module counts them as "gpu", the spilled ones as "helper_cpu".

Prints "serving" once ready. SIGUSR1: rest 0.5 s, then measure 1 s of
idle into OUT_DIR/idle.json (CPU time of the process and of the host
thread, the host thread's counters, the ring indexes). SIGTERM: stop
and write OUT_DIR/standin.json (the stand-in's counts, the host thread's
counters, the serving loop's).
"""

import collections
import json
import os
import signal
import sys
import threading
import time

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.serve import resident
from kgpu_helper.serve.batch import KeyCache, cqes
from kgpu_helper.serve.daemon import Helper
from kgpu_helper.serve.engine_cpu import CpuEngine, cpu_run
from kgpu_helper.services.cpu import CpuBackend
from kgpu_helper.rings.transport import KernelTransport

MASK = 0xFFFFFFFF
SQ_TAIL, SQ_HEAD, CQ_TAIL = (o // 4 for o in (
    abi.SQ_TAIL_OFF, abi.SQ_HEAD_OFF, abi.CQ_TAIL_OFF))
MAX_BYTES = 16 << 10    # ResidentXts's default


class StandIn(threading.Thread):
    """resident_xts of resident.cu, one block, in Python."""

    def __init__(self, t, spill):
        super().__init__(name="gpu-stand-in", daemon=True)
        r = self.r = t.region
        self.idx = r.idx
        # the spill rings' words and entries, as the loop's transport
        # sees them (the same control block)
        self.w, self.spill_sq, self.spill_cq = spill.w, spill.sq, spill.cq
        self.keys = KeyCache(r.keys)
        self.cpu = CpuEngine(CpuBackend(), r, self.keys)
        # where ResidentXts starts the kernel's claim and CQ counters
        self.claim = int(self.idx[SQ_HEAD])
        self.cq_tail = int(self.idx[CQ_TAIL])
        self.spilled = self.forwarded = 0
        self.counts = collections.Counter()
        self.stopping = False

    def run(self):
        backoff = 50e-6
        while not self.stopping:
            self._forward()
            tail = int(self.idx[SQ_TAIL])
            head = int(self.idx[SQ_HEAD])
            # the host thread's sq_head: never ahead of sq_tail, never
            # a ring behind (cq_tail cannot move meanwhile: ours)
            if (tail - head) & MASK > self.r.entries:
                self.counts["sq_head_outside"] += 1
            if (tail - self.claim) & MASK == 0:
                time.sleep(backoff)
                # the GPU polls every 2 us at most; idle, this Python
                # thread backs off to 0.5 s, so that the idle measurement
                # is the host thread's and the loop's, hardly the
                # stand-in's (TCG: about 50 us of CPU a wake-up)
                backoff = min(backoff * 2, 0.5)
                continue
            backoff = 50e-6
            q = self.r.read(self.r.sq_off, abi.SQE, self.claim & self.r.mask,
                            1)
            self.claim = (self.claim + 1) & MASK
            if self._takes(q[0]):
                st = cpu_run(self.cpu, int(q["service"][0]), q)
                self._post(cqes(q, int(np.min(st))))
                self.counts["served"] += 1
                self.counts["served_failed"] += int(np.min(st) != 0)
            else:
                self.spill_sq[self.spilled & self.r.mask] = q[0]
                self.spilled = (self.spilled + 1) & MASK
                self.w[resident.CTL_SPILL_TAIL] = self.spilled  # TSO
                self.counts["spilled"] += 1

    def _takes(self, q):
        r = self.r
        if resident.check(q, r.data_off, r.data_size, MAX_BYTES,
                          r.nkeys) != resident.RES_OK:
            return False
        slot = int(q["key_slot"])
        self.keys.refresh([slot])
        return bool(self.keys.loaded[slot])   # else the helper answers

    def _forward(self):
        t = int(self.w[resident.CTL_SPILL_CQ_TAIL])
        while self.forwarded != t:
            self._post(self.spill_cq[self.forwarded & self.r.mask:][:1]
                       .copy())
            self.forwarded = (self.forwarded + 1) & MASK
            self.counts["forwarded"] += 1

    def _post(self, cqe):
        self.r.write(self.r.cq_off, self.cq_tail & self.r.mask, cqe)
        self.cq_tail = (self.cq_tail + 1) & MASK
        self.idx[CQ_TAIL] = self.cq_tail      # after the entry (TSO)
        self.counts["posted"] += 1


def measure_idle(out, t, host):
    time.sleep(0.5)
    idx = t.region.idx
    p0, h0, s0 = time.process_time(), host.cpu_seconds(), host.snapshot()
    w0 = time.monotonic()
    time.sleep(1.0)
    p1, h1, s1 = time.process_time(), host.cpu_seconds(), host.snapshot()
    wall = time.monotonic() - w0
    doc = dict(wall_s=wall, process_cpu_s=p1 - p0, host_cpu_s=h1 - h0,
               host=s1, host_delta={k: s1[k] - s0[k] for k in s1},
               sq_tail=int(idx[SQ_TAIL]), sq_head=int(idx[SQ_HEAD]),
               cq_tail=int(idx[CQ_TAIL]))
    with open(os.path.join(out, "idle.json"), "w") as f:
        json.dump(doc, f)


def main(out):
    t = KernelTransport()
    entries = t.region.entries
    ctl = np.zeros(resident.ctl_bytes(entries), np.uint8)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    spill = resident.SpillTransport(t.region, ctl, entries, efd)
    gpu = StandIn(t, spill)   # reads sq_head before the host thread runs
    host = resident.host_thread(
        t, ctl.ctypes.data + 4 * resident.CTL_SPILL_TAIL, efd)
    spill.hangup = host.hangup
    h = Helper(spill, CpuBackend())
    h.install_signals()
    signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(
        target=measure_idle, args=(out, t, host), daemon=True).start())
    gpu.start()
    print("serving", flush=True)
    try:
        h.serve()
    finally:
        gpu.stopping = True
        gpu.join()
        host_cpu = host.cpu_seconds()
        host.stop()
        doc = dict(standin=dict(gpu.counts), host=host.snapshot(),
                   host_cpu_s=host_cpu,
                   loop={k: h.stats[k] for k in ("answered", "batches")},
                   hangup=host.hangup())
        with open(os.path.join(out, "standin.json"), "w") as f:
            json.dump(doc, f)
        h.close()
        os.close(efd)
        t.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
