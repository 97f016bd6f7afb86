"""``kgpu bench ring``: the helper measured through the ring.

The bench process plays the kernel (:class:`RingDriver`), starts a real
``kgpu helper --ring shm:...`` subprocess and keeps ``depth`` requests of
one service and size in flight, resubmitting each buffer as soon as its
completion is reaped. Per configuration it reports requests/s, GB/s of
user data, round-trip latency percentiles (submit to reap, as the driver
sees them) and the helper's CPU seconds per GB (from the kernel's
per-thread accounting of the helper process). The first completion of
every configuration is checked against the CPU backend in this process.

How the two sides wait (reported under ``method`` in the JSON): this
driver, standing in for the kernel, spins on the completion ring's tail
for up to DRIVER_SPIN seconds after each submission before it sleeps on
its socket (the kernel would sleep on a wait queue; spinning is the
driver's own business and takes no syscall off the helper's path). The
helper keeps the kernel's protocol: it polls the ring for ``--spin-us``
when idle before it sleeps in poll(), and rings one doorbell per batch
of completions (the module's ioctl; here one byte on the socket), and
the driver rings one per batch of submissions.
"""

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import click
import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.bench.services import parse_size, progress
from kgpu_helper.rings.ringdriver import RingDriver, sqe

KiB, MiB = 1 << 10, 1 << 20
#: seconds the driver spins on the CQ before sleeping on its socket
DRIVER_SPIN = 2e-3
SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB]
DEPTHS = [1, 8, 32, 256]
SERVICES = ["aes-xts-256-enc", "aes-xts-256-dec", "raid6-gen-k8",
            "raid6-rec2-k8", "nop"]


def helper_cpu_seconds(pid):
    """CPU seconds used so far by every live thread of ``pid``."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        return None
    return total / 1e9


def helper_thread_cpu(pid):
    """CPU seconds so far of each live thread of ``pid``, summed by the
    thread's name (its comm)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


