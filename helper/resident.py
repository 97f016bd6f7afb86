"""The GPU-resident XTS service: small XTS requests with no Python on
their path (issue 11 part 4; a prototype).

Three parts:

- ``helper/cuda/resident.cu``: a persistent kernel of a few blocks on its
  own stream. It polls the SQ in the registered region itself, computes
  the small in-place XTS requests it may take, writes their CQEs and
  publishes ``cq_tail`` (system-scope stores and fences); it copies every
  other request to a *spill ring* in a small mapped control block
  (``ctl``), and moves the answers to those back into the CQ. It is the
  CQ's only producer. Keys: it reads each request's key slot generation
  and re-expands the slot on the GPU when it changed.
- ``helper/native/resident_host.c``: a host thread (C, no GIL) that rings
  the completion doorbell once per batch when ``cq_tail`` moves and wakes
  the Python loop when the spill ring moves. It sleeps in poll() when
  nothing is outstanding, spins only at very low depth, and otherwise
  looks every ``sleep_us``. Doorbells: kgpu.ko's (KGPU_IOC_COMPLETE and
  poll() on /dev/kgpu; this thread then writes sq_head, not the GPU) or
  the shm ring's socket (:func:`host_thread` picks them).
- here: :class:`ResidentXts` (set-up, start, stop, statistics) and
  :class:`SpillTransport`, the spill ring as a :class:`Transport`, so the
  unchanged serving loop (:class:`kgpu_helper.daemon.Helper`) serves the
  spilled requests (large ones, RAID6, nop, anything invalid) with
  today's batched launches.

The control block (``ctl``, uint32 words, one 64-byte line each; see
resident.cu's ``CTL_*``) holds the stop flag, the spill ring's indexes,
and from byte ``SPILL_SQ_BYTE`` on the spill SQ (``entries`` SQEs) and the
spill CQ (``entries`` CQEs). At most ``entries`` requests are in flight,
so neither spill ring can overflow.

Limits of the prototype: it has run on a GPU on the shm ring only. On
kgpu.ko's ring its host side has run against the module in the testbed
with a stand-in for the GPU kernel (tests/vm/test_resident_kernel_ring.py),
but no machine has both: registering the /dev/kgpu mapping with CUDA,
the key slots (the read-only part) with ``cudaHostRegisterReadOnly``, is
untested. Not ivshmem's ring. A fault of the persistent kernel is failed
over (:meth:`ResidentXts._watchdog`, :func:`failover_plan`): the serving
loop takes the ring over and the GPU leaves service as on any GPU error.
helper/cuda/NOTES.md has the details.
"""

import ctypes
import logging
import os
import threading
import time

import numpy as np

from kgpu_helper import abi
from kgpu_helper.transport import Transport, TransportError

log = logging.getLogger("kgpu.resident")

_MASK32 = 0xFFFFFFFF

# ctl words: resident.cu's CTL_*
CTL_STOP = 0
CTL_SPILL_TAIL = 16
CTL_SPILL_HEAD = 32
CTL_SPILL_CQ_TAIL = 48
CTL_STOP_AT = 64
CTL_STOPPED = 80
CTL_RUNNING = 96
CTL_FWD = 112
CTL_BLK_BYTE = 4096
SPILL_SQ_BYTE = 8192
#: servers whose words fit between CTL_BLK_BYTE and SPILL_SQ_BYTE
MAX_SERVERS = (SPILL_SQ_BYTE - CTL_BLK_BYTE) // 16
# a server's state word (resident.cu's RES_ST_*)
ST_IDLE, ST_WAIT, ST_SERVE, ST_SPILL, ST_DONE = range(5)

# device state words: resident.cu's D_*
D_CLAIM, D_CQ_ALLOC, D_CQ_PUB, D_SPILL_ALLOC, D_SPILL_PUB, D_SQ_READ = range(6)
D_SQ_SEEN = 10
D_STATS, D_STATS_PER = 16, 4
#: resident.cu's per-server statistics, in order
SERVER_STATS = ("served", "spilled", "key_expansions", "encrypted")

