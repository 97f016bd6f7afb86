"""``kgpu bench``: benchmarks that print what they measure and write JSON."""

import datetime
import json
import math
import os
import sys
import time

import click
import numpy as np

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_SIZES = [4 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB,
                 64 * MiB, 256 * MiB]
QUICK_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB]
SERVICES = ["aes-xts-256-enc", "aes-xts-256-dec", "aes-xts-128-enc",
            "aes-xts-128-dec", "raid6-gen-k4", "raid6-gen-k8",
            "raid6-gen-k16", "raid6-rec2-k4", "raid6-rec2-k8",
            "raid6-rec2-k16", "raid6-pqd-k1", "raid6-pqd-k4"]
PATHS = ["kernel", "end_to_end", "cpu_1core", "cpu_allcores"]


@click.group()
def bench():
    """Measure the compute services and the ring."""


def parse_size(text):
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(text[-1:], 1)
    if mult > 1:
        text = text[:-1]
    try:
        value = int(float(text) * mult)
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r} (use e.g. 4K, 16M)")
    if value < 4 * KiB or value % 4096:
        raise click.BadParameter(f"sizes must be multiples of 4 KiB, got "
                                 f"{value}")
    return value


def fmt_size(n):
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB}M"
    return f"{n // KiB}K"


def progress(msg):
    click.echo(msg, err=True)


