"""The helper's serving loop: drain the ring, batch, compute, post.

One pass of the loop takes every published request (one ``drain``),
validates them all at once against the region (a bad request is answered
-EINVAL and never reaches a backend), groups the rest by service and
shape (XTS: unit size; RAID6: disks and lost blocks) and runs each group
as few backend calls as possible: one XTS launch over all the data units
of a chunk of requests, one RAID6 launch over all the stripes. Completions
go back with one ``post`` (one doorbell) per pass.

Where things are:

- :mod:`kgpu_helper.serve.batch`: key slots (KeyCache), validation, CQEs;
  :mod:`kgpu_helper.serve.fastpath` does validation, grouping, CQEs and XTS
  descriptors in one C pass where a C compiler is at hand.
- :mod:`kgpu_helper.serve.engine_cpu`: CpuEngine, the cpu backend on the
  region.
- :mod:`kgpu_helper.serve.engine_gpu`: GpuEngine (one per GPU), zero-copy
  and copy paths, failover.
- :mod:`kgpu_helper.serve.calibrate`: the start-up crossover measurement.

Several GPU engines (``--gpus 0,1``): each chunk goes to the live engine
with the least work in flight (bytes queued and not yet completed, then
requests), ties taken in turn; a slow or busy engine so gets fewer
chunks, an idle one is preferred. :class:`EngineAccount` keeps, per
engine and for the CPU, the work in flight and the requests and bytes
served; the helper logs them at stop and every ``report_every`` seconds.
"""

import collections
import logging
import os
import select
import signal
import time

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.serve import fastpath
from kgpu_helper.serve.batch import EIO, KeyCache, _check_one, validate
from kgpu_helper.serve.batch import cqes as _cqes
from kgpu_helper.serve.calibrate import calibrate  # noqa: F401 (kgpu helper's)
from kgpu_helper.serve.engine_cpu import CpuEngine, cpu_run as _cpu_run
from kgpu_helper.serve.engine_gpu import GpuEngine

log = logging.getLogger("kgpu.helper")

#: a chunk (one launch, one stream) closes at this many bytes
CHUNK_BYTES = 8 << 20
CHUNK_REQS = 1024
#: seconds between two per-engine reports in the log (0: only at stop)
REPORT_EVERY = float(os.environ.get("KGPU_HELPER_REPORT_S", "60"))


class EngineAccount:
    """One engine's (or the CPU's) load and what it served."""

    __slots__ = ("label", "q_bytes", "q_reqs", "chunks", "reqs", "bytes",
                 "failed")

    def __init__(self, label):
        self.label = label
        self.q_bytes = self.q_reqs = 0      # in flight, not yet completed
        self.chunks = self.reqs = self.bytes = 0   # served (status 0)
        self.failed = 0                     # requests it could not serve

    def line(self):
        return (f"{self.label}: {self.reqs} requests, "
                f"{self.bytes / 1e6:.1f} MB in {self.chunks} chunks"
                + (f", {self.failed} failed over" if self.failed else "")
                + (f", {self.q_reqs} in flight" if self.q_reqs else ""))


# ------------------------------------------------------------------ helper

