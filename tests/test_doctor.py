"""kgpu doctor against fake hosts: each finding, its fix, the exit status."""

import os
import resource

from kgpu_helper.cli import doctor


class FakeHost(doctor.Host):
    def __init__(self, files=(), commands=None, stats=None, cuda=None,
                 memlock=resource.RLIM_INFINITY, euid=0):
        self.files = dict(files)
        self.commands = commands or {}
        self._stats = stats
        self._cuda = cuda
        self._memlock = memlock
        self._euid = euid

    def release(self):
        return "6.12.118+deb12-amd64"

    def read(self, path):
        return self.files.get(path)

    def exists(self, path):
        return path in self.files or any(
            f.startswith(path.rstrip("/") + "/") for f in self.files)

    def listdir(self, path):
        kids = {f[len(path) + 1:].split("/")[0] for f in self.files
                if f.startswith(path + "/")}
        return sorted(kids) or None

    def run(self, *argv):
        return self.commands.get(argv, (127, ""))

    def stats(self):
        if isinstance(self._stats, Exception):
            raise self._stats
        return self._stats

    def cuda(self):
        if isinstance(self._cuda, Exception):
            raise self._cuda
        return self._cuda

    def memlock(self):
        return self._memlock

    def euid(self):
        return self._euid


LOADED = {f"/sys/module/{m}": "" for m in doctor.MODULES}
GOOD = dict(LOADED, **{"/dev/kgpu": "", "/proc/4242/cmdline":
                       "python3\0-m\0kgpu\0helper\0--backend\0cupy\0",
                       "/sys/kernel/iommu_groups/0/x": "",
                       "/proc/cmdline": "root=/dev/sda1 iommu=pt"})
STATS = {"helper_pid": 4242, "attaches": 1, "timeouts": 0,
         "services": [{"name": "xts-enc", "crossover": 16384}]}
TABLE = ("cr: 0 8192 gpu-crypt aes-xts-plain64 :64:logon:x 0 7:0 0\n"
         "r6: 0 507904 gpu-raid6 left-symmetric 1024 6 - - - - - -\n"
         "plain: 0 8 linear 7:0 0\n")
MODINFO = {("modinfo", "-n", "kgpu"):
           (0, "/lib/modules/6.12.118+deb12-amd64/updates/dkms/kgpu.ko\n"),
           ("dmsetup", "table"): (0, TABLE)}


def _says(text, *fragments):
    for f in fragments:
        assert f in text, (f, text)


def run(host):
    text, rc = doctor.report(doctor.diagnose(host, "/nowhere"))
    return text, rc


def test_a_good_gpu_host_exits_0_and_says_who_serves_what():
    text, rc = run(FakeHost(GOOD, MODINFO, STATS,
                            (12040, ["NVIDIA H100 80GB HBM3"])))
    assert rc == 0, text
    _says(text,
          "updates/dkms/kgpu.ko",
          "helper attached: pid 4242, backend cupy",
          "CUDA driver 12040: 1 GPU(s): NVIDIA H100 80GB HBM3",
          "IOMMU on (1 groups, passthrough)",
          "crossover xts-enc: 16384 bytes",
          "cr: gpu-crypt, served by helper pid 4242",
          "r6: gpu-raid6, served by helper pid 4242")
    assert "plain:" not in text
    assert text.endswith("0 problem(s), 0 warning(s)")


def test_no_modules_fails_with_the_install_fix():
    text, rc = run(FakeHost({}, {}, None, RuntimeError("no cupy")))
    assert rc == 1
    _says(text,
          "FAIL  no kgpu module built for this kernel",
          "fix: make install (DKMS builds it",
          "FAIL  module kgpu not loaded",
          "fix: modprobe kgpu",
          "warn  module dm_gpu_crypt not loaded",
          "fix: modprobe dm-gpu-crypt")
    # no GPU is a warning, not a failure: everything runs on the CPU
    assert "warn  no CUDA in this Python" in text


def test_no_helper_attached_fails_with_the_unit_to_start():
    stats = dict(STATS, helper_pid=0)
    text, rc = run(FakeHost(GOOD, MODINFO, stats, (12040, ["H100"])))
    assert rc == 1
    _says(text,
          "no helper attached",
          "fix: systemctl enable --now kgpu-helper",
          "served by the kernel's CPU (no helper)")


def test_a_stalled_helper_and_timeouts_are_reported():
    stats = dict(STATS, helper_stalled=1, timeouts=7, timeout_ms=5000)
    text, rc = run(FakeHost(GOOD, MODINFO, stats, (12040, ["H100"])))
    assert rc == 1
    assert "helper stalled" in text and "kill 4242" in text
    assert "warn  7 requests timed out (timeout 5000 ms)" in text


