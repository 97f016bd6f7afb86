"""The resident XTS path's launch: :class:`ResidentXts` registers the
region with CUDA, compiles and starts the persistent kernel on a stream of
its own beside the host thread and the spill ring's serving loop, watches
it (a probe copy at each look) and stops it; a fault hands the ring to the
serving loop (failover.py).
"""

import ctypes
import logging
import os
import threading
import time

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.serve.resident.failover import SpillTransport, failover_plan
from kgpu_helper.serve.resident.host import (
    HOST_SOCKET, _name_thread, host_mode, host_thread)
from kgpu_helper.serve.resident.layout import (
    _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, _HOST_REGISTER_MAPPED,
    _HOST_REGISTER_PORTABLE, _HOST_REGISTER_READ_ONLY, CTL_FWD, CTL_RUNNING,
    CTL_SPILL_CQ_TAIL, CTL_SPILL_HEAD, CTL_SPILL_TAIL, CTL_STOP, CTL_STOP_AT,
    CTL_STOPPED, D_CLAIM, D_CQ_ALLOC, D_CQ_PUB, D_SQ_READ, D_SQ_SEEN,
    D_STATS, D_STATS_PER, MAX_SERVERS, RES_THREADS, SERVER_STATS,
    SLOT_WORDS, SMEM_BYTES, SPILL_SQ_BYTE, ResidentError, ctl_bytes,
    server_words)

log = logging.getLogger("kgpu.resident")


class _ResArgs(ctypes.Structure):
    """struct ResArgs of resident.cu."""
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "region", "keys", "ctl", "dst", "kcache", "kgen", "te0", "td0",
        "isbox", "sq_off", "cq_off", "idx_off", "data_off", "data_size")] + \
        [(n, ctypes.c_uint32) for n in ("mask", "nslots", "max_bytes",
                                         "poll_ns", "write_sq_head",
                                         "fault_at")]


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
        from kgpu_helper.serve.batch import EIO, cqes
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
                from kgpu_helper.serve.batch import EIO, cqes
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
