"""``kgpu doctor``: what works on this host and what does not.

Each check gives a verdict (ok, warn or FAIL), what it found, and for
anything not ok the fix in one line. The host is read through a small
``Host`` object (files, commands, the module's statistics, CUDA), so the
checks run the same against a fake host in the unit tests.
"""

import os
import platform
import resource
import shutil
import subprocess

import click

from kgpu_helper.cli.cudaextra import extra_for

OK, WARN, FAIL = "ok", "warn", "FAIL"
MODULES = ("kgpu", "dm_gpu_crypt", "dm_gpu_raid6")


class Host:
    """The machine as the checks see it."""

    def release(self):
        return platform.release()

    def read(self, path):
        """A file's text, or None if it cannot be read."""
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None

    def exists(self, path):
        return os.path.exists(path)

    def listdir(self, path):
        try:
            return os.listdir(path)
        except OSError:
            return None

    def run(self, *argv):
        """(exit status, stdout) of a command; 127 if it is not there."""
        if not shutil.which(argv[0]):
            return 127, ""
        try:
            p = subprocess.run(argv, capture_output=True, text=True,
                               timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            return 1, str(e)
        return p.returncode, p.stdout

    def stats(self):
        """The kgpu module's statistics (dict), or raises with why not."""
        from kgpu_helper.rings.netlink import KgpuNetlink
        with KgpuNetlink() as nl:
            return nl.get_stats()

    def cuda(self):
        """(driver version, [GPU names]) or raises with why not."""
        import cupy
        rt = cupy.cuda.runtime
        names = []
        for i in range(rt.getDeviceCount()):
            name = rt.getDeviceProperties(i)["name"]
            names.append(name.decode() if isinstance(name, bytes) else name)
        return rt.driverGetVersion(), names

    def memlock(self):
        return resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]

    def euid(self):
        return os.geteuid()


def _check(results, verdict, what, fix=None):
    results.append((verdict, what, fix))


def check_modules(host, results, build_dir=None):
    rel = host.release()
    rc, path = host.run("modinfo", "-n", "kgpu")
    built = None
    if rc == 0 and path.strip():
        built = path.strip()
    elif build_dir and host.exists(os.path.join(build_dir, rel, "kgpu.ko")):
        built = os.path.join(build_dir, rel, "kgpu.ko")
    if built:
        _check(results, OK, f"modules for {rel}: {built}")
    else:
        _check(results, FAIL, f"no kgpu module built for this kernel ({rel})",
               "make install (DKMS builds it for every kernel with headers), "
               "or make modules KDIR=/lib/modules/$(uname -r)/build (in the "
               "kgpu checkout; needs this kernel's headers)")
    for m in MODULES:
        if host.exists(f"/sys/module/{m}"):
            _check(results, OK, f"module {m} loaded")
        elif m == "kgpu":
            _check(results, FAIL, "module kgpu not loaded",
                   "modprobe kgpu (or insmod build/$(uname -r)/kgpu.ko)")
        else:
            _check(results, WARN, f"module {m} not loaded (dmsetup create "
                   "loads it when it is installed)",
                   f"modprobe {m.replace('_', '-')}")
    if host.exists("/sys/module/kgpu") and not host.exists("/dev/kgpu"):
        _check(results, FAIL, "/dev/kgpu missing while kgpu is loaded",
               "udevadm trigger --subsystem-match=misc, or reload kgpu")


def check_helper(host, results):
    """The helper as the module sees it; the statistics, or None."""
    if not host.exists("/sys/module/kgpu"):
        return None
    try:
        st = host.stats()
    except Exception as e:      # noqa: BLE001 - any reason is the finding
        _check(results, FAIL, f"cannot read the module's statistics ({e})",
               "run kgpu doctor as root, with pyroute2 installed")
        return None
    pid = st.get("helper_pid")
    if not pid:
        _check(results, FAIL, "no helper attached: every request runs on "
               "the kernel's CPU", "systemctl enable --now kgpu-helper "
               "(after make install), or by hand: kgpu helper & (as root; "
               "--backend cpu without a GPU)")
        return st
    where = " on the host (ivshmem)" if st.get("provider") == "ivshmem" \
        else ""
    cmd = (host.read(f"/proc/{pid}/cmdline") or "").split("\0")
    backend = "auto"
    if "--backend" in cmd and cmd.index("--backend") + 1 < len(cmd):
        backend = cmd[cmd.index("--backend") + 1]
    _check(results, OK, f"helper attached: pid {pid}{where}, backend "
           f"{backend}, {st.get('attaches')} attaches so far")
    if st.get("helper_stalled"):
        _check(results, FAIL, "helper stalled: a request got no answer in "
               "time, requests go to the CPU",
               f"look at the helper's log; kill {pid} and start it again")
    if st.get("timeouts"):
        _check(results, WARN, f"{st['timeouts']} requests timed out "
               f"(timeout {st.get('timeout_ms')} ms)",
               "the helper's log: a slow or stopped helper")
    for s in st.get("services", []):
        c = s.get("crossover")
        _check(results, OK, f"crossover {s.get('name')}: "
               f"{'-' if c is None else c} bytes")
    return st


