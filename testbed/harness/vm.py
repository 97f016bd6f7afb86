"""Boot a guest kernel under QEMU (TCG) and run one command in it.

Each run boots a guest: QEMU starts with the chosen Debian kernel and the
cached initramfs, the guest mounts the host root read-only over 9p under a
tmpfs overlay, runs the command as root from the caller's working
directory, writes its exit status to a small per-run 9p share and powers
off. With a bundle (``kgpu testbed bundle``), QEMU, the kernel, the
initramfs and the guest root all come from the bundle instead, and the
caller's working directory is shared at its own path. Whatever happens, no QEMU process outlives the call: a guest that
does not finish in time is killed with a message saying so, and QEMU is
killed with the process that started it (a test run stopped by SIGTERM
leaves no guest behind to starve the next ones).

The init prints COMMAND_MARKER just before it runs the command. A guest
that stops without it (an early oops or panic under TCG, a boot that
hangs before init) never ran the command, so it is booted again, up to
BOOTS boots in all. A guest that dies after the marker is never booted
again: that is the command's failure, reported as such.

A guest can have raw disk images as virtio disks (``disks=``), keep its
overlay's upper layer on an ext4 image instead of a tmpfs
(``upper_disk=``, /dev/vda: what one boot writes is there at the next
boot of the same image), and boot systemd as PID 1 (``init="systemd"``):
the command then runs as kgpu-testbed.service once multi-user.target is
reached, and the guest powers off through systemd.

Guests can have ivshmem-doorbell devices (``ivshmem=[SOCKET, ...]``),
each the client of an ivshmem server such as ``kgpu helper --ivshmem``;
``run_together`` boots several guests at once under one hold of the lock.
"""

import contextlib
import copy
import ctypes
import fcntl
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from kgpu_testbed.harness.initramfs import initramfs_for
from kgpu_testbed.harness.kernels import Kernel, find_kernel

QEMU = "qemu-system-x86_64"
# Printed by init.sh on a line of its own just before the command runs;
# taken out of the output callers see.
COMMAND_MARKER = "kgpu-init: running the command"
# Boots per run, when a guest stops before COMMAND_MARKER.
BOOTS = 3
# A boot that has not reached the command after this many seconds (about
# 10 s is usual under TCG) counts as hung and is killed and booted again.
BOOT_TIMEOUT = 120
# Guest path of the per-run share; commands may leave files in $KGPU_OUT.
GUEST_RUN_DIR = "/run/kgpu"
GUEST_OUT_DIR = GUEST_RUN_DIR + "/out"
# One guest at a time on this machine: two TCG guests on a small host
# starve each other into timeouts. Every boot holds this lock.
LOCK_PATH = os.environ.get("KGPU_TESTBED_LOCK", "/tmp/kgpu-testbed.lock")
# Memory of each guest that run_together boots (at most).
TOGETHER_MEMORY_MB = 1024
# The guest's PATH with a bundle's root (no host interpreter there).
BUNDLE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class TestbedError(RuntimeError):
    """The testbed could not run the command (not: the command failed)."""


@dataclass
class RunResult:
    rc: int                       # the command's exit status
    output: str                   # what the guest printed on its console
    seconds: float                # wall time, boot to power-off
    files: dict = field(default_factory=dict)  # $KGPU_OUT/<name> -> bytes
    boots: int = 1                # 1, or more when a guest died before
                                  # the command started

    def check(self):
        if self.rc != 0:
            raise TestbedError(f"guest command failed with status {self.rc}:\n"
                               f"{self.output[-4000:]}")
        return self


def qemu_available(qemu=QEMU):
    return shutil.which(qemu) is not None


def _opt(value):
    """``value`` inside a QEMU option list (commas doubled)."""
    return str(value).replace(",", ",,")


def ivshmem_argv(sockets):
    """QEMU arguments for one ivshmem-doorbell device (one vector) per
    server socket, in order: the guest sees them as PCI devices in that
    order."""
    argv = []
    for i, path in enumerate(sockets):
        argv += ["-chardev", f"socket,path={_opt(path)},id=ivs{i}",
                 "-device", f"ivshmem-doorbell,chardev=ivs{i},vectors=1"]
    return argv


def check_ivshmem(sockets):
    """Raise TestbedError unless each path is a listening socket's."""
    for path in sockets:
        try:
            ok = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            ok = False
        if not ok:
            raise TestbedError(f"no ivshmem server at {path}: start 'kgpu "
                               f"helper --ivshmem {path}' first")


