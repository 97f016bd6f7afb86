"""``kgpu helper`` and ``kgpu status``."""

import json
import logging
import os
import signal
import sys

import click

from kgpu_helper.rings import abi
from kgpu_helper.serve.sdnotify import notify

log = logging.getLogger("kgpu.helper")


def _setup_logging(verbose):
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
        format="kgpu-helper[%(process)d] %(levelname)s: %(message)s")


def _note_early_stop():
    """Until the serving loop takes over, SIGTERM/SIGINT only note the
    request (start-up, calibration included, can take seconds); the
    helper then stops as soon as it is up, and exits 0. The list that
    fills up when one came."""
    early_stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: early_stop.append(True))
    return early_stop


def _parse_gpus(text):
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"--gpus takes device numbers like 0,1; got "
                                 f"{text!r}") from None


def _crossover_bytes(text):
    if text in ("auto", "none"):
        return text
    try:
        v = int(text)
    except ValueError:
        raise click.BadParameter("--crossover takes auto, none or a number "
                                 "of bytes") from None
    if not 0 <= v <= 0xFFFFFFFF:
        raise click.BadParameter("--crossover must fit in 32 bits")
    return v


def make_backends(backend, gpus, cpu_threads=None):
    """(first backend, extra GPU backends) for --backend/--gpus."""
    from kgpu_helper.services import (BackendUnavailable, cuda_available,
                                      get_backend)

    if backend == "cpu":
        return get_backend("cpu", threads=cpu_threads), []
    ok, why = cuda_available()
    if not ok:
        if backend == "cupy":
            raise BackendUnavailable(f"the cupy backend cannot run: {why}")
        log.info("no usable GPU (%s): using the cpu backend", why)
        return get_backend("cpu", threads=cpu_threads), []
    if gpus is None:
        import cupy as cp
        gpus = list(range(cp.cuda.runtime.getDeviceCount()))
    bes = [get_backend("cupy", device=g) for g in gpus]
    # before any request arrives: a cold NVRTC cache takes seconds, long
    # enough for a guest's first requests to time out into its CPU
    for be in bes:
        be.xts_batch().load_all()
    return bes[0], bes[1:]


@click.command("helper")
@click.option("--backend", type=click.Choice(["auto", "cupy", "cpu"]),
              default="auto", show_default=True,
              help="cupy: GPUs (auto: when CUDA works); cpu: numpy/OpenSSL.")
@click.option("--gpus", help="GPUs to use, e.g. 0,1 (default: all visible).")
@click.option("--ring", "ring_spec", default="kernel", show_default=True,
              help="kernel: /dev/kgpu of the module; shm:FILE: a region "
                   "served by a user-space ring driver (kgpu bench ring).")
@click.option("--ivshmem", "ivshmem", multiple=True, metavar="SOCKET",
              help="Serve a VM guest through QEMU's ivshmem-doorbell "
                   "device at this Unix socket instead of --ring "
                   "(repeatable: one socket per guest); see above.")
@click.option("--region-size", default="64M", show_default=True,
              help="--ivshmem: the guest's shared memory (its PCI BAR), a "
                   "power of two, e.g. 16M, 256M, 1G.")
@click.option("--crossover", default="auto", show_default=True,
              help="auto: measure per service at start-up and tell the "
                   "kernel (cupy backend; with cpu every request comes to "
                   "the helper: 0); none: leave the kernel's setting; or "
                   "bytes for every service.")
@click.option("--spin-us", type=float, default=50.0, show_default=True,
              help="Microseconds to poll the ring before sleeping when "
                   "idle (lower latency at low queue depth; 0: never spin).")
@click.option("--cpu-threads", type=int, default=None,
              help="Threads of the CPU backend (default: all cores).")
@click.option("--max-requests", type=int, default=None, hidden=True)
@click.option("--resident", is_flag=True,
              help="Serve small XTS requests with a persistent GPU kernel "
                   "that polls the ring itself (prototype: --ring kernel or "
                   "shm:FILE, not --ivshmem; cupy backend; see "
                   "kgpu_helper.serve.resident).")
