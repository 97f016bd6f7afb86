"""The GPU-resident XTS path's CPU-side parts, with no GPU: the kernel's
key expansion and request check (resident.cu built by the C compiler with
RES_HOST_TEST, against aes_tables.py and resident.check), the host thread
(resident_host.c: doorbells, spill wake-ups, hang-up, idle cost; on the
shm ring and, with stand-ins for /dev/kgpu, on kgpu.ko's) and the spill
ring as a transport. tests/vm/test_resident_kring.py runs the host thread
against the real module."""

import os
import select
import shutil
import socket
import subprocess
import termios
import time

import numpy as np
import pytest

from kgpu_helper.rings import abi
from kgpu_helper.serve import resident
from kgpu_helper.cuda import SOURCE_DIR
from kgpu_helper.rings.ringdriver import layout, sqe, write_header
from kgpu_helper.rings.transport import (KernelTransport, Region, ShmTransport,
                                        TransportError)
from kgpu_helper.services import aes_tables

HARNESS = r"""
#define RES_HOST_TEST
#include "resident.cu"
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
	FILE *f = fopen(argv[2], "rb");
	static unsigned char buf[1 << 16];
	size_t n = fread(buf, 1, sizeof(buf), f);

	fclose(f);
	if (argv[1][0] == 'e') {	/* te0[256] td0[256] key_len key[64] */
		u32 *w = (u32 *)buf, out[192];

		res_expand_key(out, w + 513, w[512], w, w + 256);
		for (int i = 0; i < 192; i++)
			printf("%u\n", out[i]);
	} else {			/* SQEs; data_off data_size max nslots */
		u64 off = strtoull(argv[3], 0, 0), size = strtoull(argv[4], 0, 0);
		u32 max = strtoul(argv[5], 0, 0), ns = strtoul(argv[6], 0, 0);

		for (size_t i = 0; i + 64 <= n; i += 64)
			printf("%d\n", res_check((const struct ResSqe *)(buf + i),
						 off, size, max, ns));
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("res")
    (d / "h.c").write_text(HARNESS)
    exe = d / "h"
    r = subprocess.run([cc, "-O1", "-Wall", "-std=c11", "-I", SOURCE_DIR,
                        "-o", str(exe), str(d / "h.c")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr

    def run(*args, data):
        p = d / "in.bin"
        p.write_bytes(data)
        out = subprocess.run([str(exe), args[0], str(p), *map(str, args[1:])],
                             capture_output=True, text=True, check=True)
        return [int(x) for x in out.stdout.split()]
    return run


@pytest.mark.parametrize("klen", [32, 64])
def test_gpu_key_expansion_matches_reference(harness, klen):
    rng = np.random.default_rng(klen)
    for _ in range(3):
        key = rng.bytes(klen)
        blob = (aes_tables.TE0.tobytes() + aes_tables.TD0.tobytes()
                + np.uint32(klen).tobytes() + key.ljust(64, b"\0"))
        got = harness("e", data=blob)
        half = klen // 2
        nr, e1 = aes_tables.expand_key(key[:half])
        _, e2 = aes_tables.expand_key(key[half:])
        d1 = aes_tables.decryption_key(nr, e1)
        want = [0] * 192
        want[0:len(e1)] = e1
        want[60:60 + len(e2)] = e2
        want[120:120 + len(d1)] = d1
        want[180] = nr
        assert got == want


def _cases(data_off, data_size):
    x = dict(in_len=4096, out_len=4096, unit_size=512, sector_step=1)
    o = data_off + 8192
    return [
        sqe(abi.SVC_XTS_ENC, in_off=o, out_off=o, **x),                # ok
        sqe(abi.SVC_XTS_DEC, in_off=o, out_off=o, key_slot=3, iv_mode=1,
            **x),                                                        # ok
        sqe(abi.SVC_NOP),
        sqe(abi.SVC_RAID6_GEN, in_off=o, out_off=o, **x),
        sqe(abi.SVC_XTS_ENC, in_off=o, out_off=o, flags=1, **x),
        sqe(abi.SVC_XTS_ENC, in_off=o, out_off=o + 4096, **x),
        sqe(abi.SVC_XTS_ENC, in_off=o, out_off=o, in_len=32768,
            out_len=32768, unit_size=512),
        sqe(abi.SVC_XTS_ENC, in_off=o, out_off=o, in_len=0, out_len=0,
            unit_size=512),
        sqe(abi.SVC_XTS_ENC, in_off=o, out_off=o, in_len=4096, out_len=4096,
            unit_size=256),
        sqe(abi.SVC_XTS_ENC, in_off=o, out_off=o, in_len=1536, out_len=1536,
            unit_size=1024),
        sqe(abi.SVC_XTS_ENC, in_off=o + 8, out_off=o + 8, **x),
        sqe(abi.SVC_XTS_ENC, in_off=data_off - 4096, out_off=data_off - 4096,
            **x),
        sqe(abi.SVC_XTS_ENC, in_off=data_off + data_size - 2048,
            out_off=data_off + data_size - 2048, **x),
        sqe(abi.SVC_XTS_ENC, in_off=2**64 - 4096, out_off=2**64 - 4096, **x),
        sqe(abi.SVC_XTS_ENC, in_off=o, out_off=o, key_slot=4, **x),
        sqe(abi.SVC_XTS_ENC, in_off=o, out_off=o, iv_mode=2, **x),
        sqe(abi.SVC_XTS_ENC, in_off=data_off + data_size - 4096,
            out_off=data_off + data_size - 4096, **x),                 # ok
    ]


def test_request_check_c_matches_python(harness):
    off, size, mx, ns = 1 << 20, 1 << 22, 16384, 4
    reqs = np.concatenate(_cases(off, size))
    got = harness("c", off, size, mx, ns, data=reqs.tobytes())
    want = [resident.check(r, off, size, mx, ns) for r in reqs]
    assert got == want
    assert want == [0, 0, 1, 1, 2, 3, 4, 4, 5, 5, 6, 6, 6, 6, 7, 8, 0]


class Counters:
    """sq_tail, cq_tail and the spill tail in separate lines, for the host
    thread, with a socket pair standing in for the ring's doorbells."""

    def __init__(self, **kw):
        self.w = np.zeros(64, np.uint32)
        base = self.w.ctypes.data
        self.mine, theirs = socket.socketpair()
        self.theirs = theirs
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.t = resident.HostThread(base, base + 64, base + 128,
                                     theirs.fileno(), self.efd, **kw)

    def set(self, i, v):
        self.w[16 * i] = v

    def bell(self, timeout=2.0):
        r, _, _ = select.select([self.mine], [], [], timeout)
        return self.mine.recv(4096) if r else b""

    def spilled(self, timeout=2.0):
        r, _, _ = select.select([self.efd], [], [], timeout)
        return os.eventfd_read(self.efd) if r else 0

    def until(self, what, timeout=2.0):
        end = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < end, self.t.snapshot()
            time.sleep(1e-3)

    def close(self):
        self.t.stop()
        self.mine.close()
        self.theirs.close()
        os.close(self.efd)


