"""Guests served by their host's helper through ivshmem (issue 13).

The host runs ``kgpu helper --ivshmem SOCKET --backend cpu`` (no GPU
here; the GPU run is in the closing note); each guest gets QEMU's
ivshmem-doorbell device on that socket and loads kgpu.ko with its
default ``region=auto``, which takes the device's BAR2 as its region.

- one guest per kernel (6.1, 6.12): attach at load, the self-test served
  by the host helper, gpu-crypt under fio verify (every XTS request by
  the helper, the device read back through stock dm-crypt), then the
  host helper killed with SIGKILL in the middle of a second fio verify:
  zero verify errors through the guest's fallback, and a helper started
  again on the host is picked up (a second attach) and serves the third
  fio run;
- two guests at once on one helper process (6.12), each with its own
  socket and memory, both under fio verify;
- a hostile guest (tests/vm/ivshmem_rogue.py: garbage SQEs, wild ring
  indexes, lying headers) next to a well-behaved one on the same helper:
  the helper survives and the good guest's fio verify is clean.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import build_modules

pytestmark = pytest.mark.vm

HERE = os.path.dirname(os.path.abspath(__file__))

GUEST_LIB = r"""
set -u
O=$KGPU_OUT
M={mods}
ST=/sys/kernel/debug/kgpu/stats
modprobe dm-mod
modprobe dm-crypt
modprobe raid6_pq
modprobe loop
insmod $M/kgpu.ko timeout_ms={timeout_ms} || exit 1
insmod $M/dm-gpu-crypt.ko || exit 1
stat() {{ awk -v k="$1" '$1 == k":" {{print $2}}' $ST; }}
svc() {{  # svc <service> <field>
    awk -v s="$1" -v f="$2" '$1 == "service" && $2 == s":" {{
        for (i = 3; i < NF; i += 2) if ($i == f) print $(i + 1) }}' $ST; }}