@click.option("--resident-blocks", type=click.IntRange(1, 64), default=16,
              show_default=True, help="Persistent blocks (SMs) it takes.")
@click.option("--resident-servers", type=click.Choice(["1", "2", "4", "8"]),
              default="2", show_default=True,
              help="Requests each block serves at once (its threads split "
                   "into that many servers).")
@click.option("--resident-poll-ns", type=click.IntRange(32, 100000),
              default=2000, show_default=True,
              help="GPU: longest nap between two reads of sq_tail (one "
                   "server reads it; the others watch a copy in GPU "
                   "memory).")
@click.option("--resident-max", default="16K", show_default=True,
              help="Largest XTS request it serves; larger ones take the "
                   "batched launches.")
@click.option("--resident-sleep-us", type=click.IntRange(1, 10000),
              default=20, show_default=True,
              help="Host thread: microseconds between looks at cq_tail "
                   "while requests are outstanding.")
@click.option("--resident-spin-us", type=click.IntRange(0, 10000),
              default=50, show_default=True,
              help="Host thread: spin this long after progress while at "
                   "most one request is outstanding (latency at depth 1).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def helper_cmd(backend, gpus, ring_spec, ivshmem, region_size, crossover,
               spin_us, cpu_threads, max_requests, resident, resident_blocks,
               resident_servers, resident_poll_ns, resident_max,
               resident_sleep_us, resident_spin_us, verbose):
    """Run the helper daemon: attach to the kgpu ring and serve AES-XTS
    and RAID6 requests on the GPUs (or the CPU).

    Logs to stderr. SIGTERM or SIGINT: the batch in hand is finished and
    posted, then the helper detaches; the kernel redoes anything still
    queued on its CPU. Exits 1 with a clear message when the module is not
    loaded or another helper is attached.

    \b
    VM guests (--ivshmem SOCKET): on the host, one helper serves guests
    whose kgpu.ko takes its region from an ivshmem-doorbell device. Start
    the helper first (it starts the socket's ivshmem server, a separate
    process that outlives helper restarts and logs to SOCKET.log), then
    each guest's QEMU with:
      -chardev socket,path=SOCKET,id=ivs0
      -device ivshmem-doorbell,chardev=ivs0,vectors=1
    One guest per socket; a helper killed and started again picks the
    guests up where they are. The server exits once its guest is gone
    after a clean helper stop; SIGTERM to it stops it at once.
    """
    if resident and resident_blocks * int(resident_servers) > 256:
        raise click.BadParameter(
            f"--resident-blocks x --resident-servers is at most 256 servers, "
            f"got {resident_blocks} x {resident_servers}")
    if ivshmem:
        if ring_spec != "kernel":
            raise click.BadParameter("--ring and --ivshmem exclude each "
                                     "other")
        if resident:
            raise click.BadParameter("--resident serves /dev/kgpu or a "
                                     "shm ring (a prototype), not --ivshmem")
        return _helper_ivshmem(backend, gpus, ivshmem, region_size,
                               crossover, spin_us, cpu_threads, verbose)
    from kgpu_helper.serve.daemon import Helper
    from kgpu_helper.services import BackendUnavailable
    from kgpu_helper.services.cpu import CpuBackend
    from kgpu_helper.rings.transport import TransportError, open_transport

    _setup_logging(verbose)
    if resident:
        # before CUDA starts: no lazy kernel loading next to a kernel that
        # never ends (kgpu_helper.serve.resident, ResidentXts._preload)
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    gpu_list = _parse_gpus(gpus)
    cross = _crossover_bytes(crossover)
    early_stop = _note_early_stop()
    if ring_spec == "kernel":
        # pyroute2 takes seconds to import on a slow machine: before we
        # attach, since the kernel sends requests from then on and
        # waits for them until we serve
        import kgpu_helper.rings.netlink  # noqa: F401
    try:
        t = open_transport(ring_spec)
    except TransportError as e:
        raise click.ClickException(str(e)) from None
    try:
        try:
            be, extra = make_backends(backend, gpu_list, cpu_threads)
        except BackendUnavailable as e:
            raise click.ClickException(str(e)) from None
        cpu = be if be.name == "cpu" else CpuBackend(threads=cpu_threads)
        names = [be.device_name()] + [b.device_name() for b in extra]
        log.info("attached to %s ring (%d entries, %d MiB data); backend %s"
                 " on %s", t.name, t.region.entries,
                 t.region.data_size >> 20, be.name, ", ".join(names))
        # measured before the resident kernel runs (calibration launches
        # and waits on the GPU), sent once it is known whether it runs
        cross_values = _crossover_values(be, cpu, cross)
        h = Helper(t, be, gpus=extra, spin=spin_us * 1e-6, cpu_backend=cpu)
        res = None
        if resident:
            res = _start_resident(t, be, resident_blocks, resident_max,
                                  resident_sleep_us, resident_spin_us,
                                  int(resident_servers), resident_poll_ns)
            if res is not None:
                h.t = res.spill  # the loop serves what the GPU spills
                if cross == "auto" and cross_values is not None:
                    _resident_crossover(cross_values)
        _send_crossover(t, cross_values)
        h.install_signals()
        if early_stop:
            h.request_stop()
        log.info("serving")
        notify(READY=1, STATUS=f"serving {t.name} on {be.name}: "
               f"{', '.join(names)}")
        try:
            n = h.serve(max_requests=max_requests)
        except TransportError as e:
            log.warning("%s", e)
            n = h.stats["answered"]
        finally:
            if res is not None:
                res.stop()
            h.close()
        notify(STOPPING=1)
        log.info("stopping: %d requests answered in %d batches", n,
                 h.stats["batches"])
        for line in h.report():
            log.info("served: %s", line)
    finally:
        t.close()
    return 0


