"""Misbehaving helpers for the core's VM tests, written against the raw ABI
(kgpu_helper.rings.abi) rather than the real daemon, so that the kernel's side
is tested on its own.

    python3 fakehelper.py error    answer every request with -EIO
    python3 fakehelper.py silent   attach, map, never answer
    python3 fakehelper.py garbage  answer with wrong tags and sequences
    python3 fakehelper.py probe    attach, check the header, detach
    python3 fakehelper.py scribble try to write the header and the keys,
                                   scribble on what it may write, die (-9)
    python3 fakehelper.py fork     attach, fork a child that keeps the
                                   file (no exec), exit; the child reports
                                   what the file still lets it do
    python3 fakehelper.py lossy    the real daemon (cpu backend), except
                                   that the first request it takes is lost
    python3 fakehelper.py resident the real daemon (cpu backend), its XTS
                                   answers labelled as a GPU-resident
                                   helper's (CQE_RESIDENT), two of them
                                   with flags the ABI does not allow

It prints "attached" once the region is mapped.
"""

import collections
import ctypes
import errno
import fcntl
import mmap
import os
import select
import signal
import sys
import time

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.rings.transport import Region, map_region


def attach():
    fd = os.open("/dev/kgpu", os.O_RDWR)
    region = map_region(fd, "/dev/kgpu")
    return fd, region


def _err(e):
    return errno.errorcode.get(e.errno, str(e.errno))


