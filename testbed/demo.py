"""The main job (``make demo``): a crypt device in the testbed, driven by fio.

Until the gpu-crypt and gpu-raid6 targets exist this builds a stock
dm-crypt (aes-xts-plain64) device over a loop device in tmpfs, writes it
with a fio verify job, reads it back with the verify, and reports the
throughput fio measured.
"""

import shlex

from kgpu_testbed import fio

GUEST_SCRIPT = r"""
set -eu
modprobe loop
modprobe dm-crypt
img=/tmp/demo.img
truncate -s {size_mb}M $img
loop=$(losetup --find --show $img)
key=$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')
sectors=$(blockdev --getsz $loop)
echo "0 $sectors crypt aes-xts-plain64 $key 0 $loop 0" | dmsetup create demo
dmsetup mknodes
echo "demo: $(dmsetup table demo | sed 's/ [0-9a-f]\{{64,\}} / <key> /')"
echo "demo: fio writes {size_mb} MiB (bs={bs}, iodepth={iodepth}, crc32c verify headers)"
fio --eta=never --name=write-verify --filename=/dev/mapper/demo --direct=1 \
    --ioengine=libaio --iodepth={iodepth} --bs={bs} --rw=write \
    --size={size_mb}M --verify=crc32c --do_verify=0 \
    --verify_state_save=0 --output-format=json --output=$KGPU_OUT/write.json
echo "demo: fio reads it back and verifies every block"
fio --eta=never --name=read-verify --filename=/dev/mapper/demo --direct=1 \
    --ioengine=libaio --iodepth={iodepth} --bs={bs} --rw=read \
    --size={size_mb}M --verify=crc32c --verify_fatal=1 \
    --verify_state_save=0 --output-format=json --output=$KGPU_OUT/read.json
dmsetup remove demo
losetup -d $loop
dmesg | grep -E 'BUG|Oops|WARNING|Call Trace' && exit 3
echo "demo: fio verify passed"
"""


def run_demo(testbed, size_mb=128, bs="128k", iodepth=16):
    """Run the job in ``testbed``; returns (write FioRates, read FioRates)."""
    script = GUEST_SCRIPT.format(size_mb=int(size_mb), bs=shlex.quote(bs),
                                 iodepth=int(iodepth))
    result = testbed.run(script).check()
    write = fio.parse(result.files["write.json"].decode())[0]
    read = fio.parse(result.files["read.json"].decode())[0]
    if write.errors or read.errors:
        raise RuntimeError(f"fio reported errors: write {write.errors}, "
                           f"read {read.errors}")
    return write, read
