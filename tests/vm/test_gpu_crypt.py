"""gpu-crypt against stock dm-crypt, on Debian's 6.1 and 6.12 kernels.

One guest per kernel runs gpu_crypt_guest.sh: the interop matrix in both
directions (gpu-crypt writes, crypt reads, and the reverse) without and
with the helper, fio with crc32c verify without a helper, with one, and
with the helper killed (-9) and restarted mid-run, an ext4 written through
gpu-crypt and checked through crypt, bad table lines, the table line
against crypt's, a keyring key, key wipe / key set, LUKS1 / LUKS2 with
4096-byte sectors / LUKS2 with a keyring key taken over and released under
fio, and fstrim through allow_discards down to a sparse backing file. The
oracle is always stock dm-crypt (or fio's own verify, cryptsetup, the
backing file's allocation), never gpu-crypt itself.
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


LUKS = ["luks2-4k", "luks1", "luks2-keyring"]
LUKS_STEPS = ["takeover", "release", "fio", "status", "fsck", "close",
              "reopen"]


@pytest.mark.parametrize("step", LUKS_STEPS)
@pytest.mark.parametrize("case", LUKS)
def test_luks_matrix_taken_over_and_released_under_fio(guest, case, step):
    """LUKS2 with 4096-byte sectors, LUKS1, LUKS2 with its key in the
    keyring: taken over and released under fio verify; after release
    cryptsetup status shows the volume's own type and close works; stock
    crypt, opened afresh, reads what fio left."""
    _ok(guest[0], f"luks-{case}-{step}")


def test_luks_matrix_is_what_it_says(guest):
    files = guest[1]
    assert "sector_size:4096" in files["luks-luks2-4k-table.txt"]
    assert "sector_size" not in files["luks-luks1-table.txt"]
    assert "type:    LUKS1" in files["luks-luks1-status-released.txt"]
    # cryptsetup put the LUKS2 volume key in the keyring, not the table
    assert files["luks-keyring-key.txt"].strip() == ":64:logon"


def test_luks_keyring_takeover_without_key_file_says_what_to_give(guest):
    _ok(guest[0], "luks-keyring-nokey")
    assert "--key-file" in guest[1]["luks-keyring-nokey.txt"]


@pytest.mark.parametrize("case", LUKS)
def test_cryptsetup_status_while_taken_over_fails_quietly(guest, case):
    """cryptsetup knows only its own target: while gpu-crypt serves the
    volume, its status fails (rc 1) and prints nothing misleading."""
    taken = guest[1][f"luks-{case}-status-taken.txt"]
    assert taken.strip().splitlines()[-1] == "rc=1", taken
    assert "is active" not in taken, taken


def test_doctor_in_the_guest_sees_modules_helper_and_mapping(guest):
    """kgpu doctor on a host with the modules loaded, the helper attached
    and a LUKS1 volume taken over: nothing broken (exit 0), and it says
    who serves the mapping."""
    text = guest[1]["doctor.txt"]
    assert text.strip().splitlines()[-1] == "rc=0", text
    assert re.search(r"ok  helper attached: pid \d+, backend cpu", text), text
    assert re.search(r"ok  lv: gpu-crypt, served by helper pid \d+", text), \
        text
    assert "ok  module kgpu loaded" in text and "0 problem(s)" in text, text


def _trim(files):
    out = {}
    for line in files["trim.txt"].splitlines():
        name, *kv = line.split()
        out[name] = {k: int(v) for k, v in (x.split("=") for x in kv)}
    return out


def test_discards_reach_the_backing_file_with_allow_discards(guest):
    t = _trim(guest[1])["allow"]
    assert t["fstrim_rc"] == 0, t
    # 24 MiB written, deleted, trimmed: the sparse file gave most of it back
    assert t["full"] >= 24 * 1024 and t["after"] < t["full"] - 16 * 1024, t


def test_no_discards_without_allow_discards(guest):
    t = _trim(guest[1])["none"]
    assert t["fstrim_rc"] != 0, t
    # nothing given back (the journal may still grow it a little)
    assert t["after"] >= t["full"], t
    assert "not supported" in guest[1]["fstrim-none.txt"]


def test_no_kernel_complaints(guest):
    dmesg = guest[1]["dmesg.txt"]
    for bad in ("BUG:", "Oops", "WARNING:", "Call Trace", "hung_task"):
        assert bad not in dmesg, dmesg[-3000:]
