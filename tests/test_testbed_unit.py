"""Testbed pieces that need no VM: kernel discovery and fio's JSON."""

import json

import pytest

from kgpu_testbed.demo import fio
from kgpu_testbed.harness.kernels import Kernel, find_kernel, list_kernels


def test_kernel_series():
    assert Kernel("6.1.0-56-amd64", "/x").series == "6.1"
    assert Kernel("6.12.117+deb12-amd64", "/x").series == "6.12"


def test_no_kernels_is_a_clear_error(tmp_path):
    assert list_kernels(boot=str(tmp_path)) == []
    with pytest.raises(LookupError, match="make deps"):
        find_kernel("6.1", boot=str(tmp_path))


def test_series_does_not_match_prefix():
    kernels = list_kernels()
    if not any(k.series == "6.12" for k in kernels):
        pytest.skip("no 6.12 kernel installed")
    # "6.1" must never pick a 6.12 kernel.
    try:
        assert find_kernel("6.1").series == "6.1"
    except LookupError:
        pass
    assert find_kernel("6.12").series == "6.12"


def _job(name, rbw, wbw, err=0):
    def side(bw):
        return {"bw_bytes": bw, "iops": bw / 4096}
    return {"jobname": name, "error": err, "read": side(rbw),
            "write": side(wbw)}


def test_fio_parse_skips_leading_warnings():
    text = ("fio: some warning\n" +
            json.dumps({"jobs": [_job("a", 0, 50_000_000)]}))
    (rate,) = fio.parse(text)
    assert rate.job == "a"
    assert rate.write_mbps == pytest.approx(50.0)
    assert rate.read_mbps == 0
    assert rate.errors == 0


def test_fio_parse_rejects_garbage():
    with pytest.raises(ValueError):
        fio.parse("no json here")
    with pytest.raises(ValueError):
        fio.parse('{"jobs": []}')


# ivshmem devices, bundles, two guests at once: the parts without a VM.

def _testbed(tmp_path, **kw):
    import sys

    from kgpu_testbed import Testbed
    return Testbed(kernel=Kernel("6.12.0-test-amd64", "/nonexistent/vmlinuz"),
                   qemu=sys.executable, log=lambda m: None, **kw)


def _listening(path):
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def test_ivshmem_argv_one_device_per_socket(tmp_path):
    from kgpu_testbed.harness.vm import ivshmem_argv

    assert ivshmem_argv([]) == []
    assert ivshmem_argv(["/a/s0", "/b/s,1"]) == [
        "-chardev", "socket,path=/a/s0,id=ivs0",
        "-device", "ivshmem-doorbell,chardev=ivs0,vectors=1",
        "-chardev", "socket,path=/b/s,,1,id=ivs1",   # QEMU's comma escape
        "-device", "ivshmem-doorbell,chardev=ivs1,vectors=1"]


def test_testbed_qemu_argv_has_ivshmem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tb = _testbed(tmp_path, ivshmem=["s0", "s1"])
    argv = tb._qemu_argv("/i.cpio.gz", str(tmp_path), "run", str(tmp_path))
    i = argv.index("-chardev")
    assert argv[i:i + 4] == [
        "-chardev", f"socket,path={tmp_path}/s0,id=ivs0",   # made absolute
        "-device", "ivshmem-doorbell,chardev=ivs0,vectors=1"]
    assert argv.count("-chardev") == 2
    assert f"socket,path={tmp_path}/s1,id=ivs1" in argv
    # Today's mode: the host root, no cwd share, no -L.
    assert "local,id=hostroot,path=/,security_model=none,readonly=on," \
           "multidevs=remap" in argv
    assert not any("hostcwd" in a for a in argv)
    assert "-L" not in argv
    assert "kgpu.root=bundle" not in argv[argv.index("-append") + 1]
    assert _testbed(tmp_path)._qemu_argv("/i", "/r", "run").count(
        "-chardev") == 0


def test_missing_ivshmem_socket_is_a_clear_error(tmp_path):
    from kgpu_testbed import TestbedError

    tb = _testbed(tmp_path, ivshmem=[str(tmp_path / "nobody")])
    with pytest.raises(TestbedError, match=r"no ivshmem server at .*nobody: "
                       r"start 'kgpu helper --ivshmem .*nobody' first"):
        tb.run("true")          # before any QEMU (there is none here)
    (tmp_path / "plain").write_text("not a socket")
    tb = _testbed(tmp_path, ivshmem=[str(tmp_path / "plain")])
    with pytest.raises(TestbedError, match="no ivshmem server"):
        tb.shell()


def test_present_ivshmem_socket_passes(tmp_path):
    from kgpu_testbed.harness.vm import check_ivshmem

    with _listening(tmp_path / "ok.sock"):
        check_ivshmem([str(tmp_path / "ok.sock")])


def test_cli_ivshmem_missing_socket(tmp_path):
    from click.testing import CliRunner

    from kgpu_helper.cli.main import cli

    from kgpu_testbed.harness.vm import qemu_available

    if not list_kernels() or not qemu_available():
        pytest.skip("no guest kernel or no QEMU installed")
    r = CliRunner().invoke(cli, ["testbed", "run", "--ivshmem",
                                  str(tmp_path / "x.sock"), "true"])
    assert r.exit_code != 0
    assert "no ivshmem server at" in r.output
    assert "kgpu helper --ivshmem" in r.output


