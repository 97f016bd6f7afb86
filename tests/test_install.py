"""What `make install` ships for a real host (issue 21), checked without a
VM: the units pass systemd-analyze verify, the udev rule's helper script
matches md's array UUID in blkid's and mdadm's spellings, the helper's
sd_notify reaches a systemd-style socket, DKMS's file names what the
Makefile builds, and `kgpu raid6 stop --scan` needs its config.
(tests/vm/test_systemd_boot.py installs and boots all of it.)"""

import os
import re
import shutil
import socket
import subprocess

import pytest
from click.testing import CliRunner

from kgpu_helper.serve.sdnotify import notify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMD = os.path.join(REPO, "helper", "systemd")
UNITS = ["kgpu-helper.service", "kgpu-raid6.service", "kgpu-crypt@.service"]


def _installed_units(tmp_path):
    """The units as make install writes them, ExecStart on a stub."""
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (sbin / "kgpu").write_text("#!/bin/sh\n")
    (sbin / "kgpu").chmod(0o755)
    for name in UNITS:
        text = open(os.path.join(SYSTEMD, name)).read()
        assert "@SBINDIR@" in text and "@DOCDIR@" in text, name
        text = text.replace("@SBINDIR@", str(sbin)).replace(
            "@DOCDIR@", "/usr/share/doc/kgpu")
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.skipif(not shutil.which("systemd-analyze"),
                    reason="systemd-analyze not installed")
def test_units_verify(tmp_path):
    d = _installed_units(tmp_path)
    shutil.copy(d / "kgpu-crypt@.service", d / "kgpu-crypt@data.service")
    # what systemd-cryptsetup-generator would make for "data"
    (d / "systemd-cryptsetup@data.service").write_text(
        "[Service]\nType=oneshot\nExecStart=/bin/true\n")
    names = ["kgpu-helper.service", "kgpu-raid6.service",
             "systemd-cryptsetup@data.service", "kgpu-crypt@data.service"]
    p = subprocess.run(["systemd-analyze", "verify"] + [str(d / n) for n in names],
                       capture_output=True, text=True)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


def _unit(name):
    keys = {}
    for line in open(os.path.join(SYSTEMD, name)):
        if "=" in line and not line.startswith("#"):
            k, _, v = line.strip().partition("=")
            keys.setdefault(k, []).append(v)
    return keys


def test_helper_unit_is_notify_restarting_and_hardened():
    u = _unit("kgpu-helper.service")
    assert u["Type"] == ["notify"] and u["Restart"] == ["always"]
    assert u["ExecStart"] == ["@SBINDIR@/kgpu helper"]
    for k in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert u[k] == ["yes"], k
    assert u["ProtectSystem"] == ["strict"]
    assert u["DevicePolicy"] == ["closed"]
    assert "/dev/kgpu rw" in u["DeviceAllow"]
    assert any("nvidia" in a for a in u["DeviceAllow"])


def test_crypt_unit_releases_before_cryptsetup_detaches():
    u = _unit("kgpu-crypt@.service")
    # stopped before systemd-cryptsetup@ (the reverse of After=)
    assert any("systemd-cryptsetup@%i.service" in a for a in u["After"])
    assert u["ExecStop"] == ["@SBINDIR@/kgpu crypt release %I"]
    assert u["ExecStart"] == ["@SBINDIR@/kgpu crypt takeover %I"]


def test_raid6_unit_before_local_fs_and_crypttab():
    u = _unit("kgpu-raid6.service")
    before = " ".join(u["Before"]).split()
    assert "local-fs-pre.target" in before and "cryptsetup-pre.target" in before
    assert u["DefaultDependencies"] == ["no"]
    assert u["ExecStop"] == ["@SBINDIR@/kgpu raid6 stop --scan"]


@pytest.fixture
def member(tmp_path):
    conf = tmp_path / "raid6.conf"
    conf.write_text("# arrays for gpu-raid6\n"
                    "ARRAY data UUID=c749f278:8a387146:b7514ee2:044bcc46\n"
                    "ARRAY other uuid=0123abcd:00000000:11111111:22222222 # x\n")

    def run(uuid):
        return subprocess.run(
            [os.path.join(SYSTEMD, "kgpu-raid6-member"), uuid],
            capture_output=True, text=True,
            env=dict(os.environ, KGPU_RAID6_CONF=str(conf)))
    return run


def test_udev_member_script_matches_blkid_and_mdadm_uuids(member):
    # blkid's ID_FS_UUID of an md member is the array UUID, dashed
    p = member("c749f278-8a38-7146-b751-4ee2044bcc46")
    assert p.returncode == 0 and p.stdout.strip() == "data", p
    p = member("0123ABCD:00000000:11111111:22222222")
    assert p.returncode == 0 and p.stdout.strip() == "other", p
    assert member("c749f278-8a38-7146-b751-4ee2044bcc47").returncode == 1
    assert member("").returncode == 1


