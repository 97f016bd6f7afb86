"""The helper's serving loop: drain the ring, batch, compute, post.

One pass of the loop takes every published request (one ``drain``),
validates them all at once against the region (a bad request is answered
-EINVAL and never reaches a backend), groups the rest by service and
shape (XTS: unit size; RAID6: disks and lost blocks) and runs each group
as few backend calls as possible: one XTS launch over all the data units
of a chunk of requests, one RAID6 launch over all the stripes. Completions
go back with one ``post`` (one doorbell) per pass.

Engines:

- :class:`CpuEngine` runs a group synchronously with the ``cpu`` backend,
  straight on the region's memory.
- :class:`GpuEngine` (one per GPU) queues a chunk on one of a few CUDA
  streams and returns at once; the loop posts each chunk when its event
  fires, so consecutive chunks overlap. The region is registered with
  CUDA (``cudaHostRegister``).

  XTS, zero-copy (the default where the device can use the registered
  region's host addresses): a chunk is ONE launch of xts.cu's batched
  kernel, which reads and writes the region itself over PCIe; the
  requests travel as descriptors (offsets, first sector, step, key slot)
  inside the launch's arguments (above 32 requests: one copy of a
  descriptor table). No cudaMemcpy, no per-unit IV arrays, and for a
  batch of one request no numpy at all (the latency path).

  XTS, copy (``KGPU_XTS_IO=copy``, unaligned requests, or no zero-copy):
  large requests are copied by DMA straight between the region and the
  GPU with one ``cudaMemcpyAsync`` per request; small ones (where a copy
  call costs more than copying the bytes) are gathered into a pinned
  buffer and moved with one copy per chunk. RAID6 always copies (one
  ``cudaMemcpy2DAsync`` per request).

A GPU error fails over: a chunk that could not be queued, or whose inputs
are still intact after an asynchronous error, is redone on the CPU (and
reported with the CQE_CPU flag); an in-place XTS request whose buffer may
have been half written is answered -EIO, which makes the kernel redo it
from its own copy. That GPU is then taken out of service.
"""

import collections
import errno
import logging
import os
import select
import signal
import struct
import time

import numpy as np

from kgpu_helper import abi
from kgpu_helper.services.interface import KeyTable

log = logging.getLogger("kgpu.helper")

EINVAL = -errno.EINVAL
ENOKEY = -errno.ENOKEY
EIO = -errno.EIO

#: XTS requests below this many bytes are gathered on the host (one copy
#: call per chunk); larger ones are copied straight from the region.
DIRECT_MIN = 32 << 10
#: a chunk (one launch, one stream) closes at this many bytes
CHUNK_BYTES = 8 << 20
CHUNK_REQS = 1024
#: XTS data path: "auto" (zero-copy where the device allows it), "zerocopy",
#: "copy". With "auto", KGPU_XTS_ZC_MAX (bytes) sends larger chunks through
#: the copy engines instead; unset by default: on the H200 runs zero-copy
#: was the faster path at 1 MiB x depth 32-128 in two runs out of three
#: (helper/cuda/NOTES.md).
XTS_IO = os.environ.get("KGPU_XTS_IO", "auto")
ZC_MAX = (int(os.environ["KGPU_XTS_ZC_MAX"])
          if os.environ.get("KGPU_XTS_ZC_MAX") else None)
XTS_SVCS = (abi.SVC_XTS_ENC, abi.SVC_XTS_DEC)
RAID_SVCS = (abi.SVC_RAID6_GEN, abi.SVC_RAID6_REC, abi.SVC_RAID6_PQD)
_DUMMY_KEY = bytes(range(1, 33))


# ------------------------------------------------------------------ keys

