"""The kernel's side of the ring, in user space, over a shared-memory file.

:class:`RingDriver` lays out a region exactly as the kgpu module does
(kmod/uapi/kgpu.h) in a memfd, serves it to one helper at a time over a
Unix socket (connecting attaches and receives the region's fd, the socket
is the doorbell both ways, hang-up detaches), submits requests with tags and
sequence numbers, reaps completions and validates them as the kernel
would. With it the helper is run and measured on a machine without the
module (``kgpu bench ring``) and tested without root (tests/test_ring.py).

Like the kernel, the driver keeps at most ``ring_entries`` requests in
flight (back-pressure: ``submit`` takes what fits and says how many), and
when the helper detaches it reports every request still in flight as
:data:`DETACHED` (the kernel would redo those on its CPU) and resets the
four ring indexes so that the next helper starts clean.
"""

import errno
import mmap
import os
import select
import socket
import struct
import time

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.rings.transport import (_CQ_HEAD, _CQ_TAIL, _MASK32, _SQ_HEAD,
                                   _SQ_TAIL, SHM_ATTACHED, SHM_BELL,
                                   SHM_BUSY, Region)

PAGE = 4096
#: status given to requests still in flight when the helper detaches
DETACHED = -errno.ENOTCONN

COMPLETION = np.dtype([("tag", "<u4"), ("seq", "<u8"), ("status", "<i2"),
                       ("flags", "<u2"), ("latency_ns", "<i8")])
_COMPLETION1 = struct.Struct("<IQhHq")
_CQE1 = struct.Struct("<QIhH")
_SEQ_TAG = struct.Struct("<QI")


def _align(n, a):
    return (n + a - 1) // a * a


def layout(entries, key_slots, data_size, data_align=PAGE):
    """Region offsets as the module lays them out: the helper's read-only
    part (header page, key slots), then its read-write part from rw_off
    (ring index page, SQ, CQ, data area), each part page-aligned."""
    if entries < 1 or entries & (entries - 1):
        raise ValueError(f"ring entries must be a power of two, got "
                         f"{entries}")
    keys_off = PAGE
    rw_off = _align(keys_off + key_slots * abi.KEY_SLOT.itemsize, PAGE)
    idx_off = rw_off
    sq_off = idx_off + PAGE
    cq_off = _align(sq_off + entries * abi.SQE.itemsize, PAGE)
    data_off = _align(cq_off + entries * abi.CQE.itemsize,
                      max(PAGE, data_align))
    size = _align(data_off + data_size, PAGE)
    return dict(keys_off=keys_off, rw_off=rw_off, idx_off=idx_off,
                sq_off=sq_off, cq_off=cq_off, data_off=data_off,
                data_size=data_size, region_size=size)


def write_header(buf, entries, key_slots, lay, data_align=PAGE,
                 link_off=0):
    """Write a region header into ``buf`` as the module does: identity,
    sizes and the offsets of ``lay`` (from :func:`layout`); ``link_off``:
    abi.LINK_OFF for an ivshmem region, else 0."""
    hdr = np.frombuffer(buf, dtype=abi.REGION_HDR, count=1)
    hdr[0] = 0
    hdr["magic"] = abi.MAGIC
    hdr["abi_version"] = abi.ABI_VERSION
    hdr["ring_entries"] = entries
    hdr["sqe_size"] = abi.SQE.itemsize
    hdr["cqe_size"] = abi.CQE.itemsize
    hdr["key_slots"] = key_slots
    hdr["key_slot_size"] = abi.KEY_SLOT.itemsize
    hdr["data_align"] = data_align
    hdr["link_off"] = link_off
    for k, v in lay.items():
        hdr[k] = v