def _start_resident(t, be, blocks, max_size, sleep_us, spin_us, servers=2,
                    poll_ns=2000):
    """The GPU-resident XTS path, started; None (and a warning: the
    helper serves as without it) where it cannot run."""
    from kgpu_helper.bench.services import parse_size
    from kgpu_helper.serve.resident import ResidentError, ResidentXts

    if be.name != "cupy":
        log.warning("--resident needs the cupy backend: not used")
        return None
    try:
        res = ResidentXts(t, be, blocks=blocks,
                          max_bytes=parse_size(max_size), sleep_us=sleep_us,
                          spin_us=spin_us, servers=servers, poll_ns=poll_ns)
        res.start()
    except Exception as e:  # noqa: BLE001 - serve without it
        log.warning("resident XTS path not used: %s%s", "" if isinstance(
            e, ResidentError) else f"{type(e).__name__}: ", e)
        return None
    return res


def _helper_ivshmem(backend, gpus, sockets, region_size, crossover, spin_us,
                    cpu_threads, verbose):
    """kgpu helper --ivshmem: one thread per socket
    (kgpu_helper.rings.ivshmem)."""
    from kgpu_helper.rings import ivshmem
    from kgpu_helper.bench.services import parse_size
    from kgpu_helper.serve.daemon import Helper
    from kgpu_helper.rings.ivshmem_server import check_region_size
    from kgpu_helper.services import BackendUnavailable
    from kgpu_helper.services.cpu import CpuBackend
    from kgpu_helper.rings.transport import TransportError

    _setup_logging(verbose)
    try:
        size = check_region_size(parse_size(region_size))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    gpu_list = _parse_gpus(gpus)
    cross = _crossover_bytes(crossover)
    early_stop = _note_early_stop()
    try:
        be, extra = make_backends(backend, gpu_list, cpu_threads)
    except BackendUnavailable as e:
        raise click.ClickException(str(e)) from None
    cpu = be if be.name == "cpu" else CpuBackend(threads=cpu_threads)
    values = _crossover_values(be, cpu, cross) or {}
    if early_stop:
        return 0
    log.info("backend %s on %s; serving %s", be.name, ", ".join(
        [be.device_name()] + [b.device_name() for b in extra]),
        ", ".join(sockets))
    notify(READY=1, STATUS=f"serving {', '.join(sockets)} on {be.name}")

    def make_helper(t):
        return Helper(t, be, gpus=extra, spin=spin_us * 1e-6,
                      cpu_backend=cpu)

    try:
        services = ivshmem.serve(list(sockets), size, make_helper, values)
    except TransportError as e:
        raise click.ClickException(str(e)) from None
    for s in services:
        log.info("stopping: %s: %d requests answered over %d attaches, "
                 "%d guest errors", s.path, s.served, s.attaches, s.errors)
    return 0


