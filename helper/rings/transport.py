"""The helper's side of the ring: the shared region, drain and post.

No crypto and no GPU here. Two transports expose the same small
interface (:class:`Transport`):

- :class:`KernelTransport`: ``/dev/kgpu`` of the kgpu module. ``open``
  attaches (one helper at a time: EBUSY), ``KGPU_IOC_VERSION`` checks
  magic and ABI version, the region is mapped in its two parts (header and
  keys read-only, the rest read-write: see :func:`map_region`),
  ``poll(POLLIN)`` waits for submissions, ``KGPU_IOC_COMPLETE`` rings the
  doorbell once per batch of completions, ``close`` detaches (the kernel
  then completes whatever was in flight on its CPU). The attachment
  belongs to this process: a child forked without exec has none.
- :class:`ShmTransport`: the same region layout in shared memory,
  created by :mod:`kgpu_helper.rings.ringdriver` (the user-space stand-in for
  the kernel). Attaching is connecting to the driver's Unix socket
  (``<file>.sock``); the connection is the doorbell in both directions
  (one byte per batch) and its hang-up is the detach.

Memory ordering: the region is shared with another CPU writer (the kernel
or the driver process). On x86-64 (TSO) stores become visible in program
order and loads are not reordered with older loads, so "write the
entries, then store the index" on one side and "load the index, then read
the entries" on the other need no fences; numpy and memoryview stores
are plain stores. The module is x86-64 only for that reason (see
``_check_arch``).
"""

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import select
import socket

import numpy as np

from kgpu_helper.rings import abi

DEVICE = "/dev/kgpu"
_MASK32 = 0xFFFFFFFF

# Word (uint32) indexes of the four ring indexes in struct kgpu_ring_idx.
_SQ_TAIL = abi.SQ_TAIL_OFF // 4
_SQ_HEAD = abi.SQ_HEAD_OFF // 4
_CQ_TAIL = abi.CQ_TAIL_OFF // 4
_CQ_HEAD = abi.CQ_HEAD_OFF // 4

# Doorbell / handshake bytes of the shared-memory transport.
SHM_ATTACHED = b"A"
SHM_BUSY = b"B"
SHM_BELL = b"d"


_NO_SQES = np.zeros(0, dtype=abi.SQE)
_NO_SQES.flags.writeable = False


class TransportError(RuntimeError):
    """The ring cannot be attached or is inconsistent; ``str`` says why
    and what to do."""


def _check_arch():
    if platform.machine() not in ("x86_64", "AMD64"):
        raise TransportError(
            f"the ring relies on x86-64 store ordering (TSO); this is "
            f"{platform.machine()}")


def _check_identity(magic, version, what):
    """Refuse anything that is not a kgpu region of our ABI version."""
    if magic != abi.MAGIC:
        raise TransportError(f"{what} is not kgpu's (magic {magic:#x}, not "
                             f"{abi.MAGIC:#x})")
    if version != abi.ABI_VERSION:
        raise TransportError(
            f"{what} speaks ABI {version}, this helper speaks "
            f"{abi.ABI_VERSION}: install matching versions")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value


def _header(fd):
    """(region_size, rw_off) from the read-only header page of ``fd``."""
    first = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        hdr = np.frombuffer(first, dtype=abi.REGION_HDR, count=1)[0]
        _check_identity(int(hdr["magic"]), int(hdr["abi_version"]),
                        "the region")
        size, rw_off = int(hdr["region_size"]), int(hdr["rw_off"])
        del hdr
    finally:
        first.close()
    if not (mmap.PAGESIZE <= rw_off < size) or rw_off % mmap.PAGESIZE:
        raise TransportError(f"region of {size} bytes with its writable "
                             f"part at {rw_off}: not a valid layout")
    return size, rw_off


