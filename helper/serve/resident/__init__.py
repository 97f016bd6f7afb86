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
- this package, in four modules:

  - ``layout.py``: the control block's memory layout (every word shared
    with resident.cu and resident_host.c) and :func:`check`, the rule by
    which the kernel takes a request;
  - ``host.py``: the host-side driver, resident_host.c's thread loaded
    with ctypes (:class:`HostThread`, :func:`host_thread`);
  - ``failover.py``: :func:`failover_plan` and :class:`SpillTransport`,
    the spill ring as a Transport, so that the unchanged serving loop
    (:class:`kgpu_helper.serve.daemon.Helper`) serves the spilled requests
    (large ones, RAID6, nop, anything invalid) with today's batched
    launches, and the whole ring after a fault;
  - ``launch.py``: :class:`ResidentXts` (set-up, the kernel's launch,
    watchdog, stop, statistics).

  Imports go layout <- host, failover <- launch; the package exports the
  names the helper and the tests use.

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

from kgpu_helper.serve.resident.failover import (
    SpillTransport, failover_plan)
from kgpu_helper.serve.resident.host import (
    HOST_KGPU, HOST_SOCKET, HostThread, host_library, host_mode, host_thread)
from kgpu_helper.serve.resident.launch import ResidentXts
from kgpu_helper.serve.resident.layout import (
    CTL_BLK_BYTE, CTL_FWD, CTL_RUNNING, CTL_SPILL_CQ_TAIL, CTL_SPILL_HEAD,
    CTL_SPILL_TAIL, CTL_STOP, CTL_STOP_AT, CTL_STOPPED, HOST_STATS,
    MAX_SERVERS, RES_OK, SERVER_STATS, SPILL_SQ_BYTE, ST_DONE, ST_IDLE,
    ST_SERVE, ST_SPILL, ST_WAIT, ResidentError, check, ctl_bytes,
    server_words, spill_rings)

__all__ = [
    "CTL_BLK_BYTE", "CTL_FWD", "CTL_RUNNING", "CTL_SPILL_CQ_TAIL",
    "CTL_SPILL_HEAD", "CTL_SPILL_TAIL", "CTL_STOP", "CTL_STOP_AT",
    "CTL_STOPPED", "HOST_KGPU", "HOST_SOCKET", "HOST_STATS", "HostThread",
    "MAX_SERVERS", "RES_OK", "ResidentError", "ResidentXts", "SERVER_STATS",
    "SPILL_SQ_BYTE", "ST_DONE", "ST_IDLE", "ST_SERVE", "ST_SPILL", "ST_WAIT",
    "SpillTransport", "check", "ctl_bytes", "failover_plan", "host_library",
    "host_mode", "host_thread", "server_words", "spill_rings"]