class KeyCache:
    """The region's key slots as a KeyTable, re-expanded when a slot's
    generation changes (checked only for the slots a batch uses)."""

    def __init__(self, keys_view):
        self.view = keys_view
        n = len(keys_view)
        # generation of slot s: word 32 * s + 1 (read per request)
        self.words = keys_view.view(np.uint32).reshape(-1) if n else None
        self.table = KeyTable([_DUMMY_KEY] * n) if n else KeyTable()
        for s in range(n):
            self.table.wipe(s)
        self.gen = [None] * n
        self.loaded = np.zeros(max(n, 1), dtype=bool)

    def refresh(self, slots):
        for s in slots:
            s = int(s)
            if s >= len(self.gen):
                continue
            g = int(self.words[32 * s + 1])
            if g == self.gen[s]:
                continue
            # A sequence count (uapi/kgpu.h): odd while the kernel rewrites
            # the slot; a read counts only between two equal even values.
            for _ in range(1000):
                g = int(self.words[32 * s + 1])
                if g & 1:
                    continue
                klen = int(self.view["key_len"][s])
                key = self.view["key"][s, :64].tobytes()[:klen]
                if int(self.words[32 * s + 1]) == g:
                    break
            else:
                # Still changing: cache nothing, so the next batch reads
                # it again; this one's requests find the slot unloaded.
                if self.loaded[s]:
                    self.table.wipe(s)
                self.loaded[s] = False
                self.gen[s] = None
                continue
            if klen in (32, 64):
                self.table.set(s, key)
                self.loaded[s] = True
            else:
                if self.loaded[s]:
                    self.table.wipe(s)
                self.loaded[s] = False
            self.gen[s] = g


# ------------------------------------------------------------ validation

#: below this many requests a batch is validated in plain Python (numpy's
#: per-call overhead dominates small batches)
SMALL_BATCH = 8


def _check_one(r, lo, hi, keys):
    """validate() for one request, as a tuple in abi.SQE field order."""
    (_seq, _tag, svc, flags, in_off, in_len, out_len, out_off, unit,
     _step, _sector, key_slot, iv_mode, nd, fa, fb, _res) = r
    if flags or svc >= abi.SVC_COUNT:
        return EINVAL
    if svc == abi.SVC_NOP:
        return 0
    if not (lo <= in_off <= hi and in_len <= hi - in_off and lo <= out_off
            <= hi and out_len <= hi - out_off and in_len > 0
            and in_len == out_len and unit > 0 and unit % 16 == 0):
        return EINVAL
    if svc in XTS_SVCS:
        if unit > 4096 or in_len % unit or iv_mode > abi.IV_PLAIN:
            return EINVAL
        if out_off != in_off and out_off < in_off + in_len and \
                in_off < out_off + out_len:
            return EINVAL
        if key_slot >= len(keys.gen):
            return EINVAL
        keys.refresh((key_slot,))
        return 0 if keys.loaded[key_slot] else ENOKEY
    if svc == abi.SVC_RAID6_PQD:
        # deltas of data slots fa..fb, then P and Q (uapi/kgpu.h)
        if not (4 <= nd <= 32 and in_off == out_off and fa <= fb < nd - 2
                and in_len == (fb - fa + 3) * unit):
            return EINVAL
        return 0
    if not (4 <= nd <= 32 and in_off == out_off and in_len == nd * unit):
        return EINVAL
    if svc == abi.SVC_RAID6_REC and not (
            fa < nd and (fb == abi.RAID6_NONE or (fb < nd and fb != fa))):
        return EINVAL
    return 0


