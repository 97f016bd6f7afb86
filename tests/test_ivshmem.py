"""kgpu helper --ivshmem against a fake QEMU and fake guests (no VM).

The helper runs as a process (cpu backend), as a person runs it; it
starts the socket's ivshmem server, which must survive the helper's
death. Every test leaves no server behind (the ``no_servers_left``
fixture checks it and kills any straggler).
"""

import errno
import os
import select
import signal
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kgpu_helper.rings import abi
from kgpu_helper.rings.ivshmem_server import server_pid
from kgpu_helper.rings.ringdriver import sqe

import raid6_ref
from ivshmem_fake import FakeGuest, FakeQemu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = bytes(range(64))
REGION = 4 << 20
EINVAL = -errno.EINVAL


def xts_oracle(key, data, sector, unit):
    out = bytearray()
    for i in range(len(data) // unit):
        c = Cipher(algorithms.AES(key),
                   modes.XTS((sector + i).to_bytes(16, "little")))
        out += c.encryptor().update(bytes(data[i * unit:(i + 1) * unit]))
    return bytes(out)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


class Bench:
    """Helper processes, fake guests and sockets of one test."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.procs = []
        self.guests = []
        self.sockets = set()

    def sock(self, name):
        p = str(self.dir / name)
        self.sockets.add(p)
        return p

    def helper(self, *socks, wait=True):
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        args = [sys.executable, "-m", "kgpu_helper.cli", "helper",
                "--backend", "cpu", "--cpu-threads", "1", "--spin-us", "0",
                "--region-size", str(REGION)]
        for s in socks:
            args += ["--ivshmem", s]
        log = open(self.dir / f"helper{len(self.procs)}.log", "w+")
        p = subprocess.Popen(args, env=env, stdout=log, stderr=log,
                             text=True)
        p.log = log
        self.procs.append(p)
        if wait:
            end = time.monotonic() + 30
            while not all(server_pid(s) and os.path.exists(s)
                          for s in socks):
                assert p.poll() is None, self.output(p)
                assert time.monotonic() < end, self.output(p)
                time.sleep(0.02)
        return p

    @staticmethod
    def output(p):
        p.log.seek(0)
        return p.log.read()

    def guest(self, sock, **kw):
        g = FakeGuest(sock, **kw)
        self.guests.append(g)
        return g

    def stop(self, p):
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0, self.output(p)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            p.log.close()
        for g in self.guests:
            g.close()


@pytest.fixture
def bench(tmp_path):
    b = Bench(tmp_path)
    try:
        yield b
    finally:
        b.close()
        # a clean helper stop and no guest left: every server exits
        left = {}
        end = time.monotonic() + 5
        for s in b.sockets:
            pid = server_pid(s)
            while pid and _alive(pid) and time.monotonic() < end:
                time.sleep(0.02)
            if pid and _alive(pid):
                left[s] = pid
                os.kill(pid, signal.SIGKILL)
        assert not left, f"ivshmem servers left running: {left}"
        for s in b.sockets:
            for suffix in ("", ".ctl", ".lock"):
                assert not os.path.exists(s + suffix), s + suffix


def xts_req(g, off, n, sector=0, unit=512, **kw):
    return sqe(abi.SVC_XTS_ENC, in_off=off, out_off=off, in_len=n,
               out_len=n, unit_size=unit, sector=sector, sector_step=1, **kw)


def check_served(g, rng, n=16384):
    """XTS, RAID6 gen and a NOP through ``g``, byte-exact."""
    off = g.data_off + 8192
    data = rng.bytes(n)
    g.view(off, n)[:] = np.frombuffer(data, np.uint8)
    roff = off + n
    unit = 4096
    rows = [rng.bytes(unit) for _ in range(4)]
    g.view(roff, 6 * unit)[:4 * unit] = np.frombuffer(b"".join(rows),
                                                      np.uint8)
    reqs = np.concatenate([
        xts_req(g, off, n, sector=77),
        sqe(abi.SVC_RAID6_GEN, in_off=roff, out_off=roff, in_len=6 * unit,
            out_len=6 * unit, unit_size=unit, ndisks=6),
        sqe(abi.SVC_NOP)])
    assert g.run(reqs) == [0, 0, 0]
    assert g.view(off, n).tobytes() == xts_oracle(KEY, data, 77, 512)
    p, q = raid6_ref.pq(rows)
    assert g.view(roff + 4 * unit, 2 * unit).tobytes() == p + q


def served_guest(bench, seed):
    """A helper on a new socket, a guest attached to it and served once:
    (socket, helper process, guest, its token, rng)."""
    s = bench.sock("a.sock")
    h = bench.helper(s)
    g = bench.guest(s)
    g.set_key(0, KEY)
    tok = g.wait_attached()
    rng = np.random.default_rng(seed)
    check_served(g, rng)
    return s, h, g, tok, rng


# ------------------------------------------------------------------ tests

def test_greeting_attach_and_requests(bench):
    s = bench.sock("a.sock")
    h = bench.helper(s)
    g = bench.guest(s)
    assert g.size == REGION
    g.set_key(0, KEY)
    tok = g.wait_attached()
    assert tok != 0
    link = g.link()
    assert link["helper_pid"] == h.pid
    # the cpu backend: every request to the helper (crossover 0)
    assert g.lw[abi.LINK.fields["crossover"][1] // 4] == 0
    rng = np.random.default_rng(1)
    check_served(g, rng)
    # one at a time too (the daemon's depth-1 path)
    assert g.run(sqe(abi.SVC_NOP)) == [0]
    # invalid requests are answered -EINVAL, not computed
    assert g.run(xts_req(g, g.data_off, 4096, key_slot=9)) == [EINVAL]
    bench.stop(h)
    # a clean stop says so to the guest
    assert g.wait_irq(5) or True
    g.interrupt()
    assert g.helper_state()[0] == abi.LINK_DETACH and g.detached


def test_idle_helper_sleeps(bench):
    s = bench.sock("a.sock")
    h = bench.helper(s)
    g = bench.guest(s)
    g.set_key(0, KEY)
    g.wait_attached()
    check_served(g, np.random.default_rng(2))
    _asleep(g)                    # asleep, and asks to be rung
    rings = g.rings

    def cpu():
        with open(f"/proc/{h.pid}/stat") as f:
            v = f.read().split(") ")[1].split()
        return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")

    c0, t0 = cpu(), time.monotonic()
    time.sleep(1.0)
    used = (cpu() - c0) / (time.monotonic() - t0)
    assert used < 0.02, f"idle helper used {used:.1%} of a CPU"
    # submitting while it sleeps rings once, and it answers
    assert g.run(sqe(abi.SVC_NOP)) == [0]
    assert g.rings == rings + 1


def test_kill9_new_helper_reattaches_server_survives(bench):
    s = bench.sock("a.sock")
    h = bench.helper(s)
    srv = server_pid(s)
    # its own session: the helper's process group or terminal is not its
    assert os.getsid(srv) != os.getsid(h.pid)
    assert os.getpgid(srv) != os.getpgid(h.pid)
    g = bench.guest(s)
    g.set_key(0, KEY)
    tok = g.wait_attached()
    rng = np.random.default_rng(3)
    check_served(g, rng)
    # requests in flight, then kill -9
    off = g.data_off
    g.submit(np.concatenate([xts_req(g, off + i * 65536, 65536)
                             for i in range(32)]))
    assert g.idx()[0] == 32 + 3
    h.kill()
    h.wait()
    assert _alive(srv) and server_pid(s) == srv
    h2 = bench.helper(s)
    tok2 = g.wait_attached(other_than=tok)
    assert tok2 != tok
    assert g.link()["helper_pid"] == h2.pid
    check_served(g, rng)
    assert server_pid(s) == srv
    bench.stop(h2)
    g.close()
    bench.guests.remove(g)


def test_two_guests_one_helper(bench):
    a, b = bench.sock("a.sock"), bench.sock("b.sock")
    bench.helper(a, b)
    ga, gb = bench.guest(a), bench.guest(b)
    assert server_pid(a) != server_pid(b)
    for g in (ga, gb):
        g.set_key(0, KEY)
        g.wait_attached()
    errs = []

    def work(g, seed):
        try:
            rng = np.random.default_rng(seed)
            for _ in range(10):
                check_served(g, rng, n=8192)
        except BaseException as e:  # noqa: BLE001
            errs.append(e)

    ths = [threading.Thread(target=work, args=(g, i))
           for i, g in enumerate((ga, gb))]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    assert not errs, errs


def _asleep(g, timeout=10.0):
    """Until the helper serving ``g`` went to sleep (set need_wakeup, the
    last thing it writes in an idle guest's memory before poll())."""
    end = time.monotonic() + timeout
    while g.need_wakeup() != 1:
        assert time.monotonic() < end, ("helper not asleep", g.link())
        time.sleep(0.005)


def _link_wait(g, cond, what, timeout=10.0):
    """Wait for cond() reading the guest's interrupts without acting on
    them (a guest that does not play along)."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, (what, g.link())
        if select.select([g.irq], [], [], 0.2)[0]:
            os.eventfd_read(g.irq)


def ack_with_bad_header(g, field, value):
    """Ack the helper's next attach offer with a header whose ``field``
    is ``value``; the helper must detach again."""
    _link_wait(g, lambda: g.helper_state()[0] == abi.LINK_ATTACH
               and g.helper_state()[1] != g.token(), "attach offer")
    g.write_header()
    o = abi.REGION_HDR.fields[field][1]
    size = abi.REGION_HDR.fields[field][0].itemsize
    g.mm[o:o + size] = value.to_bytes(size, "little")
    w = abi.LINK.fields["guest_token"][1] // 4
    g.lw[w] = g.helper_state()[1]
    g.ring()
    _link_wait(g, lambda: g.helper_state()[0] == abi.LINK_DETACH,
               f"detach after a bad {field}")


def _crc(g):
    return zlib.crc32(g.mm)


def test_malicious_guest_hurts_only_itself(bench):
    a, b = bench.sock("good.sock"), bench.sock("evil.sock")
    h = bench.helper(a, b)
    good, evil = bench.guest(a), bench.guest(b)
    good.set_key(0, KEY)
    evil.set_key(0, KEY)
    good.wait_attached()
    tok = evil.wait_attached()
    rng = np.random.default_rng(4)
    check_served(good, rng)
    # the good guest's helper thread asleep, need_wakeup (its last store
    # to that guest's memory) set: after a fixed 0.2 s wait the crc could
    # be taken before that store, and then differ for no fault
    _asleep(good)
    crc = _crc(good)

    # garbage SQEs, bad key slots, huge and overflowing offsets
    junk = np.frombuffer(rng.bytes(32 * abi.SQE.itemsize), abi.SQE).copy()
    junk["flags"] |= 1
    big = 2 ** 64 - 4096
    bad = np.concatenate([
        junk,
        xts_req(evil, evil.data_off, 4096, key_slot=4),
        xts_req(evil, evil.data_off, 4096, key_slot=0xFFFF),
        xts_req(evil, big, 4096),
        sqe(abi.SVC_XTS_ENC, in_off=evil.data_off, out_off=big,
            in_len=4096, out_len=4096, unit_size=512),
        xts_req(evil, evil.data_off + evil.data_size - 512, 4096),
        xts_req(evil, evil.data_off, 4096, unit=0),
        sqe(abi.SVC_RAID6_GEN, in_off=evil.data_off, out_off=evil.data_off,
            in_len=0xFFFFFFF0, out_len=0xFFFFFFF0, unit_size=0x10000000,
            ndisks=255),
        sqe(abi.SVC_RAID6_PQD, in_off=evil.data_off, out_off=evil.data_off,
            in_len=3 * 4096, out_len=3 * 4096, unit_size=4096, ndisks=4,
            fail_a=3, fail_b=3),
    ])
    st = evil.run(bad[:32])
    assert st == [EINVAL] * 32
    st = evil.run(bad[32:])
    assert all(x < 0 for x in st), st
    assert st[0] == EINVAL and st[1] == EINVAL
    # one at a time (the depth-1 path) too
    for r in bad[33:]:
        assert evil.run(r[None])[0] < 0

    # a wild sq_tail: the helper detaches that guest, logs one line
    idx = evil.region.idx
    idx[abi.SQ_TAIL_OFF // 4] = idx[abi.SQ_HEAD_OFF // 4] + 1000000
    evil.ring()
    end = time.monotonic() + 10
    while evil.helper_state()[0] != abi.LINK_DETACH:
        assert time.monotonic() < end, evil.link()
        evil.wait_irq(1)
    # ... then offers to attach again: acked with garbage headers
    for field, value in (("ring_entries", 8192), ("sq_off", 2 ** 63),
                         ("data_size", 2 ** 64 - 1), ("key_slots", 70000),
                         ("magic", 0)):
        ack_with_bad_header(evil, field, value)
    # the good guest: untouched, and still served right
    assert _crc(good) == crc
    check_served(good, rng)
    assert h.poll() is None
    out = Bench.output(h)
    assert "evil.sock: guest 1: submission ring corrupt" in out
    assert "ring_entries 8192 > 4096" in out
    # and the evil guest, behaving again, is served again
    evil.wait_attached(other_than=tok)
    check_served(evil, rng)


def test_qemu_reconnect_gets_fresh_memory(bench):
    s, _h, g, _tok, _rng = served_guest(bench, 5)
    ino = g.ino
    g.close()
    bench.guests.remove(g)
    q = FakeQemu(s)
    _gid, memfd, _bell, _irq = q.greeting()
    try:
        assert os.fstat(memfd).st_ino != ino
        mem = os.pread(memfd, REGION, 0)
        # all zero but what the helper writes to attach (its link line)
        lo, hi = abi.LINK_OFF, abi.LINK_OFF + 64
        assert mem[:lo].count(0) == lo
        assert mem[hi:].count(0) == REGION - hi
    finally:
        q.close()


def test_second_qemu_refused(bench):
    s = bench.sock("a.sock")
    bench.helper(s)
    g = bench.guest(s)
    g.wait_attached()
    q = FakeQemu(s)
    try:
        assert q.recv_msg() == (-errno.EBUSY, [])
        assert q.recv_msg() is None
    finally:
        q.close()
    assert g.run(sqe(abi.SVC_NOP)) == [0]


def test_second_helper_refused(bench):
    s = bench.sock("a.sock")
    h = bench.helper(s)
    h2 = bench.helper(s, wait=False)
    assert h2.wait(30) == 1
    out = Bench.output(h2)
    assert f"another helper (pid {h.pid}) is serving this socket" in out
    assert h.poll() is None


def test_region_size_must_be_power_of_two(bench):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-m", "kgpu_helper.cli", "helper", "--backend",
         "cpu", "--ivshmem", bench.sock("a.sock"), "--region-size", "48M"],
        env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "power of two" in out.stderr


def test_guest_module_reload_gets_a_new_token(bench):
    _s, _h, g, tok, rng = served_guest(bench, 6)
    g.detach()   # rmmod: state and token 0, doorbell
    # unloaded, it answers no interrupt until the helper's new offer
    _link_wait(g, lambda: g.helper_state()[1] != tok, "a new offer")
    tok2 = g.wait_attached(other_than=tok)
    assert tok2 != tok
    check_served(g, rng)


def test_fast_module_reload_with_another_layout(bench):
    _s, _h, g, tok, rng = served_guest(bench, 7)
    _asleep(g)             # the helper waits for the next request
    g.reload(entries=16)   # acks the old token with a new header
    assert g.token() == tok
    tok2 = g.wait_attached(other_than=tok)
    assert tok2 != tok
    check_served(g, rng)


def test_stale_socket_files_and_a_stopped_server(bench):
    import socket

    s = bench.sock("a.sock")
    # what a server killed with -9 leaves: socket files nobody listens on
    for p in (s, s + ".ctl"):
        x = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        x.bind(p)
        x.close()
    bench.helper(s)
    srv = server_pid(s)
    g = bench.guest(s)
    g.wait_attached()
    assert g.run(sqe(abi.SVC_NOP)) == [0]
    # SIGTERM stops the server at once (its guest loses the link); the
    # helper starts a new one for the next QEMU
    os.kill(srv, signal.SIGTERM)
    # (a generous deadline: a loaded 2-core machine took more than 10 s)
    end = time.monotonic() + 30
    while server_pid(s) in (None, srv) or not os.path.exists(s):
        assert time.monotonic() < end
        time.sleep(0.05)
    g.close()
    bench.guests.remove(g)
    g = bench.guest(s)
    g.wait_attached()
    assert g.run(sqe(abi.SVC_NOP)) == [0]


def test_server_exits_on_a_bye_queued_behind_a_guest_disconnect(tmp_path):
    """QEMU goes and the helper says BYE and closes while the server looks
    elsewhere: it then sees both at once, its GONE to the helper fails
    (EPIPE) with the BYE still unread. A clean stop all the same: with no
    guest and no helper it exits (it used to keep running: a flake of
    test_qemu_reconnect_gets_fresh_memory's teardown on a loaded machine)."""
    from kgpu_helper.rings.ivshmem import ServerLink

    sock = str(tmp_path / "a.sock")
    link = ServerLink(sock, region_size=4 << 20)     # starts the server
    q = FakeQemu(sock)
    q.greeting()
    assert link.recv(5)[0] is not None               # GUES reached the helper
    pid = server_pid(sock)
    os.kill(pid, signal.SIGSTOP)
    try:
        q.close()                                    # QEMU first
        link.bye()                                   # BYE, close
    finally:
        os.kill(pid, signal.SIGCONT)
    end = time.monotonic() + 10
    while server_pid(sock) == pid and time.monotonic() < end:
        time.sleep(0.05)
    log = open(sock + ".log").read()
    if server_pid(sock) == pid:
        os.kill(pid, signal.SIGTERM)
        pytest.fail("server kept running after a clean stop:\n" + log)
    assert "it had said BYE" in log and "exiting" in log, log