# resident_host.c's RH_STAT_*
HOST_STATS = ("loops", "bells", "spill_signals", "idle_polls", "sleeps",
              "hangup", "spin_ns")

RES_THREADS = 256
#: T0 and Td0 replicated per bank, and the inverse S-box (xts.cu)
SMEM_BYTES = 2 * 256 * 32 * 4 + 256 * 32
SLOT_WORDS = 192

# res_check's reasons (resident.cu)
RES_OK, RES_NOT_XTS, RES_FLAGS, RES_NOT_IN_PLACE, RES_TOO_BIG, RES_UNIT, \
    RES_RANGE, RES_SLOT, RES_IV_MODE = range(9)

_HOST_REGISTER_PORTABLE, _HOST_REGISTER_MAPPED = 1, 2
_HOST_REGISTER_READ_ONLY = 8
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class ResidentError(RuntimeError):
    """The resident path cannot run here; ``str`` says why."""


def ctl_bytes(entries):
    """Size of the control block for a ring of ``entries``."""
    return SPILL_SQ_BYTE + entries * (abi.SQE.itemsize + abi.CQE.itemsize)


def check(sqe, data_off, data_size, max_bytes, nslots):
    """Python mirror of resident.cu's ``res_check``: RES_OK if the GPU
    takes the request (a numpy SQE record or a row of ``SQE.names``),
    else why it goes to the spill ring."""
    f = dict(zip(abi.SQE.names, sqe.tolist() if hasattr(sqe, "tolist")
                 else sqe))
    u, n, off = f["unit_size"], f["in_len"], f["in_off"]
    if f["service"] not in (abi.SVC_XTS_ENC, abi.SVC_XTS_DEC):
        return RES_NOT_XTS
    if f["flags"]:
        return RES_FLAGS
    if off != f["out_off"] or n != f["out_len"]:
        return RES_NOT_IN_PLACE
    if n == 0 or n > max_bytes:
        return RES_TOO_BIG
    if u not in (512, 1024, 2048, 4096) or n % u:
        return RES_UNIT
    if off % 16 or off < data_off or off - data_off > data_size or \
            n > data_off + data_size - off:
        return RES_RANGE
    if f["key_slot"] >= nslots:
        return RES_SLOT
    if f["iv_mode"] > 1:
        return RES_IV_MODE
    return RES_OK


def spill_rings(ctl, entries):
    """The spill SQ and spill CQ of the control block ``ctl`` (uint8), as
    SQE and CQE arrays over it."""
    sq = ctl[SPILL_SQ_BYTE:SPILL_SQ_BYTE + entries * abi.SQE.itemsize]
    cq0 = SPILL_SQ_BYTE + entries * abi.SQE.itemsize
    cq = ctl[cq0:cq0 + entries * abi.CQE.itemsize]
    return sq.view(abi.SQE), cq.view(abi.CQE)


def server_words(ctl, servers):
    """Each server's (claim, state) words of ``ctl``, one row per server."""
    w = ctl[:SPILL_SQ_BYTE].view(np.uint32)
    return w[CTL_BLK_BYTE // 4:CTL_BLK_BYTE // 4 + 4 * servers].reshape(
        servers, 4)[:, :2]


def _i32(x):
    """A free-running u32 index difference as a signed number."""
    x &= _MASK32
    return x - (1 << 32) if x & 0x80000000 else x


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


class _ResArgs(ctypes.Structure):
    """struct ResArgs of resident.cu."""
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "region", "keys", "ctl", "dst", "kcache", "kgen", "te0", "td0",
        "isbox", "sq_off", "cq_off", "idx_off", "data_off", "data_size")] + \
        [(n, ctypes.c_uint32) for n in ("mask", "nslots", "max_bytes",
                                         "poll_ns", "write_sq_head",
                                         "fault_at")]


# resident_host.c's RH_SOCKET, RH_KGPU: the doorbells of the shm ring and
# of kgpu.ko's ring
HOST_SOCKET, HOST_KGPU = 0, 1