class Helper:
    """The serving loop over one transport.

    ``backend``: a services backend (cpu or cupy); ``gpus``: extra cupy
    backends for more GPUs (the first GPU is ``backend``). ``spin``:
    seconds to poll the ring before sleeping in poll() when idle (saves a
    wake-up per request at low queue depth).
    """

    def __init__(self, transport, backend, gpus=(), spin=50e-6,
                 cpu_backend=None, stats=None, xts_io=None, engines=None,
                 report_every=None):
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
        if engines is not None:
            # prebuilt engines (the tests' fakes): submit(svc, reqs, row)
            # -> chunk with done(), wait(), finish(); .broken; .streams
            self.gpus = list(engines)
        self._rr = 0
        self.cpu_acct = EngineAccount("cpu")
        self.accts = [EngineAccount(self._label(i, g))
                      for i, g in enumerate(self.gpus)]
        self._acct_of = {id(g): a for g, a in zip(self.gpus, self.accts)}
        self._cost = {}  # id(chunk) -> (account, bytes, requests)
        self.report_every = (REPORT_EVERY if report_every is None
                             else report_every)
        self._reported = time.monotonic()
        self.inflight = collections.deque()
        # batches of 2 or more: validated and grouped in one C pass where
        # a C compiler is at hand (helper/native/fastpath.c), else numpy
        self.fast = fastpath.get(self.region, self.keys)
        # seconds spent polling (ring or GPU event) rather than working,
        # for the benches' busy/spin split of the helper's CPU time
        self.spin_s = 0.0
        self.sync_s = 0.0
        self._counters = _spin_counters()
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

    @staticmethod
    def _label(i, g):
        try:
            name = g.name()
        except Exception:  # noqa: BLE001 - a name is only for the log
            name = type(g).__name__
        return f"engine {i} ({name})"

    def _gpu(self):
        """The live engine with the least work in flight (bytes, then
        requests); ties in turn, starting after the last one chosen."""
        gs = self.gpus
        n = len(gs)
        if n == 1:
            g = gs[0]
            return g if g.broken is None else None
        best = bkey = None
        for j in range(n):
            i = (self._rr + j) % n
            g = gs[i]
            if g.broken is not None:
                continue
            a = self.accts[i]
            key = (a.q_bytes, a.q_reqs)
            if best is None or key < bkey:
                best, bkey = i, key
        if best is None:
            return None
        self._rr = (best + 1) % n
        return gs[best]

    def _finish(self, ch):
        """A chunk's CQEs, with its engine's account brought up to date:
        requests answered CQE_CPU count for the CPU, failed ones (status
        not 0) as failed over."""
        cq = ch.finish()
        cost = self._cost.pop(id(ch), None)
        if cost is not None:
            a, nbytes, nreqs = cost
            a.q_bytes -= nbytes
            a.q_reqs -= nreqs
            a.chunks += 1
            cpu = (cq["flags"] & abi.CQE_CPU) != 0
            ok = cq["status"] == 0
            if ok.all() and not cpu.any():
                a.reqs += nreqs
                a.bytes += nbytes
            else:
                lens = ch.reqs["in_len"].astype(np.int64)
                mine = ok & ~cpu
                a.reqs += int(mine.sum())
                a.bytes += int(lens[mine].sum())
                a.failed += int((~mine).sum())
                c = self.cpu_acct
                c.reqs += int((ok & cpu).sum())
                c.bytes += int(lens[ok & cpu].sum())
        return cq

    def report(self):
        """Per engine (and the CPU): requests and bytes served."""
        return [a.line() for a in [*self.accts, self.cpu_acct]]

    def _maybe_report(self):
        now = time.monotonic()
        if now - self._reported >= self.report_every:
            self._reported = now
            for line in self.report():
                log.info("served so far: %s", line)

    def dispatch(self, sqes):
        """Validate and start ``sqes``; returns (ready CQE arrays, list of
        chunks in flight)."""
        if len(sqes) == 1:
            return self._dispatch_one(sqes)
        if self.fast is not None:
            return self._dispatch_fast(sqes)
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

    def _dispatch_fast(self, sqes):
        """dispatch() through fastpath: one C pass validates, answers the
        invalid requests and the nops, and groups the rest."""
        ready, pending = [], []
        _st, cq, groups, err, nnop = self.fast.classify(sqes)
        if cq is not None:
            ready.append(cq)
            if len(cq) > nnop:
                self.stats["errors"] += len(cq) - nnop
                for s in np.nonzero(err)[0]:
                    self.stats[("errors", int(s))] += int(err[s])
            if nnop:
                self.stats[("done", abi.SVC_NOP)] += nnop
        for s, reqs in groups:
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
        """One chunk to a GPU (the least loaded; if it fails, the next
        live one), or (no GPU left) to the CPU."""
        g = self._gpu()
        while g is not None:
            try:
                ch = g.submit(s, part, row)
            except Exception as e:  # noqa: BLE001 - fail over
                g.broken = f"{type(e).__name__}: {e}"
                log.error("%s: cannot queue work (%s); taking it "
                          "out of service", g.name(), g.broken)
                # Part of the chunk may be queued already: another engine
                # or the CPU may redo it only once nothing on the GPU can
                # still write.
                if not self._quiesce():
                    ready.append(_cqes(part, EIO))
                    return
                g = self._gpu()
                continue
            a = self._acct_of.get(id(g))
            if a is not None:
                nbytes = row[5] if row is not None else \
                    int(part["in_len"].sum())
                a.q_bytes += nbytes
                a.q_reqs += len(part)
                self._cost[id(ch)] = (a, nbytes, len(part))
            pending.append(ch)
            self.stats[("gpu", s)] += len(part)
            return
        self.stats[("cpu", s)] += len(part)
        # CQE_CPU whenever the CPU did it, GPUs or not: the
        # kernel's GPU/CPU split must tell the truth.
        st = _cpu_run(self.cpu, s, part)
        c = self.cpu_acct
        c.chunks += 1
        ok = (np.asarray(st) == 0) if isinstance(st, np.ndarray) else \
            np.full(len(part), st == 0)
        c.reqs += int(ok.sum())
        c.bytes += int(part["in_len"].astype(np.int64)[ok].sum())
        ready.append(_cqes(part, st, abi.CQE_CPU))

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
            start = time.perf_counter()
            end = start + self.spin
            try:
                while time.perf_counter() < end:
                    if t.pending() or self.stopping:
                        return
            finally:
                self._spun(start)
        # A transport whose other side rings only on request (ivshmem's
        # need_wakeup) arms that here; True: work arrived meanwhile.
        arm = getattr(t, "arm_wakeup", None)
        if arm is not None and arm():
            return
        p = select.poll()
        p.register(t.fileno(), select.POLLIN)
        if self._wake_r >= 0:
            p.register(self._wake_r, select.POLLIN)
        ms = None if timeout is None else int(timeout * 1000)
        try:
            events = p.poll(ms)
        finally:
            if arm is not None:
                t.disarm_wakeup()
        for fd, ev in events:
            if fd == t.fileno():
                if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    from kgpu_helper.rings.transport import TransportError
                    raise TransportError("the ring's other side went away")
                if hasattr(t, "_clear"):
                    t._clear()

    def _wait_oldest(self):
        """Wait for the oldest chunk, looking at the ring meanwhile."""
        ch = self.inflight[0]
        start = time.perf_counter()
        end = start + max(self.spin, 200e-6)
        try:
            while time.perf_counter() < end:
                if ch.done() or self.t.pending():
                    return
        finally:
            self._spun(start)
        start = time.perf_counter()
        ch.wait()
        # CUDA's event wait may spin or block (its scheduling flags):
        # counted apart from our own polling
        self.sync_s += time.perf_counter() - start
        if self._counters is not None:
            self._counters[1] = int(self.sync_s * 1e9)

    def _wait_any(self):
        """Several engines: wait for any chunk (not only the oldest, which
        may sit on a slow engine) or the ring, polling."""
        start = time.perf_counter()
        try:
            while not self.stopping:
                for ch in self.inflight:
                    if ch.done():
                        return
                if self.t.pending():
                    return
                time.sleep(20e-6)
        finally:
            self._spun(start)

    def _spun(self, start):
        self.spin_s += time.perf_counter() - start
        if self._counters is not None:
            self._counters[0] = int(self.spin_s * 1e9)

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
                if len(self.gpus) > 1:
                    # any engine's finished chunks, not only the oldest's:
                    # a slow engine must not hold back a fast one's posts
                    # (nor make it look busy to _gpu())
                    if self.inflight:
                        keep = collections.deque()
                        for ch in self.inflight:
                            if ch.done():
                                out.append(self._finish(ch))
                            else:
                                keep.append(ch)
                        self.inflight = keep
                else:
                    while self.inflight and self.inflight[0].done():
                        out.append(self._finish(self.inflight.popleft()))
                if out:
                    cq = np.concatenate(out) if len(out) > 1 else out[0]
                    t.post(cq)
                    answered += len(cq)
                    self.stats["batches"] += 1
                    self.stats["answered"] += len(cq)
                    if self.report_every > 0:
                        self._maybe_report()
                elif self.inflight and (sqes is None or not len(sqes)):
                    if self.stopping:
                        self.inflight[0].wait()
                    elif len(self.gpus) > 1:
                        self._wait_any()
                    else:
                        self._wait_oldest()
        finally:
            # whatever is still queued on a GPU completes before we go
            while self.inflight:
                ch = self.inflight.popleft()
                try:
                    cq = self._finish(ch)
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


def _spin_counters():
    """``$KGPU_HELPER_COUNTERS``: a file the benches read while the helper
    runs; word 0 is the nanoseconds spent polling so far, word 1 those spent
    in a GPU event's wait. None if unset."""
    path = os.environ.get("KGPU_HELPER_COUNTERS")
    if not path:
        return None
    try:
        with open(path, "a+b") as f:
            f.truncate(4096)
            import mmap
            mm = mmap.mmap(f.fileno(), 4096)
        return np.frombuffer(mm, dtype=np.uint64)
    except OSError as e:
        log.warning("KGPU_HELPER_COUNTERS=%s: %s", path, e)
        return None
