"""kgpu on a host that boots with systemd (issue 21), on 6.1 and 6.12.

Three boots per kernel on the same disks: an upper layer for the guest's
root (an ext4 image: what one boot installs or writes is there at the
next) and six member disks.

- Setup (the ordinary testbed init): ``make install`` as a user runs it
  (the modules through DKMS for this kernel, the helper's virtual
  environment, the units and the udev rule), an md RAID6 made by mdadm
  listed in /etc/kgpu/raid6.conf, LUKS2 on it in /etc/crypttab, ext4 on
  that in /etc/fstab, the units enabled.
- Boot 1, systemd as PID 1: the array came up as gpu-raid6 (md kept
  off), the LUKS2 volume as gpu-crypt, the file system mounted, the helper
  active; the helper killed with SIGKILL under fio verify is restarted by
  systemd within seconds, with 0 verify errors; data written and
  checksummed; then a clean power-off.
- Boot 2: all of it the same again, the data intact, and the journal of
  boot 1's shutdown free of failed units and cryptsetup errors.
"""

import json
import os
import re
import subprocess

import pytest

from conftest import REPO, guest_results, keep_artifacts

pytestmark = pytest.mark.vm

HERE = os.path.dirname(os.path.abspath(__file__))
MEMBERS = 6
MEMBER_MB = 48
UPPER_MB = 3072


def _boot(tb, command, label):
    r = tb.run(command, cwd=REPO, echo=False)
    keep_artifacts(label, r.files)
    files = {k: v.decode(errors="replace") for k, v in r.files.items()}
    print(f"{label}: {r.seconds:.0f} s")
    assert r.rc == 0, (files.get("results"), r.output[-4000:])
    return guest_results(files), files


@pytest.fixture(scope="module", params=["6.1", "6.12"])
def boots(request, tmp_path_factory):
    from kgpu_testbed import Testbed, TestbedError

    k = request.param
    d = tmp_path_factory.mktemp(f"systemd-{k}")
    upper = d / "upper.img"
    with open(upper, "wb") as f:
        f.truncate(UPPER_MB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(upper)], check=True)
    disks = []
    for i in range(MEMBERS):
        p = d / f"member{i}.img"
        with open(p, "wb") as f:
            f.truncate(MEMBER_MB << 20)
        disks.append(str(p))
    try:
        setup = Testbed(kernel=k, upper_disk=str(upper), disks=disks,
                        timeout=1500)
        sysd = Testbed(kernel=k, upper_disk=str(upper), disks=disks,
                       init="systemd", timeout=900, boot_timeout=400)
    except TestbedError as e:
        pytest.skip(str(e))
    out = {"setup": _boot(setup, "bash tests/vm/systemd_setup_guest.sh",
                          f"systemd-{k}-setup")}
    for n in (1, 2):
        out[n] = _boot(sysd, f"bash tests/vm/systemd_boot_guest.sh {n}",
                       f"systemd-{k}-boot{n}")
    return out


def _kv(text):
    return dict(w.split("=", 1) for w in text.split() if "=" in w)


def test_make_install_builds_through_dkms(boots):
    res, files = boots["setup"]
    assert res.get("setup") == "done", res
    assert re.search(r"kgpu/\S+, \S+, x86_64: installed", files["dkms-status.txt"]), \
        files["dkms-status.txt"]
    paths = files["modinfo.txt"].split()
    assert len(paths) == 3 and all("/updates/dkms/" in p for p in paths), paths


def test_dmsetup_create_loads_the_target_module(boots):
    res = boots["setup"][0]
    assert res["before-create"] == "loaded=", res
    # gpu-crypt's table loaded dm-gpu-crypt, and kgpu with it
    assert res["after-crypt"] == "loaded=kgpu,dm_gpu_crypt,", res
    assert res["after-raid6"] == "loaded=kgpu,dm_gpu_crypt,dm_gpu_raid6,", res


@pytest.mark.parametrize("n", [1, 2])
def test_stack_comes_up_at_boot(boots, n):
    res, files = boots[n]
    assert res.get("done") is not None, res
    units = _kv(res["units"])
    assert units == {"helper": "active", "raid6": "active", "crypt": "active",
                     "cryptsetup": "active"}, (units, files.get(f"status-{n}.txt"))
    assert _kv(res["targets"]) == {"r6": "gpu-raid6", "data": "gpu-crypt"}, res
    assert res["mount"] == "/dev/mapper/data,ext4", res
    # md did not take the members: our udev rule renamed their type
    md = _kv(res["md"])
    assert md == {"arrays": "0", "member_fs_type": "kgpu_raid6_member"}, md
    assert res["failed"].strip(",") == "", res["failed"]
    # a clean shutdown before: the array opened clean, no resync
    assert res["resync"] == "0", files[f"dmesg-{n}.txt"][-3000:]
    j = files[f"journal-{n}.txt"]
    # Type=notify: started once the helper said READY=1, after "serving"
    serving = j.index("INFO: serving")
    assert j.index("Started kgpu-helper.service", serving) > serving, j
    assert "data: now served by gpu-crypt" in j, j


def test_killed_helper_restarted_under_fio_verify(boots):
    res, files = boots[1]
    fio = _kv(res["fio"])
    assert fio["rc"] == "0", fio
    # systemd starts it again after RestartSec=1s; it is ready once
    # Python has started, attached and sent its crossovers (seconds
    # under TCG)
    assert fio["restart_ms"] != "none" and int(fio["restart_ms"]) < 5000, fio
    assert fio["ready_ms"] != "none" and int(fio["ready_ms"]) < 60000, fio
    assert int(fio["restarts"]) >= 1 and fio["new"] != fio["killed"], fio
    job = json.loads(files["fio.json"])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 16 << 20, job
    # the restarted helper attached again
    st = json.loads(files["kgpu-status.json"])
    assert st["helper_pid"] == int(fio["new"]), st


def test_data_intact_after_reboot(boots):
    res, files = boots[2]
    assert _kv(res["sha"]) == {"rc": "0"}, files["sha.txt"]
    assert "blob: OK" in files["sha.txt"]
    assert _kv(res["reread"]) == {"rc": "0"}, files.get("fio-reread.json")
    job = json.loads(files["fio-reread.json"])["jobs"][0]
    assert job["error"] == 0, job


def test_shutdown_journal_clean(boots):
    res, files = boots[2]
    whole = files["journal-prev.txt"]
    assert int(_kv(res["prevboot"])["lines"]) > 100, whole[-2000:]
    # boot 1's shutdown: from its command's end on (the helper killed on
    # purpose before it is not the shutdown's business)
    start = whole.find("command done, powering off")
    assert start >= 0, whole[-3000:]
    j = whole[start:]
    # the shutdown happened and went through our units in order
    assert "data: now served by dm-crypt" in j, j[-4000:]
    assert re.search(r"r6 \(\S+\): removed", j), j[-4000:]
    release = j.index("data: now served by dm-crypt")
    detach = [m.start() for m in re.finditer(
        r"systemd-cryptsetup@data\.service: Deactivated|Stopped "
        r"systemd-cryptsetup@data|Stopped .*Cryptography Setup for data", j)]
    assert detach and detach[-1] > release, j[-4000:]
    failed = [ln for ln in j.splitlines()
              if re.search(r"Failed with result|entered failed state|"
                           r"Failed to start|failed with error", ln)]
    assert not failed, failed
    crypt_err = [ln for ln in j.splitlines() if "cryptsetup" in ln and
                 re.search(r"error|fail|cannot|unknown", ln, re.I)]
    assert not crypt_err, crypt_err
