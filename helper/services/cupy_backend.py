"""The cupy backend: the CUDA kernels of ``kgpu_helper/cuda`` on one GPU.

Device arrays (cupy) in, device arrays out: the work is queued on the
current CUDA stream and the call returns at once. Host arrays (numpy) in:
copied to the GPU, computed, copied back, and the call returns when done;
that is the simple path for tests and small jobs. The throughput path is
:class:`Pipeline`: it takes host buffers (pinned: see ``empty_host``) and
overlaps the copy-in, kernel and copy-out of consecutive batches on a few
CUDA streams, which is what the helper does with the shared region.

This module imports CuPy at import time; import it only after
``probe()`` (or through ``get_backend``).
"""

import ctypes
import struct
import weakref

import cupy as cp
import numpy as np

from kgpu_helper.cuda import get_kernel
from kgpu_helper.services import aes_tables, gf256
from kgpu_helper.services.interface import (Backend, XtsRequest,
                                             check_raid6_gen,
                                             check_raid6_pqd,
                                             check_raid6_recover)

XTS_THREADS = 256
XTS_TILE = 1024        # AES blocks per tile (xts.cu: XTS_THREADS * XTS_BPT)
TAB_BYTES = 256 * 32 * 4   # one replicated T-table
ISB_BYTES = 256 * 32       # the replicated inverse S-box
RAID6_THREADS = 256
RAID6_V = 2

# recovery modes, as in raid6.cu
REC_2DATA, REC_DATA_P, REC_DATA, REC_PQ = range(4)

_H2D = 1  # cudaMemcpyHostToDevice
_D2H = 2  # cudaMemcpyDeviceToHost


def probe():
    """(True, "") if CuPy imports and a CUDA device computes, else
    (False, reason)."""
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return False, "no CUDA device"
        if int((cp.arange(4, dtype=cp.int32) + 1).sum()) != 10:
            return False, "a test computation on the GPU gave a wrong answer"
    except Exception as e:  # noqa: BLE001 - report whatever CUDA says
        return False, f"CUDA does not work ({type(e).__name__}: {e})"
    return True, ""