class Service:
    """One benchmarked service: its shapes and how to run it."""

    def __init__(self, name, unit_size):
        self.name = name
        parts = name.split("-")
        if name.startswith("aes-xts"):
            self.kind = "xts"
            self.key_bytes = int(parts[2]) // 4  # 256 -> 64-byte key
            self.decrypt = parts[3] == "dec"
            self.unit_size = unit_size
        else:
            # gen / rec2 / pqd; pqd's k: the data blocks that changed
            self.kind = parts[1]
            self.k = int(parts[2][1:])

    def shape(self, size):
        """Host arrays for ``size`` bytes of user data."""
        if self.kind == "xts":
            return (size // self.unit_size, self.unit_size)
        n = size // self.k
        n -= n % 16
        return (self.k, n)

    def user_bytes(self, size):
        s = self.shape(size)
        return s[0] * s[1]


def _rng_fill(rng, a):
    a.reshape(-1)[:] = rng.integers(0, 256, a.size, dtype=np.uint8)


class Runner:
    def __init__(self, gpu, cpu1, cpuall, min_time, rng):
        self.gpu, self.cpu1, self.cpuall = gpu, cpu1, cpuall
        self.min_time = min_time
        self.rng = rng
        from kgpu_helper.services import KeyTable
        self.keys = {32: KeyTable([rng.bytes(32)]),
                     64: KeyTable([rng.bytes(64)])}

    # -- timing helpers

    def _reps(self, once_seconds):
        return max(3, min(2000, int(self.min_time / max(once_seconds, 1e-6))))

    def time_host(self, fn):
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        reps = self._reps(once)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    def time_gpu(self, fns):
        """Mean GPU seconds per call of fns (a list, used in turn).

        A spin kernel goes first and keeps the GPU busy while Python queues
        all the timed calls, so the events around them measure the calls
        running back to back on the GPU, not Python's launch rate.
        """
        import cupy as cp
        from kgpu_helper.cuda import get_kernel
        spin = get_kernel("util", "spin")
        for f in fns[:2]:
            f()
        cp.cuda.Device().synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fns[0]()
        end.record()
        end.synchronize()
        once = cp.cuda.get_elapsed_time(start, end) / 1e3
        reps = min(300, self._reps(once))
        # about 40 us of queueing time per call, at about 2 GHz
        spin((1,), (1,), (np.uint64(min(2e9, reps * 40e-6 * 2e9)),))
        start.record()
        for i in range(reps):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3 / reps

    # -- paths

    def cpu(self, be, svc, size):
        shape = svc.shape(size)
        data = np.empty(shape if svc.kind in ("xts", "gen") else
                        (shape[0] + 2, shape[1]), np.uint8)
        _rng_fill(self.rng, data)
        if svc.kind == "xts":
            keys = self.keys[svc.key_bytes]
            sectors = np.arange(shape[0], dtype=np.uint64) + 12345
            out = np.empty_like(data)
            fn = be.xts_decrypt if svc.decrypt else be.xts_encrypt
            return self.time_host(lambda: fn(keys, data, sectors, out=out,
                                             unit_size=svc.unit_size))
        if svc.kind == "gen":
            p = np.empty(shape[1], np.uint8)
            q = np.empty(shape[1], np.uint8)
            return self.time_host(lambda: be.raid6_gen(data, p, q))
        if svc.kind == "pqd":
            k = svc.k
            return self.time_host(lambda: be.raid6_pqd(data[:k], data[k],
                                                       data[k + 1], 0))
        failed = [1, svc.k - 1]
        return self.time_host(lambda: be.raid6_recover(data, failed))

    def kernel(self, svc, size):
        import cupy as cp
        be = self.gpu
        shape = svc.shape(size)
        rows = shape[0] + (2 if svc.kind in ("rec2", "pqd") else 0)
        footprint = rows * shape[1] * (2 if svc.kind == "xts" else 1)
        # rotate over buffers so memory-bound kernels are not timed from L2
        nbuf = max(1, min(8, math.ceil(256 * MiB / footprint)))
        fns = []
        for _ in range(nbuf):
            d = cp.random.randint(0, 256, (rows, shape[1]), dtype=cp.uint8)
            if svc.kind == "xts":
                keys = self.keys[svc.key_bytes]
                sec = cp.arange(shape[0], dtype=cp.uint64) + 12345
                out = cp.empty_like(d)
                fns.append(lambda d=d, s=sec, o=out, k=keys: be.launch_xts(
                    svc.decrypt, k, d, o, s, None, svc.unit_size))
            elif svc.kind == "gen":
                pq = cp.empty((2, shape[1]), cp.uint8)
                fns.append(lambda d=d, pq=pq: be.launch_gen(d, pq[0], pq[1]))
            elif svc.kind == "pqd":
                k = svc.k
                fns.append(lambda d=d: be.launch_pqd(d[:k], d[k], d[k + 1],
                                                     0))
            else:
                failed = [1, svc.k - 1]
                fns.append(lambda d=d: be.launch_recover(d, failed))
        return self.time_gpu(fns)

    def end_to_end(self, svc, size, depth=3):
        be = self.gpu
        shape = svc.shape(size)
        pipe = be.pipeline(depth)
        slots = []
        for _ in range(depth):
            if svc.kind == "xts":
                hin = be.empty_host(shape)
                hout = be.empty_host(shape)
                _rng_fill(self.rng, hin)
                sec = be.empty_host((shape[0],), np.uint64)
                sec[:] = np.arange(shape[0], dtype=np.uint64) + 777
                slots.append((hin, hout, sec))
            elif svc.kind == "gen":
                hin = be.empty_host(shape)
                _rng_fill(self.rng, hin)
                slots.append((hin, be.empty_host((2, shape[1]))))
            elif svc.kind == "pqd":
                blocks = be.empty_host((shape[0] + 2, shape[1]))
                _rng_fill(self.rng, blocks)
                slots.append((blocks,))
            else:
                blocks = be.empty_host((shape[0] + 2, shape[1]))
                _rng_fill(self.rng, blocks)
                slots.append((blocks,))
        keys = self.keys.get(getattr(svc, "key_bytes", 64))

        def submit(i):
            s = slots[i % depth]
            if svc.kind == "xts":
                pipe.xts(svc.decrypt, keys, s[0], s[2], s[1],
                         unit_size=svc.unit_size)
            elif svc.kind == "gen":
                pipe.raid6_gen(s[0], s[1][0], s[1][1])
            elif svc.kind == "pqd":
                k = svc.k
                pipe.raid6_pqd(s[0][:k], s[0][k], s[0][k + 1], 0)
            else:
                pipe.raid6_recover(s[0], [1, svc.k - 1])

        for i in range(depth):  # warm-up
            submit(i)
        pipe.wait()
        t0 = time.perf_counter()
        submit(0)
        pipe.wait()
        once = time.perf_counter() - t0
        reps = max(2 * depth, self._reps(once / 2))
        t0 = time.perf_counter()
        for i in range(reps):
            submit(i)
        pipe.wait()
        return (time.perf_counter() - t0) / reps


def copy_ceiling(gpu, size=256 * MiB, reps=10):
    """Pinned host<->device copy rates and the device-to-device copy rate."""
    import cupy as cp
    rt = cp.cuda.runtime
    with gpu.device:
        h_a, h_b = gpu.empty_host((size,)), gpu.empty_host((size,))
        h_a[:] = 1
        d_a, d_b = cp.empty(size, cp.uint8), cp.empty(size, cp.uint8)
        s1 = cp.cuda.Stream(non_blocking=True)
        s2 = cp.cuda.Stream(non_blocking=True)

        def run(h2d, d2h):
            for _ in range(2):  # warm-up, then timed
                t0 = time.perf_counter()
                for _ in range(reps):
                    if h2d:
                        rt.memcpyAsync(d_a.data.ptr, h_a.ctypes.data, size, 1,
                                       s1.ptr)
                    if d2h:
                        rt.memcpyAsync(h_b.ctypes.data, d_b.data.ptr, size, 2,
                                       s2.ptr)
                s1.synchronize()
                s2.synchronize()
                dt = time.perf_counter() - t0
            return size * reps / dt / 1e9

        h2d = run(True, False)
        d2h = run(False, True)
        both = run(True, True)  # bytes of one direction per second
        big = 1 << 30
        x = cp.empty(big, cp.uint8)
        y = cp.empty(big, cp.uint8)
        x.fill(3)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        y[:] = x
        start.record()
        for _ in range(reps):
            y[:] = x
        end.record()
        end.synchronize()
        dcopy = 2 * big * reps / (cp.cuda.get_elapsed_time(start, end) / 1e3)
        return {"h2d_gbps": round(h2d, 2), "d2h_gbps": round(d2h, 2),
                "bidir_gbps": round(both, 2),
                "bidir_total_gbps": round(2 * both, 2),
                "device_copy_gbps": round(dcopy / 1e9, 1),
                "note": "bidir_gbps is each direction while both run at once; "
                        "device_copy_gbps counts bytes read plus written"}


def crossovers(results, services, sizes):
    """Per service: the smallest size from which the GPU (end_to_end) is at
    least as fast as cpu_allcores at that size and every larger one."""
    table = {(r["service"], r["path"], r["size"]): r["gbps"] for r in results}
    out = {}
    for s in services:
        cross = None
        for size in sorted(sizes, reverse=True):
            g = table.get((s, "end_to_end", size))
            c = table.get((s, "cpu_allcores", size))
            if g is None or c is None:
                continue  # not measured at this size (--cpu-max-size)
            if g >= c:
                cross = size
            else:
                break
        out[s] = cross
    return out


def check_targets(results, ceiling):
    """The issue's targets, each with its measured value and verdict."""
    if not ceiling:
        return []
    table = {(r["service"], r["path"], r["size"]): r["gbps"] for r in results}
    checks = []
    big = [s for s in {r["size"] for r in results} if s >= 16 * MiB]
    for svc in ("aes-xts-256-enc", "aes-xts-256-dec"):
        for size in sorted(big):
            k = table.get((svc, "kernel", size))
            if k is not None:
                checks.append((f"{svc} kernel @{fmt_size(size)} >= 300 GB/s",
                               k, 300.0))
            e = table.get((svc, "end_to_end", size))
            if e is not None:
                need = 0.9 * ceiling["bidir_gbps"]
                checks.append((f"{svc} end_to_end @{fmt_size(size)} >= 90% "
                               f"of bidir copy", e, need))
    for kind in ("gen", "rec2"):
        for kk in (4, 8, 16):
            svc = f"raid6-{kind}-k{kk}"
            bound = ceiling["device_copy_gbps"] * kk / (kk + 2)
            for size in sorted(big):
                k = table.get((svc, "kernel", size))
                if k is not None:
                    checks.append((f"{svc} kernel @{fmt_size(size)} >= 90% of "
                                   f"copy x k/(k+2)", k, 0.9 * bound))
                e = table.get((svc, "end_to_end", size))
                if e is not None:
                    checks.append((f"{svc} end_to_end @{fmt_size(size)} >= 90%"
                                   f" of H2D", e, 0.9 * ceiling["h2d_gbps"]))
    return [{"target": t, "measured_gbps": round(v, 2),
             "needed_gbps": round(n, 2), "met": v >= n}
            for t, v, n in checks]


@bench.command("compute")
@click.option("--backend", type=click.Choice(["auto", "cupy", "cpu"]),
              default="auto", show_default=True,
              help="cupy: GPU paths (kernel, end_to_end) plus the CPU paths "
                   "for comparison; cpu: the CPU paths only; auto: cupy "
                   "when CUDA works.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write all results to this JSON file.")
@click.option("--sizes", help="Bytes of user data per call, comma-separated "
              "with K/M/G suffixes (e.g. 4K,1M,16M). Default: 4K to 256M.")
@click.option("--quick", is_flag=True,
              help=f"Short run: sizes {','.join(map(fmt_size, QUICK_SIZES))}"
                   " (unless --sizes) and 0.05 s per measurement.")
@click.option("--services", "service_list",
              help=f"Comma-separated subset of: {', '.join(SERVICES)}.")
@click.option("--paths", "path_list",
              help=f"Comma-separated subset of: {', '.join(PATHS)}.")
@click.option("--unit-size", type=click.Choice(["512", "1024", "2048",
                                                 "4096"]),
              default="512", show_default=True,
              help="XTS data unit (sector) size in bytes.")
@click.option("--cpu-threads", type=int, default=None,
              help="Threads for cpu_allcores (default: all cores).")
@click.option("--cpu-max-size", default="256M", show_default=True,
              help="Skip the CPU paths above this size per call (they are "
                   "slow).")
@click.option("--min-time", type=float, default=0.25, show_default=True,
              help="Seconds each measurement runs for (at least 3 calls).")
@click.option("--anchor/--no-anchor", default=True, show_default=True,
              help="Measure openssl speed -evp aes-256-xts at the same sizes "
                   "(1 core and all cores) when openssl is installed.")
def compute(backend, json_path, sizes, quick, service_list, path_list,
            unit_size, cpu_threads, cpu_max_size, min_time, anchor):
    """Throughput of AES-XTS and RAID6 on each path, in GB/s of user data.

    Paths: kernel (data already in GPU memory; calls queued back to back on
    the GPU behind a spin kernel, timed with CUDA events),
    end_to_end (pinned host memory -> GPU -> host, pipelined over 3 CUDA
    streams, as the helper runs), cpu_1core and cpu_allcores (the CPU
    backend in the same run). Also measures the pinned copy ceiling and the
    device-to-device copy rate, checks the targets of the design and
    reports, per service, the size from which the GPU beats the CPU.
    """
    from kgpu_helper.services import BackendUnavailable, get_backend
    from kgpu_helper.services.cpu import CpuBackend, cpu_name

    size_list = ([parse_size(s) for s in sizes.split(",")] if sizes
                 else QUICK_SIZES if quick else DEFAULT_SIZES)
    if quick:
        min_time = min(min_time, 0.05)
    services = service_list.split(",") if service_list else SERVICES
    for s in services:
        if s not in SERVICES:
            raise click.BadParameter(f"unknown service {s!r}",
                                     param_hint="--services")
    paths = path_list.split(",") if path_list else PATHS
    for p in paths:
        if p not in PATHS:
            raise click.BadParameter(f"unknown path {p!r}",
                                     param_hint="--paths")
    cpu_cap = parse_size(cpu_max_size)
    threads = cpu_threads or os.cpu_count() or 1

    gpu = None
    if backend != "cpu":
        try:
            gpu = get_backend(backend)
        except BackendUnavailable as e:
            raise click.ClickException(str(e)) from None
        if gpu.name != "cupy":
            progress("no usable GPU: measuring the CPU paths only")
            gpu = None
    if gpu is None:
        paths = [p for p in paths if p.startswith("cpu")]
    cpu1, cpuall = CpuBackend(threads=1), CpuBackend(threads=threads)
    runner = Runner(gpu, cpu1, cpuall, min_time, np.random.default_rng(0))

    ceiling = None
    if gpu is not None:
        progress("measuring the copy ceiling...")
        ceiling = copy_ceiling(gpu)

    results = []
    todo = [(s, z, p) for s in services for z in size_list for p in paths
            if not (p.startswith("cpu") and z > cpu_cap)]
    for i, (sname, size, path) in enumerate(todo, 1):
        svc = Service(sname, int(unit_size))
        nbytes = svc.user_bytes(size)
        if nbytes == 0:
            continue
        progress(f"[{i}/{len(todo)}] {sname} {fmt_size(size)} {path}")
        if path == "kernel":
            sec = runner.kernel(svc, size)
        elif path == "end_to_end":
            sec = runner.end_to_end(svc, size)
        else:
            sec = runner.cpu(cpu1 if path == "cpu_1core" else cpuall, svc,
                             size)
        results.append({"service": sname, "path": path, "size": size,
                        "bytes": nbytes, "seconds": sec,
                        "gbps": round(nbytes / sec / 1e9, 3)})

    report = {
        "device": gpu.device_name() if gpu else cpu_name(),
        "backend": "cupy" if gpu else "cpu",
        "cpu": cpu_name(),
        "cpu_threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "unit_size": int(unit_size),
        "results": results,
        "copy_ceiling": ceiling,
        "crossover_bytes": (crossovers(results, services, size_list)
                            if gpu else None),
        "targets": check_targets(results, ceiling),
    }
    if anchor and any(s.startswith("aes-xts") for s in services):
        from kgpu_helper.bench.anchor import openssl_xts
        progress("openssl speed -evp aes-256-xts (the CPU anchor)...")
        report["openssl"] = openssl_xts(
            [z for z in size_list if z >= 16], cores=threads)
    print_report(report, services, size_list, paths)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        progress(f"wrote {json_path}")
    return 0


def print_report(rep, services, sizes, paths):
    out = sys.stdout
    out.write(f"device: {rep['device']}   cpu: {rep['cpu']} "
              f"({rep['cpu_threads']} threads)   {rep['date']}\n")
    if rep["copy_ceiling"]:
        c = rep["copy_ceiling"]
        out.write(f"copy ceiling (GB/s): H2D {c['h2d_gbps']}  D2H "
                  f"{c['d2h_gbps']}  both at once {c['bidir_gbps']} each way"
                  f"  device copy {c['device_copy_gbps']}\n")
    table = {(r["service"], r["path"], r["size"]): r["gbps"]
             for r in rep["results"]}
    head = f"{'service':<17}{'size':>6}" + "".join(f"{p:>14}" for p in paths)
    out.write("GB/s of user data per path\n" + head + "\n")
    for s in services:
        for z in sizes:
            vals = [table.get((s, p, z)) for p in paths]
            if all(v is None for v in vals):
                continue
            out.write(f"{s:<17}{fmt_size(z):>6}" + "".join(
                f"{v:>14.2f}" if v is not None else f"{'-':>14}"
                for v in vals) + "\n")
    if rep.get("openssl"):
        from kgpu_helper.bench.anchor import format_anchor
        out.write("\n".join(format_anchor(rep["openssl"])) + "\n")
    if rep["crossover_bytes"]:
        out.write("GPU (end_to_end) >= CPU (all cores) from:\n")
        for s, z in rep["crossover_bytes"].items():
            out.write(f"  {s:<17} {fmt_size(z) if z else 'never (in range)'}"
                      "\n")
    if rep["targets"]:
        met = sum(t["met"] for t in rep["targets"])
        out.write(f"targets: {met}/{len(rep['targets'])} met\n")
        for t in rep["targets"]:
            out.write(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: "
                      f"{t['measured_gbps']} (needs {t['needed_gbps']})\n")
    out.flush()
