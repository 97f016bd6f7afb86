"""A fake QEMU and a fake guest kgpu.ko for the ivshmem tests, no VM.

:func:`connect_qemu` connects to an ivshmem server socket as QEMU's
ivshmem-doorbell device does and checks the greeting message by message
(docs/specs/ivshmem-spec.rst in QEMU). :class:`FakeGuest` maps the shared
memory and plays the guest module's side of kmod/uapi/kgpu.h (the ABI
that kgpu_helper.rings.abi mirrors): it lays the region out as the module does
(ringdriver.layout), acks the helper's attach tokens when "interrupted"
through its eventfd, submits requests, rings the doorbell only while
need_wakeup is set, and reaps completions.
"""

import mmap
import os
import select
import socket
import struct
import time

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.rings.ivshmem import full_barrier
from kgpu_helper.rings.ringdriver import layout, write_header
from kgpu_helper.rings.transport import (_CQ_HEAD, _CQ_TAIL, _MASK32, _SQ_HEAD,
                                   _SQ_TAIL, Region)

_Q = struct.Struct("<q")
_W = {name: abi.LINK.fields[name][1] // 4 for name in abi.LINK.names}


class FakeQemu:
    """One QEMU connection: the socket and what the greeting gave."""

    def __init__(self, path, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.msgs = []

    def recv_msg(self):
        """(value, fds) of one 8-byte message; None at EOF."""
        msg, fds, _, _ = socket.recv_fds(self.sock, 8, 2)
        if not msg:
            return None
        assert len(msg) == 8, msg
        return _Q.unpack(msg)[0], fds

    def greeting(self):
        """Read the five greeting messages and check them as QEMU does;
        returns (guest id, memfd, helper doorbell fd, own interrupt fd)."""
        got = [self.recv_msg() for _ in range(5)]
        self.msgs = got
        assert None not in got, got
        vals = [v for v, _ in got]
        nfds = [len(f) for _, f in got]
        # version 0; our id; -1 + shm; peer 0 vector 0; our id vector 0
        assert vals == [0, 1, -1, 0, 1], vals
        assert nfds == [0, 0, 1, 1, 1], nfds
        return 1, got[2][1][0], got[3][1][0], got[4][1][0]

    def close(self):
        for _, fds in self.msgs:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.msgs = []
        self.sock.close()


def connect_qemu(path):
    q = FakeQemu(path)
    gid, memfd, bell, irq = q.greeting()
    return q, gid, memfd, bell, irq


class FakeGuest:
    """The guest kgpu.ko's side of one ivshmem region."""

    def __init__(self, path, entries=64, key_slots=4):
        self.qemu, self.id, memfd, self.bell, self.irq = connect_qemu(path)
        st = os.fstat(memfd)
        self.size, self.ino = st.st_size, st.st_ino
        self.mm = mmap.mmap(memfd, self.size)
        self.entries = entries
        self.key_slots = key_slots
        self.lw = memoryview(self.mm)[
            abi.LINK_OFF:abi.LINK_OFF + abi.LINK.itemsize].cast("I")
        self.write_header()
        self.region = Region(self.mm, owner=True)
        self.seq = 1
        self.outstanding = {}       # seq -> tag
        self.answers = {}           # seq -> (status, flags)
        self.rings = 0              # doorbell writes
        self.attaches = 0
        self.detached = False
        self.keys = {}

    # -- what the module writes

    def write_header(self):
        lay = layout(self.entries, self.key_slots, 0)
        data_off = lay["data_off"]
        lay.update(data_size=self.size - data_off, region_size=self.size)
        write_header(self.mm, self.entries, self.key_slots, lay,
                     link_off=abi.LINK_OFF)
        self.data_off = lay["data_off"]
        self.data_size = lay["data_size"]

    def set_key(self, slot, key):
        self.keys[slot] = bytes(key)
        ks = self.region.keys[slot:slot + 1]
        gen = int(ks["generation"][0]) | 1
        ks["generation"] = gen
        ks["key"] = 0
        ks["key"][0, :len(key)] = np.frombuffer(bytes(key), np.uint8)
        ks["key_len"] = len(key)
        ks["generation"] = gen + 1

    def view(self, off, n):
        return self.region.buf[off:off + n]

    # -- the link

    def ring(self):
        os.eventfd_write(self.bell, 1)
        self.rings += 1

    def interrupt(self):
        """The MSI-X handler: link state first, then nothing else here
        (the caller reaps)."""
        try:
            os.eventfd_read(self.irq)
        except BlockingIOError:
            pass
        lw = self.lw
        st, tok = lw[_W["helper_state"]], lw[_W["helper_token"]]
        if st == abi.LINK_ATTACH and (tok != lw[_W["guest_token"]]
                                      or lw[_W["guest_state"]]
                                      != abi.LINK_READY):
            # a new helper: what the old one had is redone on the CPU
            self.outstanding.clear()
            self.write_header()
            for s, k in self.keys.items():
                self.set_key(s, k)
            idx = self.region.idx
            idx[_SQ_TAIL] = idx[_SQ_HEAD] = idx[_CQ_TAIL] = idx[_CQ_HEAD] = 0
            lw[_W["guest_id"]] = self.id
            lw[_W["guest_token"]] = tok
            lw[_W["guest_state"]] = abi.LINK_READY
            self.attaches += 1
            self.detached = False
            self.ring()
        elif st == abi.LINK_DETACH:
            self.detached = True
            self.outstanding.clear()

    def token(self):
        return self.lw[_W["guest_token"]]

    def helper_state(self):
        return self.lw[_W["helper_state"]], self.lw[_W["helper_token"]]

    def need_wakeup(self):
        return self.lw[_W["need_wakeup"]]

    def wait_irq(self, timeout):
        r, _, _ = select.select([self.irq], [], [], timeout)
        if r:
            self.interrupt()
        return bool(r)

    def wait_attached(self, timeout=10.0, other_than=0):
        """Until a helper attached (with a token other than
        ``other_than``); the token."""
        end = time.monotonic() + timeout
        self.interrupt()
        while not (self.lw[_W["guest_state"]] == abi.LINK_READY
                   and self.token() not in (0, other_than)
                   and self.helper_state() == (abi.LINK_ATTACH,
                                               self.token())):
            left = end - time.monotonic()
            assert left > 0, f"no helper attached; link {self.link()}"
            self.wait_irq(left)
        return self.token()

    def link(self):
        return {k: self.lw[w] for k, w in _W.items()
                if not k.startswith("pad") and k != "crossover"}

    def detach(self):
        """The module unloads."""
        self.lw[_W["guest_state"]] = 0
        self.lw[_W["guest_token"]] = 0
        self.ring()

    def reload(self, entries):
        """rmmod then insmod with another ring size, so fast that the new
        module acks the token the helper still shows (the helper sees
        one ring, of the new module)."""
        self.lw[_W["guest_state"]] = 0
        self.region.release()
        self.entries = entries
        self.write_header()
        self.region = Region(self.mm, owner=True)
        for s, k in self.keys.items():
            self.set_key(s, k)
        idx = self.region.idx
        idx[_SQ_TAIL] = idx[_SQ_HEAD] = idx[_CQ_TAIL] = idx[_CQ_HEAD] = 0
        self.outstanding.clear()
        self.lw[_W["guest_token"]] = self.lw[_W["helper_token"]]
        self.lw[_W["guest_state"]] = abi.LINK_READY
        self.ring()

    # -- requests

    def submit(self, sqes):
        """Publish ``sqes`` (seq and tag filled in), ring if asked to;
        returns their seqs."""
        sqes = sqes.copy()
        n = len(sqes)
        assert len(self.outstanding) + n <= self.entries
        seqs = list(range(self.seq, self.seq + n))
        self.seq += n
        sqes["seq"] = seqs
        free = sorted(set(range(self.entries))
                      - set(self.outstanding.values()))
        sqes["tag"] = free[:n]
        for s, t in zip(seqs, free[:n]):
            self.outstanding[s] = t
        idx = self.region.idx
        tail = idx[_SQ_TAIL]
        self.region.write(self.region.sq_off, tail & (self.entries - 1),
                          sqes)
        idx[_SQ_TAIL] = (tail + n) & _MASK32
        full_barrier()
        if self.need_wakeup():
            self.ring()
        return seqs

    def reap(self):
        idx = self.region.idx
        head, tail = idx[_CQ_HEAD], idx[_CQ_TAIL]
        n = (tail - head) & _MASK32
        if n == 0 or n > self.entries:
            idx[_CQ_HEAD] = tail
            return 0
        cq = self.region.read(self.region.cq_off, abi.CQE,
                              head & (self.entries - 1), n)
        idx[_CQ_HEAD] = tail
        for seq, tag, status, flags in cq.tolist():
            if self.outstanding.get(seq) == tag:
                del self.outstanding[seq]
                self.answers[seq] = (status, flags)
        return n

    def wait_answers(self, seqs, timeout=10.0):
        """Statuses of ``seqs``, waiting for them (through interrupts)."""
        end = time.monotonic() + timeout
        while True:
            self.reap()
            if all(s in self.answers for s in seqs):
                return [self.answers.pop(s)[0] for s in seqs]
            left = end - time.monotonic()
            assert left > 0, (f"no answer to {len(seqs)} requests; link "
                              f"{self.link()}, idx {list(self.idx())}")
            self.wait_irq(min(left, 1.0))

    def run(self, sqes, timeout=10.0):
        return self.wait_answers(self.submit(sqes), timeout)

    def idx(self):
        i = self.region.idx
        return i[_SQ_TAIL], i[_SQ_HEAD], i[_CQ_TAIL], i[_CQ_HEAD]

    def close(self):
        """Its QEMU exits."""
        self.region.release()
        self.lw.release()
        try:
            self.mm.close()
        except BufferError:
            pass
        self.qemu.close()