def map_region(fd, what):
    """Map the region of ``fd`` the way the ABI asks: one contiguous range
    of ``region_size`` bytes, ``[0, rw_off)`` (header, keys) read-only and
    ``[rw_off, region_size)`` read-write, so that region offsets are the
    same on both sides. Returns an ``mmap.mmap`` whose close() unmaps all
    of it (it stands for the whole range: a store below ``rw_off``
    through it faults, as intended)."""
    size, rw_off = _header(fd)
    # Reserve the range, then lay the two parts over it (MAP_FIXED).
    mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                   mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor
    try:
        for off, length, prot in (
                (0, rw_off, mmap.PROT_READ),
                (rw_off, size - rw_off, mmap.PROT_READ | mmap.PROT_WRITE)):
            got = _libc.mmap(base + off, length, prot,
                             mmap.MAP_SHARED | _MAP_FIXED, fd, off)
            if got == _MAP_FAILED or got != base + off:
                err = ctypes.get_errno()
                raise TransportError(
                    f"cannot map the {size >> 20} MiB region of {what} "
                    f"({'read-write' if off else 'read-only'} part at "
                    f"{off}): {os.strerror(err)}")
    except BaseException:
        mm.close()
        raise
    return mm


class Region:
    """Typed views of a mapped region (any buffer with the ABI layout).

    ``hdr`` is the header as a numpy record, ``sq``/``cq``/``keys`` the
    rings and key slots as structured arrays, ``buf`` the whole region as
    uint8 (request offsets are region offsets), ``idx`` struct
    kgpu_ring_idx as uint32 words for fast access to the ring indexes.
    ``rw_off``: where the helper's writable part starts; below it (header,
    keys) the views are read-only unless ``owner`` (the ring driver, the
    kernel's stand-in, writes the keys).
    """

    def __init__(self, buf, owner=False):
        self.mem = buf
        self.buf = np.frombuffer(buf, dtype=np.uint8)
        if self.buf.size < mmap.PAGESIZE:
            raise TransportError("region smaller than its header page")
        hdr = self.buf[:abi.REGION_HDR.itemsize].view(abi.REGION_HDR)
        if not owner:
            hdr.flags.writeable = False
        self.hdr = hdr[0]
        # Every value is read once, from a snapshot: the other side may
        # rewrite the header meanwhile (an ivshmem guest is not trusted),
        # and a view must never lie at an offset other than the one checked.
        h = hdr.copy()[0]
        _check_identity(int(h["magic"]), int(h["abi_version"]),
                        "the region")
        for name, dt in (("sqe_size", abi.SQE), ("cqe_size", abi.CQE),
                         ("key_slot_size", abi.KEY_SLOT)):
            if int(h[name]) != dt.itemsize:
                raise TransportError(f"region {name} {int(h[name])} != "
                                     f"{dt.itemsize}")
        self.entries = int(h["ring_entries"])
        if self.entries < 1 or self.entries & (self.entries - 1):
            raise TransportError(f"ring_entries {self.entries} is not a "
                                 f"power of two")
        self.mask = self.entries - 1
        self.size = int(h["region_size"])
        self.rw_off = int(h["rw_off"])
        if (self.rw_off < mmap.PAGESIZE or self.rw_off % mmap.PAGESIZE
                or self.size > self.buf.size or self.rw_off >= self.size):
            raise TransportError(f"region of {self.size} bytes (mapped "
                                 f"{self.buf.size}) with its writable part "
                                 f"at {self.rw_off}: not a valid layout")
        self.data_off = int(h["data_off"])
        self.data_size = int(h["data_size"])
        self.nkeys = int(h["key_slots"])

        def part(off, count, dt, writable):
            off = int(off)
            end = off + count * dt.itemsize
            lo, hi = ((self.rw_off, self.size) if writable
                      else (abi.REGION_HDR.itemsize, self.rw_off))
            if off < lo or end > hi:
                raise TransportError(f"region part at {off} of {count} x "
                                     f"{dt.itemsize} bytes lies outside "
                                     f"its part [{lo}, {hi})")
            return self.buf[off:end].view(dt)

        self.sq = part(h["sq_off"], self.entries, abi.SQE, True)
        self.cq = part(h["cq_off"], self.entries, abi.CQE, True)
        self.sq_off = int(h["sq_off"])
        self.cq_off = int(h["cq_off"])
        idx_off = int(h["idx_off"])
        part(idx_off, 1, abi.RING_IDX, True)
        self.mv = memoryview(buf).cast("B")
        self.idx = self.mv[idx_off:idx_off + abi.RING_IDX.itemsize].cast("I")
        self.keys = part(h["keys_off"], self.nkeys, abi.KEY_SLOT, False)
        if not owner:
            self.keys.flags.writeable = False
        part(self.data_off, self.data_size, np.dtype(np.uint8), True)

    def read(self, ring_off, dtype, start, n):
        """Copy of ``n`` entries of the ring at ``ring_off`` from ``start``
        on (wrapping), as a writable ``dtype`` array: byte copies, which
        cost less than numpy's structured copies for a few entries."""
        es = dtype.itemsize
        a = ring_off + start * es
        over = start + n - self.entries
        if over <= 0:
            raw = bytearray(self.mv[a:a + n * es])
        else:
            raw = bytearray(self.mv[a:ring_off + self.entries * es])
            raw += self.mv[ring_off:ring_off + over * es]
        return np.frombuffer(raw, dtype)

    def write(self, ring_off, start, entries):
        """Store the structured array ``entries`` into the ring at
        ``ring_off`` from ``start`` on (wrapping)."""
        raw = entries.tobytes()
        es = entries.dtype.itemsize
        a = ring_off + start * es
        first = min(len(entries), self.entries - start) * es
        self.mv[a:a + first] = raw[:first]
        if first < len(raw):
            self.mv[ring_off:ring_off + len(raw) - first] = raw[first:]

    def release(self):
        """Drop every view so that the mapping can be closed."""
        self.hdr = self.sq = self.cq = self.keys = self.buf = None
        if getattr(self, "idx", None) is not None:
            self.idx.release()
            self.idx = None
        if getattr(self, "mv", None) is not None:
            self.mv.release()
            self.mv = None


