"""kgpu testbed bundle, and guests booted from one with the host's QEMU,
its ROMs and its TCG module hidden (a mount namespace), as on a GPU host
without QEMU: the guest root is the bundle's (no Python in it) and has
the tools the guest tests use; kgpu.ko loads from it; --ivshmem gives the
guest its device (served here by a minimal stand-in server)."""

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, build_modules

pytestmark = pytest.mark.vm

# What a host without QEMU lacks, hidden from the guest's QEMU.
HIDE = ["/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe",
        "/usr/lib/x86_64-linux-gnu/qemu"]

GUEST = r"""
set -eu
test -e Makefile                  # the caller's folder, at its own path
test ! -e /usr/bin/python3        # the bundle's root, not the host's
fio --version
dmsetup version | grep -q 'Driver version'
cryptsetup --version
mdadm --version
mkfs.ext4 -V 2>&1 | head -n 1
e2fsck -V 2>&1 | head -n 1
echo abc | sha256sum
insmod "$KGPU_MODULES/kgpu.ko" 2>/dev/null || modprobe kgpu
grep -qw kgpu /proc/modules
ls /sys/kernel/debug/kgpu 2>/dev/null || echo "no kgpu debugfs (yet)"
modprobe dm_crypt; modprobe raid456; modprobe loop
# The ivshmem-doorbell device (Red Hat 1af4:1110) from --ivshmem.
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor):$(cat $d/device)" = 0x1af4:0x1110 ]; then
        echo "ivshmem at ${d##*/}"
    fi
done
echo bundle-ok > "$KGPU_OUT/ok"
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from kgpu_testbed.harness import bundle as bundle_mod
    from kgpu_testbed.harness.kernels import find_kernel

    try:
        kernel = find_kernel("6.12")
    except LookupError as e:
        pytest.skip(str(e))
    modules = build_modules(kernel)
    out = str(tmp_path_factory.mktemp("bundle") / "kgpu-testbed.tar.gz")
    start = time.monotonic()
    summary = bundle_mod.build(kernel, modules, out, log=print)
    print(f"bundle: {summary['archive_bytes'] / 1e6:.1f} MB in "
          f"{time.monotonic() - start:.1f} s")
    return out, summary


def _fake_ivshmem_server(path, size=1 << 20):
    """Serve one QEMU the way QEMU's ivshmem server does: protocol
    version, its id (1), the shared memory, its own vector's eventfd."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        mem = os.memfd_create("kgpu-test-ivshmem")
        os.ftruncate(mem, size)
        ev = os.eventfd(0)
        conn.sendall(struct.pack("<q", 0) + struct.pack("<q", 1))
        socket.send_fds(conn, [struct.pack("<q", -1)], [mem])
        socket.send_fds(conn, [struct.pack("<q", 1)], [ev])
        conn.recv(1)            # until QEMU goes
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_bundle_is_small_and_reproducible(bundle, tmp_path):
    from kgpu_testbed.harness import bundle as bundle_mod
    from kgpu_testbed.harness.kernels import find_kernel

    out, summary = bundle
    assert summary["archive_bytes"] < 55e6
    names = set(bundle_mod.listing(out))
    for want in ["qemu/bin/qemu-system-x86_64", "qemu/modules/accel-tcg-"
                 "x86_64.so", "qemu/share/bios-256k.bin", "boot/vmlinuz",
                 "boot/initrd.cpio.gz", "root/usr/bin/fio",
                 "root/usr/sbin/cryptsetup", "root/usr/lib/x86_64-linux-gnu/"
                 "libc.so.6", "manifest.json"]:
        assert f"kgpu-testbed/{want}" in names, want
    qlibs = [n for n in names if n.startswith("kgpu-testbed/qemu/lib/")]
    assert qlibs and not any("/libc.so" in n or "ld-linux" in n
                             for n in qlibs)
    again = str(tmp_path / "again.tar.gz")
    kernel = find_kernel("6.12")
    bundle_mod.build(kernel, build_modules(kernel), again, log=print)
    with open(out, "rb") as f1, open(again, "rb") as f2:
        assert f1.read() == f2.read(), "two builds differ"


def test_guest_from_bundle(bundle, tmp_path):
    out, _ = bundle
    sock = str(tmp_path / "ivshmem.sock")
    srv = _fake_ivshmem_server(sock)
    cmd = [sys.executable, "-m", "kgpu_helper.cli", "testbed", "run",
           "--bundle", out, "--ivshmem", sock, "--timeout", "300",
           "--", GUEST]
    hidden = os.geteuid() == 0 and shutil.which("unshare")
    if hidden:
        mounts = ["mount --bind /dev/null /usr/bin/qemu-system-x86_64"] + [
            f"mount -t tmpfs none {d}" for d in HIDE if os.path.isdir(d)]
        cmd = ["unshare", "-m", "sh", "-c",
               " && ".join(mounts) + ' && exec "$@"', "sh"] + cmd
    start = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    finally:
        srv.close()
    print(f"boot from the bundle and run: {time.monotonic() - start:.1f} s "
          f"(host QEMU hidden: {bool(hidden)})\n{p.stdout[-3000:]}\n"
          f"{p.stderr[-3000:]}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for tool in ("fio-3", "cryptsetup 2", "mdadm - v4", "mke2fs 1",
                 "e2fsck 1", "ivshmem at 0000:"):
        assert tool in p.stdout, tool
    assert "Could not" not in p.stdout + p.stderr