def cuda_extra(host):
    """The CuPy extra for this host's driver (cudaextra.py's rule, the one
    make install follows), or None."""
    rc, out = host.run("nvidia-smi")
    return extra_for(out) if rc == 0 else None


def check_cuda(host, results):
    try:
        driver, gpus = host.cuda()
    except Exception as e:      # noqa: BLE001
        extra = cuda_extra(host)
        if extra:
            fix = (f"make install CUDA={extra}, or pip install "
                   f"'kgpu[{extra}]' (CuPy for this driver's CUDA)")
        else:
            fix = ("on a host with an NVIDIA driver: make install (CuPy "
                   "for its CUDA), or pip install 'kgpu[cuda12]'")
        _check(results, WARN, f"no CUDA in this Python ({type(e).__name__}: "
               f"{e}): the helper can run only its CPU backend", fix)
        return
    if not gpus:
        _check(results, WARN, f"CUDA driver {driver} but no GPU",
               "nvidia-smi: is the GPU visible to this host?")
        return
    _check(results, OK, f"CUDA driver {driver}: {len(gpus)} GPU(s): "
           f"{', '.join(gpus)}")


def check_memory(host, results):
    groups = host.listdir("/sys/kernel/iommu_groups")
    cmdline = host.read("/proc/cmdline") or ""
    if groups:
        mode = "passthrough" if "iommu=pt" in cmdline else "translated"
        _check(results, OK, f"IOMMU on ({len(groups)} groups, {mode})")
    else:
        _check(results, OK, "IOMMU off or absent (no DMA remapping of the "
               "pinned region)")
    lim = host.memlock()
    if host.euid() != 0 and lim != resource.RLIM_INFINITY and \
            lim < (64 << 20):
        _check(results, WARN, f"locked-memory limit {lim >> 10} KiB: the "
               "helper pins the 64 MiB region with CUDA",
               "run the helper as root, or raise its limit (ulimit -l, "
               "systemd's LimitMEMLOCK)")


def check_units(host, results):
    """Under systemd: are the units of make install there and running?"""
    if not host.exists("/run/systemd/system"):
        return
    rc, state = host.run("systemctl", "is-active", "kgpu-helper.service")
    state = state.strip() or "unknown"
    if rc == 127:
        return
    _, enabled = host.run("systemctl", "is-enabled", "kgpu-helper.service")
    enabled = enabled.strip() or "not installed"
    if state == "active":
        _check(results, OK, f"kgpu-helper.service active ({enabled})")
    elif enabled == "not installed":
        _check(results, WARN, "kgpu-helper.service not installed: nothing "
               "starts the helper at boot", "make install")
    else:
        _check(results, WARN, f"kgpu-helper.service {state} ({enabled})",
               "systemctl enable --now kgpu-helper; journalctl -u "
               "kgpu-helper says why it stopped")


def check_mappings(host, results, stats):
    rc, out = host.run("dmsetup", "table")
    if rc != 0:
        _check(results, WARN, "dmsetup table failed (not root, or no "
               "device-mapper)", "run kgpu doctor as root")
        return
    served = "the kernel's CPU (no helper)"
    if stats and stats.get("helper_pid"):
        served = f"helper pid {stats['helper_pid']}"
    found = 0
    for line in out.splitlines():
        name, _, rest = line.partition(": ")
        words = rest.split()
        if len(words) > 2 and words[2] in ("gpu-crypt", "gpu-raid6"):
            found += 1
            _check(results, OK, f"{name}: {words[2]}, served by {served}")
    if not found:
        _check(results, OK, "no gpu-crypt or gpu-raid6 mapping")


def diagnose(host, build_dir=None):
    """Every check's (verdict, what, fix), in order."""
    results = []
    _check(results, OK, f"kernel {host.release()}")
    check_modules(host, results, build_dir)
    stats = check_helper(host, results)
    check_units(host, results)
    check_cuda(host, results)
    check_memory(host, results)
    check_mappings(host, results, stats)
    return results


def report(results):
    """The lines people read, and the exit status (1 if anything FAILs)."""
    lines = []
    for verdict, what, fix in results:
        lines.append(f"{verdict:>4}  {what}")
        if fix and verdict != OK:
            lines.append(f"      fix: {fix}")
    bad = sum(v == FAIL for v, _w, _f in results)
    warn = sum(v == WARN for v, _w, _f in results)
    lines.append(f"{bad} problem(s), {warn} warning(s)")
    return "\n".join(lines), 1 if bad else 0


@click.command("doctor")
def doctor():
    """Say what works on this host and what does not: the modules (built
    for this kernel? loaded?), the helper (attached? backend?), the
    crossovers, CUDA and the GPUs, the IOMMU and the locked-memory limit,
    and which mappings are gpu-crypt or gpu-raid6 and who serves them.
    Each problem comes with its fix; exits 1 if anything is broken."""
    # the checkout's build/ (make modules), three levels up from here
    repo = os.path.abspath(__file__)
    for _ in range(3):
        repo = os.path.dirname(repo)
    text, rc = report(diagnose(Host(), os.path.join(repo, "build")))
    click.echo(text)
    raise SystemExit(rc)