def validate(sqes, region, keys):
    """Per request: 0 if it may be computed, else a negative errno."""
    n = len(sqes)
    if n <= SMALL_BATCH:
        lo = region.data_off
        hi = lo + region.data_size
        return np.array([_check_one(r, lo, hi, keys) for r in sqes.tolist()],
                        dtype=np.int16)
    st = np.zeros(n, dtype=np.int16)
    lo = np.uint64(region.data_off)
    hi = np.uint64(region.data_off + region.data_size)
    svc = sqes["service"]
    in_off, out_off = sqes["in_off"], sqes["out_off"]
    in_len = sqes["in_len"].astype(np.uint64)
    out_len = sqes["out_len"].astype(np.uint64)
    unit = sqes["unit_size"].astype(np.uint64)

    def inside(off, ln):
        return (off >= lo) & (off <= hi) & (ln <= hi - np.minimum(off, hi))

    bad = (svc >= abi.SVC_COUNT) | (sqes["flags"] != 0)
    xts = (svc == abi.SVC_XTS_ENC) | (svc == abi.SVC_XTS_DEC)
    pqd = svc == abi.SVC_RAID6_PQD
    raid = (svc == abi.SVC_RAID6_GEN) | (svc == abi.SVC_RAID6_REC)
    data = xts | raid | pqd
    buf_ok = (inside(in_off, in_len) & inside(out_off, out_len)
              & (in_len > 0) & (in_len == out_len))
    unit_ok = (unit > 0) & (unit % np.uint64(16) == 0)
    safe_unit = np.where(unit_ok, unit, np.uint64(1))
    bad |= data & ~(buf_ok & unit_ok)
    # XTS: whole units, unit 16..4096, in place or disjoint, known IV mode
    overlap = ((out_off != in_off) & (out_off < in_off + in_len)
               & (in_off < out_off + out_len))
    bad |= xts & ((unit > np.uint64(4096)) | (in_len % safe_unit != 0)
                  | overlap | (sqes["iv_mode"] > abi.IV_PLAIN))
    # RAID6: ndisks blocks in place, lost blocks in range and distinct
    nd = sqes["ndisks"].astype(np.uint64)
    fa, fb = sqes["fail_a"], sqes["fail_b"]
    rshape = ((nd >= 4) & (nd <= 32) & (in_off == out_off)
              & (in_len == nd * unit))
    rec = svc == abi.SVC_RAID6_REC
    fail_ok = ((fa < nd) & ((fb == abi.RAID6_NONE) | ((fb < nd) & (fb != fa))))
    bad |= raid & ~rshape
    bad |= rec & ~fail_ok
    # RAID6_PQD: deltas of data slots fa..fb, then P and Q
    fa64, fb64 = fa.astype(np.uint64), fb.astype(np.uint64)
    pshape = ((nd >= 4) & (nd <= 32) & (in_off == out_off) & (fa64 <= fb64)
              & (fb64 + np.uint64(2) < nd)
              & (in_len == (fb64 - np.minimum(fa64, fb64) + np.uint64(3))
                 * unit))
    bad |= pqd & ~pshape
    st[bad] = EINVAL
    # XTS: the key slot must hold a key
    ks = sqes["key_slot"].astype(np.int64)
    kx = xts & ~bad
    if kx.any():
        inrange = ks < len(keys.gen)
        keys.refresh(np.unique(ks[kx & inrange]))
        loaded = np.zeros(n, dtype=bool)
        loaded[inrange] = keys.loaded[ks[inrange]]
        st[kx & ~inrange] = EINVAL
        st[kx & inrange & ~loaded] = ENOKEY
    return st