def test_host_thread_rings_once_per_look_and_wakes_the_spill_loop():
    c = Counters(spin_below=0, sleep_us=2000)
    try:
        c.set(0, 5)            # five submitted
        c.mine.send(b"ddddd")  # their doorbells: drained by the thread
        c.set(1, 3)            # three completed at once
        assert c.bell() == b"d"
        c.set(1, 5)
        assert c.bell() == b"d"
        assert c.spilled(0.05) == 0
        c.set(2, 1)
        assert c.spilled() == 1
        # the thread counts a signal after it sends it: wait for the count,
        # then leave it time for a bell or signal too many
        c.until(lambda: c.t.snapshot()["spill_signals"])
        time.sleep(0.05)
        st = c.t.snapshot()
        assert st["bells"] == 2 and st["spill_signals"] == 1
        assert not c.t.hangup()
    finally:
        c.close()


def test_host_thread_sleeps_when_idle_and_sees_hangup():
    c = Counters()
    try:
        # asleep in poll() (not a fixed wait for it: under load the thread
        # may start late), then its own CPU clock: the process's would
        # count whatever else runs in it (this test's own Python, any
        # thread an earlier test left winding down)
        c.until(lambda: c.t.snapshot()["idle_polls"])
        c0 = c.t.cpu_seconds()
        time.sleep(0.5)
        busy = c.t.cpu_seconds() - c0
        assert busy < 0.02 * 0.5 + 0.005, f"idle host thread used {busy} s"
        c.mine.close()         # the ring's other side goes away
        assert c.spilled() >= 1
        assert c.t.hangup()
    finally:
        c.t.stop()
        c.theirs.close()
        os.close(c.efd)


