"""The GPU engine (one per GPU): a chunk is queued on one of a few CUDA
streams and the call returns at once; the serving loop posts each chunk
when its event fires, so consecutive chunks overlap. The region is
registered with CUDA (``cudaHostRegister``).

XTS, zero-copy (the default where the device can use the registered
region's host addresses): a chunk is ONE launch of xts.cu's batched
kernel, which reads and writes the region itself over PCIe; the requests
travel as descriptors (offsets, first sector, step, key slot) inside the
launch's arguments (above 32 requests: one copy of a descriptor table,
built in C by :mod:`kgpu_helper.serve.fastpath` where it can be). No
cudaMemcpy, no per-unit IV arrays, and for a batch of one request no
numpy at all (the latency path).

XTS, copy (``KGPU_XTS_IO=copy``, unaligned requests, or no zero-copy):
large requests are copied by DMA straight between the region and the GPU
with one ``cudaMemcpyAsync`` per request; small ones (where a copy call
costs more than copying the bytes) are gathered into a pinned buffer and
moved with one copy per chunk. RAID6 always copies (one
``cudaMemcpy2DAsync`` per request).

A GPU error fails over: a chunk whose inputs are still intact after an
asynchronous error is redone on the CPU (CQE_CPU); an in-place XTS
request whose buffer may have been half written is answered -EIO, which
makes the kernel redo it from its own copy. That GPU is then taken out of
service.
"""

import collections
import logging
import os
import time

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.serve import fastpath
from kgpu_helper.serve.batch import EIO, XTS_SVCS, cqes as _cqes, xts_ivs
from kgpu_helper.serve.engine_cpu import cpu_run as _cpu_run

log = logging.getLogger("kgpu.helper")

#: XTS requests below this many bytes are gathered on the host (one copy
#: call per chunk); larger ones are copied straight from the region.
DIRECT_MIN = 32 << 10
#: XTS data path: "auto" (zero-copy where the device allows it), "zerocopy",
#: "copy". With "auto", KGPU_XTS_ZC_MAX (bytes) sends larger chunks through
#: the copy engines instead; unset by default: on the H200 runs zero-copy
#: was the faster path at 1 MiB x depth 32-128 in two runs out of three
#: (helper/cuda/NOTES.md).
XTS_IO = os.environ.get("KGPU_XTS_IO", "auto")
ZC_MAX = (int(os.environ["KGPU_XTS_ZC_MAX"])
          if os.environ.get("KGPU_XTS_ZC_MAX") else None)


class _PinnedPool:
    """Reusable pinned host buffers (allocating them is slow)."""

    def __init__(self):
        self.free = collections.defaultdict(list)

    def take(self, nbytes):
        import cupy as cp
        size = 1 << max(16, (max(nbytes, 1) - 1).bit_length())
        lst = self.free[size]
        if lst:
            return lst.pop()
        mem = cp.cuda.alloc_pinned_memory(size)
        return np.frombuffer(mem, dtype=np.uint8, count=size)

    def give(self, arr):
        self.free[arr.size].append(arr)


class GpuChunk:
    """One queued chunk: its requests, its event, what to do when done."""

    __slots__ = ("eng", "reqs", "event", "after", "pinned", "flags",
                 "svc", "retry_ok")

    def __init__(self, eng, svc, reqs, event, after, pinned, retry_ok):
        self.eng, self.svc, self.reqs = eng, svc, reqs
        self.event, self.after, self.pinned = event, after, pinned
        self.retry_ok = retry_ok

    def done(self):
        try:
            return self.event.done
        except Exception:  # noqa: BLE001 - an async error: finish() says
            return True

    def wait(self, spin=0.0):
        if spin > 0:
            end = time.perf_counter() + spin
            while time.perf_counter() < end:
                if self.done():
                    return
        try:
            self.event.synchronize()
        except Exception:  # noqa: BLE001 - reported by finish()
            pass

    def finish(self):
        return self.eng.finish(self)