def test_guest_lock_nests_within_a_process(tmp_path, monkeypatch):
    import fcntl
    import os

    from kgpu_testbed.harness import vm

    lock = tmp_path / "lock"
    monkeypatch.setattr(vm, "LOCK_PATH", str(lock))

    def free():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with vm.guest_lock():
        with vm.guest_lock():       # a run inside: must not deadlock
            assert not free()
        assert not free()           # the outer hold is still on
    assert free()


def test_run_together_keeps_guests_apart(tmp_path, monkeypatch):
    from kgpu_testbed import TestbedError
    from kgpu_testbed.harness import vm

    monkeypatch.setattr(vm, "LOCK_PATH", str(tmp_path / "lock"))
    seen = []

    def fake_run(self, command, locked=False, echo=True, **kw):
        assert locked and not echo
        seen.append((self.memory_mb, self.cpus))
        if command == "fail":
            raise TestbedError("boom")
        return vm.RunResult(int(command), f"out {command}", 1.0,
                            {"f": command.encode()})

    monkeypatch.setattr(vm.Testbed, "run", fake_run)
    monkeypatch.setattr(vm.Testbed, "_initrd", lambda self: "/i")
    tb = _testbed(tmp_path, memory_mb=4096, cpus=4)
    a, b = vm.run_together([(tb, "3"), (tb, "5")])
    assert (a.rc, a.output, a.files) == (3, "out 3", {"f": b"3"})
    assert (b.rc, b.output, b.files) == (5, "out 5", {"f": b"5"})
    assert all(m == vm.TOGETHER_MEMORY_MB for m, _ in seen)
    assert tb.memory_mb == 4096          # the caller's testbed is untouched
    with pytest.raises(TestbedError, match="guest 2 of 2: boom"):
        vm.run_together([(tb, "0"), (tb, "fail")])


def test_bundle_unpack_rejects_foreign_archives(tmp_path, monkeypatch):
    import tarfile

    from kgpu_testbed.harness import bundle

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(bundle.BundleError, match="no bundle at"):
        bundle.unpack(str(tmp_path / "none.tar.gz"))
    (tmp_path / "evil").write_text("x")
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as t:
        t.add(tmp_path / "evil", arcname="../evil")
    with pytest.raises(bundle.BundleError, match="not a kgpu testbed bundle"):
        bundle.unpack(str(tmp_path / "evil.tar.gz"))
    (tmp_path / "junk.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(bundle.BundleError, match="cannot unpack"):
        bundle.unpack(str(tmp_path / "junk.tar.gz"))


def _fake_bundle(tmp_path):
    import json
    import tarfile

    top = tmp_path / "src" / "kgpu-testbed"
    (top / "qemu" / "bin").mkdir(parents=True)
    (top / "root").mkdir()
    (top / "manifest.json").write_text(json.dumps(
        {"format": 1, "release": "6.12.9-test-amd64"}))
    qemu = top / "qemu" / "bin" / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\n")
    qemu.chmod(0o755)
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(top, arcname="kgpu-testbed")
    return str(archive)


def test_bundle_testbed_argv(tmp_path, monkeypatch):
    from kgpu_testbed import Testbed, TestbedError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archive = _fake_bundle(tmp_path)
    tb = Testbed(bundle=archive, ivshmem=["/s"], log=lambda m: None)
    b = tb.bundle
    assert b.dir.startswith(str(tmp_path / "cache"))
    assert tb.kernel.release == "6.12.9-test-amd64"
    assert tb.qemu == b.qemu and tb.kernel.image == b.kernel_image
    assert tb.qemu_env["LD_LIBRARY_PATH"].startswith(b.dir)
    argv = tb._qemu_argv(b.initrd, "/r", "run", "/some,where")
    assert argv[0] == b.qemu
    assert argv[1:3] == ["-L", b.share]
    assert f"local,id=hostroot,path={b.root},security_model=none," \
           "readonly=on,multidevs=remap" in argv
    assert "local,id=hostcwd,path=/some,,where,security_model=none," \
           "readonly=on,multidevs=remap" in argv
    assert "kgpu.root=bundle" in argv[argv.index("-append") + 1]
    assert "ivshmem-doorbell,chardev=ivs0,vectors=1" in argv
    # Unpacked once: a second testbed finds it in the cache.
    assert Testbed(bundle=archive, log=lambda m: None).bundle.dir == b.dir
    with pytest.raises(TestbedError, match="has kernel 6.12.9-test-amd64, "
                       "not 6.1"):
        Testbed(bundle=archive, kernel="6.1", log=lambda m: None)
    assert Testbed(bundle=archive, kernel="6.12",
                   log=lambda m: None).kernel.release == "6.12.9-test-amd64"


def test_bundle_guest_script(tmp_path, monkeypatch):
    from kgpu_testbed import Testbed

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tb = Testbed(bundle=_fake_bundle(tmp_path), log=lambda m: None)
    run = tmp_path / "run"
    tb._write_script(str(run), "echo hi", "/w/k", None)
    script = (run / "cmd.sh").read_text()
    assert "export PATH=/usr/local/sbin:" in script
    assert "PYTHONPATH" not in script and "VIRTUAL_ENV" not in script
    assert "export KGPU_MODULES=/lib/modules/6.12.9-test-amd64/extra" in script
    assert (run / "cwd").read_text() == "/w/k"