def _crossover_values(be, cpu, cross):
    """Per service: the bytes from which the helper should get requests
    (--crossover); None for 'none'."""
    from kgpu_helper.serve.daemon import calibrate

    if cross == "none":
        return None
    if cross == "auto":
        if be.name == "cupy":
            res = calibrate(be, cpu)
            log.info("crossover (GPU beats CPU from): %s", ", ".join(
                f"{abi.SERVICE_NAMES[s]} {v if v is not None else 'never'}"
                for s, v in res.items()))
            # a service the GPU never wins keeps its requests on the
            # kernel's CPU
            values = {s: (0xFFFFFFFF if v is None else v)
                      for s, v in res.items()}
        else:
            values = {s: 0 for s in abi.SERVICE_NAMES}
    else:
        values = {s: cross for s in abi.SERVICE_NAMES}
    return values


def _resident_crossover(values):
    """With the GPU-resident path running, XTS requests of every size go
    to the helper: the calibration above compares the time of one request
    (which a core wins at 4 KiB: about 1 us against 25 through the ring),
    while the resident path exists to take the work off the kernel's CPU
    (its host thread spends about 0.4 us of CPU per 4 KiB request at depth
    32 on an H200 host, where AES-XTS of 4 KiB costs a core about 0.9 us).
    An explicit --crossover still wins."""
    for s in (abi.SVC_XTS_ENC, abi.SVC_XTS_DEC):
        if s in values:
            values[s] = 0
    log.info("crossover: XTS from 0 bytes (the resident path takes small "
             "requests off the kernel's CPU)")


def _send_crossover(t, values):
    if values is None:
        return
    if t.name != "kernel":
        log.info("crossover not sent (no kernel on a %s ring)", t.name)
        return
    try:
        from kgpu_helper.rings.netlink import KgpuNetlink
        with KgpuNetlink() as nl:
            for s, v in values.items():
                nl.set_crossover(s, v)
        log.info("crossover sent to the kernel")
    except Exception as e:  # noqa: BLE001 - serve anyway
        log.warning("could not send the crossover to the kernel: %s", e)


@click.command("status")
@click.option("--json", "as_json", is_flag=True,
              help="Print the statistics as JSON.")
def status(as_json):
    """Show the kgpu module's state: helper attached (pid), ring occupancy,
    per-service requests, bytes, GPU/CPU split, timeouts and errors, and
    each service's crossover size (from generic netlink)."""
    try:
        from kgpu_helper.rings.netlink import KgpuNetlink, KgpuNotLoaded, \
            format_stats
    except ImportError as e:
        raise click.ClickException(f"kgpu status needs pyroute2 ({e})") \
            from None
    try:
        with KgpuNetlink() as nl:
            st = nl.get_stats()
    except KgpuNotLoaded as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot query the kgpu module: {e}") \
            from None
    if as_json:
        click.echo(json.dumps(st, indent=1))
    else:
        click.echo(format_stats(st))
    return 0