class GpuEngine:
    """One GPU: a CupyBackend, a few streams, staging buffers."""

    def __init__(self, backend, region, keys, cpu, registered, nstreams=4,
                 xts_io=None):
        import cupy as cp
        self.cp = cp
        self.be = backend
        self.region = region
        self.keys = keys
        self.cpu = cpu  # CpuEngine for failover
        self.registered = registered
        self.base = region.buf.ctypes.data
        self.broken = None
        with backend.device:
            self.streams = [cp.cuda.Stream(non_blocking=True)
                            for _ in range(nstreams)]
        self.stage = [None] * nstreams
        self.next = 0
        self.pool = _PinnedPool()
        self.events = []
        mode = xts_io or XTS_IO
        self.zero_copy = self._can_zero_copy(mode)
        self.zc_max = ZC_MAX if mode == "auto" else None
        self.batch = backend.xts_batch() if self.zero_copy else None

    def _can_zero_copy(self, mode):
        if mode not in ("auto", "zerocopy", "copy"):
            raise ValueError(f"KGPU_XTS_IO must be auto, zerocopy or copy, "
                             f"got {mode!r}")
        if mode == "copy" or not self.registered:
            return False
        try:
            # cudaDevAttrCanUseHostPointerForRegisteredMem: the kernel may
            # use the region's host addresses as they are
            ok = self.cp.cuda.runtime.deviceGetAttribute(
                91, self.be.device.id) == 1
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            log.info("%s cannot address the registered region directly: "
                     "XTS copies through the GPU's memory", self.name())
        return ok

    def _event(self):
        if self.events:
            return self.events.pop()
        return self.cp.cuda.Event(block=True, disable_timing=True)

    def name(self):
        return f"GPU {self.be.device.id} ({self.be.device_name()})"

    def _stream(self):
        i = self.next
        self.next = (i + 1) % len(self.streams)
        return i, self.streams[i]

    def _staging(self, i, nbytes):
        cp = self.cp
        buf = self.stage[i]
        if buf is None or buf.size < nbytes:
            self.stage[i] = None
            # Allocated on (and so freed back to) stream i's pool: work
            # still queued on that stream is ordered before any reuse.
            with self.streams[i]:
                buf = cp.empty(max(nbytes, 1 << 20), dtype=cp.uint8)
            self.stage[i] = buf
        return buf

    # -- queueing (may raise: the caller fails over to the CPU)

    def submit(self, svc, reqs, row=None):
        """Queue one chunk; ``row``: its only request as a tuple (the
        lean path of a batch of one)."""
        i, st = self._stream()
        with self.be.device:
            if svc in XTS_SVCS:
                if self.zero_copy and row is not None \
                        and not (row[4] | row[7]) & 15:
                    after, pinned, retry = self._xts_one(svc, row, st)
                elif self.zero_copy and not (
                        (reqs["in_off"] | reqs["out_off"]) & 15).any() and (
                        self.zc_max is None
                        or int(reqs["in_len"].sum()) <= self.zc_max):
                    after, pinned, retry = self._xts_zc(svc, reqs, i, st)
                else:
                    with st:
                        after, pinned, retry = self._xts(svc, reqs, i, st)
            else:
                with st:
                    after, pinned, retry = self._raid(svc, reqs, i, st)
            ev = self._event()
            ev.record(st)
        return GpuChunk(self, svc, reqs, ev, after, pinned, retry)

    def _xts_one(self, svc, row, st):
        """One request, zero-copy: a single launch, no numpy."""
        (_seq, _tag, _svc, _fl, in_off, n, _ol, out_off, unit, step, sector,
         slot, iv_mode) = row[:13]
        self.batch.one(svc == abi.SVC_XTS_DEC, self.keys.table, self.base,
                       self.base, in_off, out_off, n, unit, sector, step,
                       slot, iv_mode == abi.IV_PLAIN, st.ptr)
        # an in-place request may be half written after an async error
        return None, None, in_off != out_off

    def _xts_zc(self, svc, reqs, i, st):
        """A chunk, zero-copy: one launch over descriptors (and above
        XTS_INLINE requests one copy of the descriptor table)."""
        from kgpu_helper.services.cupy_backend import (XTS_DESC, XTS_INLINE,
                                                       xts_descs)
        n = len(reqs)
        unit = int(reqs["unit_size"][0])
        pinned = table = None
        if n > XTS_INLINE:
            pinned = self.pool.take(n * XTS_DESC.itemsize)
            table = pinned[:n * XTS_DESC.itemsize].view(XTS_DESC)
        fast = fastpath.xts_descs(reqs, unit, np.empty(n, XTS_DESC)
                                  if table is None else table)
        if fast is not None:
            descs, units = fast
        else:
            descs, units = xts_descs(reqs["in_off"], reqs["out_off"],
                                     reqs["in_len"], reqs["sector"],
                                     reqs["sector_step"], reqs["key_slot"],
                                     reqs["iv_mode"] == abi.IV_PLAIN, unit,
                                     out=table)
        d_descs = 0
        if pinned is not None:
            d = self._staging(i, descs.nbytes)
            self.cp.cuda.runtime.memcpyAsync(d.data.ptr, descs.ctypes.data,
                                             descs.nbytes, 1, st.ptr)
            d_descs = d.data.ptr
        self.batch.many(svc == abi.SVC_XTS_DEC, self.keys.table, self.base,
                        self.base, descs, units, unit, st.ptr, d_descs)
        retry = not (reqs["in_off"] == reqs["out_off"]).any()
        return None, pinned, retry

    def _xts(self, svc, reqs, i, st):
        cp = self.cp
        rt = cp.cuda.runtime
        unit = int(reqs["unit_size"][0])
        lens = reqs["in_len"].astype(np.int64)
        if self.registered:
            small = lens < DIRECT_MIN
            if small.any() and not small.all():
                order = np.argsort(~small, kind="stable")
                reqs, lens, small = reqs[order], lens[order], small[order]
        else:
            small = np.ones(len(reqs), dtype=bool)
        sec, counts = xts_ivs(reqs, unit)
        nunits = len(sec)
        total = int(lens.sum())
        nsmall = int(small.sum())
        small_bytes = int(lens[:nsmall].sum())
        meta = (12 * nunits + 255) & ~255
        pinned = self.pool.take(meta + small_bytes)
        pinned[:8 * nunits].view(np.uint64)[:] = sec
        pinned[8 * nunits:12 * nunits].view(np.int32)[:] = np.repeat(
            reqs["key_slot"].astype(np.int32), counts)
        buf = self.region.buf
        # plain Python ints: field access on numpy records is slow
        ins = reqs["in_off"].tolist()
        outs = reqs["out_off"].tolist()
        ns = reqs["in_len"].tolist()
        pos = meta
        for o, n in zip(ins[:nsmall], ns[:nsmall]):
            pinned[pos:pos + n] = buf[o:o + n]
            pos += n
        d = self._staging(i, meta + total)
        dp, hp = d.data.ptr, pinned.ctypes.data
        rt.memcpyAsync(dp, hp, meta + small_bytes, 1, st.ptr)
        pos = meta + small_bytes
        for o, n in zip(ins[nsmall:], ns[nsmall:]):
            rt.memcpyAsync(dp + pos, self.base + o, n, 1, st.ptr)
            pos += n
        d_ivs = d[:8 * nunits].view(cp.uint64)
        d_slots = d[8 * nunits:12 * nunits].view(cp.int32)
        d_data = d[meta:meta + total]
        self.be.launch_xts(svc == abi.SVC_XTS_DEC, self.keys.table, d_data,
                           d_data, d_ivs, d_slots, unit)
        if small_bytes:
            rt.memcpyAsync(hp + meta, dp + meta, small_bytes, 2, st.ptr)
        pos = meta + small_bytes
        for o, n in zip(outs[nsmall:], ns[nsmall:]):
            rt.memcpyAsync(self.base + o, dp + pos, n, 2, st.ptr)
            pos += n

        def after():
            p = meta
            for o, n in zip(outs[:nsmall], ns[:nsmall]):
                buf[o:o + n] = pinned[p:p + n]
                p += n

        # a redo on the CPU is safe unless a request is in place and its
        # output may have been half copied back
        retry = all(a != b for a, b in zip(ins[nsmall:], outs[nsmall:]))
        return after, pinned, retry

    def _raid(self, svc, reqs, i, st):
        cp = self.cp
        rt = cp.cuda.runtime
        pqd = svc == abi.SVC_RAID6_PQD
        # blocks per request: PQD's group shares fail_a..fail_b
        nd = (int(reqs["fail_b"][0]) - int(reqs["fail_a"][0]) + 3 if pqd
              else int(reqs["ndisks"][0]))
        k = nd - 2
        units = reqs["unit_size"].astype(np.int64)
        ncol = int(units.sum())
        cols = np.cumsum(units) - units
        d = self._staging(i, nd * ncol)
        dp = d.data.ptr
        gen = svc == abi.SVC_RAID6_GEN
        rows_in = k if gen else nd
        pinned = None
        if self.registered:
            hbase, hoff = self.base, reqs["in_off"].astype(np.int64)
        else:
            hoff = np.cumsum(reqs["in_len"].astype(np.int64)) - reqs["in_len"]
            pinned = self.pool.take(int(reqs["in_len"].sum()))
            hbase = pinned.ctypes.data
            buf = self.region.buf
            for r, p in zip(reqs, hoff):
                o, n = int(r["in_off"]), int(r["in_len"])
                pinned[p:p + n] = buf[o:o + n]
        for j in range(len(reqs)):
            u = int(units[j])
            rt.memcpy2DAsync(dp + int(cols[j]), ncol, hbase + int(hoff[j]),
                             u, u, rows_in, 1, st.ptr)
        blocks = d[:nd * ncol].reshape(nd, ncol)
        if gen or pqd:
            if gen:
                self.be.launch_gen(blocks[:k], blocks[k], blocks[k + 1])
            else:
                self.be.launch_pqd(blocks[:k], blocks[k], blocks[k + 1],
                                   int(reqs["fail_a"][0]))
            for j in range(len(reqs)):
                u = int(units[j])
                rt.memcpy2DAsync(hbase + int(hoff[j]) + k * u, u,
                                 dp + k * ncol + int(cols[j]), ncol, u, 2, 2,
                                 st.ptr)
            failed = (k, k + 1)
        else:
            failed = sorted({int(reqs["fail_a"][0])}
                            | ({int(reqs["fail_b"][0])}
                               if int(reqs["fail_b"][0]) != abi.RAID6_NONE
                               else set()))
            self.be.launch_recover(blocks, failed)
            for j in range(len(reqs)):
                u = int(units[j])
                for f in failed:
                    rt.memcpyAsync(hbase + int(hoff[j]) + f * u,
                                   dp + f * ncol + int(cols[j]), u, 2, st.ptr)

        after = None
        if pinned is not None:
            def after():
                buf = self.region.buf
                for r, p in zip(reqs, hoff):
                    u = int(r["unit_size"])
                    for f in failed:
                        o = int(r["in_off"]) + f * u
                        buf[o:o + u] = pinned[p + f * u:p + (f + 1) * u]
        # RAID6 never overwrites its inputs: a CPU redo is always safe
        return after, pinned, True

    # -- completion

    def finish(self, ch):
        err = None
        try:
            ch.event.synchronize()
        except Exception as e:  # noqa: BLE001 - any CUDA error
            err = e
        if err is None:
            if ch.after is not None:
                ch.after()
            if ch.pinned is not None:
                self.pool.give(ch.pinned)
            self.events.append(ch.event)
            return _cqes(ch.reqs)
        self.broken = f"{type(err).__name__}: {err}"
        log.error("%s failed (%s); taking it out of service", self.name(),
                  self.broken)
        if not ch.retry_ok:
            return _cqes(ch.reqs, EIO)
        return _cqes(ch.reqs, _cpu_run(self.cpu, ch.svc, ch.reqs),
                     abi.CQE_CPU)