class RingDriver:
    """Create a region (in a memfd) and listen at the Unix socket ``path``
    for a helper (``ShmTransport(path)``) to attach."""

    def __init__(self, path, entries=256, data_size=64 << 20, key_slots=16,
                 data_align=PAGE):
        self.path = path
        lay = layout(entries, key_slots, data_size, data_align)
        self.sock_path = path
        self.memfd = os.memfd_create("kgpu-region", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, lay["region_size"])
        self.mm = mmap.mmap(self.memfd, lay["region_size"], mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        write_header(self.mm, entries, key_slots, lay, data_align)
        self.region = Region(self.mm, owner=True)
        self.entries = entries
        self.data_off = lay["data_off"]
        self.data_size = data_size
        self._next_buf = self.data_off
        # per tag: in flight?, its seq, when it was submitted
        self.busy = np.zeros(entries, dtype=bool)
        self.seq_of = np.zeros(entries, dtype=np.uint64)
        self.t_of = np.zeros(entries, dtype=np.int64)
        self.free = list(range(entries - 1, -1, -1))
        self.seq = 1
        self.bad_completions = 0
        self.attaches = 0
        self.detached_log = []
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.sock_path)
        self.listener.listen(4)
        self.listener.setblocking(False)
        self.conn = None

    # ------------------------------------------------------------ buffers

    def buffer(self, nbytes, align=PAGE):
        """Region offset of a fresh ``nbytes`` buffer (bump allocator)."""
        off = _align(self._next_buf, align)
        if off + nbytes > self.data_off + self.data_size:
            raise MemoryError(f"ring data area full: {nbytes} bytes asked, "
                              f"{self.data_off + self.data_size - off} left")
        self._next_buf = off + nbytes
        return off

    def reset_buffers(self):
        self._next_buf = self.data_off

    def view(self, off, nbytes):
        """The region bytes [off, off + nbytes) as a writable uint8 array."""
        return self.region.buf[off:off + nbytes]

    # --------------------------------------------------------------- keys

    def set_key(self, slot, key):
        """Load a raw XTS key (K1 || K2, 32 or 64 bytes) into a key slot,
        in the module's order (see _write_key)."""
        key = bytes(key)
        if len(key) not in (32, 64):
            raise ValueError(f"XTS key must be 32 or 64 bytes, got "
                             f"{len(key)}")
        self._write_key(slot, key)

    def wipe_key(self, slot):
        self._write_key(slot, b"")

    def _write_key(self, slot, key):
        # The module's sequence count (uapi/kgpu.h): generation odd while
        # the slot changes, even again after; same order of stores.
        ks = self.region.keys[slot:slot + 1]
        gen = int(ks["generation"][0])
        if gen & 1:
            gen += 1
        ks["generation"] = (gen + 1) & _MASK32
        ks["key"] = 0
        ks["key"][0, :len(key)] = np.frombuffer(key, np.uint8)
        ks["key_len"] = len(key)
        ks["generation"] = (gen + 2) & _MASK32

    # ------------------------------------------------------ attach/detach

    def attached(self):
        return self.conn is not None

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except BlockingIOError:
                return
            if self.conn is not None:
                c.send(SHM_BUSY)
                c.close()
                continue
            socket.send_fds(c, [SHM_ATTACHED], [self.memfd])
            c.setblocking(False)
            self.conn = c
            self.attaches += 1

    def wait_attach(self, timeout=10.0):
        """Wait until a helper attaches; True if one did."""
        end = time.monotonic() + timeout
        while self.conn is None:
            left = end - time.monotonic()
            if left <= 0:
                return False
            select.select([self.listener], [], [], left)
            self._accept()
        return True

    def _detach(self):
        """The helper went away: in-flight requests come back as DETACHED
        (after any completions it did post), and the ring starts over."""
        out = self._reap_cq()
        tags = np.nonzero(self.busy)[0].astype(np.uint32)
        lost = self._complete(tags, self.seq_of[tags],
                              np.full(len(tags), DETACHED, np.int16),
                              np.zeros(len(tags), np.uint16))
        idx = self.region.idx
        idx[_SQ_TAIL] = idx[_SQ_HEAD] = idx[_CQ_TAIL] = idx[_CQ_HEAD] = 0
        self.conn.close()
        self.conn = None
        self.detached_log.append(len(tags))
        return np.concatenate([out, lost])

    # ------------------------------------------------------ submit / reap

    def space(self):
        return len(self.free)

    def inflight(self):
        return self.entries - len(self.free)

    def submit(self, sqes):
        """Submit as many of ``sqes`` (structured abi.SQE array; tag and
        seq are filled in here) as the ring has room for; returns their
        tags (as many as were taken). The rest is the caller's to retry
        after reaping."""
        n = min(len(sqes), len(self.free))
        if n == 0 or self.conn is None:
            return np.zeros(0, np.uint32)
        if n == 1:
            return self._submit_one(sqes)
        tags = np.array(self.free[-n:][::-1], dtype=np.uint32)
        del self.free[-n:]
        sub = sqes[:n].copy()
        sub["tag"] = tags
        seqs = np.arange(self.seq, self.seq + n, dtype=np.uint64)
        self.seq += n
        sub["seq"] = seqs
        self.busy[tags] = True
        self.seq_of[tags] = seqs
        self.t_of[tags] = time.perf_counter_ns()
        idx = self.region.idx
        tail = idx[_SQ_TAIL]
        self.region.write(self.region.sq_off, tail & (self.entries - 1), sub)
        idx[_SQ_TAIL] = (tail + n) & _MASK32  # after the entries (TSO)
        self._bell()
        return tags

    def _submit_one(self, sqes):
        """submit() of one request with byte copies (no numpy records)."""
        tag = self.free.pop()
        seq = self.seq
        self.seq += 1
        raw = bytearray(sqes[:1].tobytes())
        _SEQ_TAG.pack_into(raw, 0, seq, tag)
        self.busy[tag] = True
        self.seq_of[tag] = seq
        self.t_of[tag] = time.perf_counter_ns()
        r = self.region
        idx = r.idx
        tail = idx[_SQ_TAIL]
        a = r.sq_off + (tail & (self.entries - 1)) * len(raw)
        r.mv[a:a + len(raw)] = raw
        idx[_SQ_TAIL] = (tail + 1) & _MASK32  # after the entry (TSO)
        self._bell()
        return np.array([tag], dtype=np.uint32)

    def _bell(self):
        try:
            self.conn.send(SHM_BELL)
        except BlockingIOError:
            pass  # unread bells: the helper will look at the ring anyway
        except OSError:
            pass  # detached; noticed by the next wait()

    def _reap_cq(self):
        idx = self.region.idx
        head, tail = idx[_CQ_HEAD], idx[_CQ_TAIL]
        n = (tail - head) & _MASK32
        if n == 0:
            return np.zeros(0, COMPLETION)
        if n > self.entries:
            self.bad_completions += n
            idx[_CQ_HEAD] = tail
            return np.zeros(0, COMPLETION)
        if n == 1:  # the common case at low depth, without numpy
            r = self.region
            seq, tag, status, flags = _CQE1.unpack_from(
                r.mv, r.cq_off + (head & (self.entries - 1)) * _CQE1.size)
            idx[_CQ_HEAD] = tail
            if tag < self.entries and self.busy[tag] and \
                    int(self.seq_of[tag]) == seq:
                now = time.perf_counter_ns()
                self.busy[tag] = False
                self.free.append(tag)
                return np.frombuffer(bytearray(_COMPLETION1.pack(
                    tag, seq, status, flags, now - int(self.t_of[tag]))),
                    COMPLETION)
            self.bad_completions += 1
            return np.zeros(0, COMPLETION)
        cqes = self.region.read(self.region.cq_off, abi.CQE,
                                head & (self.entries - 1), n)
        idx[_CQ_HEAD] = tail
        tags = cqes["tag"].astype(np.int64)
        ok = tags < self.entries
        t = np.where(ok, tags, 0)
        ok &= self.busy[t] & (self.seq_of[t] == cqes["seq"])
        # one completion per tag: later duplicates are bad ones
        _, first = np.unique(np.where(ok, tags, -1), return_index=True)
        keep = np.zeros(n, bool)
        keep[first] = True
        ok &= keep
        self.bad_completions += int(n - ok.sum())
        cqes = cqes[ok]
        return self._complete(cqes["tag"], cqes["seq"], cqes["status"],
                              cqes["flags"])

    def _complete(self, tags, seqs, status, flags):
        out = np.zeros(len(tags), COMPLETION)
        if len(tags) == 0:
            return out
        now = time.perf_counter_ns()
        out["tag"] = tags
        out["seq"] = seqs
        out["status"] = status
        out["flags"] = flags
        out["latency_ns"] = now - self.t_of[tags]
        self.busy[tags] = False
        self.free.extend(int(t) for t in tags)
        return out

    def reap(self):
        """Completions posted so far (a COMPLETION array, maybe empty)."""
        return self._reap_cq()

    def wait(self, timeout=None, spin=0.0):
        """Wait for completions (spinning on the CQ for up to ``spin``
        seconds first, then sleeping on the doorbell); return them. Also
        accepts helpers and notices their detach (returned as DETACHED)."""
        idx = self.region.idx
        if spin > 0 and self.conn is not None:
            end = time.perf_counter() + spin
            while idx[_CQ_TAIL] == idx[_CQ_HEAD]:
                if time.perf_counter() > end:
                    break
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out = self._reap_cq()
            if len(out):
                return out
            fds = [self.listener] + ([self.conn] if self.conn else [])
            left = (None if deadline is None
                    else max(0.0, deadline - time.monotonic()))
            r, _, _ = select.select(fds, [], [], left)
            if self.listener in r:
                self._accept()
            if self.conn is not None and self.conn in r:
                try:
                    b = self.conn.recv(4096)
                except BlockingIOError:
                    b = b"x"
                except OSError:
                    b = b""
                if not b:
                    return self._detach()
            if not r and deadline is not None:
                return self._reap_cq()

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.listener.close()
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        os.close(self.memfd)
        self.region.release()
        try:
            self.mm.close()
        except BufferError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sqe(service, **fields):
    """One request as a 1-element abi.SQE array (unset fields zero; for
    RAID6 fail_a/fail_b default to RAID6_NONE)."""
    a = np.zeros(1, dtype=abi.SQE)
    a["service"] = service
    a["fail_a"] = a["fail_b"] = abi.RAID6_NONE
    for k, v in fields.items():
        a[k] = v
    return a
