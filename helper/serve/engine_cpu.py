"""The CPU engine: groups run synchronously on the ``cpu`` backend,
straight on the region's memory (the helper without a GPU, and every
GPU engine's failover)."""

import logging

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.serve.batch import EIO, XTS_SVCS, xts_ivs

log = logging.getLogger("kgpu.helper")


class CpuEngine:
    """Runs groups on the CPU backend, in place on the region."""

    def __init__(self, backend, region, keys):
        self.be = backend
        self.buf = region.buf
        self.keys = keys

    def run(self, svc, reqs):
        """Compute ``reqs`` (one group); returns their statuses."""
        if svc in XTS_SVCS:
            self._xts(svc == abi.SVC_XTS_DEC, reqs)
        elif svc == abi.SVC_RAID6_GEN:
            for r in reqs:
                b = self._blocks(r)
                k = b.shape[0] - 2
                self.be.raid6_gen(b[:k], b[k], b[k + 1])
        elif svc == abi.SVC_RAID6_REC:
            for r in reqs:
                failed = [int(r["fail_a"])]
                if int(r["fail_b"]) != abi.RAID6_NONE:
                    failed.append(int(r["fail_b"]))
                self.be.raid6_recover(self._blocks(r), failed)
        elif svc == abi.SVC_RAID6_PQD:
            for r in reqs:
                b = self._blocks(r)
                n = b.shape[0] - 2
                self.be.raid6_pqd(b[:n], b[n], b[n + 1], int(r["fail_a"]))
        return np.zeros(len(reqs), np.int16)

    def _blocks(self, r):
        """The request's blocks as (blocks, unit_size)."""
        off, u = int(r["in_off"]), int(r["unit_size"])
        nb = int(r["in_len"]) // u
        return self.buf[off:off + nb * u].reshape(nb, u)

    def _xts(self, decrypt, reqs):
        fn = self.be.xts_decrypt if decrypt else self.be.xts_encrypt
        unit = int(reqs["unit_size"][0])
        sec, counts = xts_ivs(reqs, unit)
        slots = np.repeat(reqs["key_slot"].astype(np.int32), counts)
        if len(reqs) == 1:
            r = reqs[0]
            i, o, n = int(r["in_off"]), int(r["out_off"]), int(r["in_len"])
            # in place is fine for this backend: it reads the whole input
            # before it writes (tests/test_daemon.py checks it)
            fn(self.keys.table, self.buf[i:i + n], sec, slots,
               unit_size=unit, out=self.buf[o:o + n])
            return
        src = np.concatenate([self.buf[int(r["in_off"]):int(r["in_off"])
                                       + int(r["in_len"])] for r in reqs])
        out = fn(self.keys.table, src, sec, slots, unit_size=unit)
        pos = 0
        for r in reqs:
            n, o = int(r["in_len"]), int(r["out_off"])
            self.buf[o:o + n] = out[pos:pos + n]
            pos += n


def cpu_run(cpu, svc, reqs):
    """cpu.run(), with a failure answered -EIO (the kernel then redoes the
    requests from its own copy) instead of taking the helper down."""
    try:
        return cpu.run(svc, reqs)
    except Exception as e:  # noqa: BLE001 - answer, never die
        log.error("cpu backend failed on %d %s request(s): %s: %s",
                  len(reqs), abi.SERVICE_NAMES.get(svc, svc),
                  type(e).__name__, e)
        return EIO