class Config:
    """One service at one size: request template and reference check."""

    def __init__(self, name, size, unit_size):
        self.name = name
        self.size = size
        if name == "nop":
            self.kind, self.buf_bytes, self.user_bytes = "nop", 0, 0
            return
        parts = name.split("-")
        if name.startswith("aes-xts"):
            self.kind = "xts"
            self.key_bytes = int(parts[2]) // 4
            self.decrypt = parts[3] == "dec"
            self.unit = unit_size
            self.buf_bytes = self.user_bytes = size
        else:
            self.kind = parts[1]  # gen / rec2
            self.k = int(parts[2][1:])
            self.unit = max(16, size // self.k // 16 * 16)
            self.buf_bytes = (self.k + 2) * self.unit
            self.user_bytes = self.k * self.unit

    def template(self, off, i):
        if self.kind == "nop":
            return sqe(abi.SVC_NOP)
        if self.kind == "xts":
            svc = abi.SVC_XTS_DEC if self.decrypt else abi.SVC_XTS_ENC
            return sqe(svc, in_off=off, out_off=off, in_len=self.size,
                       out_len=self.size, unit_size=self.unit,
                       sector_step=1, sector=1000 + i * (self.size // 512),
                       key_slot=0 if self.key_bytes == 64 else 1)
        svc = abi.SVC_RAID6_GEN if self.kind == "gen" else abi.SVC_RAID6_REC
        extra = {}
        if self.kind == "rec2":
            extra = dict(fail_a=1, fail_b=self.k - 1)
        return sqe(svc, in_off=off, out_off=off, in_len=self.buf_bytes,
                   out_len=self.buf_bytes, unit_size=self.unit,
                   ndisks=self.k + 2, **extra)

    def expected(self, cpu, keys, before, tmpl):
        """What the buffer must hold after the request (CPU oracle)."""
        if self.kind == "xts":
            n = self.size // self.unit
            sec = np.arange(n, dtype=np.uint64) + np.uint64(
                int(tmpl["sector"][0]))
            kt = keys[self.key_bytes]
            fn = cpu.xts_decrypt if self.decrypt else cpu.xts_encrypt
            return fn(kt, before, sec, unit_size=self.unit)
        b = before.reshape(self.k + 2, self.unit).copy()
        cpu.raid6_gen(b[:self.k], b[self.k], b[self.k + 1])
        return b.reshape(-1)


def _pct(a, q):
    return float(np.percentile(a, q)) / 1e3 if len(a) else None


def _prepare(drv, cfg, depth, cpu, keys, rng, cap):
    """Buffers and request templates of one point: (offsets, templates,
    expected contents of buffer 0 after its first request)."""
    nbuf = depth if cfg.buf_bytes == 0 else max(1, min(depth,
                                                       cap // cfg.buf_bytes))
    drv.reset_buffers()
    offs = [drv.buffer(cfg.buf_bytes) if cfg.buf_bytes else 0
            for _ in range(nbuf)]
    if cfg.buf_bytes:
        first = drv.view(offs[0], cfg.buf_bytes)
        first[:] = rng.integers(0, 256, cfg.buf_bytes, dtype=np.uint8)
        if cfg.kind in ("gen", "rec2"):
            b = first.reshape(cfg.k + 2, cfg.unit)
            cpu.raid6_gen(b[:cfg.k], b[cfg.k], b[cfg.k + 1])
        for o in offs[1:]:
            drv.view(o, cfg.buf_bytes)[:] = first
    tmpl = np.concatenate([cfg.template(o, i) for i, o in enumerate(offs)])
    expect = None
    if cfg.buf_bytes:
        before = drv.view(offs[0], cfg.buf_bytes).copy()
        expect = cfg.expected(cpu, keys, before, tmpl[:1])
        if cfg.kind == "rec2":  # lose the two blocks the request rebuilds
            b = drv.view(offs[0], cfg.buf_bytes).reshape(cfg.k + 2, cfg.unit)
            b[1] = 0xA5
            b[cfg.k - 1] = 0x5A
    return offs, tmpl, expect


def _verify(drv, cfg, offs, tmpl, expect):
    """One request on buffer 0, checked against the CPU oracle (None for
    nop). Leaves nothing in flight."""
    if not cfg.buf_bytes:
        return None
    drv.submit(tmpl[:1])
    c = drv.wait(timeout=30, spin=DRIVER_SPIN)
    if len(c) == 0:
        raise RuntimeError(f"{cfg.name}: no completion in 30 s")
    got = drv.view(offs[0], cfg.buf_bytes)
    return bool(int(c["status"][0]) == 0 and np.array_equal(got, expect))


def run_config_c(drv, pid, cfg, depth, min_time, cpu, keys, rng, cap,
                 threads, counters):
    """Measure one (service, size, depth) with the C submitter
    (helper/native/ringsub.c); returns a result dict of one run."""
    from kgpu_helper.native import build
    exe = build("ringsub")
    offs, tmpl, expect = _prepare(drv, cfg, depth, cpu, keys, rng, cap)
    checked = _verify(drv, cfg, offs, tmpl, expect)
    with tempfile.NamedTemporaryFile(prefix="kgpu-tmpl-") as f:
        f.write(tmpl.tobytes())
        f.flush()
        sock = drv.conn.fileno()
        cmd = [exe, str(drv.memfd), str(sock), f.name, str(min_time),
               str(min(0.05, min_time / 4)), str(threads), str(drv.seq),
               str(pid), counters or "-"]
        th0 = helper_thread_cpu(pid)
        r = subprocess.run(cmd, pass_fds=(drv.memfd, sock),
                           capture_output=True, text=True, timeout=120)
        th1 = helper_thread_cpu(pid)
    if r.returncode:
        raise RuntimeError(f"ringsub failed ({r.returncode}): "
                           f"{r.stderr.strip()}")
    m = json.loads(r.stdout)
    drv.seq = int(m["next_seq"])
    res = _result(cfg, depth, len(offs), m["requests"], m["seconds"],
                  m["p50_us"], m["p99_us"], m["helper_cpu_s"],
                  m["helper_spin_s"], m["helper_sync_s"],
                  m["submitter_cpu_s"], m["errors"], m["cpu_flagged"],
                  checked, threads=m["threads"],
                  resident_flagged=m["resident_flagged"])
    # where the helper's CPU went, by thread name, over the whole call
    # (the submitter's start and warm-up included, unlike helper_cpu_s)
    res["helper_threads_cpu_s"] = {
        k: round(v - th0.get(k, 0.0), 6) for k, v in th1.items()
        if v - th0.get(k, 0.0) > 0}
    return res


def _result(cfg, depth, nbuf, done, sec, p50, p99, hcpu, hspin, hsync,
            scpu, errors, cpu_flagged, checked, threads=None,
            resident_flagged=0):
    nbytes = done * cfg.user_bytes
    # negative: not measured (a helper that publishes no counters)
    hspin = None if hspin is None or hspin < 0 else hspin
    hsync = None if hsync is None or hsync < 0 else hsync
    hcpu = None if hcpu is None or hcpu < 0 else hcpu

    def per_gb(x):
        if x is None or x < 0 or not nbytes:
            return None
        return round(x / (nbytes / 1e9), 4)

    def per_req(x):
        if x is None or x < 0 or not done:
            return None
        return round(x / done * 1e6, 3)
    busy = hcpu - hspin if hcpu is not None and hspin is not None else None
    return {
        "service": cfg.name, "size": cfg.size, "depth": depth,
        "depth_effective": nbuf, "submitters": threads, "requests": done,
        "seconds": round(sec, 4),
        "requests_per_s": round(done / sec, 1),
        "gbps": round(nbytes / sec / 1e9, 3),
        "p50_us": p50, "p99_us": p99,
        "helper_cpu_s": hcpu, "helper_spin_s": hspin, "helper_sync_s": hsync,
        "submitter_cpu_s": scpu,
        "helper_cpu_s_per_gb": per_gb(hcpu),
        "helper_busy_s_per_gb": per_gb(busy),
        "helper_spin_s_per_gb": per_gb(hspin),
        "helper_sync_s_per_gb": per_gb(hsync),
        "submitter_cpu_s_per_gb": per_gb(scpu),
        "helper_cpu_us_per_req": per_req(hcpu),
        "helper_busy_us_per_req": per_req(busy),
        "submitter_cpu_us_per_req": per_req(scpu),
        "errors": errors, "helper_cpu_completions": cpu_flagged,
        # answered by the GPU-resident kernel (CQE_RESIDENT), no launch
        "resident_completions": resident_flagged,
        "verified": checked,
    }


def run_config(drv, pid, cfg, depth, min_time, cpu, keys, rng, cap):
    """Measure one (service, size, depth) with the Python driver (one
    sq_tail store per batch); returns a result dict of one run."""
    offs, tmpl, expect = _prepare(drv, cfg, depth, cpu, keys, rng, cap)
    checked = _verify(drv, cfg, offs, tmpl, expect)
    buf_of = np.zeros(drv.entries, dtype=np.int64)
    tags = drv.submit(tmpl)
    buf_of[tags] = np.arange(len(tags))
    spin = DRIVER_SPIN
    lat = []
    done = errors = cpu_flagged = resident_flagged = 0
    warm_until = time.perf_counter() + min(0.05, min_time / 4)
    t0 = c0 = s0 = None
    while True:
        c = drv.wait(timeout=30, spin=spin)
        if len(c) == 0:
            raise RuntimeError(f"{cfg.name} {cfg.size} depth {depth}: no "
                               f"completion in 30 s (helper stuck?)")
        if (c["status"] == -107).any():
            raise RuntimeError("the helper detached during the benchmark")
        bufs = buf_of[c["tag"]]
        now = time.perf_counter()
        if t0 is None:
            if now >= warm_until:
                t0, c0 = now, helper_cpu_seconds(pid)
                s0, p0 = _counters(COUNTERS[0]), time.process_time()
        else:
            lat.append(c["latency_ns"])
            done += len(c)
            errors += int((c["status"] != 0).sum())
            cpu_flagged += int((c["flags"] & abi.CQE_CPU != 0).sum())
            resident_flagged += int((c["flags"] & abi.CQE_RESIDENT != 0)
                                    .sum())
            if now - t0 >= min_time and done >= 3 * len(offs):
                t1, c1 = now, helper_cpu_seconds(pid)
                s1, p1 = _counters(COUNTERS[0]), time.process_time()
                break
        tags = drv.submit(tmpl[bufs])
        buf_of[tags] = bufs
    while drv.inflight():  # let the rest finish before the next config
        if not len(drv.wait(timeout=30, spin=spin)):
            raise RuntimeError("helper stuck while draining")
    lat = np.concatenate(lat) if lat else np.zeros(0)
    cpu_s = (c1 - c0) if c0 is not None and c1 is not None else None
    spin_s = sync_s = None
    if s0 is not None and s1 is not None:
        spin_s, sync_s = s1[0] - s0[0], s1[1] - s0[1]
    return _result(cfg, depth, len(offs), done, t1 - t0, _pct(lat, 50),
                   _pct(lat, 99), cpu_s, spin_s, sync_s, p1 - p0, errors,
                   cpu_flagged, checked, resident_flagged=resident_flagged)


#: where the helper publishes its polling time (KGPU_HELPER_COUNTERS)
COUNTERS = [None]


def _counters(path):
    """(spin s, sync s) from the helper's counters file, or None."""
    if not path:
        return None
    try:
        a = np.fromfile(path, dtype=np.uint64, count=2)
    except OSError:
        return None
    return (a[0] / 1e9, a[1] / 1e9) if len(a) == 2 else None


#: per run, these are summarised as median and range over the runs
_VARYING = ("requests_per_s", "gbps", "p50_us", "p99_us",
            "helper_cpu_s_per_gb", "helper_busy_s_per_gb",
            "helper_spin_s_per_gb", "helper_sync_s_per_gb",
            "submitter_cpu_s_per_gb", "helper_cpu_us_per_req",
            "helper_busy_us_per_req", "submitter_cpu_us_per_req")


def summarise(runs):
    """One result from several runs of a point: each varying figure is
    the median, with its range under ``<name>_range``; every run is kept
    under ``runs``."""
    out = dict(runs[0])
    for k in _VARYING:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if not vals:
            out[k], out[k + "_range"] = None, None
            continue
        out[k] = round(float(np.median(vals)), 4)
        out[k + "_range"] = [round(min(vals), 4), round(max(vals), 4)]
    for k in ("requests", "errors", "helper_cpu_completions",
              "resident_completions"):
        out[k] = sum(r.get(k) or 0 for r in runs)
    out["verified"] = (None if all(r["verified"] is None for r in runs)
                       else all(r["verified"] for r in runs))
    out["n_runs"] = len(runs)
    out["runs"] = runs
    return out


def bare_launch_us(n=2000):
    """p50 of a bare CuPy launch + synchronize, and of a 4 KiB pinned
    round trip (H2D, tiny kernel, D2H, synchronize), in microseconds."""
    import cupy as cp
    x = cp.zeros(1, cp.float32)
    k = cp.ElementwiseKernel("float32 a", "float32 b", "b = a + 1",
                             "kgpu_bare")
    st = cp.cuda.Stream(non_blocking=True)
    h = cp.cuda.alloc_pinned_memory(4096)
    hb = np.frombuffer(h, np.uint8, 4096)
    d = cp.empty(4096, cp.uint8)
    res = {}
    with st:
        for name in ("launch_sync", "copy_launch_copy_4k"):
            ts = []
            for i in range(n):
                t0 = time.perf_counter_ns()
                if name == "copy_launch_copy_4k":
                    cp.cuda.runtime.memcpyAsync(d.data.ptr, hb.ctypes.data,
                                                4096, 1, st.ptr)
                k(x, x)
                if name == "copy_launch_copy_4k":
                    cp.cuda.runtime.memcpyAsync(hb.ctypes.data, d.data.ptr,
                                                4096, 2, st.ptr)
                st.synchronize()
                ts.append(time.perf_counter_ns() - t0)
            res[name + "_p50_us"] = float(np.median(ts[n // 10:])) / 1e3
    return res


def zero_copy_probe(be, n=2000):
    """The batched XTS kernel on registered host memory, without the
    ring: p50 of one 4 KiB request (launch + synchronize), and GB/s of
    zero-copy encryption of 64 x 1 MiB requests in one launch next to the
    copy engines' pinned H2D + D2H of the same bytes (both directions at
    once, as the copy path uses them)."""
    import cupy as cp

    from kgpu_helper.services import KeyTable
    from kgpu_helper.services.cupy_backend import xts_descs
    res = {}
    with be.device:
        if cp.cuda.runtime.deviceGetAttribute(91, be.device.id) != 1:
            return {"error": "no host pointers for registered memory"}
        keys = KeyTable([bytes(range(64))])
        size = 64 * MiB
        mem = cp.cuda.alloc_pinned_memory(2 * size)  # registered already
        h = np.frombuffer(mem, np.uint8, 2 * size)
        h[:] = 7
        base = h.ctypes.data
        st = cp.cuda.Stream(non_blocking=True)
        b = be.xts_batch()
        ts = []
        for i in range(n):
            t0 = time.perf_counter_ns()
            b.one(False, keys, base, base, 0, 0, 4096, 512, i, 1, 0, False,
                  st.ptr)
            st.synchronize()
            ts.append(time.perf_counter_ns() - t0)
        res["xts_one_4k_launch_sync_p50_us"] = float(
            np.median(ts[n // 10:])) / 1e3
        nreq = 64
        offs = np.arange(nreq, dtype=np.uint64) * np.uint64(MiB)
        ones = np.ones(nreq, dtype=np.int64)
        descs, units = xts_descs(offs, offs, ones * MiB, offs, ones,
                                 ones * 0, ones * 0, 512)
        d_descs = cp.asarray(descs.view(np.uint8))
        d = cp.empty(size, cp.uint8)

        def timed(fn, reps=20):
            fn()
            st.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            st.synchronize()
            return size / ((time.perf_counter() - t0) / reps) / 1e9

        res["zero_copy_xts_64x1M_gbps"] = timed(lambda: b.many(
            False, keys, base, base, descs, units, 512, st.ptr,
            d_descs.data.ptr))
        st2 = cp.cuda.Stream(non_blocking=True)

        def copies():
            cp.cuda.runtime.memcpyAsync(d.data.ptr, base, size, 1, st.ptr)
            cp.cuda.runtime.memcpyAsync(base + size, d.data.ptr, size, 2,
                                        st2.ptr)
            st2.synchronize()
        res["copy_engines_h2d_and_d2h_64M_gbps"] = timed(copies)
        res["device_xts_64M_gbps"] = timed(lambda: b.many(
            False, keys, d.data.ptr, d.data.ptr, descs, units, 512, st.ptr,
            d_descs.data.ptr))
    return {k: round(v, 2) for k, v in res.items()}


def start_helper(sock, backend, spin_us, extra=(), xts_io=None,
                 counters=None):
    cmd = [sys.executable, "-m", "kgpu_helper.cli", "helper", "--backend",
           backend, "--ring", "shm:" + sock, "--crossover", "none",
           "--spin-us", str(spin_us), *extra]
    env = dict(os.environ)
    if os.environ.get("KGPU_BENCH_HELPER_PATH"):
        # measure another helper (e.g. an older checkout) behind this bench
        env["PYTHONPATH"] = os.environ["KGPU_BENCH_HELPER_PATH"]
    if xts_io:
        env["KGPU_XTS_IO"] = xts_io
    if counters:
        env["KGPU_HELPER_COUNTERS"] = counters
    return subprocess.Popen(cmd, env=env)


def idle_cpu(pid, after=1.0, window=1.0):
    """The helper's CPU, in % of one core, over ``window`` s that start
    ``after`` s after its last request."""
    time.sleep(after)
    c0 = helper_cpu_seconds(pid)
    time.sleep(window)
    c1 = helper_cpu_seconds(pid)
    if c0 is None or c1 is None:
        return None
    return round(100 * (c1 - c0) / window, 3)


def submitters_for(depth, submitters):
    """Submitter threads of the C driver at ``depth``: ``submitters``,
    or by default one per request up to 4."""
    return max(1, min(depth, submitters or 4))


METHODS = {
    "c": ("C submitter (helper/native/ringsub.c): each request published "
          "on its own (lock, SQE, store-release sq_tail, one doorbell "
          "byte: kgpu_submit's wake-up), from {submitters} submitter "
          "threads that sleep on a condition variable until a completion "
          "thread, asleep in poll() on the helper's doorbell, reaps the CQ "
          "and wakes them (the module's done()); nothing spins"),
    "python": ("Python driver (helper/rings/ringdriver.py): a whole batch "
               "published with one sq_tail store and one doorbell byte; "
               "spins on the CQ tail up to "
               f"{DRIVER_SPIN * 1e3:g} ms after submitting, then sleeps "
               "on its socket; its own costs are inside the latencies"),
}


def run(backends, services, sizes, depths, min_time, unit_size, data_bytes,
        spin_us, progress, compare_compute=True, xts_io=None, driver="c",
        runs=3, submitters=None, anchor=True, resident_opts=()):
    from kgpu_helper.services import KeyTable, get_backend
    from kgpu_helper.services.cpu import CpuBackend, cpu_name

    rng = np.random.default_rng(0)
    cpu = CpuBackend(threads=os.cpu_count())
    key64, key32 = rng.bytes(64), rng.bytes(32)
    keys = {64: KeyTable([key64]), 32: KeyTable([key32])}
    report = {"date": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(timespec="seconds"), "cpu": cpu_name(),
              "unit_size": unit_size, "results": [], "helpers": {},
              "method": {
                  "driver": METHODS[driver].format(
                      submitters=(submitters or "min(depth, 4)")),
                  "driver_kind": driver,
                  "runs_per_point": runs,
                  "helper_spin_us": spin_us,
                  "helper": "polls the SQ for helper_spin_us when idle, then"
                            " sleeps in poll(); one doorbell per posted batch",
                  "cpu": "helper CPU from /proc/PID/task/*/schedstat over "
                         "the measured window; 'spin' is the time the "
                         "helper spent in its polling loops (ring or GPU "
                         "event), 'busy' the rest; 'sync' is wall time in "
                         "CUDA event waits (which may spin or sleep, by "
                         "CUDA's flags), inside busy; the submitter's CPU "
                         "is its own process's (getrusage), reported apart",
                  "xts_io": xts_io or os.environ.get("KGPU_XTS_IO", "auto"),
              }}
    if anchor:
        from kgpu_helper.bench.anchor import openssl_xts
        progress("openssl speed -evp aes-256-xts (the CPU anchor)...")
        report["openssl"] = openssl_xts(sorted({s for s in sizes
                                                if s >= 16} | {4 * KiB}))
    for backend in backends:
        idle = None
        tmp = tempfile.mkdtemp(prefix="kgpu-ring-")
        sock = os.path.join(tmp, "ring.sock")
        drv = RingDriver(sock, entries=256, data_size=data_bytes)
        drv.set_key(0, key64)
        drv.set_key(1, key32)
        counters = os.path.join(tmp, "counters")
        COUNTERS[0] = counters
        proc = start_helper(sock, "cupy" if backend == "resident"
                            else backend, spin_us, xts_io=xts_io,
                            counters=counters,
                            extra=(["--resident", *resident_opts]
                                   if backend == "resident" else ()))
        try:
            if not drv.wait_attach(120):
                raise RuntimeError(f"the {backend} helper did not attach")
            # the first requests compile kernels: warm every service up
            for sname in services:
                cfg = Config(sname, 64 * KiB, unit_size)
                run_config(drv, proc.pid, cfg, 1, 0.01, cpu, keys, rng,
                           data_bytes)
            compare_only = backend == "cpu" and len(backends) > 1
            for sname in services:
                if compare_only and sname == "nop":
                    continue
                # next to a GPU run, the cpu backend is measured at the
                # comparison point of the CPU-time target only
                bsizes = ([MiB] if compare_only else
                          [4 * KiB] if sname == "nop" else sizes)
                for size in bsizes:
                    cfg = Config(sname, size, unit_size)
                    for depth in ([32] if compare_only else depths):
                        progress(f"[{backend}] {sname} {size // KiB}K "
                                 f"depth {depth}")
                        each = []
                        for _ in range(runs):
                            if driver == "c":
                                each.append(run_config_c(
                                    drv, proc.pid, cfg, depth, min_time, cpu,
                                    keys, rng, data_bytes,
                                    submitters_for(depth, submitters),
                                    counters))
                            else:
                                each.append(run_config(
                                    drv, proc.pid, cfg, depth, min_time, cpu,
                                    keys, rng, data_bytes))
                        r = summarise(each)
                        r["backend"] = backend
                        report["results"].append(r)
                        progress(f"    {r['requests_per_s']:.0f} req/s "
                                 f"{r['gbps']} GB/s p50 {r['p50_us']:.1f} "
                                 f"us p99 {r['p99_us']:.1f} us helper cpu "
                                 f"{r['helper_cpu_us_per_req']} us/req "
                                 f"verified {r['verified']}"
                                 + (f" resident {r['resident_completions']}"
                                    f"/{r['requests']}"
                                    if backend == "resident" else ""))
            idle = idle_cpu(proc.pid)
            progress(f"[{backend}] idle: {idle}% of a core")
        finally:
            proc.terminate()
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            report["helpers"][backend] = {"exit_status": rc,
                                          "idle_cpu_pct": idle}
            drv.close()
            if os.path.exists(counters):
                os.unlink(counters)
            os.rmdir(tmp)
    if "cupy" in backends or "resident" in backends:
        be = get_backend("cupy")
        report["device"] = be.device_name()
        report["bare_cupy"] = bare_launch_us()
        try:
            report["zero_copy"] = zero_copy_probe(be)
        except Exception as e:  # noqa: BLE001 - report, do not fail
            report["zero_copy"] = {"error": f"{type(e).__name__}: {e}"}
        if compare_compute:
            report["compute_end_to_end"] = compute_end_to_end(
                be, [s for s in services if s != "nop"], unit_size, rng)
    report["targets"] = targets(report)
    return report


def compute_end_to_end(be, services, unit_size, rng, size=1 * MiB):
    """`kgpu bench compute`'s end_to_end path for the same services, in
    this run (its Runner, unchanged)."""
    try:
        from kgpu_helper.bench.services import Runner, Service
        from kgpu_helper.services.cpu import CpuBackend
        runner = Runner(be, CpuBackend(threads=1), CpuBackend(threads=1),
                        0.5, rng)
        out = {}
        for s in services:
            svc = Service(s, unit_size)
            sec = runner.end_to_end(svc, size)
            out[s] = round(svc.user_bytes(size) / sec / 1e9, 3)
        return out
    except Exception as e:  # noqa: BLE001 - report, do not fail the bench
        return {"error": f"{type(e).__name__}: {e}"}


def targets(rep):
    res = rep["results"]

    def find(backend, svc, size, depth):
        for r in res:
            if (r["backend"], r["service"], r["size"], r["depth"]) == \
                    (backend, svc, size, depth):
                return r
        return None

    out = []
    r = find("cupy", "aes-xts-256-enc", 4 * KiB, 1)
    if r:
        out.append({"target": "xts 4K depth 1 p50 <= 50 us",
                    "value_us": r["p50_us"], "met": r["p50_us"] <= 50,
                    "bare_cupy": rep.get("bare_cupy")})
    e2e = rep.get("compute_end_to_end") or {}
    for svc, g in e2e.items():
        if not isinstance(g, float):
            continue
        best = max((r["gbps"] for r in res if r["backend"] == "cupy"
                    and r["service"] == svc and r["size"] == MiB
                    and r["depth"] >= 32), default=None)
        if best is not None:
            out.append({"target": f"{svc} 1M depth>=32 >= 90% of compute "
                        "end_to_end", "ring_gbps": best,
                        "end_to_end_gbps": g, "ratio": round(best / g, 3),
                        "met": best >= 0.9 * g})
    # issue 11's small-request targets (C submitter)
    xts4 = [r for r in res if r["backend"] == "cupy" and r["size"] == 4 * KiB
            and r["service"] == "aes-xts-256-enc"]
    best = max((r for r in xts4 if r["depth"] >= 128),
               key=lambda r: r["requests_per_s"], default=None)
    if best:
        out.append({"target": "xts 4K depth>=128 >= 1,000,000 req/s",
                    "value": best["requests_per_s"], "depth": best["depth"],
                    "met": best["requests_per_s"] >= 1e6})
    nop = max((r for r in res if r["backend"] == "cupy"
               and r["service"] == "nop"),
              key=lambda r: r["requests_per_s"], default=None)
    if nop:
        out.append({"target": "nop >= 2,000,000 req/s",
                    "value": nop["requests_per_s"], "depth": nop["depth"],
                    "met": nop["requests_per_s"] >= 2e6})
    for b in ("cupy", "resident"):
        out.extend(_part4_targets(rep, b, find))
    for r in res:
        if r["backend"] != "cupy" or r["size"] != MiB or r["depth"] != 32:
            continue
        c = find("cpu", r["service"], MiB, 32)
        if c and c["helper_cpu_s_per_gb"] and r["helper_cpu_s_per_gb"]:
            ratio = r["helper_cpu_s_per_gb"] / c["helper_cpu_s_per_gb"]
            out.append({"target": f"{r['service']} 1M depth 32 helper CPU/GB"
                        " <= 1/5 of the cpu backend's",
                        "cupy_s_per_gb": r["helper_cpu_s_per_gb"],
                        "cpu_s_per_gb": c["helper_cpu_s_per_gb"],
                        "ratio": round(ratio, 3), "met": ratio <= 0.2})
    return out


def _part4_targets(rep, backend, find):
    """Issue 11 part 4's targets (the GPU-resident path) for ``backend``."""
    out = []
    r1 = find(backend, "aes-xts-256-enc", 4 * KiB, 1)
    if r1:
        out.append({"target": f"[{backend}] xts 4K depth 1 p50 <= 15 us",
                    "value_us": r1["p50_us"], "met": r1["p50_us"] <= 15})
    r32 = find(backend, "aes-xts-256-enc", 4 * KiB, 32)
    if r32:
        out.append({"target": f"[{backend}] xts 4K depth 32 >= 500,000 "
                    "req/s", "value": r32["requests_per_s"],
                    "met": r32["requests_per_s"] >= 5e5})
        ossl = {a["size"]: a for a in
                (rep.get("openssl") or {}).get("results", [])}
        o4 = ossl.get(4 * KiB, {}).get("one_core_s_per_gb")
        if o4 and r32.get("helper_cpu_s_per_gb") is not None:
            out.append({"target": f"[{backend}] xts 4K depth 32 helper "
                        "CPU/GB <= 1/3 of openssl 1 core", "helper_s_per_gb":
                        r32["helper_cpu_s_per_gb"], "openssl_s_per_gb": o4,
                        "met": r32["helper_cpu_s_per_gb"] <= o4 / 3})
    idle = ((rep.get("helpers") or {}).get(backend) or {}).get(
        "idle_cpu_pct")
    if r1 is not None and idle is not None:
        out.append({"target": f"[{backend}] idle helper CPU < 2% of a core",
                    "value_pct": idle, "met": idle < 2})
    return out


def _rng(r, k, fmt):
    """``median [min-max]`` of a summarised figure."""
    v, rg = r.get(k), r.get(k + "_range")
    if v is None:
        return "-"
    if not rg or rg[0] == rg[1]:
        return format(v, fmt)
    return f"{format(v, fmt)} [{format(rg[0], fmt)}-{format(rg[1], fmt)}]"


def resident_lines(results):
    """Per backend whose helper answered any request from its GPU-resident
    kernel (CQE_RESIDENT): how many of each point's requests it served;
    the rest went through the batched path."""
    lines = []
    for b in dict.fromkeys(r.get("backend") for r in results):
        rs = [r for r in results if r.get("backend") == b]
        if not any(r.get("resident_completions") for r in rs):
            continue
        pts = ", ".join(f"{r['service']} {r['size'] // KiB}K depth "
                        f"{r['depth']} {r.get('resident_completions') or 0}"
                        f"/{r['requests']}" for r in rs)
        lines.append(f"{b}: requests the resident kernel served: {pts}")
    return lines


def print_report(rep, out=sys.stdout):
    from kgpu_helper.bench.anchor import format_anchor
    out.write(f"device: {rep.get('device', '-')}   cpu: {rep['cpu']}   "
              f"{rep['date']}   xts unit {rep['unit_size']}\n")
    if rep.get("bare_cupy"):
        b = rep["bare_cupy"]
        out.write(f"bare CuPy launch+sync p50 {b['launch_sync_p50_us']:.1f} "
                  f"us; 4K copy+launch+copy+sync p50 "
                  f"{b['copy_launch_copy_4k_p50_us']:.1f} us\n")
    if rep.get("zero_copy"):
        out.write(f"zero-copy probe: {json.dumps(rep['zero_copy'])}\n")
    if rep.get("method"):
        m = rep["method"]
        out.write(f"method: {m['driver']}. Helper: spin "
                  f"{m['helper_spin_us']:g} us, xts io {m['xts_io']}. "
                  f"Each point {m.get('runs_per_point', 1)} runs: median "
                  f"[min-max]. CPU: {m.get('cpu', '')}.\n")
    if rep.get("openssl"):
        out.write("\n".join(format_anchor(rep["openssl"])) + "\n")
    out.write(f"{'backend':<7}{'service':<16}{'size':>6}{'depth':>6} "
              f"{'req/s':>24} {'p50 us':>20} {'p99 us':>22} "
              f"{'helper cpu us/req (busy, spin)':>32} {'sub us/req':>10} "
              f"{'helper s/GB':>11} ok\n")
    for r in rep["results"]:
        d = (f"{r['depth']}" if r["depth"] == r["depth_effective"]
             else f"{r['depth_effective']}*")
        busy = r.get("helper_busy_us_per_req")
        spin = (None if r.get("helper_cpu_us_per_req") is None or busy is None
                else r["helper_cpu_us_per_req"] - busy)
        hc = (f"{_rng(r, 'helper_cpu_us_per_req', '.1f')} ("
              f"{'-' if busy is None else f'{busy:.1f}'}, "
              f"{'-' if spin is None else f'{spin:.1f}'})")
        sub = r.get("submitter_cpu_us_per_req")
        cg = r.get("helper_cpu_s_per_gb")
        out.write(f"{r['backend']:<7}{r['service']:<16}"
                  f"{r['size'] // KiB:>5}K{d:>6} "
                  f"{_rng(r, 'requests_per_s', '.0f'):>24} "
                  f"{_rng(r, 'p50_us', '.1f'):>20} "
                  f"{_rng(r, 'p99_us', '.1f'):>22} {hc:>32} "
                  f"{'-' if sub is None else f'{sub:.1f}':>10} "
                  f"{'-' if cg is None else f'{cg:.3f}':>11} "
                  f"{'yes' if r['verified'] else r['verified']}\n")
    out.write("(* = fewer buffers than the depth fit in the data area; "
              "busy = helper CPU minus its polling; sub = the submitter "
              "side's CPU)\n")
    for line in resident_lines(rep["results"]):
        out.write(line + "\n")
    for b, h in (rep.get("helpers") or {}).items():
        if h.get("idle_cpu_pct") is not None:
            out.write(f"{b} helper idle (1 s after the last request, over "
                      f"1 s): {h['idle_cpu_pct']}% of one core\n")
    if rep.get("compute_end_to_end"):
        out.write(f"compute end_to_end at 1M (GB/s): "
                  f"{rep['compute_end_to_end']}\n")
    for t in rep["targets"]:
        out.write(f"target: {t['target']}: {'MET' if t['met'] else 'MISSED'}"
                  f"  {json.dumps({k: v for k, v in t.items() if k not in ('target', 'met')})}\n")


@click.command("ring")
@click.option("--backend", "backends", default="auto", show_default=True,
              help="Helper backend(s) to measure, comma-separated: auto, "
                   "cupy, cpu, resident (cupy with --resident; e.g. "
                   "cupy,resident for before/after).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write all results to this JSON file.")
@click.option("--sizes", help="Request sizes (user data), comma-separated "
              "with K/M suffixes. Default: 4K,64K,1M,16M.")
@click.option("--depths", help="Queue depths, comma-separated. Default: "
              "1,8,32,256.")
@click.option("--services", "service_list",
              help="Comma-separated subset of: aes-xts-256-enc, "
                   "aes-xts-256-dec, aes-xts-128-enc, aes-xts-128-dec, "
                   "raid6-gen-k<K>, raid6-rec2-k<K>, nop.")
@click.option("--unit-size", type=click.Choice(["512", "1024", "2048",
                                                 "4096"]),
              default="512", show_default=True,
              help="XTS data unit (sector) size in bytes.")
@click.option("--min-time", type=float, default=0.3, show_default=True,
              help="Seconds each configuration runs for.")
@click.option("--data-size", default="512M", show_default=True,
              help="Data area of the region (bounds depth x size).")
@click.option("--spin-us", type=float, default=50.0, show_default=True,
              help="The helper's --spin-us.")
@click.option("--xts-io", type=click.Choice(["auto", "zerocopy", "copy"]),
              default=None, help="The helper's XTS data path (sets "
              "KGPU_XTS_IO for it; default: the helper's own choice).")
@click.option("--driver", type=click.Choice(["c", "python"]), default="c",
              show_default=True,
              help="The kernel's side: c (one request published at a time, "
                   "submitters sleep until woken, as kgpu.ko) or python "
                   "(whole batches, the tests' driver).")
@click.option("--runs", type=click.IntRange(1, 20), default=3,
              show_default=True, help="Runs per point (median and range).")
@click.option("--submitters", type=click.IntRange(1, 256), default=None,
              help="Submitter threads of the C driver (default: "
                   "min(depth, 4)).")
@click.option("--anchor/--no-anchor", default=True, show_default=True,
              help="Measure openssl speed -evp aes-256-xts too.")
@click.option("--resident-opts", default="", help="Options of `kgpu "
              "helper` for the resident backend, e.g. '--resident-blocks "
              "16 --resident-sleep-us 10'.")
def ring(backends, json_path, sizes, depths, service_list, unit_size,
         min_time, data_size, spin_us, xts_io, driver, runs, submitters,
         anchor, resident_opts):
    """The helper through the ring, without the kernel module.

    This process plays the kernel's side of the ring ABI over shared
    memory and drives a real `kgpu helper` subprocess. Per service, request
    size and queue depth: requests/s, GB/s, p50/p99 round-trip latency and
    the helper's CPU seconds per GB; with cupy also a bare CuPy launch's
    latency and `bench compute`'s end_to_end rate at 1M, and the targets.
    """
    blist = [b.strip() for b in backends.split(",") if b.strip()]
    for b in blist:
        if b not in ("auto", "cupy", "cpu", "resident"):
            raise click.BadParameter(f"unknown backend {b!r}",
                                     param_hint="--backend")
    if "auto" in blist:
        from kgpu_helper.services import cuda_available
        blist = [("cupy" if cuda_available()[0] else "cpu") if b == "auto"
                 else b for b in blist]
    size_list = ([parse_size(s) for s in sizes.split(",")] if sizes
                 else SIZES)
    depth_list = ([int(d) for d in depths.split(",")] if depths
                  else DEPTHS)
    for d in depth_list:
        if not 1 <= d <= 256:
            raise click.BadParameter("depths are 1..256 (the ring's size)",
                                     param_hint="--depths")
    services = (service_list.split(",") if service_list
                else SERVICES)
    if driver == "c":
        from kgpu_helper.native import NativeUnavailable, build
        try:
            build("ringsub")
        except NativeUnavailable as e:
            raise click.ClickException(f"{e} (or use --driver python)") \
                from None
    rep = run(blist, services, size_list, depth_list, min_time,
              int(unit_size), parse_size(data_size), spin_us, progress,
              xts_io=xts_io, driver=driver, runs=runs,
              submitters=submitters, anchor=anchor,
              resident_opts=resident_opts.split())
    print_report(rep)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rep, f, indent=1)
        progress(f"wrote {json_path}")
    return 0
