"""A hostile guest for the host helper, run as root inside a testbed guest
that has an ivshmem-doorbell device and no kgpu.ko loaded.

It maps the device's BAR2 (the region the host helper serves) and BAR0
(the doorbell) through sysfs, lays out a valid-looking region, attaches
like kgpu.ko does (guest_state READY, guest_token = the helper's token),
and then, for the given number of seconds, writes garbage: random SQEs,
wild ring indexes, header values that lie, tokens that flip, and rings
the doorbell again and again. It prints one summary line; the test checks
on the host that the helper lived through it and that the other guest,
served by the same helper at the same time, saw nothing of it.

    python3 ivshmem_rogue.py SECONDS
"""

import glob
import mmap
import os
import random
import struct
import sys
import time

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.rings.ringdriver import layout, write_header

PAGE = 4096


def find_device():
    for d in sorted(glob.glob("/sys/bus/pci/devices/*")):
        with open(f"{d}/vendor") as v, open(f"{d}/device") as p:
            if (int(v.read(), 16), int(p.read(), 16)) == (
                    abi.IVSHMEM_VENDOR, abi.IVSHMEM_DEVICE):
                return d
    sys.exit("rogue: no ivshmem device in this guest")


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    dev = find_device()
    with open(f"{dev}/enable", "w") as f:   # memory decoding on
        f.write("1")
    fd2 = os.open(f"{dev}/resource2", os.O_RDWR | os.O_SYNC)
    size = os.fstat(fd2).st_size
    bar2 = mmap.mmap(fd2, size)
    fd0 = os.open(f"{dev}/resource0", os.O_RDWR | os.O_SYNC)
    bar0 = mmap.mmap(fd0, os.fstat(fd0).st_size)  # 256 bytes of registers
    mem = np.frombuffer(bar2, dtype=np.uint8)
    link = mem[abi.LINK_OFF:abi.LINK_OFF + abi.LINK.itemsize].view(abi.LINK)[0]
    bell = struct.pack("<I", abi.IVSHMEM_HELPER_PEER << 16)

    def ring():
        bar0[12:16] = bell

    entries = 64
    lay = layout(entries, 8, 1 << 20)
    hdr = mem[:abi.REGION_HDR.itemsize].view(abi.REGION_HDR)[0]

    def good_header():
        write_header(bar2, entries, 8, lay, link_off=abi.LINK_OFF)

    def lying_header():
        good_header()
        field = random.choice(["ring_entries", "sq_off", "cq_off",
                               "data_off", "data_size", "region_size",
                               "rw_off", "idx_off", "keys_off",
                               "key_slots", "sqe_size"])
        hdr[field] = random.choice([0, 1, 3, 1 << 31, (1 << 32) - 1,
                                    size, size + PAGE, size * 4,
                                    random.getrandbits(32)]) & (
            (1 << (8 * hdr[field].nbytes)) - 1)

    good_header()
    link["guest_id"] = 1
    link["guest_state"] = abi.LINK_READY
    ring()

    idx_off = lay["idx_off"]
    idx = mem[idx_off:idx_off + abi.RING_IDX.itemsize].view(abi.RING_IDX)[0]
    sq = mem[lay["sq_off"]:lay["sq_off"] + entries * abi.SQE.itemsize]
    rng = np.random.default_rng(1234)
    stats = dict(acks=0, bells=0, garbage_sqes=0, wild_tails=0, lies=0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tok = int(link["helper_token"])
        if tok and int(link["guest_token"]) != tok:
            link["guest_token"] = tok      # "attached"
            stats["acks"] += 1
        what = random.random()
        if what < 0.5:
            # a burst of random SQEs, published with a plausible tail
            n = random.randint(1, entries)
            sq[:] = rng.integers(0, 256, sq.size, dtype=np.uint8)
            idx["sq_tail"] = (int(idx["sq_head"]) + n) & 0xFFFFFFFF
            stats["garbage_sqes"] += n
        elif what < 0.75:
            idx["sq_tail"] = random.getrandbits(32)
            idx["cq_head"] = random.getrandbits(32)
            stats["wild_tails"] += 1
        elif what < 0.9:
            lying_header()
            link["guest_token"] = 0        # "reloaded": the helper re-reads
            stats["lies"] += 1
        else:
            good_header()
            link["guest_token"] = 0
        ring()
        stats["bells"] += 1
        time.sleep(0.002)
    good_header()
    link["guest_state"] = 0
    link["guest_token"] = 0
    ring()
    print("rogue: " + " ".join(f"{k}={v}" for k, v in stats.items()),
          flush=True)


if __name__ == "__main__":
    main()