wait_attaches() {{  # wait_attaches <n>: until n helpers attached, 120 s
    for i in $(seq 600); do
        [ "$(stat attaches)" -ge "$1" ] && [ "$(stat helper_pid)" -gt 0 ] \
            && return 0
        sleep 0.2
    done
    echo "no helper attached (wanted $1 attaches)"; cat $ST; return 1
}}
KEY=$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')
crypt_dev() {{  # crypt_dev <name> <MiB>: gpu-crypt over a loop device
    truncate -s $2M /tmp/$1.img
    L=$(losetup -f --show /tmp/$1.img)
    echo "0 $(($2 * 2048)) gpu-crypt aes-xts-plain64 $KEY 0 $L 0" |
        dmsetup create $1
    dmsetup mknodes
    [ -b /dev/mapper/$1 ] || {{ echo "no /dev/mapper/$1"; exit 1; }}
    echo $L > /tmp/$1.loop
}}
fio_verify() {{  # fio_verify <dev> <MiB> <out.json>
    fio --name=v --filename=$1 --rw=randwrite --bs=64k --size=$2M \
        --ioengine=psync --direct=1 --verify=crc32c --do_verify=1 \
        --verify_fatal=0 --output-format=json --output=$3
    echo "fio rc=$?" >> $O/fio-rc.txt
}}
"""

GUEST_MAIN = GUEST_LIB + r"""
wait_attaches 1 || exit 1
cat /sys/module/kgpu/parameters/region > $O/region.txt
dmesg | grep -i kgpu > $O/dmesg-load.txt
echo 8 > /sys/kernel/debug/kgpu/selftest
cat /sys/kernel/debug/kgpu/selftest > $O/selftest.txt
crypt_dev g 48
cp $ST $O/stats-0.txt
fio_verify /dev/mapper/g 16 $O/fio-1.json
cp $ST $O/stats-1.txt
# The host kills its helper 2 s after this line, and starts a new one
# 4 s later; the fio run below must not see an error meanwhile.
echo "KGPU-KILL-HELPER-NOW"
fio_verify /dev/mapper/g 40 $O/fio-2.json
cp $ST $O/stats-2.txt
wait_attaches 2 || exit 1
cp $ST $O/stats-3.txt
fio_verify /dev/mapper/g 16 $O/fio-3.json
cp $ST $O/stats-4.txt
# stock dm-crypt reads what gpu-crypt wrote
sha256sum < /dev/mapper/g > $O/sum-gpu.txt
L=$(cat /tmp/g.loop)
dmsetup remove g
echo "0 $((48 * 2048)) crypt aes-xts-plain64 $KEY 0 $L 0" | dmsetup create s
dmsetup mknodes
sha256sum < /dev/mapper/s > $O/sum-stock.txt
dmsetup remove s
rmmod dm_gpu_crypt
rmmod kgpu
dmesg | grep -iE "kgpu|BUG|WARNING|Oops" > $O/dmesg.txt
"""

GUEST_PAIR = GUEST_LIB + r"""
wait_attaches 1 || exit 1
crypt_dev g 24
fio_verify /dev/mapper/g 24 $O/fio.json
cp $ST $O/stats.txt
dmsetup remove g
rmmod dm_gpu_crypt
rmmod kgpu
"""

GUEST_ROGUE = r"""
sleep 3
timeout -s KILL 120 python3 {rogue} 25 > $KGPU_OUT/rogue.txt 2>&1
echo "rc=$?" >> $KGPU_OUT/rogue.txt
"""


class HostHelper:
    """``kgpu helper --ivshmem`` on this host, as a user starts it."""

    def __init__(self, sockets, tmp, name="helper"):
        self.sockets = list(sockets)
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.proc = None
        self.logs = []

    def start(self):
        argv = [sys.executable, "-m", "kgpu_helper.cli", "helper",
                "--backend", "cpu", "--crossover", "0", "--spin-us", "0"]
        for s in self.sockets:
            argv += ["--ivshmem", s]
        path = f"{self.log_path}.{len(self.logs)}"
        self.logs.append(path)
        with open(path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not all(os.path.exists(s) for s in self.sockets):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"helper did not start:\n{self.log()}")
            time.sleep(0.1)
        return self

    def kill(self, sig=signal.SIGKILL):
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        out = []
        for p in self.logs:
            with open(p) as f:
                out.append(f.read())
        return "\n".join(out)

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None


def _stop_servers(sockets):
    """The ivshmem servers outlive helpers by design; the tests end them."""
    for s in sockets:
        try:
            with open(s + ".lock") as f:
                pid = int(f.read().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass  # none left, or it already went


def _stats(text):
    out, svc = {}, {}
    for line in text.splitlines():
        m = re.match(r"service (\S+): (.*)", line)
        if m:
            f = m.group(2).split()
            svc[m.group(1)] = {f[i]: int(f[i + 1]) for i in range(0, len(f), 2)}
        elif ": " in line:
            k, v = line.split(": ", 1)
            out[k] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    out["svc"] = svc
    return out


def _fio_errors(text):
    from kgpu_testbed.demo import fio
    job = fio.parse(text)[0]
    return job.errors, job.write.io_bytes, job.read.io_bytes


def _testbed(kernel, ivshmem):
    from kgpu_testbed import Testbed, TestbedError
    try:
        return Testbed(kernel=kernel, timeout=900, ivshmem=ivshmem)
    except TestbedError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module", params=["6.1", "6.12"])
def main_run(request, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp(f"ivs-{request.param}"))
    sock = os.path.join(tmp, "guest.sock")
    helper = HostHelper([sock], tmp).start()
    events = {}

    def on_line(line):
        if "KGPU-KILL-HELPER-NOW" in line and "kill" not in events:
            events["kill"] = threading.Thread(target=kill_and_restart)
            events["kill"].start()

    def kill_and_restart():
        time.sleep(2)
        events["killed_rc"] = helper.kill()
        events["server_after_kill"] = os.path.exists(sock)
        time.sleep(4)
        helper.start()

    try:
        tb = _testbed(request.param, [sock])
        mods = build_modules(tb.kernel)
        r = tb.run(GUEST_MAIN.format(mods=mods, timeout_ms=2000),
                   echo=False, on_line=on_line)
        if "kill" in events:
            events["kill"].join()
        alive = helper.alive()
    finally:
        helper.stop()
        _stop_servers([sock])
    files = {k: v.decode(errors="replace") for k, v in r.files.items()}
    return r, files, events, alive, helper.log()


def test_region_is_the_ivshmem_bar(main_run):
    r, files, *_ = main_run
    assert r.rc == 0, r.output[-3000:]
    assert files["region.txt"].strip() == "ivshmem"
    assert "attached (ivshmem)" in files["dmesg-load.txt"]


def test_selftest_served_by_host_helper(main_run):
    _, files, *_ = main_run
    st = files["selftest.txt"]
    assert "PASS" in st, st
    m = re.search(r"helper (\d+), fallback (\d+)", st)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) == 0, st


def test_gpu_crypt_fio_verify_served_by_host(main_run):
    _, files, *_ = main_run
    err, wrote, read = _fio_errors(files["fio-1.json"])
    assert err == 0 and wrote == 16 << 20 and read == 16 << 20
    s0, s1 = _stats(files["stats-0.txt"]), _stats(files["stats-1.txt"])
    for svc in ("xts-enc", "xts-dec"):
        served = (s1["svc"][svc]["helper_cpu"] + s1["svc"][svc]["gpu"]
                  - s0["svc"][svc]["helper_cpu"] - s0["svc"][svc]["gpu"])
        assert served > 0, (svc, s1)
        assert s1["svc"][svc]["fallback"] == s0["svc"][svc]["fallback"]
    assert s1["provider"] == "ivshmem"


def test_helper_killed_mid_fio_loses_nothing(main_run):
    _, files, events, _, log = main_run
    assert events.get("killed_rc") == -signal.SIGKILL, log
    assert events["server_after_kill"], "the ivshmem server went with it"
    err, wrote, read = _fio_errors(files["fio-2.json"])
    assert err == 0 and wrote == 40 << 20 and read == 40 << 20
    s2 = _stats(files["stats-2.txt"])
    # the kill showed: requests timed out into the guest's CPU
    assert s2["timeouts"] > 0 or sum(
        v["fallback"] for v in s2["svc"].values()) > 0, s2


def test_restarted_helper_is_picked_up(main_run):
    _, files, _, alive, log = main_run
    assert alive, log
    s3, s4 = _stats(files["stats-3.txt"]), _stats(files["stats-4.txt"])
    assert s3["attaches"] >= 2
    err, wrote, read = _fio_errors(files["fio-3.json"])
    assert err == 0 and read == 16 << 20
    served = sum(s4["svc"][s]["helper_cpu"] - s3["svc"][s]["helper_cpu"]
                 for s in ("xts-enc", "xts-dec"))
    assert served > 0, (s3, s4)
    assert "fio rc=0\nfio rc=0\nfio rc=0" in files["fio-rc.txt"]


def test_stock_dm_crypt_reads_what_gpu_crypt_wrote(main_run):
    r, files, *_ = main_run
    assert files["sum-gpu.txt"] == files["sum-stock.txt"]
    assert not re.search(r"BUG|WARNING|Oops", files["dmesg.txt"]), \
        files["dmesg.txt"]


def _together(tmp, second_cmd):
    from kgpu_testbed.harness.vm import run_together
    socks = [os.path.join(tmp, f"g{i}.sock") for i in (1, 2)]
    helper = HostHelper(socks, tmp).start()
    try:
        tbs = [_testbed("6.12", [s]) for s in socks]
        mods = build_modules(tbs[0].kernel)
        first = GUEST_PAIR.format(mods=mods, timeout_ms=5000)
        second = second_cmd.format(mods=mods, timeout_ms=5000,
                                   rogue=os.path.join(HERE,
                                                      "ivshmem_rogue.py"))
        results = run_together([(tbs[0], first), (tbs[1], second)])
        alive = helper.alive()
    finally:
        helper.stop()
        _stop_servers(socks)
    files = [{k: v.decode(errors="replace") for k, v in r.files.items()}
             for r in results]
    return results, files, alive, helper.log()


def test_two_guests_one_helper(tmp_path):
    results, files, alive, log = _together(str(tmp_path), GUEST_PAIR)
    assert alive, log
    pids = set()
    for r, f in zip(results, files):
        assert r.rc == 0, r.output[-3000:]
        err, wrote, read = _fio_errors(f["fio.json"])
        assert err == 0 and wrote == 24 << 20 and read == 24 << 20
        st = _stats(f["stats.txt"])
        assert st["svc"]["xts-enc"]["helper_cpu"] > 0, st
        assert st["svc"]["xts-dec"]["helper_cpu"] > 0, st
        pids.add(st["helper_pid"])
    assert len(pids) == 1, "one helper process served both guests"


def test_hostile_guest_does_not_disturb_the_other(tmp_path):
    results, files, alive, log = _together(str(tmp_path), GUEST_ROGUE)
    good, rogue = files
    assert alive, "the helper died of the hostile guest:\n" + log
    assert results[0].rc == 0, results[0].output[-3000:]
    err, wrote, read = _fio_errors(good["fio.json"])
    assert err == 0 and read == 24 << 20
    st = _stats(good["stats.txt"])
    assert st["svc"]["xts-dec"]["helper_cpu"] > 0, st
    assert st["bad_completions"] == 0, st
    m = re.search(r"garbage_sqes=(\d+) wild_tails=(\d+)", rogue["rogue.txt"])
    assert m and int(m.group(1)) > 100 and int(m.group(2)) > 10, \
        rogue["rogue.txt"]
    assert "rc=0" in rogue["rogue.txt"]