class Transport:
    """What the serving loop needs from a ring.

    - ``region``: a :class:`Region` (``buf``, ``keys``, ``data_off``...);
    - ``fileno()``: an fd that polls readable when submissions may wait;
    - ``pending()``: how many SQEs are published and not yet taken;
    - ``wait(timeout)``: sleep until ``pending()`` or the timeout
      (seconds, None: forever); returns ``pending()``;
    - ``drain()``: copy every published SQE out of the SQ (a structured
      array, possibly empty) and advance ``sq_head``;
    - ``post(cqes)``: write completions at ``cq_tail``, publish them and
      ring the doorbell once;
    - ``close()``: detach.
    """

    region = None

    def fileno(self):
        raise NotImplementedError

    def _doorbell(self):
        raise NotImplementedError

    def _wait_fd(self, timeout):
        """Block in poll() on the fd; raise TransportError on hang-up."""
        p = select.poll()
        p.register(self.fileno(), select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        for _fd, ev in p.poll(ms):
            if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                raise TransportError("the ring's other side went away")

    def pending(self):
        idx = self.region.idx
        return (idx[_SQ_TAIL] - idx[_SQ_HEAD]) & _MASK32

    def wait(self, timeout=None):
        n = self.pending()
        if n == 0:
            self._wait_fd(timeout)
            n = self.pending()
        return n

    def drain(self):
        r = self.region
        idx = r.idx
        head = idx[_SQ_HEAD]
        tail = idx[_SQ_TAIL]  # then the entries: TSO, see the module doc
        n = (tail - head) & _MASK32
        if n == 0:
            return _NO_SQES
        if n > r.entries:
            raise TransportError(
                f"submission ring corrupt: {n} entries published on a ring "
                f"of {r.entries} (sq_head {head}, sq_tail {tail})")
        sqes = r.read(r.sq_off, abi.SQE, head & r.mask, n)
        idx[_SQ_HEAD] = tail
        return sqes

    def cq_space(self):
        idx = self.region.idx
        return self.region.entries - ((idx[_CQ_TAIL] - idx[_CQ_HEAD])
                                      & _MASK32)

    def post(self, cqes):
        n = len(cqes)
        if n == 0:
            return
        r = self.region
        idx = r.idx
        if n > self.cq_space():
            # Cannot happen with a correct other side: at most
            # ring_entries requests are in flight, unreaped CQEs included.
            raise TransportError(
                f"completion ring full: {n} to post, {self.cq_space()} free")
        tail = idx[_CQ_TAIL]
        r.write(r.cq_off, tail & r.mask, cqes)
        idx[_CQ_TAIL] = (tail + n) & _MASK32  # after the entries (TSO)
        self._doorbell()

    def _unmap(self):
        if self.region is not None:
            self.region.release()
            self.region = None
        if getattr(self, "mm", None) is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # a view is still alive somewhere; unmapped at exit
            self.mm = None

    def close(self):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class KernelTransport(Transport):
    """The kgpu module's ``/dev/kgpu``."""

    name = "kernel"

    def __init__(self, path=DEVICE):
        _check_arch()
        self.path = path
        self.fd = -1
        self.mm = None
        self.region = None
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TransportError(
                f"{path} does not exist: the kgpu module is not loaded "
                f"(modprobe kgpu, or insmod kgpu.ko)") from None
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise TransportError(
                    f"{path} is busy: another helper is attached (see "
                    f"'kgpu status' for its pid)") from None
            if e.errno in (errno.EACCES, errno.EPERM):
                raise TransportError(f"no permission to open {path}: run "
                                     f"the helper as root") from None
            if e.errno == errno.EAGAIN:
                raise TransportError(
                    f"{path}: the previous helper's GPU still has the region "
                    f"pinned for DMA; try again in a moment") from None
            raise TransportError(f"cannot open {path}: {e}") from None
        try:
            self._check_version()
            self._map()
        except BaseException:
            self.close()
            raise

    def _check_version(self):
        try:
            raw = fcntl.ioctl(self.fd, abi.IOC_VERSION,
                              bytes(abi.VERSION.itemsize))
        except OSError as e:
            raise TransportError(f"KGPU_IOC_VERSION failed on {self.path}: "
                                 f"{e}") from None
        v = np.frombuffer(raw, dtype=abi.VERSION)[0]
        _check_identity(int(v["magic"]), int(v["abi_version"]),
                        f"the device {self.path}")

    def _map(self):
        try:
            self.mm = map_region(self.fd, self.path)
        except OSError as e:
            raise TransportError(f"cannot map the region of {self.path}: "
                                 f"{e}") from None
        self.region = Region(self.mm)

    def fileno(self):
        return self.fd

    def _doorbell(self):
        fcntl.ioctl(self.fd, abi.IOC_COMPLETE, 0)

    def close(self):
        self._unmap()
        if self.fd >= 0:
            os.close(self.fd)  # detaches: the kernel takes back the rest
            self.fd = -1


class ShmTransport(Transport):
    """A region served by :class:`kgpu_helper.rings.ringdriver.RingDriver` at
    the Unix socket ``path``: connecting attaches, and the attach message
    carries the region's file descriptor (SCM_RIGHTS), the way opening
    /dev/kgpu gives the module's region."""

    name = "shm"

    def __init__(self, path, timeout=5.0):
        _check_arch()
        self.path = path
        self.mm = None
        self.region = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
                hello, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
            except (FileNotFoundError, ConnectionRefusedError):
                raise TransportError(
                    f"no ring driver is serving {path} (start one with "
                    f"'kgpu bench ring', or use the kernel transport)"
                ) from None
            except OSError as e:
                raise TransportError(f"cannot attach to {path}: {e}") \
                    from None
            if hello == SHM_BUSY:
                raise TransportError(f"{path} is busy: another helper is "
                                     f"attached")
            if hello != SHM_ATTACHED or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise TransportError(f"{path}: the ring driver hung up")
            self.sock.setblocking(False)
            fd = fds[0]
            try:
                self.mm = map_region(fd, path)
            finally:
                os.close(fd)
            self.region = Region(self.mm)
        except BaseException:
            self.close()
            raise

    def fileno(self):
        return self.sock.fileno()

    def _wait_fd(self, timeout):
        super()._wait_fd(timeout)
        self._clear()

    def _clear(self):
        try:
            while True:
                b = self.sock.recv(4096)
                if not b:
                    raise TransportError("the ring driver went away")
                if len(b) < 4096:
                    return
        except BlockingIOError:
            return

    def _doorbell(self):
        try:
            self.sock.send(SHM_BELL)
        except BlockingIOError:
            pass  # the driver has a backlog of bells: it will look anyway
        except OSError as e:
            raise TransportError(f"the ring driver went away ({e})") \
                from None

    def close(self):
        self._unmap()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def open_transport(spec):
    """``kernel`` (or a device path) -> KernelTransport; ``shm:SOCKET`` ->
    ShmTransport."""
    if spec.startswith("shm:"):
        return ShmTransport(spec[4:])
    if spec == "kernel":
        return KernelTransport()
    return KernelTransport(spec)
