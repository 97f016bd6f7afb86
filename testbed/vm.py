"""Boot a guest kernel under QEMU (TCG) and run one command in it.

Each run is one boot: QEMU starts with the chosen Debian kernel and the
cached initramfs, the guest mounts the host root read-only over 9p under a
tmpfs overlay, runs the command as root from the caller's working
directory, writes its exit status to a small per-run 9p share and powers
off. Whatever happens, no QEMU process outlives the call: a guest that
does not finish in time is killed with a message saying so.
"""

import fcntl
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from kgpu_testbed.initramfs import initramfs_for
from kgpu_testbed.kernels import find_kernel

QEMU = "qemu-system-x86_64"
# Guest path of the per-run share; commands may leave files in $KGPU_OUT.
GUEST_RUN_DIR = "/run/kgpu"
GUEST_OUT_DIR = GUEST_RUN_DIR + "/out"
# One guest at a time on this machine: two TCG guests on a small host
# starve each other into timeouts. Every boot holds this lock.
LOCK_PATH = os.environ.get("KGPU_TESTBED_LOCK", "/tmp/kgpu-testbed.lock")


class TestbedError(RuntimeError):
    """The testbed could not run the command (not: the command failed)."""


@dataclass
class RunResult:
    rc: int                       # the command's exit status
    output: str                   # what the guest printed on its console
    seconds: float                # wall time, boot to power-off
    files: dict = field(default_factory=dict)  # $KGPU_OUT/<name> -> bytes

    def check(self):
        if self.rc != 0:
            raise TestbedError(f"guest command failed with status {self.rc}:\n"
                               f"{self.output[-4000:]}")
        return self


def qemu_available():
    return shutil.which(QEMU) is not None


class Testbed:
    """A recipe for guest boots: which kernel, how much memory and CPU.

    >>> tb = Testbed(kernel="6.12")
    >>> tb.run("uname -r").output
    """

    def __init__(self, kernel=None, memory_mb=2048, cpus=None,
                 overlay_mb=1024, timeout=600, log=None):
        try:
            self.kernel = find_kernel(kernel)
        except LookupError as e:
            raise TestbedError(str(e)) from None
        self.memory_mb = memory_mb
        self.cpus = cpus or min(os.cpu_count() or 1, 4)
        self.overlay_mb = overlay_mb
        self.timeout = timeout
        self.log = log or (lambda msg: print(f"testbed: {msg}", file=sys.stderr))
        if not qemu_available():
            raise TestbedError(f"{QEMU} not found; install qemu-system-x86 "
                               "('make deps')")

    def _qemu_argv(self, initrd, rundir, mode):
        append = " ".join([
            "console=ttyS0", "quiet", "loglevel=4", "panic=-1",
            "mitigations=off", "random.trust_cpu=on", "tsc=reliable",
            "no_timer_check", "8250.nr_uarts=1", "rdinit=/init",
            f"kgpu.mode={mode}", f"kgpu.overlay_mb={self.overlay_mb}",
        ])
        argv = [
            QEMU, "-accel", "tcg,thread=multi", "-cpu", "max",
            "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-kernel", self.kernel.image, "-initrd", initrd,
            "-append", append, "-no-reboot", "-nic", "none",
            "-display", "none", "-vga", "none",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,"
                      "readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=kgpurun,path={rundir},security_model=none,"
                      "multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=kgpurun,mount_tag=kgpurun",
        ]
        if mode == "shell":
            argv += ["-serial", "mon:stdio"]
        else:
            argv += ["-monitor", "none", "-serial", "stdio"]
        return argv

    def _write_script(self, rundir, command, cwd, env):
        os.makedirs(os.path.join(rundir, "out"))
        lines = ["# written by the kgpu testbed on the host"]
        # This interpreter's folder first: the guest's python3 and kgpu
        # are then the ones running here (a venv's, say).
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

    def run(self, command, *, cwd=None, env=None, timeout=None, echo=True):
        """Run ``command`` (a bash command line) as root in a fresh guest.

        Streams the guest console to stdout when ``echo``; returns a
        RunResult. Raises TestbedError if the guest died or timed out.
        """
        return self._boot(command, "run", cwd, env, timeout, echo)

    def shell(self):
        """An interactive root shell in the guest on this terminal."""
        return self._boot("exec /bin/bash -l", "shell", None, None, None,
                          echo=True).rc

    def _boot(self, command, mode, cwd, env, timeout, echo):
        with _guest_lock(self.log):
            return self._boot_locked(command, mode, cwd, env, timeout, echo)

    def _boot_locked(self, command, mode, cwd, env, timeout, echo):
        timeout = timeout or self.timeout
        initrd = initramfs_for(self.kernel, log=self.log)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="kgpu-run-") as rundir:
            self._write_script(rundir, command, cwd or os.getcwd(), env)
            argv = self._qemu_argv(initrd, rundir, mode)
            if mode == "shell":
                self.log(f"booting {self.kernel.release}; 'exit' powers off, "
                         "Ctrl-A X kills the VM")
                proc = subprocess.Popen(argv, start_new_session=False)
                try:
                    proc.wait()
                finally:
                    _kill(proc)
                output = ""
            else:
                output = self._drive(argv, timeout, echo)
            seconds = time.monotonic() - start
            rc = _read_rc(rundir)
            files = _collect(os.path.join(rundir, "out"))
        if rc is None:
            tail = output[-3000:]
            raise TestbedError(
                f"the guest ({self.kernel.release}) stopped without reporting "
                f"an exit status (kernel panic or init failure?); "
                f"last console output:\n{tail}")
        return RunResult(rc, output, seconds, files)

    def _drive(self, argv, timeout, echo):
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)
        chunks = []
        pending = b""
        deadline = time.monotonic() + timeout
        try:
            fd = proc.stdout.fileno()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestbedError(
                        f"the guest did not finish within {timeout:.0f} s; "
                        "QEMU was killed. Last console output:\n"
                        + _clean(b"".join(chunks))[-3000:])
                ready, _, _ = select.select([fd], [], [], min(left, 1.0))
                if not ready:
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break
                chunks.append(data)
                if echo:
                    lines = (pending + data).split(b"\n")
                    pending = lines.pop()
                    _echo(lines)
            if echo and pending:
                _echo([pending])
            proc.wait(timeout=30)
        finally:
            _kill(proc)
        return _clean(b"".join(chunks))


class _guest_lock:
    """Holds LOCK_PATH for one boot; says so when it has to wait."""

    def __init__(self, log):
        self.log = log
        self.fd = None

    def __enter__(self):
        self.fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log(f"waiting for another guest to finish ({LOCK_PATH})")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)   # closing drops the lock
        return False


# The kernel's last word at power-off, not the command's output.
_POWER_DOWN = re.compile(rb"\[\s*\d+\.\d+\] reboot: Power down\s*$")


def _echo(lines):
    for line in lines:
        line, n = _POWER_DOWN.subn(b"", line)
        if line or not n:
            sys.stdout.write(_clean(line) + "\n")
    sys.stdout.flush()


def _clean(data):
    return data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")


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


def _collect(outdir, limit=64 << 20):
    files = {}
    for dirpath, _, names in os.walk(outdir):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, outdir)
            if os.path.getsize(path) <= limit:
                with open(path, "rb") as f:
                    files[rel] = f.read()
    return files
