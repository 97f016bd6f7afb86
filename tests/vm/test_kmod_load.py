"""The core module loads, creates /dev/kgpu, answers its ABI ioctl and
unloads cleanly, repeatedly, on both testbed kernels (one boot each)."""

import pytest

from conftest import build_modules
from kgpu_helper.rings.abi import ABI_VERSION

pytestmark = pytest.mark.vm

GUEST = r"""
set -eu
ko={ko}
modprobe raid6_pq   # kgpu.ko's one dependency; insmod does not resolve it
for i in 1 2 3; do
    insmod $ko
    test -c /dev/kgpu || {{ echo "no /dev/kgpu after insmod"; exit 10; }}
    grep -qw kgpu /proc/modules
    rmmod kgpu
    test ! -e /dev/kgpu || {{ echo "/dev/kgpu left after rmmod"; exit 11; }}
done
insmod $ko
python3 - <<'EOF'
import fcntl, os, struct
fd = os.open("/dev/kgpu", os.O_RDWR)
# KGPU_IOC_VERSION = _IOR(0xb7, 0, struct kgpu_version{{u32 magic, abi}})
req = (2 << 30) | (8 << 16) | (0xb7 << 8) | 0
magic, abi = struct.unpack("<II", fcntl.ioctl(fd, req, bytes(8)))
print(f"ioctl: magic={{magic:#x}} abi={{abi}}")
assert magic == 0x6b677075 and abi == {abi}, (magic, abi)
try:
    fcntl.ioctl(fd, 0xdead, bytes(8))
except OSError as e:
    assert e.errno == 25, e   # ENOTTY for an unknown ioctl
else:
    raise AssertionError("unknown ioctl accepted")
os.close(fd)
EOF
rmmod kgpu
dmesg > $KGPU_OUT/dmesg.txt
echo kmod-ok
"""


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_load_unload(series):
    from kgpu_testbed import Testbed, TestbedError

    try:
        tb = Testbed(kernel=series, timeout=300)
    except TestbedError as e:
        pytest.skip(str(e))
    ko = f"{build_modules(tb.kernel)}/kgpu.ko"
    result = tb.run(GUEST.format(ko=ko, abi=ABI_VERSION))
    assert result.rc == 0, result.output
    assert "kmod-ok" in result.output
    dmesg = result.files["dmesg.txt"].decode()
    assert dmesg.count("kgpu: loaded") == 4
    assert dmesg.count("kgpu: unloaded") == 4
    for bad in ("BUG:", "Oops", "WARNING:", "Call Trace", "kmemleak"):
        assert bad not in dmesg, dmesg


REGION_GUEST = r"""
ko={ko}
modprobe raid6_pq
if insmod $ko region=ivshmem; then echo "region=ivshmem loaded without a device"; exit 10; fi
insmod $ko region=bogus && {{ echo "region=bogus accepted"; exit 11; }}
insmod $ko || exit 12
cat /sys/module/kgpu/parameters/region > $KGPU_OUT/region.txt
cp /sys/kernel/debug/kgpu/stats $KGPU_OUT/stats.txt
stat -c %a /sys/kernel/debug/kgpu/stats > $KGPU_OUT/mode.txt
rmmod kgpu || exit 13
dmesg > $KGPU_OUT/dmesg.txt
echo region-ok
"""


def test_region_param_without_ivshmem():
    """No ivshmem device: region=ivshmem refuses to load and says why,
    the default (auto) is vmalloc, and debugfs stats says so in text."""
    from kgpu_testbed import Testbed, TestbedError

    try:
        tb = Testbed(kernel="6.12", timeout=300)
    except TestbedError as e:
        pytest.skip(str(e))
    ko = f"{build_modules(tb.kernel)}/kgpu.ko"
    result = tb.run(REGION_GUEST.format(ko=ko))
    assert result.rc == 0, result.output
    assert "region-ok" in result.output
    dmesg = result.files["dmesg.txt"].decode()
    assert "region=ivshmem: no ivshmem device (PCI 1af4:1110)" in dmesg
    assert "invalid for parameter `region'" in dmesg
    assert f"kgpu: loaded, ABI {ABI_VERSION}: region vmalloc" in dmesg
    assert dmesg.count("kgpu: loaded") == 1
    assert result.files["region.txt"].decode().strip() == "vmalloc"
    assert result.files["mode.txt"].decode().strip() == "400"
    stats = result.files["stats.txt"].decode().splitlines()
    kv = dict(ln.split(": ", 1) for ln in stats if not ln.startswith("service "))
    assert kv["provider"] == "vmalloc"
    assert kv["helper_pid"] == "0"
    assert kv["ring_entries"] == "256"
    assert int(kv["data_size"]) == 64 << 20
    svcs = [ln.split(":")[0] for ln in stats if ln.startswith("service ")]
    assert svcs == ["service nop", "service xts-enc", "service xts-dec",
                    "service raid6-gen", "service raid6-rec",
                    "service raid6-pqd"]
    for bad in ("BUG:", "Oops", "WARNING:", "Call Trace"):
        assert bad not in dmesg, dmesg