class _HostCfg(ctypes.Structure):
    """struct rh_cfg of resident_host.c."""
    _fields_ = [("sq_tail", ctypes.c_void_p), ("cq_tail", ctypes.c_void_p),
                ("spill_tail", ctypes.c_void_p), ("stats", ctypes.c_void_p),
                ("bell_fd", ctypes.c_int32), ("spill_fd", ctypes.c_int32),
                ("wake_fd", ctypes.c_int32), ("spin_below", ctypes.c_uint32),
                ("spin_us", ctypes.c_uint32), ("sleep_us", ctypes.c_uint32),
                ("mode", ctypes.c_uint32), ("bell_ioctl", ctypes.c_uint32),
                ("sq_head", ctypes.c_void_p)]


def host_library():
    """resident_host.c, built and loaded (ctypes)."""
    from kgpu_helper.native import build
    lib = ctypes.CDLL(build("resident_host", shared=True))
    lib.rh_start.restype = ctypes.c_void_p
    lib.rh_start.argtypes = [ctypes.POINTER(_HostCfg)]
    lib.rh_stop.restype = ctypes.c_int
    lib.rh_stop.argtypes = [ctypes.c_void_p]
    lib.rh_cpu_ns.restype = ctypes.c_int64
    lib.rh_cpu_ns.argtypes = [ctypes.c_void_p]
    return lib


class HostThread:
    """resident_host.c's thread over raw addresses (so that it can be
    tested without a GPU): ``sq_tail``/``cq_tail``/``spill_tail`` are the
    addresses of the three uint32 counters, ``bell_fd`` the doorbell.

    The shm ring (the default): ``bell_fd`` is the ring driver's socket.
    kgpu.ko's ring: ``sq_head`` (the address of the region's sq_head) and
    ``bell_ioctl`` (abi.IOC_COMPLETE) given, ``bell_fd`` is /dev/kgpu; the
    thread then writes sq_head itself (resident_host.c says when).
    :func:`host_thread` picks these for a transport."""

    def __init__(self, sq_tail, cq_tail, spill_tail, bell_fd, spill_fd,
                 spin_below=1, spin_us=50, sleep_us=20, sq_head=None,
                 bell_ioctl=0):
        self.lib = host_library()
        self.stats = np.zeros(len(HOST_STATS), np.uint64)
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        mode = HOST_SOCKET if sq_head is None else HOST_KGPU
        self.cfg = _HostCfg(sq_tail, cq_tail, spill_tail,
                            self.stats.ctypes.data, bell_fd, spill_fd,
                            self.wake_fd, spin_below, spin_us, sleep_us,
                            mode, bell_ioctl, sq_head)
        self.h = self.lib.rh_start(ctypes.byref(self.cfg))
        if not self.h:
            os.close(self.wake_fd)
            raise ResidentError("cannot start the resident host thread")

    def hangup(self):
        return bool(self.stats[HOST_STATS.index("hangup")])

    def snapshot(self):
        return {k: int(v) for k, v in zip(HOST_STATS, self.stats)}

    def cpu_seconds(self):
        """CPU time the thread used so far (its own clock), or None."""
        ns = self.lib.rh_cpu_ns(self.h) if self.h else -1
        return None if ns < 0 else ns * 1e-9

    def stop(self):
        if self.h:
            self.lib.rh_stop(self.h)
            self.h = None
            os.close(self.wake_fd)


def _name_thread(name):
    """The calling thread's name as ps and /proc show it (PR_SET_NAME)."""
    try:
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def host_mode(transport):
    """HOST_KGPU for kgpu.ko's ring, HOST_SOCKET for the shm ring; any
    other transport (ivshmem's) raises ResidentError."""
    from kgpu_helper.transport import KernelTransport, ShmTransport

    if isinstance(transport, KernelTransport):
        return HOST_KGPU
    if isinstance(transport, ShmTransport):
        return HOST_SOCKET
    name = getattr(transport, "name", type(transport).__name__)
    raise ResidentError(f"the resident path serves kgpu.ko's ring and the "
                        f"shm ring, not a {name} transport")


