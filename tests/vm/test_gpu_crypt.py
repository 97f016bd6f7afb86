"""gpu-crypt against stock dm-crypt, on Debian's 6.1 and 6.12 kernels.

One guest per kernel runs gpu_crypt_guest.sh: the interop matrix in both
directions (gpu-crypt writes, crypt reads, and the reverse) without and
with the helper, fio with crc32c verify without a helper, with one, and
with the helper killed (-9) and restarted mid-run, an ext4 written through
gpu-crypt and checked through crypt, bad table lines, the table line
against crypt's, a keyring key, and key wipe / key set. The oracle is
always stock dm-crypt (or fio's own verify), never gpu-crypt itself.
"""

import json
import os
import re

import pytest

from conftest import run_guest_script

pytestmark = pytest.mark.vm

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = ["plain64-512k", "plain64-256k-ivoff-devoff", "plain-ivwrap",
         "ss1024", "ss4096-large", "ss4096", "plain-ss1024-large"]
BAD = ["cipher", "keylen", "keyhex", "keyring", "keyringtype", "sectorsize",
       "optunknown", "optcount", "optjunk", "ivoffset", "ivoffsetjunk",
       "devsector", "nodev", "beyond", "lenmultiple", "fewargs"]


@pytest.fixture(scope="module", params=["6.1", "6.12"])
def guest(request):
    files = run_guest_script(request.param, f"{HERE}/gpu_crypt_guest.sh",
                             f"gpu-crypt-{request.param}", timeout=1200)
    results = {}
    for line in files.get("results", "").splitlines():
        verdict, _, rest = line.partition(" ")
        name, _, why = rest.partition(": ")
        results[name] = (verdict, why)
    return results, files


def _ok(results, name):
    assert name in results, f"{name} did not run"
    verdict, why = results[name]
    assert verdict == "ok", f"{name}: {why}"


@pytest.mark.parametrize("suffix", ["", "+helper"])
@pytest.mark.parametrize("case", CASES)
def test_interop_both_ways(guest, case, suffix):
    for way in ("gpu-crypt-to-crypt", "crypt-to-gpu-crypt"):
        _ok(guest[0], f"{case}{suffix}/{way}")


def _fio(files, name):
    doc = json.loads(files[f"fio-{name}.json"])
    for job in doc["jobs"]:
        assert job["error"] == 0, job
        io = job["write"]["io_bytes"] + job["read"]["io_bytes"]
        assert io > 0, job
    return doc


def test_bounce_path(guest):
    """Region data through bounce pages, as for device memory."""
    for way in ("gpu-crypt-to-crypt", "crypt-to-gpu-crypt"):
        _ok(guest[0], f"bounce-plain64+helper/{way}")
    _ok(guest[0], "fio-rand-bounce")
    _fio(guest[1], "rand-bounce")


@pytest.mark.parametrize("name", ["rand-nohelper", "seq-nohelper",
                                  "rand-helper", "seq-helper", "killed"])
def test_fio_verify(guest, name):
    results, files = guest
    check = {"killed": "fio-helper-killed"}.get(name, f"fio-{name}")
    _ok(results, check)
    _fio(files, name)


def _counters(text):
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", text)}


def test_who_did_the_work(guest):
    files = guest[1]
    none = _counters(files["status-nohelper.txt"])
    assert none["kernel"] > 0 and none["gpu"] == none["helper_cpu"] == 0
    helper = _counters(files["status-helper.txt"])
    assert helper["helper_cpu"] > 0, helper    # the cpu backend's answers
    killed = _counters(files["status-killed.txt"])
    # Served by the helper before the kill, by the kernel after it.
    assert killed["helper_cpu"] > helper["helper_cpu"], killed
    assert killed["kernel"] > 0, killed
    _ok(guest[0], "restarted")
    status = json.loads(files["kgpu-status.json"])
    xts = {s["name"]: s for s in status["services"]}
    assert xts["xts-enc"]["helper_cpu"] > 0 and xts["xts-dec"]["helper_cpu"] > 0


@pytest.mark.parametrize("name", BAD)
def test_bad_table_refused(guest, name):
    _ok(guest[0], f"bad/{name}")


@pytest.mark.parametrize("name", ["table", "keyring-table", "keyring-interop",
                                  "fsck", "fs-files", "rmmod-target",
                                  "open-short-key", "open-vs-cryptsetup"])
def test_control_and_fs(guest, name):
    _ok(guest[0], name)


@pytest.mark.parametrize("name", ["key-wipe-live", "key-wipe", "resume-wiped",
                                  "key-set-size", "key-set",
                                  "resume-after-set", "key-set-data"])
def test_key_messages(guest, name):
    _ok(guest[0], name)


@pytest.mark.parametrize("name", ["takeover", "release",
                                  "fio-across-takeover", "luks-fsck",
                                  "takeover-refused"])
def test_luks2_takeover_and_release(guest, name):
    _ok(guest[0], name)
    if name == "fio-across-takeover":
        _fio(guest[1], "takeover")


def test_no_kernel_complaints(guest):
    dmesg = guest[1]["dmesg.txt"]
    for bad in ("BUG:", "Oops", "WARNING:", "Call Trace", "hung_task"):
        assert bad not in dmesg, dmesg[-3000:]
