"""The resident XTS path's host-side driver: native/resident_host.c's
thread (C, no GIL), loaded with ctypes. It rings the completion doorbell
once per batch when the kernel moves ``cq_tail``, and wakes the serving
loop when the spill ring moves; on kgpu.ko's ring it also writes
``sq_head``. :func:`host_thread` picks the doorbell for a transport.
"""

import ctypes
import os

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.serve.resident.layout import HOST_STATS, ResidentError

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
    from kgpu_helper.rings.transport import KernelTransport, ShmTransport

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