def xts_group(unit_size):
    """Tiles per tweak phase in xts.cu: about 256 units' tweaks at once."""
    return max(1, unit_size // 64)


def xts_smem_bytes(decrypt, unit_size):
    """Dynamic shared memory of one XTS block: encryption, T0 + a group's
    tweaks; decryption, one T-table (T0, then Td0) + the inverse S-box
    (its tweaks go to device memory)."""
    if decrypt:
        return TAB_BYTES + ISB_BYTES
    units = XTS_TILE // (unit_size // 16) + 2
    return TAB_BYTES + xts_group(unit_size) * units * 16


# ------------------------------------------------- batched XTS (xts_batch_*)

#: requests whose descriptors travel inside the launch's arguments
XTS_INLINE = 32
#: struct XtsDesc of xts.cu, for tables built with numpy
XTS_DESC = np.dtype([("in_off", "<u8"), ("out_off", "<u8"),
                     ("sector", "<u8"), ("unit0", "<u8"), ("step", "<u4"),
                     ("slot", "<i4"), ("plain", "<u4"), ("pad", "<u4")])
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class _Desc(ctypes.Structure):
    _fields_ = [(name, {"<u8": ctypes.c_uint64, "<u4": ctypes.c_uint32,
                        "<i4": ctypes.c_int32}[XTS_DESC.fields[name][0].str])
                for name in XTS_DESC.names]


class _BatchArgs(ctypes.Structure):
    """struct XtsBatchArgs of xts.cu (the kernel's one argument)."""
    _fields_ = [("in_base", ctypes.c_uint64), ("out_base", ctypes.c_uint64),
                ("descs", ctypes.c_uint64), ("sched", ctypes.c_uint64),
                ("te0", ctypes.c_uint64), ("td0", ctypes.c_uint64),
                ("isbox", ctypes.c_uint64), ("total_blocks", ctypes.c_uint64),
                ("ndesc", ctypes.c_uint32), ("bpu", ctypes.c_uint32),
                ("group", ctypes.c_uint32), ("nslots", ctypes.c_int32),
                ("inl", _Desc * XTS_INLINE)]


assert ctypes.sizeof(_Desc) == XTS_DESC.itemsize == 48
_INL_OFF = _BatchArgs.inl.offset
_ONE = struct.Struct("<QQQQIiII")  # one XtsDesc


def xts_descs(in_off, out_off, nbytes, sector, step, slot, plain, unit_size,
              out=None):
    """The XTS_DESC table of a batch (arrays, one entry per request) and
    its number of data units; ``out``: an XTS_DESC array to fill (e.g. in
    pinned memory)."""
    n = len(nbytes)
    d = np.empty(n, XTS_DESC) if out is None else out[:n]
    units = np.asarray(nbytes, dtype=np.uint64) // np.uint64(unit_size)
    d["in_off"] = in_off
    d["out_off"] = out_off
    d["sector"] = sector
    c = np.cumsum(units)
    d["unit0"][0] = 0
    d["unit0"][1:] = c[:-1]
    d["step"] = step
    d["slot"] = slot
    d["plain"] = plain
    d["pad"] = 0
    return d, int(c[-1]) if n else 0


def xts_batch_smem_bytes(decrypt, unit_size):
    """Dynamic shared memory of one xts_batch block: tables, and per unit
    of a group its tweak (16 bytes), input/output offsets (16) and slot
    (4)."""
    tables = TAB_BYTES * (2 if decrypt else 1) + (ISB_BYTES if decrypt else 0)
    units = XTS_TILE // (unit_size // 16) + 2
    return tables + xts_group(unit_size) * units * 36


class XtsBatch:
    """Launches of xts.cu's batched kernels with prebuilt arguments.

    A batch of XTS requests is one launch: each request is a descriptor
    (``XTS_DESC``: input and output byte offsets from the launch's
    ``in_base``/``out_base``, first IV, IV step, key slot, plain or
    plain64), and its data units are numbered after the previous
    request's. Up to ``XTS_INLINE`` descriptors travel inside the launch
    arguments; a larger table must already be on the device. The argument
    block, the kernel handles, their shared-memory sizes and occupancy are
    built once, so a launch costs a few field stores and one
    ``cuLaunchKernel``. ``in_base``/``out_base`` may be device memory or
    the device pointer of registered host memory (zero-copy).
    """

    def __init__(self, backend):
        self.be = backend
        self.args = _BatchArgs()
        self._params = (ctypes.c_void_p * 1)(ctypes.addressof(self.args))
        self._pp = ctypes.addressof(self._params)
        self._inl = ctypes.addressof(self.args) + _INL_OFF
        a = self.args
        a.te0 = backend._te0.data.ptr
        a.td0 = backend._td0.data.ptr
        a.isbox = backend._isbox.data.ptr
        self._fn = {}
        self._smem_set = {}  # function -> the limit last set on it

    def load_all(self):
        """Compile (or load from CuPy's cache) and load every variant now,
        rather than at its first launch: NVRTC on a cold cache takes
        seconds, and CUDA's lazy loading may wait for the whole GPU."""
        for decrypt in (False, True):
            for unit in (512, 1024, 2048, 4096):
                self._func(decrypt, unit)

    def _func(self, decrypt, unit_size):
        key = (decrypt, unit_size)
        hit = self._fn.get(key)
        if hit is None:
            with self.be.device:
                kern = get_kernel("xts", "xts_batch_decrypt" if decrypt
                                  else "xts_batch_encrypt")
                fptr = kern.kernel.ptr
                smem = xts_batch_smem_bytes(decrypt, unit_size)
                cp.cuda.driver.funcSetAttribute(
                    fptr, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem)
                self._smem_set[fptr] = smem
                try:
                    per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                        fptr, XTS_THREADS, smem)
                except Exception:  # noqa: BLE001 - estimate
                    per_sm = self.be._smem_per_sm // (smem + 1024)
            hit = (kern, fptr, smem, max(1, min(8, int(per_sm))) *
                   self.be.sm_count, xts_group(unit_size))
            self._fn[key] = hit
        return hit

    def one(self, decrypt, keys, in_base, out_base, in_off, out_off, nbytes,
            unit_size, sector, step, slot, plain, stream_ptr):
        """Queue one request (no numpy, no table)."""
        _ONE.pack_into(self.args, _INL_OFF, in_off, out_off, sector,
                       0, step, slot, 1 if plain else 0, 0)
        self._launch(decrypt, keys, in_base, out_base, nbytes // 16, 1, 0,
                     unit_size, stream_ptr)

    def many(self, decrypt, keys, in_base, out_base, descs, total_units,
             unit_size, stream_ptr, d_descs=0):
        """Queue the requests of ``descs`` (an XTS_DESC array; ``unit0``
        filled in). Above XTS_INLINE of them ``d_descs`` is the device
        address of the same table."""
        n = len(descs)
        if n <= XTS_INLINE:
            ctypes.memmove(self._inl, descs.ctypes.data, n * 48)
            d_descs = 0
        elif not d_descs:
            raise ValueError(f"{n} descriptors need a device table")
        self._launch(decrypt, keys, in_base, out_base,
                     total_units * (unit_size // 16), n, d_descs, unit_size,
                     stream_ptr)

    def _launch(self, decrypt, keys, in_base, out_base, total_blocks, ndesc,
                d_descs, unit_size, stream_ptr):
        if total_blocks == 0:
            return
        _kern, fptr, smem, max_grid, group = self._func(decrypt, unit_size)
        a = self.args
        a.in_base = in_base
        a.out_base = out_base
        a.descs = d_descs
        a.sched = self.be.schedule(keys).data.ptr
        a.nslots = len(keys)
        a.total_blocks = total_blocks
        a.ndesc = ndesc
        a.bpu = unit_size // 16
        ntiles = -(-total_blocks // XTS_TILE)
        grid = min(ntiles, max_grid)
        a.group = min(group, -(-ntiles // grid))
        if self._smem_set.get(fptr) != smem:
            # The dynamic shared-memory limit is set to exactly what this
            # launch asks for whenever that changes: launches of 46592
            # bytes failed (CUDA_ERROR_INVALID_VALUE, H200, cupy 14.2)
            # after the limit had been raised to 70784 for another unit
            # size, and passed with the limit set to their own size.
            cp.cuda.driver.funcSetAttribute(
                fptr, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            self._smem_set[fptr] = smem
        try:
            cp.cuda.driver.launchKernel(fptr, grid, 1, 1, XTS_THREADS, 1, 1,
                                        smem, stream_ptr, self._pp, 0)
        except Exception as e:
            raise RuntimeError(
                f"xts_batch launch failed ({e}): grid {grid}, shared memory "
                f"{smem}, {ndesc} requests, {total_blocks} blocks, unit "
                f"{unit_size}, decrypt {decrypt}") from e


class CupyBackend(Backend):
    """AES-XTS and RAID6 on one CUDA device (``device``: its index)."""

    name = "cupy"

    def __init__(self, device=None, threads=None):
        del threads  # a CPU-backend option; accepted so options can be shared
        self.device = cp.cuda.Device(0 if device is None else device)
        with self.device:
            props = cp.cuda.runtime.getDeviceProperties(self.device.id)
            self._name = props["name"].decode(errors="replace")
            self.sm_count = int(props["multiProcessorCount"])
            self._smem_per_sm = int(props["sharedMemPerMultiprocessor"])
            self._te0 = cp.asarray(aes_tables.TE0)
            self._td0 = cp.asarray(aes_tables.TD0)
            self._isbox = cp.asarray(aes_tables.INV_SBOX)
            self._stream = cp.cuda.Stream(non_blocking=True)
        self._schedules = weakref.WeakKeyDictionary()
        #: while a resident kernel runs on this device: a list that keeps
        #: replaced key schedules alive (see schedule())
        self.resident = None
        self._kernels = {}
        self._batch = None

    def xts_batch(self):
        """This device's :class:`XtsBatch` launcher (made on first use)."""
        if self._batch is None:
            self._batch = XtsBatch(self)
        return self._batch

    def device_name(self):
        return self._name

    def empty_host(self, shape, dtype=np.uint8):
        """A numpy array in pinned (page-locked) host memory."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        mem = cp.cuda.alloc_pinned_memory(max(1, count * dtype.itemsize))
        return np.frombuffer(mem, dtype=dtype, count=count).reshape(shape)

    def synchronize(self):
        with self.device:
            cp.cuda.Device().synchronize()

    # ---------------------------------------------------------------- XTS

    def _xts(self, decrypt, keys, data, sectors, slots, unit_size, iv_mode,
             ivs, out):
        if isinstance(data, np.ndarray):
            # host path: validate on the host (checks the slots too)
            req = XtsRequest(keys, data, sectors, slots, unit_size, iv_mode,
                             ivs)
            if out is None:
                out = np.empty_like(data)
            with self.device, self._stream:
                d_data = cp.asarray(data)
                d_ivs = cp.asarray(req.ivs)
                d_slots = None if req.slots is None else cp.asarray(req.slots)
                d_out = cp.empty_like(d_data)
                self.launch_xts(decrypt, keys, d_data, d_out, d_ivs, d_slots,
                                req.unit_size)
                d_out.get(out=out.reshape(d_out.shape))
                self._stream.synchronize()
            return out
        with self.device:
            req = XtsRequest(keys, data, sectors, slots, unit_size, iv_mode,
                             ivs, xp=cp)
            if out is None:
                out = cp.empty_like(data)
            self.launch_xts(decrypt, keys, data, out, req.ivs, req.slots,
                            req.unit_size)
        return out

    def schedule(self, keys):
        """The device copy of a KeyTable's schedule (refreshed on change)."""
        hit = self._schedules.get(keys)
        if hit is None or hit[0] != keys.version:
            if hit is not None and self.resident is not None:
                # a device-wide wait would wait for the resident kernel
                # (kgpu_helper.serve.resident), which never ends: keep the
                # old copy instead (a few KiB; key changes are rare)
                self.resident.append(hit[1])
            elif hit is not None:
                # Kernels queued on any stream may still read the old
                # copy (launches hold its raw pointer): let them finish
                # before it goes back to the pool. Key changes are rare.
                self.synchronize()
            with self.device:
                hit = (keys.version, cp.asarray(keys.schedule))
            self._schedules[keys] = hit
        return hit[1]

    def _xts_kernel(self, decrypt, smem):
        """(kernel, resident blocks per SM) for this shared-memory size."""
        key = (decrypt, smem)
        hit = self._kernels.get(key)
        if hit is None:
            kern = get_kernel("xts", "xts_decrypt" if decrypt else
                              "xts_encrypt")
            kern.max_dynamic_shared_size_bytes = smem
            try:
                per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    kern.kernel.ptr, XTS_THREADS, smem)
            except Exception:  # noqa: BLE001 - estimate from shared memory
                per_sm = self._smem_per_sm // (smem + 1024)
            hit = (kern, max(1, min(8, int(per_sm))))
            self._kernels[key] = hit
        return hit

    def launch_xts(self, decrypt, keys, d_in, d_out, d_ivs, d_slots,
                   unit_size):
        """Queue one XTS kernel on the current stream (arrays on device).

        d_in/d_out: uint8, n*unit_size bytes (may be the same array);
        d_ivs: (n,) uint64 sector numbers (already masked for "plain") or
        (n, 2) uint64 raw IVs; d_slots: (n,) int32 or None (all slot 0).
        """
        bpu = unit_size // 16
        total = d_in.size // 16
        if total == 0:
            return
        smem = xts_smem_bytes(decrypt, unit_size)
        kern, per_sm = self._xts_kernel(decrypt, smem)
        if smem > 48 * 1024:
            # set before each launch: seen not to stick to the function
            # between calls (CUDA_ERROR_INVALID_VALUE on a later launch)
            kern.max_dynamic_shared_size_bytes = smem
        ntiles = -(-total // XTS_TILE)
        grid = min(ntiles, per_sm * self.sm_count)
        group = min(xts_group(unit_size), -(-ntiles // grid))
        iv_stride = 2 if d_ivs.ndim == 2 else 1
        args = (d_in, d_out, d_ivs, np.int32(iv_stride),
                d_slots if d_slots is not None else np.uint64(0),
                np.int32(len(keys)), self.schedule(keys), self._te0,
                self._td0, self._isbox, np.uint64(total), np.uint32(bpu),
                np.uint32(group))
        if decrypt:
            # the units' tweaks (xts_decrypt); from the pool of the current
            # stream, so reused only after this launch
            args += (cp.empty(-(-total // bpu) * 16, cp.uint8),)
        kern((grid,), (XTS_THREADS,), args, shared_mem=smem)

    # -------------------------------------------------------------- RAID6

    def _raid_kernel(self, what, k):
        kern = self._kernels.get((what, k))
        if kern is None:
            kern = get_kernel("raid6", f"raid6_{what}_k{k}", RAID6_K=k)
            self._kernels[(what, k)] = kern
        return kern

    def _raid_grid(self, ncols):
        per_block = RAID6_THREADS * RAID6_V
        return max(1, min(-(-ncols // per_block), self.sm_count * 16))

    def launch_gen(self, d_data, d_p, d_q):
        """Queue P/Q generation on the current stream (arrays on device)."""
        k, n = d_data.shape
        ncols = n // 16
        if ncols == 0:
            return
        kern = self._raid_kernel("gen", k)
        kern((self._raid_grid(ncols),), (RAID6_THREADS,),
             (d_data, d_p, d_q, np.uint64(ncols), np.uint64(ncols)))

    def launch_recover(self, d_blocks, failed):
        """Queue recovery of ``failed`` (sorted, 1 or 2 rows) in place."""
        disks, n = d_blocks.shape
        k = disks - 2
        ncols = n // 16
        if ncols == 0:
            return
        mode, x, y, c1, c2 = recovery_plan(k, failed)
        kern = self._raid_kernel("rec", k)
        kern((self._raid_grid(ncols),), (RAID6_THREADS,),
             (d_blocks, np.uint64(ncols), np.uint64(ncols), np.int32(mode),
              np.int32(x), np.int32(y), np.uint32(c1), np.uint32(c2)))

    def launch_pqd(self, d_delta, d_p, d_q, start):
        """Queue a P/Q delta update on the current stream (arrays on
        device): ``d_delta`` (rows, n) C-contiguous, P and Q updated in
        place."""
        rows, n = d_delta.shape
        ncols = n // 16
        if ncols == 0:
            return
        kern = self._kernels.get("pqd")
        if kern is None:
            kern = get_kernel("raid6", "raid6_pqd", RAID6_K=2)
            self._kernels["pqd"] = kern
        kern((self._raid_grid(ncols) * RAID6_V,), (RAID6_THREADS,),
             (d_delta, d_p, d_q, np.uint64(ncols), np.uint64(ncols),
              np.int32(rows), np.int32(start)))

    def raid6_pqd(self, delta, p, q, start):
        check_raid6_pqd(delta, p, q, start)
        if isinstance(delta, np.ndarray):
            with self.device, self._stream:
                d_delta = cp.asarray(delta)
                d_p = cp.asarray(p)
                d_q = cp.asarray(q)
                self.launch_pqd(d_delta, d_p, d_q, start)
                d_p.get(out=p)
                d_q.get(out=q)
                self._stream.synchronize()
            return p, q
        with self.device:
            self.launch_pqd(delta, p, q, start)
        return p, q

    def raid6_gen(self, data, p=None, q=None):
        k, n = check_raid6_gen(data, p, q)
        if isinstance(data, np.ndarray):
            p = np.empty(n, np.uint8) if p is None else p
            q = np.empty(n, np.uint8) if q is None else q
            with self.device, self._stream:
                d_data = cp.asarray(data)
                d_p = cp.empty(n, cp.uint8)
                d_q = cp.empty(n, cp.uint8)
                self.launch_gen(d_data, d_p, d_q)
                d_p.get(out=p)
                d_q.get(out=q)
                self._stream.synchronize()
            return p, q
        with self.device:
            p = cp.empty(n, cp.uint8) if p is None else p
            q = cp.empty(n, cp.uint8) if q is None else q
            self.launch_gen(data, p, q)
        return p, q

    def raid6_recover(self, blocks, failed):
        k, n, failed = check_raid6_recover(blocks, failed)
        if isinstance(blocks, np.ndarray):
            with self.device, self._stream:
                d_blocks = cp.asarray(blocks)
                self.launch_recover(d_blocks, failed)
                for f in failed:
                    d_blocks[f].get(out=blocks[f])
                self._stream.synchronize()
            return blocks
        with self.device:
            self.launch_recover(blocks, failed)
        return blocks

    def pipeline(self, depth=3):
        """A :class:`Pipeline` of ``depth`` streams on this device."""
        return Pipeline(self, depth)


def recovery_plan(k, failed):
    """(mode, x, y, c1, c2) for raid6.cu's recovery kernel."""
    x = failed[0]
    y = failed[1] if len(failed) == 2 else -1
    if x >= k:  # P and/or Q
        return REC_PQ, x, y, 0, 0
    if 0 <= y < k:
        c1, c2 = gf256.recovery_coefficients(x, y)
        return REC_2DATA, x, y, c1, c2
    if y == k:
        return REC_DATA_P, x, y, gf256.gpow(-x), 0
    return REC_DATA, x, y, gf256.gpow(x), 0


class Pipeline:
    """Overlapped host -> GPU -> host batches on ``depth`` CUDA streams.

    Each submit picks the next stream in turn, copies its inputs in,
    queues the kernel and copies the result out, all asynchronously, and
    returns a CUDA event that completes when the host output is written.
    Host buffers must be pinned (``backend.empty_host``) for the copies to
    overlap, and must not be touched until that event completes. Device
    staging buffers are kept per stream and reused, so consecutive
    batches on one stream never race. ``wait()`` drains everything.
    """

    def __init__(self, backend, depth=3):
        self.be = backend
        with backend.device:
            self.streams = [cp.cuda.Stream(non_blocking=True)
                            for _ in range(depth)]
        self._bufs = [{} for _ in range(depth)]
        self._next = 0

    def _stage(self, i, name, nbytes):
        buf = self._bufs[i].get(name)
        if buf is None or buf.size < nbytes:
            buf = cp.empty(max(nbytes, 16), dtype=cp.uint8)
            self._bufs[i][name] = buf
        return buf[:nbytes]

    def _take(self):
        i = self._next
        self._next = (i + 1) % len(self.streams)
        return i, self.streams[i]

    @staticmethod
    def _copy(dst, src, kind, stream):
        if kind == _H2D:
            cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.ctypes.data,
                                        src.nbytes, _H2D, stream.ptr)
        else:
            cp.cuda.runtime.memcpyAsync(dst.ctypes.data, src.data.ptr,
                                        dst.nbytes, _D2H, stream.ptr)

    def xts(self, decrypt, keys, data, sectors, out, slots=None, *,
            unit_size=512, iv_mode="plain64", ivs=None):
        """Queue one XTS batch: host ``data`` -> host ``out``."""
        req = XtsRequest(keys, data, sectors, slots, unit_size, iv_mode, ivs)
        i, st = self._take()
        with self.be.device, st:
            d_in = self._stage(i, "in", data.nbytes)
            d_iv = self._stage(i, "iv", req.ivs.nbytes).view(cp.uint64)
            self._copy(d_in, data, _H2D, st)
            self._copy(d_iv, np.ascontiguousarray(req.ivs), _H2D, st)
            d_iv = d_iv.reshape(req.ivs.shape)
            d_slots = None
            if req.slots is not None:
                d_slots = self._stage(i, "slots", req.slots.nbytes).view(
                    cp.int32)
                self._copy(d_slots, req.slots, _H2D, st)
            self.be.launch_xts(decrypt, keys, d_in, d_in, d_iv, d_slots,
                               req.unit_size)
            self._copy(out, d_in, _D2H, st)
            return st.record()

    def raid6_gen(self, data, p, q):
        """Queue P/Q of host ``data`` (k, n) into host ``p`` and ``q``."""
        k, n = check_raid6_gen(data, p, q)
        i, st = self._take()
        with self.be.device, st:
            d = self._stage(i, "in", data.nbytes).reshape(k, n)
            d_pq = self._stage(i, "pq", 2 * n).reshape(2, n)
            self._copy(d, data, _H2D, st)
            self.be.launch_gen(d, d_pq[0], d_pq[1])
            self._copy(p, d_pq[0], _D2H, st)
            self._copy(q, d_pq[1], _D2H, st)
            return st.record()

    def raid6_pqd(self, delta, p, q, start):
        """Queue a P/Q delta update of host ``p`` and ``q`` in place."""
        rows, n = check_raid6_pqd(delta, p, q, start)
        i, st = self._take()
        with self.be.device, st:
            d = self._stage(i, "in", (rows + 2) * n).reshape(rows + 2, n)
            self._copy(d[:rows], delta, _H2D, st)
            self._copy(d[rows], p, _H2D, st)
            self._copy(d[rows + 1], q, _H2D, st)
            self.be.launch_pqd(d[:rows], d[rows], d[rows + 1], start)
            self._copy(p, d[rows], _D2H, st)
            self._copy(q, d[rows + 1], _D2H, st)
            return st.record()

    def raid6_recover(self, blocks, failed):
        """Queue recovery of host ``blocks`` (k+2, n): only the surviving
        rows go to the GPU and only the rebuilt rows come back."""
        k, n, failed = check_raid6_recover(blocks, failed)
        disks = k + 2
        i, st = self._take()
        with self.be.device, st:
            d = self._stage(i, "in", blocks.nbytes).reshape(disks, n)
            start = 0
            for stop in failed + [disks]:  # contiguous runs of survivors
                if stop > start:
                    self._copy(d[start:stop], blocks[start:stop], _H2D, st)
                start = stop + 1
            self.be.launch_recover(d, failed)
            for f in failed:
                self._copy(blocks[f], d[f], _D2H, st)
            return st.record()

    def wait(self):
        for st in self.streams:
            st.synchronize()