def test_udev_rule_runs_before_md_assembly():
    rule = open(os.path.join(SYSTEMD, "63-kgpu-raid6.rules")).read()
    assert 'ENV{ID_FS_TYPE}="kgpu_raid6_member"' in rule
    assert "@LIBEXECDIR@/kgpu-raid6-member" in rule
    # udev runs rules files in name order: ours must come before md's
    # incremental assembly, wherever this mdadm installs it
    md = [f for d in ("/lib/udev/rules.d", "/usr/lib/udev/rules.d")
          if os.path.isdir(d) for f in os.listdir(d)
          if f.endswith("md-raid-assembly.rules")]
    if not md:
        pytest.skip("mdadm's udev rules are not installed")
    assert all("63-kgpu-raid6.rules" < f for f in md), md


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_reaches_the_socket(tmp_path, monkeypatch, abstract):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"kgpu-test-{os.getpid()}"
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        path = str(tmp_path / "notify")
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
    with s:
        assert notify(READY=1, STATUS="serving kernel on cpu")
        assert s.recv(4096) == b"READY=1\nSTATUS=serving kernel on cpu"


def test_sd_notify_outside_systemd_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(READY=1) is False


def test_dkms_conf_names_what_the_makefile_builds():
    conf = open(os.path.join(REPO, "kmod", "dkms.conf")).read()
    names = re.findall(r'BUILT_MODULE_NAME\[\d\]="([^"]+)"', conf)
    assert sorted(names) == ["dm-gpu-crypt", "dm-gpu-raid6", "kgpu"]
    assert 'PACKAGE_VERSION="@VERSION@"' in conf
    kbuild = open(os.path.join(REPO, "kmod", "Kbuild")).read() + open(
        os.path.join(REPO, "dm_targets", "Kbuild")).read()
    for n in names:
        assert f"obj-m += {n}.o" in kbuild, n
    assert 'KGPU_WERROR=' in conf


def test_raid6_stop_needs_its_config(tmp_path):
    from kgpu_helper.cli.main import cli
    r = CliRunner().invoke(cli, ["raid6", "stop", "--scan", "--config",
                                  str(tmp_path / "none.conf")])
    assert r.exit_code == 1 and "no " in r.output, r.output


def test_crypttab_lines():
    from kgpu_helper.cli.crypt import parse_crypttab
    tab = parse_crypttab(
        "# name device key options\n"
        "data /dev/mapper/r6 /etc/kgpu-test.key luks,discard\n"
        "home UUID=1234-abcd none luks\n"
        "swap /dev/sdb2 /dev/urandom swap,cipher=aes-xts-plain64,size=512\n"
        "bare /dev/sdc\n")
    assert tab["data"] == ("/dev/mapper/r6", "/etc/kgpu-test.key",
                           {"luks": "", "discard": ""})
    assert tab["home"][1] is None and tab["home"][0] == "UUID=1234-abcd"
    assert tab["swap"][2]["size"] == "512"
    assert tab["bare"] == ("/dev/sdc", None, {})


def test_takeover_without_key_or_crypttab_line_says_what_to_do(tmp_path):
    import click

    from kgpu_helper.cli.crypt import volume_key_from_crypttab
    tab = tmp_path / "crypttab"
    tab.write_text("other /dev/sdx /k luks\nhome /dev/sdy none luks\n")
    for name, why in (("data", "has no line for it"),
                      ("home", "has no key file")):
        with pytest.raises(click.ClickException) as e:
            volume_key_from_crypttab(name, 64, str(tab))
        assert why in e.value.message and "--key-file" in e.value.message


def test_raid6_stop_removes_the_configs_gpu_raid6_devices(tmp_path,
                                                          monkeypatch):
    import subprocess as sp

    from kgpu_helper.cli import raid6 as raid6_cli
    from kgpu_helper.cli.main import cli
    conf = tmp_path / "raid6.conf"
    conf.write_text("ARRAY a UUID=00000000:00000000:00000000:00000001\n"
                    "ARRAY b UUID=00000000:00000000:00000000:00000002\n"
                    "ARRAY c UUID=00000000:00000000:00000000:00000003\n")
    tables = {"a": "0 8 gpu-raid6 left-symmetric 128 6 ...\n",
              "b": "0 8 linear 7:0 0\n"}         # c: not open
    calls = []

    def run(argv):
        calls.append(argv)
        if argv[1] == "table":
            t = tables.get(argv[2])
            return sp.CompletedProcess(argv, 0 if t else 1, t or "", "")
        return sp.CompletedProcess(argv, 0, "", "")
    monkeypatch.setattr(raid6_cli, "_run", run)
    r = CliRunner().invoke(cli, ["raid6", "stop", "--scan", "--config",
                                 str(conf)])
    # a removed (with --retry), b left open (not ours), c passed over
    assert ["dmsetup", "remove", "--retry", "a"] in calls, calls
    assert not any(c[1] == "remove" and c[-1] != "a" for c in calls), calls
    assert "a (00000000:00000000:00000000:00000001): removed" in r.output
    assert "b is not a gpu-raid6 device" in r.output, r.output
    assert r.exit_code == 1, r.output