def xts_ivs(reqs, unit):
    """Sector number of every data unit of ``reqs`` (one uint64 per unit,
    already masked to 32 bits for iv_mode plain) and the unit counts."""
    if len(reqs) == 1:
        (_seq, _tag, _svc, _fl, _io, in_len, _ol, _oo, _u, step, sector,
         _ks, iv_mode, *_rest) = reqs.tolist()[0]
        count = in_len // unit
        sec = np.arange(count, dtype=np.uint64)
        sec *= np.uint64(step)
        sec += np.uint64(sector)
        if iv_mode == abi.IV_PLAIN:
            sec &= np.uint64(0xFFFFFFFF)
        return sec, np.array([count], dtype=np.int64)
    counts = (reqs["in_len"] // unit).astype(np.int64)
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    rel = (np.arange(total, dtype=np.uint64)
           - np.repeat(starts.astype(np.uint64), counts))
    sec = (np.repeat(reqs["sector"], counts)
           + rel * np.repeat(reqs["sector_step"].astype(np.uint64), counts))
    plain = reqs["iv_mode"] == abi.IV_PLAIN
    if plain.any():
        mask = np.where(plain, np.uint64(0xFFFFFFFF), ~np.uint64(0))
        sec &= np.repeat(mask, counts)
    return sec, counts


# ---------------------------------------------------------------- engines

class Done:
    """Completions that are ready now."""

    def __init__(self, cqes):
        self.cqes = cqes

    def done(self):
        return True

    def wait(self, spin=0.0):
        pass

    def finish(self):
        return self.cqes


_STATUS_FLAGS = struct.Struct("<hH")


def _cqes(reqs, status=0, flags=0):
    if len(reqs) == 1 and not isinstance(status, np.ndarray):
        # seq and tag open both an SQE and a CQE: 12 bytes, then 4 more
        raw = bytearray(reqs[:1].tobytes()[:12])
        raw += _STATUS_FLAGS.pack(int(status), flags)
        return np.frombuffer(raw, dtype=abi.CQE)
    c = np.zeros(len(reqs), dtype=abi.CQE)
    c["seq"] = reqs["seq"]
    c["tag"] = reqs["tag"]
    c["status"] = status
    c["flags"] = flags
    return c


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


def _cpu_run(cpu, svc, reqs):
    """cpu.run(), with a failure answered -EIO (the kernel then redoes the
    requests from its own copy) instead of taking the helper down."""
    try:
        return cpu.run(svc, reqs)
    except Exception as e:  # noqa: BLE001 - answer, never die
        log.error("cpu backend failed on %d %s request(s): %s: %s",
                  len(reqs), abi.SERVICE_NAMES.get(svc, svc),
                  type(e).__name__, e)
        return EIO


# ------------------------------------------------------------------ helper

class Helper:
    """The serving loop over one transport.

    ``backend``: a services backend (cpu or cupy); ``gpus``: extra cupy
    backends for more GPUs (the first GPU is ``backend``). ``spin``:
    seconds to poll the ring before sleeping in poll() when idle (saves a
    wake-up per request at low queue depth).
    """

    def __init__(self, transport, backend, gpus=(), spin=50e-6,
                 cpu_backend=None, stats=None, xts_io=None):
        from kgpu_helper.services.cpu import CpuBackend

        self.t = transport
        self.region = transport.region
        self.keys = KeyCache(self.region.keys)
        self.cpu = CpuEngine(cpu_backend or (backend if backend.name == "cpu"
                                             else CpuBackend()),
                             self.region, self.keys)
        self.spin = spin
        self.stopping = False
        self.stats = stats if stats is not None else collections.Counter()
        self.gpus = []
        self._registered = False
        if backend.name == "cupy":
            self._registered = self._register(backend)
            for be in [backend, *gpus]:
                self.gpus.append(GpuEngine(be, self.region, self.keys,
                                           self.cpu, self._registered,
                                           xts_io=xts_io))
        self._rr = 0
        self.inflight = collections.deque()
        # request_stop() writes here to end a sleep in poll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- CUDA registration of the region

    def _register(self, backend):
        import cupy as cp
        # The writable part only (ring indexes, rings, data): the header
        # and keys below rw_off are mapped read-only, which CUDA's default
        # registration refuses; the GPU never needs them.
        r = self.region
        ptr, size = r.buf.ctypes.data + r.rw_off, r.buf.size - r.rw_off
        try:
            with backend.device:
                # Portable | Mapped: every GPU may copy from it, and the
                # zero-copy XTS kernel addresses it directly
                cp.cuda.runtime.hostRegister(ptr, size, 3)
        except Exception as e:  # noqa: BLE001 - fall back to bounce copies
            log.warning("cannot register the region with CUDA (%s): copying "
                        "through pinned buffers instead", e)
            return False
        log.info("region of %d MiB registered with CUDA", size >> 20)
        return True

    def _unregister(self):
        if self._registered:
            import cupy as cp
            try:
                cp.cuda.runtime.hostUnregister(self.region.buf.ctypes.data
                                               + self.region.rw_off)
            except Exception as e:  # noqa: BLE001
                log.warning("hostUnregister: %s", e)
            self._registered = False

    # -- dispatch

    def _gpu(self):
        if len(self.gpus) == 1:
            g = self.gpus[0]
            return g if g.broken is None else None
        live = [g for g in self.gpus if g.broken is None]
        if not live:
            return None
        self._rr = (self._rr + 1) % len(live)
        return live[self._rr]

    def dispatch(self, sqes):
        """Validate and start ``sqes``; returns (ready CQE arrays, list of
        chunks in flight)."""
        if len(sqes) == 1:
            return self._dispatch_one(sqes)
        ready, pending = [], []
        st = validate(sqes, self.region, self.keys)
        bad = st != 0
        if not bad.any():
            ok = sqes
        else:
            ready.append(_cqes(sqes[bad], st[bad]))
            self.stats["errors"] += int(bad.sum())
            for s, c in zip(*np.unique(sqes["service"][bad],
                                       return_counts=True)):
                self.stats[("errors", int(s))] += int(c)
            ok = sqes[~bad]
        if len(ok) == 0:
            return ready, pending
        nop = ok["service"] == abi.SVC_NOP
        if nop.any():
            ready.append(_cqes(ok[nop]))
            self.stats[("done", abi.SVC_NOP)] += int(nop.sum())
            ok = ok[~nop]
            if len(ok) == 0:
                return ready, pending
        for key, reqs in self._groups(ok):
            s = key[0]
            self.stats[("requests", s)] += len(reqs)
            self.stats[("bytes", s)] += int(reqs["in_len"].sum())
            for part in self._chunks(reqs):
                self._start(s, part, None, ready, pending)
        return ready, pending

    def _dispatch_one(self, sqes):
        """dispatch() of a batch of one request, with plain Python ints
        (numpy's per-call overhead is most of the cost at depth 1)."""
        ready, pending = [], []
        row = sqes.tolist()[0]
        lo = self.region.data_off
        st = _check_one(row, lo, lo + self.region.data_size, self.keys)
        svc = row[2]
        if st:
            ready.append(_cqes(sqes, st))
            self.stats["errors"] += 1
            self.stats[("errors", svc)] += 1
        elif svc == abi.SVC_NOP:
            ready.append(_cqes(sqes))
            self.stats[("done", svc)] += 1
        else:
            self.stats[("requests", svc)] += 1
            self.stats[("bytes", svc)] += row[5]
            self._start(svc, sqes, row, ready, pending)
        return ready, pending

    def _start(self, s, part, row, ready, pending):
        """One chunk to a GPU, or (no GPU, or it fails) to the CPU."""
        g = self._gpu()
        if g is not None:
            try:
                pending.append(g.submit(s, part, row))
                self.stats[("gpu", s)] += len(part)
                return
            except Exception as e:  # noqa: BLE001 - fail over
                g.broken = f"{type(e).__name__}: {e}"
                log.error("%s: cannot queue work (%s); taking it "
                          "out of service", g.name(), g.broken)
                # Part of the chunk may be queued already: the CPU may
                # redo it only once nothing on the GPU can still write.
                if not self._quiesce():
                    ready.append(_cqes(part, EIO))
                    return
        self.stats[("cpu", s)] += len(part)
        # CQE_CPU whenever the CPU did it, GPUs or not: the
        # kernel's GPU/CPU split must tell the truth.
        ready.append(_cqes(part, _cpu_run(self.cpu, s, part), abi.CQE_CPU))

    @staticmethod
    def _groups(reqs):
        """(service, shape...) -> requests, in arrival order per group."""
        if len(reqs) == 1:
            yield (int(reqs["service"][0]),), reqs
            return
        svc = reqs["service"].astype(np.int64)
        xts = (svc == abi.SVC_XTS_ENC) | (svc == abi.SVC_XTS_DEC)
        gen = svc == abi.SVC_RAID6_GEN
        a = np.where(xts, reqs["unit_size"], reqs["ndisks"]).astype(np.int64)
        fa = np.where(xts | gen, 0, reqs["fail_a"]).astype(np.int64)
        fb = np.where(xts | gen, 0, reqs["fail_b"]).astype(np.int64)
        key = (((svc << 16 | a) << 8 | fa) << 8) | fb
        if (key == key[0]).all():
            yield (int(svc[0]),), reqs
            return
        for k in np.unique(key):
            sel = reqs[key == k]
            yield (int(sel["service"][0]),), sel

    @staticmethod
    def _chunks(reqs):
        if len(reqs) <= 1:
            yield reqs
            return
        lens = reqs["in_len"].astype(np.int64)
        if lens.sum() <= CHUNK_BYTES and len(reqs) <= CHUNK_REQS:
            yield reqs
            return
        start, acc = 0, 0
        for j, n in enumerate(lens):
            if j > start and (acc + n > CHUNK_BYTES
                              or j - start >= CHUNK_REQS):
                yield reqs[start:j]
                start, acc = j, 0
            acc += int(n)
        yield reqs[start:]

    # -- the loop

    def request_stop(self, *_):
        self.stopping = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def install_signals(self):
        """SIGTERM/SIGINT: finish the batch in hand, post it, return."""
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.request_stop)

    def _sleep(self, timeout):
        """Spin on the ring for ``self.spin`` s, then sleep in poll()."""
        t = self.t
        if self.spin > 0:
            end = time.perf_counter() + self.spin
            while time.perf_counter() < end:
                if t.pending() or self.stopping:
                    return
        p = select.poll()
        p.register(t.fileno(), select.POLLIN)
        if self._wake_r >= 0:
            p.register(self._wake_r, select.POLLIN)
        ms = None if timeout is None else int(timeout * 1000)
        for fd, ev in p.poll(ms):
            if fd == t.fileno():
                if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    from kgpu_helper.transport import TransportError
                    raise TransportError("the ring's other side went away")
                if hasattr(t, "_clear"):
                    t._clear()

    def _wait_oldest(self):
        """Wait for the oldest chunk, looking at the ring meanwhile."""
        ch = self.inflight[0]
        end = time.perf_counter() + max(self.spin, 200e-6)
        while time.perf_counter() < end:
            if ch.done() or self.t.pending():
                return
        ch.wait()

    def serve(self, max_requests=None, idle_timeout=None):
        """Serve until stopped (signal, ``request_stop``), the ring's other
        side goes away, ``max_requests`` were answered, or nothing
        arrived for ``idle_timeout`` seconds. Returns requests answered."""
        answered = 0
        t = self.t
        idle_since = time.monotonic()
        try:
            while True:
                if self.stopping and not self.inflight:
                    break
                if max_requests is not None and answered >= max_requests \
                        and not self.inflight:
                    break
                sqes = None
                if not self.stopping:
                    if not self.inflight and not t.pending():
                        if idle_timeout is not None and \
                                time.monotonic() - idle_since > idle_timeout:
                            break
                        self._sleep(0.5 if idle_timeout is not None
                                    else None)
                        continue
                    sqes = t.drain()
                out = []
                if sqes is not None and len(sqes):
                    idle_since = time.monotonic()
                    try:
                        ready, pend = self.dispatch(sqes)
                    except Exception as e:  # noqa: BLE001 - a bug of ours
                        # Answer the whole batch -EIO (the kernel redoes
                        # it) once no GPU can still be writing any of it.
                        log.error("batch of %d failed: %s: %s", len(sqes),
                                  type(e).__name__, e)
                        self._quiesce()
                        ready, pend = [_cqes(sqes, EIO)], []
                    out.extend(ready)
                    self.inflight.extend(pend)
                while self.inflight and self.inflight[0].done():
                    out.append(self.inflight.popleft().finish())
                if out:
                    cq = np.concatenate(out) if len(out) > 1 else out[0]
                    t.post(cq)
                    answered += len(cq)
                    self.stats["batches"] += 1
                    self.stats["answered"] += len(cq)
                elif self.inflight and (sqes is None or not len(sqes)):
                    if self.stopping:
                        self.inflight[0].wait()
                    else:
                        self._wait_oldest()
        finally:
            # whatever is still queued on a GPU completes before we go
            while self.inflight:
                ch = self.inflight.popleft()
                try:
                    cq = ch.finish()
                    t.post(cq)
                except Exception as e:  # noqa: BLE001 - the ring is gone
                    log.warning("could not post a chunk at exit: %s", e)
        return answered

    def _quiesce(self):
        """Wait until no GPU work of ours is running; False if a stream
        could not be waited for (its work may still be running)."""
        ok = True
        for g in self.gpus:
            for s in g.streams:
                try:
                    s.synchronize()
                except Exception:  # noqa: BLE001
                    ok = False
        return ok

    def close(self):
        self._quiesce()
        self._unregister()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