class Testbed:
    """A recipe for guest boots: which kernel, how much memory and CPU.

    >>> tb = Testbed(kernel="6.12")
    >>> tb.run("uname -r").output
    """

    def __init__(self, kernel=None, memory_mb=2048, cpus=None,
                 overlay_mb=1024, timeout=600, log=None, qemu=QEMU,
                 boot_timeout=BOOT_TIMEOUT, ivshmem=(), bundle=None,
                 disks=(), upper_disk=None, init=None):
        self.log = log or (lambda msg: print(f"testbed: {msg}", file=sys.stderr))
        # Sockets of ivshmem servers, one ivshmem-doorbell device each.
        self.ivshmem = [os.path.abspath(p) for p in ivshmem]
        # Raw disk images: virtio disks in order after the upper disk (an
        # ext4 image kept across boots, /dev/vda when given).
        self.upper_disk = upper_disk and os.path.abspath(upper_disk)
        self.disks = [os.path.abspath(p) for p in disks]
        if init not in (None, "systemd"):
            raise TestbedError(f"init {init!r}: only 'systemd' (or none)")
        self.init = init
        self.bundle = None
        self.qemu_env = {}
        if bundle is not None:
            self._use_bundle(bundle, kernel)
            qemu = self.bundle.qemu
        elif isinstance(kernel, Kernel):
            self.kernel = kernel
        else:
            try:
                self.kernel = find_kernel(kernel)
            except LookupError as e:
                raise TestbedError(str(e)) from None
        self.memory_mb = memory_mb
        self.cpus = cpus or min(os.cpu_count() or 1, 4)
        self.overlay_mb = overlay_mb
        self.timeout = timeout
        self.boot_timeout = boot_timeout
        self.qemu = qemu
        if not qemu_available(qemu):
            raise TestbedError(f"{qemu} not found; install qemu-system-x86 "
                               "('make deps')")

    def _use_bundle(self, archive, kernel):
        from kgpu_testbed.harness.bundle import BundleError, unpack

        try:
            self.bundle = unpack(archive, log=self.log)
        except BundleError as e:
            raise TestbedError(str(e)) from None
        release = self.bundle.release
        want = kernel.release if isinstance(kernel, Kernel) else kernel
        if want and want != release and not release.startswith(want + "."):
            raise TestbedError(f"the bundle {archive} has kernel {release}, "
                               f"not {want}")
        self.kernel = Kernel(release, self.bundle.kernel_image)
        self.qemu_env = self.bundle.qemu_env()

    def _initrd(self):
        if self.bundle:
            return self.bundle.initrd
        return initramfs_for(self.kernel, log=self.log)

    def _popen_env(self):
        return dict(os.environ, **self.qemu_env) if self.qemu_env else None

    def _qemu_argv(self, initrd, rundir, mode, cwd=None):
        root = self.bundle.root if self.bundle else "/"
        append = " ".join([
            "console=ttyS0", "quiet", "loglevel=4", "panic=-1",
            "mitigations=off", "random.trust_cpu=on", "tsc=reliable",
            "no_timer_check", "8250.nr_uarts=1", "rdinit=/init",
            f"kgpu.mode={mode}", f"kgpu.overlay_mb={self.overlay_mb}",
        ] + (["kgpu.root=bundle"] if self.bundle else [])
          + (["kgpu.upper=vda"] if self.upper_disk else [])
          + (["kgpu.init=systemd", "systemd.show_status=0",
              "systemd.mask=serial-getty@ttyS0.service"]
             if self.init == "systemd" else []))
        # Multi-threaded TCG. Rarely, 6.12 oopses early (an int3 in
        # sched_clock_cpu while the kernel patches its code; once in 21
        # boots): run() boots such a guest again. thread=single, measured
        # on 2 host cores, 2 vCPUs: boot to `true` 5.6 s vs 5.1 s (mean of
        # 6 each, 6.12); tests/vm/test_kmod_load.py 27.2 s vs 27.7 s; but
        # the demo (dm-crypt under fio, 64 MiB) writes 17-26 MB/s vs 37-41
        # and reads 24-33 vs 46-54: the guest gets one host core, not two.
        # No oops in those ~25 boots of either mode: too rare to tell
        # whether single avoids it, and too slow to pay for always.
        argv = [self.qemu]
        if self.bundle:
            argv += ["-L", self.bundle.share]
        argv += [
            "-accel", "tcg,thread=multi", "-cpu", "max",
            "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-kernel", self.kernel.image, "-initrd", initrd,
            "-append", append, "-no-reboot", "-nic", "none",
            "-display", "none", "-vga", "none",
            "-fsdev", f"local,id=hostroot,path={_opt(root)},"
                      "security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=kgpurun,path={rundir},security_model=none,"
                      "multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=kgpurun,mount_tag=kgpurun",
        ]
        if self.bundle and cwd and cwd != "/":
            # The caller's folder at its own path, under its own overlay.
            argv += [
                "-fsdev", f"local,id=hostcwd,path={_opt(cwd)},"
                          "security_model=none,readonly=on,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=hostcwd,mount_tag=hostcwd"]
        for path in ([self.upper_disk] if self.upper_disk else []) + self.disks:
            argv += ["-drive", f"file={_opt(path)},if=virtio,format=raw,"
                               "cache=unsafe"]
        argv += ivshmem_argv(self.ivshmem)
        if mode == "shell":
            argv += ["-serial", "mon:stdio"]
        else:
            argv += ["-monitor", "none", "-serial", "stdio"]
        return argv

    def _write_script(self, rundir, command, cwd, env):
        os.makedirs(os.path.join(rundir, "out"))
        lines = ["# written by the kgpu testbed on the host"]
        if self.bundle:
            path = BUNDLE_PATH
        else:
            # This interpreter's folder first: the guest's python3 and
            # kgpu are then the ones running here (a venv's, say).
            path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            path = f"{os.path.dirname(sys.executable)}:{path}:/usr/sbin:/sbin"
        guest_env = {
            "PATH": path,
            "HOME": "/root", "TERM": os.environ.get("TERM", "dumb"),
            "LANG": "C.UTF-8", "KGPU_OUT": GUEST_OUT_DIR,
            "KGPU_TESTBED": "1",
            # No udev in the guest: dmsetup must not wait for it.
            "DM_DISABLE_UDEV": "1",
            "PYTHONUNBUFFERED": "1",
        }
        if self.bundle:
            # kgpu.ko, dm-gpu-crypt.ko, dm-gpu-raid6.ko in the bundle.
            guest_env["KGPU_MODULES"] = self.bundle.guest_modules
            with open(os.path.join(rundir, "cwd"), "w") as f:
                f.write(cwd if cwd != "/" else "")
        else:
            for name in ("VIRTUAL_ENV", "PYTHONPATH"):
                if os.environ.get(name):
                    guest_env[name] = os.environ[name]
        guest_env.update(env or {})
        for k, v in guest_env.items():
            lines.append(f"export {k}={shlex.quote(v)}")
        q = shlex.quote(cwd)
        lines.append(f"cd {q} 2>/dev/null || {{ echo \"testbed: \"{q}\" is "
                     f"not visible in the guest (/run, /dev, /proc and /sys "
                     f"are its own); running in /\" >&2; cd /; }}")
        lines.append(command)
        with open(os.path.join(rundir, "cmd.sh"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def run(self, command, *, cwd=None, env=None, timeout=None, echo=True,
            on_line=None, locked=False):
        """Run ``command`` (a bash command line) as root in a fresh guest.

        Streams the guest console to stdout when ``echo``, and hands each
        console line (str, without its newline) to ``on_line`` when given;
        returns a
        RunResult. A guest that stops before the command starts (panic,
        oops, no command after ``boot_timeout`` s) is booted again, BOOTS
        boots at most; each boot has ``timeout`` s from its start to power
        off, and a ``timeout`` shorter than ``boot_timeout`` stays a plain
        timeout. Raises TestbedError if the guest died or timed out once
        the command had started, or if no boot reached it. ``locked``:
        the caller holds the testbed lock (``guest_lock``) already.
        """
        timeout = timeout or self.timeout
        cwd = os.path.abspath(cwd or os.getcwd())
        check_ivshmem(self.ivshmem)
        with contextlib.nullcontext() if locked else guest_lock(self.log):
            initrd = self._initrd()
            for boot in range(1, BOOTS + 1):
                start = time.monotonic()
                with tempfile.TemporaryDirectory(prefix="kgpu-run-") as rundir:
                    self._write_script(rundir, command, cwd, env)
                    argv = self._qemu_argv(initrd, rundir, "run", cwd)
                    output, started, status = self._drive(argv, timeout, echo,
                                                          on_line)
                    seconds = time.monotonic() - start
                    rc = _read_rc(rundir)
                    files = collect_files(os.path.join(rundir, "out"))
                if rc is not None:
                    return RunResult(rc, output, seconds, files, boots=boot)
                if started:
                    raise self._no_status_error(output)
                if status == 1:
                    raise TestbedError(
                        f"{self.qemu} failed before the guest started (exit "
                        f"status 1, a QEMU error: not retried):\n"
                        f"{output[-3000:]}")
                why = _why_stopped(output, status, self.boot_timeout)
                if boot == BOOTS:
                    raise TestbedError(
                        f"the guest ({self.kernel.release}) stopped before "
                        f"its command started in each of {BOOTS} boots, the "
                        f"last time: {why}; last console output:\n"
                        f"{output[-3000:]}")
                lines = "\n".join(
                    "  | " + ln for ln in output.strip().splitlines()[-12:])
                self.log(f"the guest stopped before its command started "
                         f"({why}); booting again ({boot + 1} of {BOOTS}). "
                         f"Its last console lines:\n{lines}")

    def shell(self):
        """An interactive root shell in the guest on this terminal."""
        check_ivshmem(self.ivshmem)
        with guest_lock(self.log):
            initrd = self._initrd()
            with tempfile.TemporaryDirectory(prefix="kgpu-run-") as rundir:
                cwd = os.getcwd()
                self._write_script(rundir, "exec /bin/bash -l", cwd, None)
                self.log(f"booting {self.kernel.release}; 'exit' powers off, "
                         "Ctrl-A X kills the VM")
                proc = subprocess.Popen(
                    self._qemu_argv(initrd, rundir, "shell", cwd),
                    env=self._popen_env(), start_new_session=False,
                    preexec_fn=_die_with_parent)
                try:
                    proc.wait()
                finally:
                    _kill(proc)
                rc = _read_rc(rundir)
        if rc is None:
            raise self._no_status_error("")
        return rc

    def _no_status_error(self, output):
        return TestbedError(
            f"the guest ({self.kernel.release}) stopped without reporting "
            f"an exit status (kernel panic or init failure?); "
            f"last console output:\n{output[-3000:]}")

    def _drive(self, argv, timeout, echo, on_line=None):
        """Run QEMU to its end. Returns (console output without the
        marker, whether the command started, QEMU's exit status or None
        when it was killed for not reaching the command in time)."""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                env=self._popen_env(),
                                start_new_session=True,
                                preexec_fn=_die_with_parent)
        chunks = []
        pending = b""
        marker = COMMAND_MARKER.encode()
        started, hide_marker, tail = False, echo, b""
        start = time.monotonic()
        deadline = start + timeout
        boot_deadline = start + self.boot_timeout
        try:
            fd = proc.stdout.fileno()
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise TestbedError(
                        f"the guest did not finish within {timeout:.0f} s; "
                        "QEMU was killed. Last console output:\n"
                        + _strip_marker(b"".join(chunks))[-3000:])
                if not started and now >= boot_deadline:
                    return _strip_marker(b"".join(chunks)), False, None
                end = deadline if started else min(deadline, boot_deadline)
                ready, _, _ = select.select([fd], [], [], min(end - now, 1.0))
                if not ready:
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break
                chunks.append(data)
                if not started:
                    started = marker in tail + data
                    tail = (tail + data)[-len(marker):]
                if echo or on_line:
                    lines = (pending + data).split(b"\n")
                    pending = lines.pop()
                    if echo:
                        hide_marker = _echo(lines, hide_marker)
                    if on_line and started:
                        for ln in lines:
                            on_line(ln.decode(errors="replace"))
            if echo and pending:
                _echo([pending], hide_marker)
            if on_line and pending and started:
                on_line(pending.decode(errors="replace"))
            status = proc.wait(timeout=30)
        finally:
            _kill(proc)
        return _strip_marker(b"".join(chunks)), started, status


_held = threading.Lock()     # guards the two below
_held_fd = None
_held_depth = 0


@contextlib.contextmanager
def guest_lock(log=None):
    """Hold LOCK_PATH, the machine's one-guest-at-a-time lock, for the
    block; says so when it waits. Within this process it nests: runs
    inside the block (from any thread) share the hold, so a caller that
    takes it can boot several guests at once (``run_together``)."""
    global _held_fd, _held_depth
    with _held:
        if _held_depth == 0:
            fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                (log or print)(f"waiting for another guest to finish "
                               f"({LOCK_PATH})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            _held_fd = fd
        _held_depth += 1
    try:
        yield
    finally:
        with _held:
            _held_depth -= 1
            if _held_depth == 0:
                os.close(_held_fd)      # closing drops the lock
                _held_fd = None


def run_together(runs, log=None):
    """Boot one guest per ``(testbed, command)`` or ``(testbed, command,
    run_kwargs)`` at the same time, under one hold of the testbed lock;
    a list of RunResult in the same order, each with its own output,
    files and exit status.

    Each guest gets at most TOGETHER_MEMORY_MB of memory and its share of
    the host's CPUs, and does not echo its console unless ``echo=True`` is
    in its run_kwargs. Raises TestbedError, naming the guest, when any
    guest could not run its command (after all of them have stopped)."""
    jobs = []
    for spec in runs:
        tb = copy.copy(spec[0])
        tb.memory_mb = min(tb.memory_mb, TOGETHER_MEMORY_MB)
        tb.cpus = max(1, min(tb.cpus, (os.cpu_count() or 1) // len(runs)))
        kwargs = dict(spec[2]) if len(spec) > 2 else {}
        kwargs.setdefault("echo", False)
        check_ivshmem(tb.ivshmem)
        jobs.append((tb, spec[1], kwargs))
    results = [None] * len(jobs)
    errors = [None] * len(jobs)

    def one(i, tb, command, kwargs):
        try:
            results[i] = tb.run(command, locked=True, **kwargs)
        except BaseException as e:   # handed to the caller below
            errors[i] = e

    with guest_lock(log):
        for tb, _, _ in jobs:
            tb._initrd()        # built once, before the guests race for it
        threads = [threading.Thread(target=one, args=(i,) + job,
                                    name=f"kgpu-guest-{i + 1}")
                   for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, e in enumerate(errors):
        if e is not None:
            if isinstance(e, TestbedError):
                raise TestbedError(f"guest {i + 1} of {len(jobs)}: {e}") from e
            raise e
    return results


# The kernel's last word at power-off, not the command's output.
_POWER_DOWN = re.compile(rb"\[\s*\d+\.\d+\] reboot: Power down\s*$")


def _echo(lines, hide_marker):
    """Write console lines to stdout, less the power-off line and, while
    ``hide_marker``, COMMAND_MARKER; returns whether it is still hidden."""
    for line in lines:
        if hide_marker and _clean(line).strip() == COMMAND_MARKER:
            hide_marker = False
            continue
        line, n = _POWER_DOWN.subn(b"", line)
        if line or not n:
            sys.stdout.write(_clean(line) + "\n")
    sys.stdout.flush()
    return hide_marker


def _strip_marker(data):
    """The console text, less the line COMMAND_MARKER (once)."""
    return re.sub(rf"^{re.escape(COMMAND_MARKER)}[ \t]*\n", "", _clean(data),
                  count=1, flags=re.MULTILINE)


_DEATH = re.compile(r"(Kernel panic - not syncing:.*|Oops:.*|BUG:.*|"
                    r"general protection fault.*)")


def _why_stopped(output, status, boot_timeout):
    """A short reason why a guest stopped before its command started."""
    if status is None:
        return f"no command after {boot_timeout:.0f} s: killed as hung"
    found = []
    for m in _DEATH.finditer(output):
        found.append(m.group(1).strip())
    if found:
        # The first sign (an oops) and the last word (the panic).
        return "; ".join(dict.fromkeys([found[0], found[-1]]))
    return f"QEMU exited with status {status}"


def _clean(data):
    return data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")


_LIBC = ctypes.CDLL(None)


def _die_with_parent():
    """In QEMU before exec: SIGKILL when this process (the thread that
    started it) dies, even where no ``finally`` runs (SIGTERM, SIGKILL),
    so that no guest is orphaned. Only a libc call, loaded beforehand:
    the child of a threaded parent must not take locks."""
    PR_SET_PDEATHSIG = 1
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill(proc):
    """Make sure QEMU is gone, whatever state it is in."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _read_rc(rundir):
    try:
        with open(os.path.join(rundir, "rc")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def collect_files(outdir, limit=64 << 20):
    files = {}
    for dirpath, _, names in os.walk(outdir):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, outdir)
            if os.path.getsize(path) <= limit:
                with open(path, "rb") as f:
                    files[rel] = f.read()
    return files