class KCounters:
    """The ring indexes as struct kgpu_ring_idx lays them out (sq_tail,
    sq_head, cq_tail, then the spill tail), for the host thread in kgpu.ko
    mode. /dev/kgpu is not here: ``fd`` stands in for it (an eventfd,
    readable while written: the module's "sq_head != sq_tail"), and
    ``bell_ioctl`` defaults to FIONCLEX, which any fd takes, so that the
    bells can be counted."""

    SQ_TAIL, SQ_HEAD, CQ_TAIL, SPILL = 0, 16, 32, 48

    def __init__(self, fd=None, bell_ioctl=termios.FIONCLEX, start=0,
                 head=None, **kw):
        self.w = np.zeros(64, np.uint32)
        self.w[[self.SQ_TAIL, self.CQ_TAIL]] = start
        self.w[self.SQ_HEAD] = start if head is None else head
        base = self.w.ctypes.data
        self.fd = os.eventfd(0, os.EFD_NONBLOCK) if fd is None else fd
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.t = resident.HostThread(
            base, base + 4 * self.CQ_TAIL, base + 4 * self.SPILL, self.fd,
            self.efd, sq_head=base + 4 * self.SQ_HEAD, bell_ioctl=bell_ioctl,
            **kw)

    def submit(self, n):
        """n more requests, and the module's wake-up."""
        self.w[self.SQ_TAIL] = (int(self.w[self.SQ_TAIL]) + n) & 0xFFFFFFFF
        os.eventfd_write(self.fd, 1)

    def answer(self, n):
        """n more completions, the way the GPU publishes them; it took
        every submission, so the stand-in's POLLIN ends first."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        self.w[self.CQ_TAIL] = (int(self.w[self.CQ_TAIL]) + n) & 0xFFFFFFFF

    def head(self):
        return int(self.w[self.SQ_HEAD])

    def until(self, what, timeout=2.0):
        end = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < end, self.t.snapshot()
            time.sleep(1e-3)

    def close(self):
        self.t.stop()
        os.close(self.fd)
        os.close(self.efd)


def test_kgpu_mode_sq_head_follows_the_answers():
    c = KCounters(start=7, head=3, spin_below=0, sleep_us=2000)
    try:
        # idle from the start: sq_head caught up, then poll()
        c.until(lambda: c.head() == 7 and c.t.snapshot()["idle_polls"])
        c.submit(2)
        c.until(lambda: c.t.snapshot()["sleeps"])   # woken, looking
        time.sleep(0.05)
        assert c.head() == 7                        # none answered yet
        c.answer(1)
        c.until(lambda: c.t.snapshot()["bells"] == 1)
        time.sleep(0.05)
        assert c.head() == 8                        # one answered: taken
        polls = c.t.snapshot()["idle_polls"]
        c.answer(1)
        c.until(lambda: c.t.snapshot()["bells"] == 2)
        c.until(lambda: c.head() == 9)              # = sq_tail, idle
        c.until(lambda: c.t.snapshot()["idle_polls"] > polls)
        st = c.t.snapshot()
        assert st["bells"] == 2 and not st["hangup"], st
    finally:
        c.close()


def test_kgpu_mode_sq_head_wraps_with_the_indexes():
    # Free-running indexes: the store wraps with them. The thread starts on
    # indexes already next to the wrap; moving SQ_TAIL and CQ_TAIL under a
    # live thread takes two stores, and a look between them is a real
    # completion to it (one bell more: this test's old flake).
    c = KCounters(start=0xFFFFFFFF, spin_below=0, sleep_us=2000)
    try:
        c.until(lambda: c.t.snapshot()["idle_polls"])
        c.submit(2)                                 # sq_tail wraps to 1
        c.until(lambda: c.t.snapshot()["sleeps"])   # woken, looking
        assert c.head() == 0xFFFFFFFF               # none answered yet
        c.answer(2)                                 # cq_tail wraps to 1
        c.until(lambda: c.head() == 1)
        c.until(lambda: c.t.snapshot()["bells"] == 1)
        time.sleep(0.05)
        st = c.t.snapshot()
        assert st["bells"] == 1 and not st["hangup"], st
    finally:
        c.close()


def test_kgpu_mode_sleeps_in_poll_and_sees_hangup():
    r, w = os.pipe()               # POLLHUP on r once w is closed
    c = KCounters(fd=r)
    try:
        c.until(lambda: c.t.snapshot()["idle_polls"])   # asleep in poll()
        c0, polls0 = c.t.cpu_seconds(), c.t.snapshot()["idle_polls"]
        t0 = time.monotonic()
        time.sleep(0.5)
        busy = c.t.cpu_seconds() - c0
        polls = c.t.snapshot()["idle_polls"] - polls0
        slept = time.monotonic() - t0   # 0.5 s, more when woken late
        assert busy < 0.02 * 0.5, f"idle host thread used {busy} s"
        # 100 ms poll() timeout: 5 in 0.5 s, 10 at most, per 0.5 s the
        # window really lasted (the main thread may wake late under load)
        assert 1 <= polls <= 20 * slept, (polls, slept)
        os.close(w)                # the module: not the helper's file now
        c.until(lambda: c.t.hangup())
        # hangup() sets the flag, then writes the eventfd: wait for both
        assert select.select([c.efd], [], [], 2.0)[0], "spill loop not woken"
        assert os.eventfd_read(c.efd) >= 1    # the spill loop woken
    finally:
        c.close()


def test_kgpu_mode_failed_doorbell_is_hangup():
    # the real KGPU_IOC_COMPLETE on a file that is not /dev/kgpu: ENOTTY,
    # as the module's ENODEV once the helper's file is detached
    c = KCounters(bell_ioctl=abi.IOC_COMPLETE)
    try:
        c.submit(1)
        c.answer(1)
        c.until(lambda: c.t.hangup())
        assert c.t.snapshot()["bells"] == 0
        # hangup() sets the flag, then writes the eventfd: wait for both
        assert select.select([c.efd], [], [], 2.0)[0], "spill loop not woken"
        assert os.eventfd_read(c.efd) >= 1
    finally:
        c.close()


def _kernel_transport():
    """A KernelTransport over a region laid out as the module does, with
    an eventfd for /dev/kgpu (no module here)."""
    lay = layout(16, 4, 1 << 20)
    buf = bytearray(lay["region_size"])
    write_header(buf, 16, 4, lay)
    t = KernelTransport.__new__(KernelTransport)
    t.region = Region(buf, owner=True)
    t.fd = os.eventfd(0, os.EFD_NONBLOCK)
    return t


def test_host_thread_for_each_transport():
    assert resident.host_mode(KernelTransport.__new__(KernelTransport)) \
        == resident.HOST_KGPU
    assert resident.host_mode(ShmTransport.__new__(ShmTransport)) \
        == resident.HOST_SOCKET
    from kgpu_helper.rings.ivshmem import IvshmemTransport
    with pytest.raises(resident.ResidentError, match="ivshmem"):
        resident.host_mode(IvshmemTransport.__new__(IvshmemTransport))
    with pytest.raises(resident.ResidentError, match="ivshmem"):
        resident.ResidentXts(IvshmemTransport.__new__(IvshmemTransport),
                             None)
    # kgpu.ko's ring: the region's own sq_head, the real doorbell ioctl
    t = _kernel_transport()
    idx = t.region.idx
    sq_tail, sq_head, cq_tail = (o // 4 for o in (
        abi.SQ_TAIL_OFF, abi.SQ_HEAD_OFF, abi.CQ_TAIL_OFF))
    idx[sq_tail] = idx[cq_tail] = 5
    spill = np.zeros(16, np.uint32)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    h = resident.host_thread(t, spill.ctypes.data, efd, spin_below=0)
    try:
        end = time.monotonic() + 2
        while idx[sq_head] != 5:
            assert time.monotonic() < end, h.snapshot()
            time.sleep(1e-3)
        idx[sq_tail] = idx[cq_tail] = 6    # the ioctl: ENOTTY on an eventfd
        while not h.hangup():
            assert time.monotonic() < end, h.snapshot()
            time.sleep(1e-3)
    finally:
        h.stop()
        os.close(efd)
        os.close(t.fd)
        t.region.release()


def test_spill_transport_drain_and_post():
    entries = 8
    ctl = np.zeros(resident.ctl_bytes(entries), np.uint8)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        t = resident.SpillTransport(None, ctl, entries, efd)
        assert t.pending() == 0 and len(t.drain()) == 0
        w = ctl[:resident.SPILL_SQ_BYTE].view(np.uint32)
        sq = t.sq
        for k in range(11):    # wraps the ring of 8
            sq[k % entries] = sqe(abi.SVC_NOP)[0]
            sq["seq"][k % entries] = 100 + k
            sq["tag"][k % entries] = k
            w[resident.CTL_SPILL_TAIL] = k + 1
            if k in (5, 10):
                got = t.drain()
                lo = 0 if k == 5 else 6
                assert list(got["seq"]) == list(range(100 + lo, 101 + k))
                assert w[resident.CTL_SPILL_HEAD] == k + 1
                cq = np.zeros(len(got), abi.CQE)
                cq["seq"], cq["tag"] = got["seq"], got["tag"]
                t.post(cq)
                assert w[resident.CTL_SPILL_CQ_TAIL] == k + 1
                n = w[resident.CTL_SPILL_CQ_TAIL]
                pos = np.arange(n - len(got), n) % entries
                assert list(t.cq["seq"][pos]) == list(got["seq"])
        assert t.pending() == 0
        os.eventfd_write(efd, 1)
        t._clear()
        t.hangup = lambda: True
        with pytest.raises(TransportError):
            t._clear()
    finally:
        os.close(efd)


def test_failover_plan_from_host_memory(tmp_path):
    """What the loop takes over after a fault, from the block words, the CQ
    and the spill rings alone: held requests answered -EIO unless their CQE
    is out, spill answers forwarded unless already in the CQ, and the SQ
    read on from the first index no block took."""
    from kgpu_helper.rings.ringdriver import RingDriver
    entries = 16
    drv = RingDriver(str(tmp_path / "r.sock"), entries=entries,
                     data_size=1 << 20)
    try:
        r = drv.region
        sq_tail_w, cq_tail_w = abi.SQ_TAIL_OFF // 4, abi.CQ_TAIL_OFF // 4
        start = 2**32 - 4  # indexes wrap during the run
        for k in range(14):
            i = (start + k) & 0xFFFFFFFF
            e = sqe(abi.SVC_XTS_ENC)[0]
            e["seq"], e["tag"] = 100 + k, k
            r.sq[i & (entries - 1)] = e
        r.idx[sq_tail_w] = (start + 11) & 0xFFFFFFFF  # 11 published
        done = [0, 1, 2, 3, 4, 5, 7, 10]               # CQEs out
        for n, k in enumerate(done):
            r.cq[n] = (100 + k, k, 0, 0)
        r.idx[cq_tail_w] = len(done)
        ctl = np.zeros(resident.ctl_bytes(entries), np.uint8)
        w = ctl[:resident.SPILL_SQ_BYTE].view(np.uint32)
        sp = ctl[resident.SPILL_SQ_BYTE:resident.SPILL_SQ_BYTE
                 + entries * 64].view(abi.SQE)
        c0 = resident.SPILL_SQ_BYTE + entries * 64
        scq = ctl[c0:c0 + entries * 16].view(abi.CQE)
        for n, k in enumerate((3, 8)):                 # spilled: 3 and 8
            sp[n] = r.sq[(start + k) & (entries - 1)]
            scq[n] = (100 + k, k, 0, 0)                # both answered
        w[resident.CTL_SPILL_TAIL] = w[resident.CTL_SPILL_CQ_TAIL] = 2
        w[resident.CTL_FWD] = 0      # 3's forward store was lost
        blocks = [(10, resident.ST_DONE),
                  (6, resident.ST_SERVE),    # held: -EIO
                  (7, resident.ST_SERVE),    # its CQE is out: answered
                  (8, resident.ST_SPILL),    # in the spill SQ: the loop's
                  (9, resident.ST_WAIT),     # published, maybe read: -EIO
                  (11, resident.ST_WAIT),    # not published: the loop's
                  (0, resident.ST_IDLE)]
        base = resident.CTL_BLK_BYTE // 4
        for b, (k, st) in enumerate(blocks):
            w[base + 4 * b] = (start + k) & 0xFFFFFFFF
            w[base + 4 * b + 1] = st
        new_head, held, forward = resident.failover_plan(
            r, ctl, len(blocks), start, 0)
        assert new_head == (start + 11) & 0xFFFFFFFF
        assert sorted(held["seq"].tolist()) == [106, 109]
        assert forward["seq"].tolist() == [108]
        # nothing claimed yet: the loop reads from where the kernel began
        w[base:base + 4 * len(blocks)] = 0
        new_head, held, forward = resident.failover_plan(
            r, ctl, len(blocks), start, 0)
        assert new_head == start and len(held) == 0
    finally:
        drv.close()


def test_spill_transport_takes_the_ring_over():
    entries = 8
    ctl = np.zeros(resident.ctl_bytes(entries), np.uint8)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    class Real:
        posted = []

        def fileno(self):
            return 99

        def pending(self):
            return 2

        def drain(self):
            q = np.zeros(2, abi.SQE)
            q["seq"] = [50, 51]
            return q

        def post(self, c):
            self.posted.extend(c["seq"].tolist())

    try:
        t = resident.SpillTransport(None, ctl, entries, efd)
        w = ctl[:resident.SPILL_SQ_BYTE].view(np.uint32)
        t.sq["seq"][0] = 7
        w[resident.CTL_SPILL_TAIL] = 1      # one spilled, not yet drained
        real = Real()
        calls = []
        t.on_fault = lambda: (calls.append(1), t.take_over(real))
        assert t.pending() == 3 and calls == [1]
        assert t.fileno() == 99
        assert t.drain()["seq"].tolist() == [7, 50, 51]
        cq = np.zeros(3, abi.CQE)
        cq["seq"] = [7, 50, 51]
        t.post(cq)
        assert real.posted == [7, 50, 51]
        assert w[resident.CTL_SPILL_CQ_TAIL] == 0   # not the spill CQ
        t.pending()
        assert calls == [1]                          # taken over once
    finally:
        os.close(efd)


def test_cli_refuses_resident_with_ivshmem():
    from click.testing import CliRunner

    from kgpu_helper.cli.main import cli

    r = CliRunner().invoke(cli, ["helper", "--resident", "--ivshmem",
                                 "/nonexistent.sock"])
    assert r.exit_code == 2 and "not --ivshmem" in r.output, r.output


def test_kernel_cqe_flag_matches_the_abi():
    """The persistent kernel marks its answers with uapi's
    KGPU_CQE_RESIDENT (its own copy of the value)."""
    import re
    src = open(os.path.join(SOURCE_DIR, "resident.cu")).read()
    m = re.search(r"#define CQE_RESIDENT (0x[0-9a-f]+)u", src)
    assert m and int(m.group(1), 16) == abi.CQE_RESIDENT


def test_cli_refuses_more_than_256_resident_servers():
    from click.testing import CliRunner

    from kgpu_helper.cli.main import cli

    r = CliRunner().invoke(cli, ["helper", "--resident", "--resident-blocks",
                                 "64", "--resident-servers", "8"])
    assert r.exit_code == 2 and "at most 256 servers" in r.output, r.output


def test_resident_crossover_sends_every_xts_size():
    from kgpu_helper.cli.commands import _resident_crossover
    values = {abi.SVC_NOP: 0, abi.SVC_XTS_ENC: 65536,
              abi.SVC_XTS_DEC: 0xFFFFFFFF, abi.SVC_RAID6_GEN: 16384}
    _resident_crossover(values)
    assert values == {abi.SVC_NOP: 0, abi.SVC_XTS_ENC: 0,
                      abi.SVC_XTS_DEC: 0, abi.SVC_RAID6_GEN: 16384}
