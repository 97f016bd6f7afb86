"""Misbehaving helpers for the core's VM tests, written against the raw ABI
(kgpu_helper.abi) rather than the real daemon, so that the kernel's side
is tested on its own.

    python3 fakehelper.py error    answer every request with -EIO
    python3 fakehelper.py silent   attach, map, never answer
    python3 fakehelper.py garbage  answer with wrong tags and sequences
    python3 fakehelper.py probe    attach, check the header, detach

It prints "attached" once the region is mapped.
"""

import errno
import fcntl
import mmap
import os
import select
import sys

import numpy as np

from kgpu_helper import abi


def attach():
    fd = os.open("/dev/kgpu", os.O_RDWR)
    hdr_map = mmap.mmap(fd, 4096)
    hdr = np.frombuffer(hdr_map, dtype=abi.REGION_HDR, count=1)[0]
    size = int(hdr["region_size"])
    region = mmap.mmap(fd, size)
    return fd, region


def views(region):
    hdr = np.frombuffer(region, dtype=abi.REGION_HDR, count=1)
    h = hdr[0]
    n = int(h["ring_entries"])
    sq = np.frombuffer(region, dtype=abi.SQE, count=n, offset=int(h["sq_off"]))
    cq = np.frombuffer(region, dtype=abi.CQE, count=n, offset=int(h["cq_off"]))
    idx = np.frombuffer(region, dtype=np.uint32, count=1024)
    return h, n, sq, cq, idx


def main(mode):
    try:
        fd, region = attach()
    except OSError as e:
        print(f"open failed: {errno.errorcode.get(e.errno, e.errno)}", flush=True)
        return 2
    h, n, sq, cq, idx = views(region)
    assert h["magic"] == abi.MAGIC and h["abi_version"] == abi.ABI_VERSION
    assert h["sqe_size"] == abi.SQE.itemsize and h["cqe_size"] == abi.CQE.itemsize
    st, sh, ct = (abi.SQ_TAIL_OFF // 4, abi.SQ_HEAD_OFF // 4,
                  abi.CQ_TAIL_OFF // 4)
    print("attached", flush=True)
    if mode == "probe":
        # An empty ring polls as not readable; COMPLETE with nothing reaps 0.
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(0) == []
        assert fcntl.ioctl(fd, abi.IOC_COMPLETE) == 0
        # Mappings the module must refuse: too long, private, offset.
        size = int(h["region_size"])
        for kw in (dict(length=size + 4096),
                   dict(length=4096, flags=mmap.MAP_PRIVATE),
                   dict(length=4096, offset=4096)):
            try:
                mmap.mmap(fd, **kw)
            except OSError:
                continue
            raise AssertionError(f"mmap {kw} accepted")
        # A wild completion index: nothing valid to reap, nothing breaks.
        idx[abi.CQ_TAIL_OFF // 4] = 0x7FFFFFF0
        assert fcntl.ioctl(fd, abi.IOC_COMPLETE) == 0
        return 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    rng = np.random.default_rng(1)
    while True:
        poller.poll(1000)
        tail = int(idx[st])
        head = int(idx[sh])
        if tail == head:
            continue
        batch = sq[np.arange(head, tail, dtype=np.uint64) % n].copy()
        idx[sh] = tail
        if mode == "silent":
            continue
        ctail = int(idx[ct])
        for i, sqe in enumerate(batch):
            c = cq[(ctail + i) % n]
            if mode == "garbage":
                c["seq"] = rng.integers(0, 2**63)
                c["tag"] = rng.integers(0, 2**32) if i % 2 else sqe["tag"]
            else:
                c["seq"] = sqe["seq"]
                c["tag"] = sqe["tag"]
            c["status"] = -errno.EIO
            c["flags"] = 0
        # x86-64 keeps stores in order: the entries are visible first.
        idx[ct] = (ctail + len(batch)) & 0xFFFFFFFF
        fcntl.ioctl(fd, abi.IOC_COMPLETE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