def scribble(fd, mm, r):
    """Every way to write below rw_off must be refused; then scribble on
    the writable part (ring indexes, rings, data) and die with -9."""
    size, rw = r.size, r.rw_off
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    rw_prot = mmap.PROT_READ | mmap.PROT_WRITE

    def attempt(what, fn):
        try:
            fn()
        except OSError as e:
            print(f"refused {what}: {_err(e)}", flush=True)
        else:
            print(f"ALLOWED {what}", flush=True)

    def mapping(length, offset):
        m = mmap.mmap(fd, length, mmap.MAP_SHARED, rw_prot, offset=offset)
        m[8:16] = (size + 4096).to_bytes(8, "little")
        m.close()

    def protect():
        if libc.mprotect(base, rw, rw_prot):
            raise OSError(ctypes.get_errno(), "mprotect")

    def procmem():
        with open("/proc/self/mem", "r+b", buffering=0) as f:
            f.seek(base + 8)
            f.write((size + 4096).to_bytes(8, "little"))
            f.seek(base + int(r.hdr["keys_off"]) + 16)
            f.write(b"\xff" * 16)

    attempt("header rw mapping", lambda: mapping(4096, 0))
    attempt("whole rw mapping", lambda: mapping(size, 0))
    attempt("keys rw mapping", lambda: mapping(4096, int(r.hdr["keys_off"])))
    attempt("mprotect rw", protect)
    attempt("/proc/self/mem write", procmem)
    # What it may write: wild ring indexes, garbage rings and data.
    r.idx[abi.SQ_HEAD_OFF // 4] = 12345
    r.idx[abi.CQ_TAIL_OFF // 4] = 0x7FFFFFFF
    r.idx[abi.SQ_TAIL_OFF // 4] = 777
    r.buf[r.sq_off:r.sq_off + r.entries * abi.SQE.itemsize] = 0xA5
    r.buf[r.cq_off:r.cq_off + r.entries * abi.CQE.itemsize] = 0x5A
    r.buf[r.data_off:r.data_off + (1 << 20)] = 0xEE
    print("scribbled", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def fork_child(fd, parent):
    """The parent attached and forked us (no exec), then exits: once it is
    gone, the file we inherited must give us nothing. @parent is its pid
    as taken before the fork: asked here, getppid() could already name
    the reaper that adopted us, and we would wait for ever."""
    while os.getppid() == parent:
        time.sleep(0.05)
    time.sleep(0.5)
    try:
        fcntl.ioctl(fd, abi.IOC_COMPLETE)
        print("child: COMPLETE ok", flush=True)
    except OSError as e:
        print(f"child: COMPLETE {_err(e)}", flush=True)
    try:
        mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ)
        print("child: mmap ok", flush=True)
    except OSError as e:
        print(f"child: mmap {_err(e)}", flush=True)
    p = select.poll()
    p.register(fd, select.POLLIN)
    ev = p.poll(0)
    hup = bool(ev and ev[0][1] & (select.POLLHUP | select.POLLERR))
    print(f"child: poll {'HUP' if hup else ev}", flush=True)
    time.sleep(120)     # keeps the file until the test kills us
    os._exit(0)


def serve_cpu(patch):
    """The real serving loop on the cpu backend over /dev/kgpu, after
    ``patch(transport)`` changed what it takes from the ring or posts."""
    from kgpu_helper.serve.daemon import Helper
    from kgpu_helper.services.cpu import CpuBackend
    from kgpu_helper.rings.transport import KernelTransport

    t = KernelTransport()
    patch(t)
    h = Helper(t, CpuBackend())
    h.install_signals()
    print("attached", flush=True)
    try:
        h.serve()
    finally:
        h.close()
        t.close()
    return 0


def lossy(t):
    """Minus one request: the first one taken is never answered."""
    drain = t.drain
    lost = []

    def drain_but_one():
        sqes = drain()
        if not lost and len(sqes):
            lost.append(int(sqes[0]["seq"]))
            print(f"lost request {lost[0]}", flush=True)
            sqes = sqes[1:]
        return sqes

    t.drain = drain_but_one


#: the flags of the first XTS answers: both paths at once, a bit ABI 5
#: does not define. The module must use neither result.
BAD_FLAGS = (abi.CQE_CPU | abi.CQE_RESIDENT, abi.CQE_RESIDENT | 0x8)


def resident(t):
    """Answers as a helper with a GPU-resident XTS path would label them:
    every other successful XTS answer CQE_RESIDENT, the rest CQE_CPU; the
    data is the cpu backend's, so right whatever the label. The first
    XTS answers carry BAD_FLAGS. Prints a count per flags value sent."""
    drain, post = t.drain, t.post
    xts = set()         # seqs of the XTS requests taken, not yet answered
    sent = collections.Counter()

    def drain_noting():
        sqes = drain()
        for q in sqes:
            if int(q["service"]) in (abi.SVC_XTS_ENC, abi.SVC_XTS_DEC):
                xts.add(int(q["seq"]))
        return sqes

    def post_labelled(cqes):
        cqes = cqes.copy()
        for i in range(len(cqes)):
            seq = int(cqes["seq"][i])
            if seq not in xts:
                continue
            xts.discard(seq)
            if cqes["status"][i]:
                continue
            n = sum(sent.values())
            flags = (BAD_FLAGS[n] if n < len(BAD_FLAGS) else
                     abi.CQE_RESIDENT if n % 2 else abi.CQE_CPU)
            cqes["flags"][i] = flags
            sent[flags] += 1
        post(cqes)
        print("sent " + " ".join(f"0x{f:x}:{c}" for f, c in
                                 sorted(sent.items())), flush=True)

    t.drain = drain_noting
    t.post = post_labelled


def main(mode):
    if mode in ("lossy", "resident"):
        return serve_cpu(globals()[mode])
    try:
        fd, mm = attach()
    except OSError as e:
        print(f"open failed: {_err(e)}", flush=True)
        return 2
    r = Region(mm)
    h, n, sq, cq, idx = r.hdr, r.entries, r.sq, r.cq, r.idx
    assert h["magic"] == abi.MAGIC and h["abi_version"] == abi.ABI_VERSION
    assert h["sqe_size"] == abi.SQE.itemsize and h["cqe_size"] == abi.CQE.itemsize
    st, sh, ct = (abi.SQ_TAIL_OFF // 4, abi.SQ_HEAD_OFF // 4,
                  abi.CQ_TAIL_OFF // 4)
    print("attached", flush=True)
    if mode == "scribble":
        scribble(fd, mm, r)
    if mode == "fork":
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            fork_child(fd, parent)
        print(f"forked {pid}", flush=True)
        os._exit(0)     # without closing anything: exit detaches
    if mode == "probe":
        # An empty ring polls as not readable; COMPLETE with nothing reaps 0.
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(0) == []
        assert fcntl.ioctl(fd, abi.IOC_COMPLETE) == 0
        # Mappings the module must refuse: too long, private, writable
        # below rw_off (header, keys).
        size = int(h["region_size"])
        rw = int(h["rw_off"])
        for kw in (dict(length=size + 4096),
                   dict(length=4096, flags=mmap.MAP_PRIVATE),
                   dict(length=4096, offset=0),
                   dict(length=4096, offset=rw - 4096)):
            try:
                mmap.mmap(fd, **{"flags": mmap.MAP_SHARED,
                                 "prot": mmap.PROT_READ | mmap.PROT_WRITE,
                                 **kw})
            except OSError:
                continue
            raise AssertionError(f"mmap {kw} accepted")
        # Read-only across the boundary is harmless, and allowed.
        mmap.mmap(fd, rw + 4096, mmap.MAP_SHARED, mmap.PROT_READ).close()
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