# ------------------------------------------------------------ calibration

CAL_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)


def calibrate(gpu, cpu, sizes=CAL_SIZES, reps=5):
    """Per service: the request size (bytes) from which ``gpu`` beats
    ``cpu`` on one request (copy in, compute, copy out), or None if it
    never does within ``sizes``. The CPU side is this helper's CPU backend,
    a stand-in for the kernel's own CPU code."""
    rng = np.random.default_rng(1)
    keys = KeyTable([rng.bytes(64)])
    res = {abi.SVC_NOP: 0}

    def best(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    for svc in (abi.SVC_XTS_ENC, abi.SVC_XTS_DEC, abi.SVC_RAID6_GEN,
                abi.SVC_RAID6_REC, abi.SVC_RAID6_PQD):
        cross = None
        for size in sizes:
            if svc in XTS_SVCS:
                data = gpu.empty_host((size,))
                data[:] = rng.integers(0, 256, size, dtype=np.uint8)
                sec = np.arange(size // 512, dtype=np.uint64)
                out = gpu.empty_host((size,))
                f = "xts_decrypt" if svc == abi.SVC_XTS_DEC else "xts_encrypt"
                tg = best(lambda: getattr(gpu, f)(keys, data, sec, out=out))
                tc = best(lambda: getattr(cpu, f)(keys, data, sec, out=out))
            else:
                k = 8
                n = max(16, size // k // 16 * 16)
                blocks = gpu.empty_host((k + 2, n))
                blocks[:] = rng.integers(0, 256, blocks.shape, dtype=np.uint8)
                if svc == abi.SVC_RAID6_GEN:
                    tg = best(lambda: gpu.raid6_gen(blocks[:k], blocks[k],
                                                    blocks[k + 1]))
                    tc = best(lambda: cpu.raid6_gen(blocks[:k], blocks[k],
                                                    blocks[k + 1]))
                elif svc == abi.SVC_RAID6_PQD:
                    # read-modify-write of two data blocks: 2 deltas, P, Q
                    b = blocks
                    tg = best(lambda: gpu.raid6_pqd(b[:2], b[2], b[3], 3))
                    tc = best(lambda: cpu.raid6_pqd(b[:2], b[2], b[3], 3))
                else:
                    tg = best(lambda: gpu.raid6_recover(blocks, [1, 5]))
                    tc = best(lambda: cpu.raid6_recover(blocks, [1, 5]))
            if tg < tc:
                if cross is None:
                    cross = size
            else:
                cross = None
        res[svc] = cross
    return res