def host_thread(transport, spill_tail, spill_fd, **kw):
    """The host thread on ``transport``'s ring (:func:`host_mode`), for a
    spill ring whose tail is at address ``spill_tail`` and whose loop
    sleeps on the eventfd ``spill_fd``; ``kw``: HostThread's waiting."""
    r = transport.region
    idx = r.buf.ctypes.data + int(r.hdr["idx_off"])
    if host_mode(transport) == HOST_KGPU:
        kw.update(sq_head=idx + abi.SQ_HEAD_OFF, bell_ioctl=abi.IOC_COMPLETE)
    return HostThread(idx + abi.SQ_TAIL_OFF, idx + abi.CQ_TAIL_OFF,
                      spill_tail, transport.fileno(), spill_fd, **kw)


def _loading_mode():
    """CUDA's module loading mode ("eager", "lazy"), or None if unknown."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        m = ctypes.c_int(0)
        if cuda.cuModuleGetLoadingMode(ctypes.byref(m)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return {1: "eager", 2: "lazy"}.get(m.value)


class ResidentXts:
    """The resident XTS path of one helper on one GPU.

    Start it once the region's writable part is registered with CUDA (the
    serving loop's :class:`Helper` does that), then serve ``self.spill``
    with that loop instead of the ring's transport. ``stop()`` after the
    loop has returned, before the region is unregistered.

    ``blocks``: persistent blocks (one per SM, 72 KiB of tables each);
    ``max_bytes``: larger XTS requests go to the batched path;
    ``poll_ns``: the kernel's longest sleep between two looks at sq_tail;
    ``spin_below``, ``spin_us``, ``sleep_us``: the host thread's waiting
    (see resident_host.c).
    """

    def __init__(self, transport, backend, blocks=16, max_bytes=16 << 10,
                 poll_ns=2000, spin_below=1, spin_us=50, sleep_us=20,
                 fault_at=0, servers=2):
        self.host_mode = host_mode(transport)
        if not 16 <= max_bytes <= 1 << 20:
            raise ResidentError(f"resident max request size must be 16 B "
                                f"to 1 MiB, got {max_bytes}")
        if servers not in (1, 2, 4, 8):
            raise ResidentError(f"servers per block must be 1, 2, 4 or 8, "
                                f"got {servers}")
        if not 1 <= blocks * servers <= MAX_SERVERS:
            raise ResidentError(f"at most {MAX_SERVERS} servers (blocks x "
                                f"servers per block), got {blocks} x "
                                f"{servers}")
        self.servers = servers
        self.nsrv = blocks * servers
        self.t = transport
        self.be = backend
        self.fault_at = fault_at
        self.fault = None         # why the kernel ended, after a fault
        self.failover = None      # what the failover did
        self._watch = None
        self._watching = False
        self.r = transport.region
        self.blocks = blocks
        self.max_bytes = max_bytes
        self.poll_ns = poll_ns
        self.host_kw = dict(spin_below=spin_below, spin_us=spin_us,
                            sleep_us=sleep_us)
        self.spill = None
        self.host = None
        self.stream = None
        self._keys_registered = False
        self.stop_at = None
        self.t_start = None

    # -- start

    def _register_keys(self, cp):
        """The header and key slots (mapped read-only) for the GPU: with
        cudaHostRegisterReadOnly, so the kernel reads the generations and
        keys where the kernel module writes them."""
        base = self.r.buf.ctypes.data
        try:
            ok = cp.cuda.runtime.deviceGetAttribute(
                113, self.be.device.id)  # HostRegisterReadOnlySupported
        except Exception:  # noqa: BLE001
            ok = None
        try:
            cp.cuda.runtime.hostRegister(
                base, self.r.rw_off, _HOST_REGISTER_PORTABLE
                | _HOST_REGISTER_MAPPED | _HOST_REGISTER_READ_ONLY)
        except Exception as e:  # noqa: BLE001
            raise ResidentError(
                f"cannot register the key slots read-only with CUDA ({e}; "
                f"HostRegisterReadOnlySupported={ok})") from None
        self._keys_registered = True

    def start(self):
        try:
            self._start()
        except BaseException:
            self._abort()
            raise

    def _abort(self):
        """Undo a start that failed half-way (the kernel not running)."""
        if self.host is not None:
            self.host.stop()
            self.host = None
        if self.stream is not None and not self.stream.done and \
                getattr(self, "ctl", None) is not None:
            # launched but not seen running: ask it to stop anyway
            self.ctl[:SPILL_SQ_BYTE].view(np.uint32)[CTL_STOP] = 1
            return
        self._release()

    def _preload(self):
        """Load, before the persistent kernel runs, the kernels the serving
        loop launches next to it. CUDA's lazy loading (the default since
        CUDA 12.2) loads a kernel at its first launch and may synchronize
        the context to do so: with a kernel that never ends, that waits
        forever. So: the batched XTS kernels here (funcSetAttribute and the
        occupancy query load them), and CUDA_MODULE_LOADING=EAGER set by
        `kgpu helper --resident` before CUDA starts for the rest."""
        mode = _loading_mode()
        if mode == "lazy":
            log.warning("CUDA loads modules lazily (CUDA_MODULE_LOADING="
                        "EAGER was not set before CUDA started): a kernel "
                        "first launched while the resident kernel runs may "
                        "wait for it forever")
        self.be.xts_batch().load_all()
        return mode

    def _start(self):
        import cupy as cp

        from kgpu_helper.cuda import OPTIONS, source

        r = self.r
        self.loading_mode = self._preload()
        if cp.cuda.runtime.deviceGetAttribute(91, self.be.device.id) != 1:
            raise ResidentError("the GPU cannot use host pointers of "
                                "registered memory")
        entries = r.entries
        with self.be.device:
            self._register_keys(cp)
            n = ctl_bytes(entries)
            self._ctl_mem = cp.cuda.alloc_pinned_memory(n)
            self.ctl = np.frombuffer(self._ctl_mem, np.uint8, n)
            self.ctl[:] = 0
            dst = np.zeros(D_STATS + D_STATS_PER * self.nsrv, np.uint32)
            sq_head = int(r.idx[abi.SQ_HEAD_OFF // 4])
            cq_tail = int(r.idx[abi.CQ_TAIL_OFF // 4])
            dst[D_CLAIM] = dst[D_SQ_READ] = dst[D_SQ_SEEN] = sq_head
            self.sq_start, self.cq_start = sq_head, cq_tail
            dst[D_CQ_ALLOC] = dst[D_CQ_PUB] = cq_tail
            self.dst = cp.asarray(dst)
            self.kcache = cp.zeros(self.nsrv * r.nkeys * SLOT_WORDS,
                                   cp.uint32)
            self.kgen = cp.ones(self.nsrv * r.nkeys, cp.uint32)  # odd: none
            code = ("#define XTS_RK_LOAD(p) (*(p))\n"
                    f"#define RES_SERVERS {self.servers}\n"
                    + source("xts") + "\n" + source("resident"))
            mod = cp.RawModule(code=code, options=OPTIONS)
            self._kern = mod.get_function("resident_xts")
            fptr = self._kern.kernel.ptr
            cp.cuda.driver.funcSetAttribute(
                fptr, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                SMEM_BYTES)
            be = self.be
            a = self._args = _ResArgs()
            a.region = r.buf.ctypes.data
            a.keys = r.buf.ctypes.data + int(r.hdr["keys_off"])
            a.ctl = self.ctl.ctypes.data
            a.dst = self.dst.data.ptr
            a.kcache = self.kcache.data.ptr
            a.kgen = self.kgen.data.ptr
            a.te0, a.td0 = be._te0.data.ptr, be._td0.data.ptr
            a.isbox = be._isbox.data.ptr
            a.sq_off, a.cq_off = r.sq_off, r.cq_off
            a.idx_off = int(r.hdr["idx_off"])
            a.data_off, a.data_size = r.data_off, r.data_size
            a.mask, a.nslots = r.mask, r.nkeys
            a.max_bytes, a.poll_ns = self.max_bytes, self.poll_ns
            a.write_sq_head = int(self.host_mode == HOST_SOCKET)
            a.fault_at = self.fault_at
            self._params = (ctypes.c_void_p * 1)(ctypes.addressof(a))
            self.stream = cp.cuda.Stream(non_blocking=True)
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.host = host_thread(
                self.t, self.ctl.ctypes.data + 4 * CTL_SPILL_TAIL, self.efd,
                **self.host_kw)
            self.spill = SpillTransport(r, self.ctl, entries, self.efd,
                                        self.host.hangup)
            cp.cuda.driver.launchKernel(
                fptr, self.blocks, 1, 1, RES_THREADS, 1, 1, SMEM_BYTES,
                self.stream.ptr, ctypes.addressof(self._params), 0)
        w = self.ctl[:SPILL_SQ_BYTE].view(np.uint32)
        end = time.monotonic() + 10
        while not w[CTL_RUNNING]:
            if self.stream.done:
                self.stream.synchronize()  # raises the kernel's error
                raise ResidentError("the resident kernel ended at once")
            if time.monotonic() > end:
                raise ResidentError("the resident kernel did not start in "
                                    "10 s")
            time.sleep(1e-3)
        self.t_start = time.monotonic()
        # no device-wide synchronize from now on (cupy_backend.schedule)
        self.be.resident = []
        self._watching = True
        self._watch = threading.Thread(target=self._watchdog,
                                       name="kgpu-resident-watch",
                                       daemon=True)
        self._watch.start()
        log.info("resident XTS: %d blocks of %d threads, %d servers each, "
                 "requests up to %d bytes on the GPU itself, the rest "
                 "through the batched path (module loading: %s)",
                 self.blocks, RES_THREADS, self.servers, self.max_bytes,
                 self.loading_mode)

    # -- faults

    def _watchdog(self, every=0.05):
        """Notice the kernel ending without being asked (a GPU fault): the
        serving loop is woken and takes the ring over (``_failover``)."""
        import cupy as cp
        _name_thread(b"kgpu-rwatch")
        w = self.ctl[:SPILL_SQ_BYTE].view(np.uint32)
        with self.be.device:
            probe = cp.cuda.Stream(non_blocking=True)
        while self._watching:
            time.sleep(every)
            # A memory fault in the kernel does not show in a query of its
            # stream (it stayed "not ready" for 10 s after one, H200); a
            # copy on a stream of its own, waited for, reports the
            # context's error. Its cost: about 20 us per look.
            try:
                with self.be.device:
                    self.dst[:1].get(stream=probe)
                    probe.synchronize()
                    done = self.stream.done
                err = None
            except Exception as e:  # noqa: BLE001 - a fault says so
                done, err = True, f"{type(e).__name__}: {e}"
            if not done or not self._watching:
                continue
            if w[CTL_STOPPED]:
                return
            if err is None:
                try:
                    self.stream.synchronize()
                    err = "the kernel ended without being asked to stop"
                except Exception as e:  # noqa: BLE001
                    err = f"{type(e).__name__}: {e}"
            self.fault = err
            log.error("the resident XTS kernel failed (%s): the serving loop "
                      "takes the ring over", err)
            self.spill.on_fault = self._failover
            os.eventfd_write(self.efd, 1)
            return

    def _failover(self):
        """In the serving loop's thread: take the ring over from the dead
        kernel (see failover_plan) and serve it as without the resident
        path; the GPU itself fails over as any GPU error does (the batched
        path's launches fail, the engine leaves service, the CPU serves)."""
        from kgpu_helper.batch import EIO, cqes
        if self.host is not None:
            self.host.stop()
            self.host = None
        new_head, held, forward = failover_plan(
            self.r, self.ctl, self.nsrv, self.sq_start, self.cq_start)
        self.r.idx[abi.SQ_HEAD_OFF // 4] = new_head
        out = [c for c in (forward, cqes(held, EIO)) if len(c)]
        if out:
            self.t.post(np.concatenate(out))
        self.spill.take_over(self.t)
        self.failover = {"sq_head": new_head, "held_eio": len(held),
                         "forwarded": len(forward)}
        log.error("resident XTS failover: %d held requests answered -EIO "
                  "(the kernel redoes them on its CPU), %d spill answers "
                  "forwarded, reading the ring from index %d",
                  len(held), len(forward), new_head)

    # -- stop

    def stop(self, timeout=10.0):
        """Stop the kernel: requests published before the stop are
        answered (spilled ones that the serving loop left are answered
        -EIO: the kernel then redoes them on its CPU), later ones stay in
        the SQ. Returns the statistics."""
        if self.stream is None:
            return {}
        self._watching = False
        if self._watch is not None:
            self._watch.join()
            self._watch = None
        w = self.ctl[:SPILL_SQ_BYTE].view(np.uint32)
        w[CTL_STOP] = 1
        end = time.monotonic() + timeout
        left = 0
        while not w[CTL_STOPPED] and time.monotonic() < end and \
                self.fault is None:
            if self.stream.done:
                break  # ended without stopping: a fault
            if self.spill.pending():
                sq = self.spill.drain()
                from kgpu_helper.batch import EIO, cqes
                self.spill.post(cqes(sq, EIO))
                left += len(sq)
            time.sleep(1e-4)
        stopped = bool(w[CTL_STOPPED])
        if self.fault is not None:
            stopped = False
        elif stopped or self.stream.done:
            try:
                self.stream.synchronize()
            except Exception as e:  # noqa: BLE001 - report it
                log.error("the resident kernel failed: %s", e)
                stopped = False
        else:
            log.error("the resident kernel did not stop in %g s", timeout)
        self.stop_at = int(w[CTL_STOP_AT])
        if self.host is not None:
            self.host.stop()
        st = self.stats()
        st["spilled_answered_at_stop"] = left
        st["stopped"] = stopped
        if self.fault is not None:
            st["fault"] = self.fault
            st["failover"] = self.failover
        if stopped:
            self._release()
            self.be.resident = None
        log.info("resident XTS stopped: %s", st)
        return st

    def stats(self):
        out = {}
        if self.stream is not None and self.fault is None:
            try:
                d = self.dst.get()
            except Exception as e:  # noqa: BLE001 - a fault: no counters
                d = None
                out["error"] = f"{type(e).__name__}: {e}"
            if d is not None:
                blk = d[D_STATS:].reshape(self.nsrv, D_STATS_PER)
                out = {k: int(blk[:, i].sum())
                       for i, k in enumerate(SERVER_STATS)}
                out["per_server_served"] = [int(x) for x in blk[:, 0]]
        if self.host is not None:
            out["host"] = self.host.snapshot()
        return out

    def debug(self):
        """The kernel's and the host thread's words now, for a report of
        something stuck (reads device memory on a stream of its own)."""
        import cupy as cp
        w = self.ctl[:SPILL_SQ_BYTE].view(np.uint32)
        out = {"ctl": {k: int(w[v]) for k, v in (
            ("stop", CTL_STOP), ("spill_tail", CTL_SPILL_TAIL),
            ("spill_head", CTL_SPILL_HEAD), ("spill_cq_tail",
                                             CTL_SPILL_CQ_TAIL),
            ("stopped", CTL_STOPPED), ("running", CTL_RUNNING),
            ("fwd", CTL_FWD))},
            "servers": server_words(self.ctl, self.nsrv).tolist(),
            "ring": {k: int(self.r.idx[o // 4]) for k, o in (
                ("sq_tail", abi.SQ_TAIL_OFF), ("sq_head", abi.SQ_HEAD_OFF),
                ("cq_tail", abi.CQ_TAIL_OFF), ("cq_head", abi.CQ_HEAD_OFF))},
            "fault": self.fault}
        try:
            with self.be.device:
                s = cp.cuda.Stream(non_blocking=True)
                out["dst"] = self.dst[:16].get(stream=s).tolist()
                s.synchronize()
                out["stream_done"] = self.stream.done
        except Exception as e:  # noqa: BLE001
            out["dst"] = f"{type(e).__name__}: {e}"
        if self.host is not None:
            out["host"] = self.host.snapshot()
        return out

    def _release(self):
        import cupy as cp
        if self._keys_registered:
            try:
                cp.cuda.runtime.hostUnregister(self.r.buf.ctypes.data)
            except Exception as e:  # noqa: BLE001
                log.warning("hostUnregister of the key slots: %s", e)
            self._keys_registered = False
        if getattr(self, "efd", None) is not None:
            os.close(self.efd)
            self.efd = None
        self.stream = None