def test_statistics_unreadable_and_missing_dev_node():
    files = dict(GOOD)
    del files["/dev/kgpu"]
    text, rc = run(FakeHost(files, MODINFO, PermissionError("not root"),
                            (12040, ["H100"])))
    assert rc == 1
    _says(text,
          "/dev/kgpu missing while kgpu is loaded",
          "cannot read the module's statistics (not root)")


def test_low_memlock_for_a_user_is_a_warning():
    text, rc = run(FakeHost(GOOD, MODINFO, STATS, (12040, ["H100"]),
                            memlock=64 << 10, euid=1000))
    assert rc == 0
    _says(text,
          "warn  locked-memory limit 64 KiB",
          "LimitMEMLOCK")


def test_a_checkout_build_counts_when_nothing_is_installed(tmp_path):
    host = FakeHost(dict(GOOD, **{
        "/b/6.12.118+deb12-amd64/kgpu.ko": ""}), {
        ("dmsetup", "table"): (0, "")}, STATS, (1, ["H100"]))
    text, rc = doctor.report(doctor.diagnose(host, "/b"))
    assert rc == 0, text
    assert "modules for 6.12.118+deb12-amd64: /b/6.12.118+deb12-amd64/" \
           "kgpu.ko" in text
    assert "no gpu-crypt or gpu-raid6 mapping" in text


def test_units_under_systemd():
    sysd = dict(GOOD, **{"/run/systemd/system/x": ""})
    active = dict(MODINFO)
    active[("systemctl", "is-active", "kgpu-helper.service")] = (0, "active\n")
    active[("systemctl", "is-enabled", "kgpu-helper.service")] = (0, "enabled\n")
    text, rc = run(FakeHost(sysd, active, STATS, (12040, ["H100"])))
    assert "ok  kgpu-helper.service active (enabled)" in text, text
    failed = dict(MODINFO)
    failed[("systemctl", "is-active", "kgpu-helper.service")] = (3, "failed\n")
    failed[("systemctl", "is-enabled", "kgpu-helper.service")] = (0, "enabled\n")
    text, rc = run(FakeHost(sysd, failed, STATS, (12040, ["H100"])))
    assert "warn  kgpu-helper.service failed (enabled)" in text, text
    assert "fix: systemctl enable --now kgpu-helper" in text, text
    # no systemd here: no line about units
    text, rc = run(FakeHost(GOOD, MODINFO, STATS, (12040, ["H100"])))
    assert "kgpu-helper.service" not in text, text


def test_no_cupy_names_the_extra_for_this_driver():
    smi = dict(MODINFO)
    smi[("nvidia-smi",)] = (0, "| NVIDIA-SMI 580.159.04   Driver Version: "
                               "580.159.04   CUDA Version: 13.0     |\n")
    text, rc = run(FakeHost(GOOD, smi, STATS, RuntimeError("no cupy")))
    assert "fix: make install CUDA=cuda13, or pip install 'kgpu[cuda13]'" \
        in text, text
    # no driver: the generic advice
    text, rc = run(FakeHost(GOOD, MODINFO, STATS, RuntimeError("no cupy")))
    assert "on a host with an NVIDIA driver: make install" in text, text


def test_make_install_and_doctor_pick_the_extra_by_one_rule(tmp_path):
    """make install runs helper/cli/cudaextra.py with the system's Python
    (no kgpu installed yet); doctor imports it. A fake nvidia-smi on PATH
    gives the driver's CUDA major: older than 11 gets no extra, newer than
    13 gets cuda13."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "helper", "cli", "cudaextra.py")
    assert "$(PYTHON) helper/cli/cudaextra.py" in \
        open(os.path.join(root, "Makefile")).read()
    smi = tmp_path / "nvidia-smi"
    for out, want in [
            ("| Driver Version: 450.80   CUDA Version: 11.0 |", "cuda11"),
            ("| Driver Version: 550.54  CUDA Version: 12.4 |", "cuda12"),
            ("| CUDA Version: 13.0 |", "cuda13"),
            ("| CUDA Version: 14.1 |", "cuda13"),
            ("| Driver Version: 440.33   CUDA Version: 10.2 |", "none")]:
        smi.write_text(f"#!/bin/sh\necho '{out}'\n")
        smi.chmod(0o755)
        env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")
        p = subprocess.run([sys.executable, "-S", script], env=env,
                           capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.strip() == want, (out, p)
        host = dict(MODINFO)
        host[("nvidia-smi",)] = (0, out + "\n")
        assert (doctor.cuda_extra(FakeHost(GOOD, host)) or "none") == want
    smi.unlink()
    p = subprocess.run([sys.executable, "-S", script], capture_output=True,
                       text=True, env=dict(os.environ, PATH=str(tmp_path)))
    assert p.stdout.strip() == "none", p
