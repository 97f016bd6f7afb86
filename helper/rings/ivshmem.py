"""The helper's side of ivshmem: guests in VMs served through QEMU's
``ivshmem-doorbell`` device (ABI 4, "The ivshmem region provider" in
kmod/uapi/kgpu.h).

Per socket (one guest each):

- :class:`ServerLink`: the control connection to the socket's ivshmem
  server (:mod:`kgpu_helper.rings.ivshmem_server`), started here as a detached
  process when none runs. It hands over the current guest's memfd and its
  two eventfds, and says when the guest's QEMU goes away.
- :class:`IvshmemTransport`: a :class:`~kgpu_helper.rings.transport.Transport`
  over that memfd. ``fileno()`` is the doorbell eventfd (QEMU signals it
  when the guest rings), ``post()`` signals the guest's interrupt eventfd
  once per batch. :meth:`~IvshmemTransport.attach` is the handshake of
  struct kgpu_link; the :class:`~kgpu_helper.rings.transport.Region` is built
  (and checked: the guest is untrusted) only once the guest acked our
  token.
- :class:`GuestService`: one thread that waits for the guest, attaches,
  runs a :class:`~kgpu_helper.serve.daemon.Helper` (its own Region and
  KeyCache; backends shared by every guest) until the guest goes, detaches
  or misbehaves, and starts over.

need_wakeup: before it sleeps the helper sets ``link.need_wakeup``, makes
a full memory barrier, then looks at ``sq_tail`` once more; the guest
publishes ``sq_tail``, makes a full barrier, then reads ``need_wakeup``
and rings if it is set. x86's TSO lets a store pass a later load, so
without the barrier both sides could miss each other's store and the
request would wait for its timeout. Python has no fence: a lock and
unlock of an uncontended pthread mutex (a ``lock cmpxchg`` in glibc,
which orders every earlier store before every later load) stands in.
"""

import array
import ctypes
import logging
import mmap
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading

from kgpu_helper.rings import abi
from kgpu_helper.rings.ivshmem_server import (BUSY, BYE, CTL_MSG, GONE, GUES,
                                        HELO, check_region_size, ctl_path,
                                        log_path)
from kgpu_helper.rings.transport import Region, Transport, TransportError

log = logging.getLogger("kgpu.helper")

#: the largest rings and key tables a guest may declare (the module's own
#: limits, kmod/kgpu_main.c): the helper allocates per entry and per slot
MAX_RING_ENTRIES = 4096
MAX_KEY_SLOTS = 4096

_W = {name: abi.LINK.fields[name][1] // 4
      for name in ("helper_state", "helper_token", "helper_pid",
                   "need_wakeup", "crossover", "guest_state", "guest_token",
                   "guest_id")}
_NCROSS = abi.LINK.fields["crossover"][0].shape[0]
_HDR_LEN = abi.REGION_HDR.itemsize


class GuestGone(TransportError):
    """The guest's QEMU disconnected from the ivshmem server."""


class GuestDetached(TransportError):
    """The guest dropped our token (its module unloaded or reloaded)."""


class ServerGone(TransportError):
    """The ivshmem server of the socket went away."""


# ------------------------------------------------------------ barrier

_libc = ctypes.CDLL(None)
_MUTEX = ctypes.create_string_buffer(64)   # pthread_mutex_t, default kind


def full_barrier():
    """A full memory barrier (see the module doc)."""
    _libc.pthread_mutex_lock(_MUTEX)
    _libc.pthread_mutex_unlock(_MUTEX)


# ------------------------------------------------------------- server

def start_server(path, region_size, timeout=10.0):
    """Start the ivshmem server of ``path`` as a detached process (own
    session, reparented to init, its log in ``path.log``); returns once
    it listens (or another one already does)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        with open(log_path(path), "ab") as logf:
            p = subprocess.Popen(
                [sys.executable, "-m", "kgpu_helper.rings.ivshmem_server",
                 path, "--region-size", str(region_size),
                 "--ready-fd", str(w), "--detach"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                pass_fds=(w,), start_new_session=True)
        os.close(w)
        w = -1
        p.wait(timeout)  # the first process forks and exits at once
        msg = b""
        while select.select([r], [], [], timeout)[0]:
            b = os.read(r, 512)
            if not b:
                break
            msg += b
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    msg = msg.decode(errors="replace").strip()
    if msg in ("ok", "running"):
        return
    raise TransportError(msg or f"the ivshmem server of {path} did not "
                         f"start (see {log_path(path)})")


def _recv_fds(sock, size, maxfds, flags):
    """socket.recv_fds() that honours ``flags`` (3.11's ignores them)."""
    msg, anc, mflags, _ = sock.recvmsg(
        size, socket.CMSG_LEN(maxfds * 4), flags)
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds), mflags


class ServerLink:
    """The helper's control connection to the ivshmem server of ``path``,
    started if none runs (``start``)."""

    def __init__(self, path, region_size=64 << 20, start=True,
                 timeout=10.0):
        self.path = os.path.abspath(path)
        self.sock = None
        check_region_size(region_size)
        for attempt in range(3):
            s = self._connect()
            if s is None:
                if not start:
                    raise TransportError(f"no ivshmem server runs for "
                                         f"{path}")
                start_server(self.path, region_size, timeout)
                s = self._connect()
                if s is None:
                    raise TransportError(f"the ivshmem server of {path} "
                                         f"started but does not answer")
            self.sock = s
            try:
                kind, a, b, _ = self.recv(timeout)
            except ServerGone:
                # it was exiting (its last helper had stopped): again
                self.close()
                continue
            if kind == BUSY:
                self.close()
                raise TransportError(
                    f"{path}: another helper (pid {a}) is serving this "
                    f"socket; stop it first")
            if kind != HELO:
                self.close()
                raise TransportError(f"{path}: unexpected {kind!r} from "
                                     f"the ivshmem server")
            self.server_pid, self.region_size = a, b
            if b != region_size:
                log.warning("%s: its server runs with %d MiB regions, not "
                            "%d: stop the server to change it", path,
                            b >> 20, region_size >> 20)
            return
        raise TransportError(f"{path}: the ivshmem server keeps hanging up")

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET
                          | socket.SOCK_CLOEXEC)
        try:
            s.connect(ctl_path(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            return None
        return s

    def fileno(self):
        return self.sock.fileno()

    def recv(self, timeout=None, nowait=False):
        """(kind, a, b, fds) of the next message; None if ``nowait`` and
        there is none."""
        if self.sock is None:
            raise ServerGone(f"{self.path}: no ivshmem server")
        if not nowait and timeout is not None:
            if not select.select([self.sock], [], [], timeout)[0]:
                raise TransportError(f"{self.path}: the ivshmem server "
                                     f"does not answer")
        try:
            msg, fds, flags = _recv_fds(self.sock, CTL_MSG.size, 3,
                                        socket.MSG_DONTWAIT if nowait else 0)
        except BlockingIOError:
            return None
        except OSError:
            msg, fds, flags = b"", [], 0
        if len(msg) != CTL_MSG.size or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            self.close()
            raise ServerGone(f"the ivshmem server of {self.path} went away")
        kind, a, b = CTL_MSG.unpack(msg)
        return kind, a, b, fds

    def bye(self):
        """A clean stop: the server may exit once its guest is gone."""
        if self.sock is not None:
            try:
                self.sock.send(CTL_MSG.pack(BYE, os.getpid(), 0))
            except OSError:
                pass
        self.close()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# ---------------------------------------------------------- transport

class IvshmemTransport(Transport):
    """One guest's region (the memfd), doorbell and interrupt."""

    name = "ivshmem"

    def __init__(self, link, memfd, bell, irq, size, guest_id):
        self.link = link
        self.bell, self.irq = bell, irq
        self.guest_id = guest_id
        self.region = None
        self.mm = None
        self.token = 0
        self._hdr = b""
        try:
            if os.fstat(memfd).st_size < size:
                raise TransportError(f"the guest's memory is smaller than "
                                     f"{size} bytes")
            self.mm = mmap.mmap(memfd, size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(memfd)
            self.close()
            raise
        os.close(memfd)
        self.size = size
        self.lw = memoryview(self.mm)[
            abi.LINK_OFF:abi.LINK_OFF + abi.LINK.itemsize].cast("I")

    # -- struct kgpu_link

    def _signal_guest(self):
        os.eventfd_write(self.irq, 1)

    def _guest_ok(self):
        lw = self.lw
        return (lw[_W["guest_state"]] == abi.LINK_READY
                and lw[_W["guest_token"]] == self.token)

    def check(self):
        """Raise GuestGone (its QEMU went away, or the server did) or
        GuestDetached (it dropped our token) if so."""
        while True:
            m = self.link.recv(nowait=True)
            if m is None:
                break
            kind, _a, _b, fds = m
            for fd in fds:
                os.close(fd)
            if kind == GONE:
                raise GuestGone(f"guest {self.guest_id} is gone")
        if self.region is not None:
            if not self._guest_ok():
                raise GuestDetached(f"guest {self.guest_id} detached")
            # A module reloaded fast enough acks the token it finds before
            # we saw it go: its new header tells (same header: the rings
            # restarted at 0, which serving follows as it is)
            if self.mm[:_HDR_LEN] != self._hdr:
                raise GuestDetached(f"guest {self.guest_id} rewrote its "
                                    f"header")

    def attach(self, crossover, wake_fd=-1):
        """Offer a new token and sleep until the guest acks it; then map
        its region. False if ``wake_fd`` became readable first (stop)."""
        self.drop_region()
        lw = self.lw
        tok = self.token
        while tok in (0, self.token):
            tok = secrets.randbits(32)
        self.token = tok
        lw[_W["need_wakeup"]] = 0
        c = _W["crossover"]
        for s in range(_NCROSS):
            lw[c + s] = int(crossover.get(s, 0)) & 0xFFFFFFFF
        lw[_W["helper_pid"]] = os.getpid()
        lw[_W["helper_token"]] = tok
        lw[_W["helper_state"]] = abi.LINK_ATTACH  # last (TSO)
        self._signal_guest()
        p = select.poll()
        for fd in (self.bell, self.link.fileno(), wake_fd):
            if fd >= 0:
                p.register(fd, select.POLLIN)
        while not self._guest_ok():
            for fd, _ev in p.poll():
                if fd == wake_fd:
                    return False
                if fd == self.bell:
                    self._clear_bell()
            self.check()
        self._hdr = self.mm[:_HDR_LEN]
        self.region = _guest_region(self.mm)
        if self.mm[:_HDR_LEN] != self._hdr:
            self.drop_region()
            raise GuestDetached(f"guest {self.guest_id} rewrote its header "
                                f"while attaching")
        return True

    def detach(self):
        """helper_state = DETACH, and tell the guest."""
        if self.mm is not None and self.lw is not None:
            self.lw[_W["need_wakeup"]] = 0
            self.lw[_W["helper_state"]] = abi.LINK_DETACH
            try:
                self._signal_guest()
            except OSError:
                pass
        self.drop_region()

    def drop_region(self):
        if self.region is not None:
            self.region.release()
            self.region = None

    # -- Transport

    def fileno(self):
        return self.bell

    def _clear_bell(self):
        try:
            os.eventfd_read(self.bell)
        except BlockingIOError:
            pass

    def _clear(self):
        self._clear_bell()
        self.check()

    def _wait_fd(self, timeout):
        if not self.arm_wakeup():   # True: work came, no bell will
            try:
                super()._wait_fd(timeout)
            finally:
                self.disarm_wakeup()
        self._clear()

    def arm_wakeup(self):
        """need_wakeup = 1, barrier, look again; True if work came."""
        self.lw[_W["need_wakeup"]] = 1
        full_barrier()
        if self.pending():
            self.lw[_W["need_wakeup"]] = 0
            return True
        return False

    def disarm_wakeup(self):
        self.lw[_W["need_wakeup"]] = 0

    def _doorbell(self):
        self._signal_guest()

    def close(self):
        self.drop_region()
        if getattr(self, "lw", None) is not None:
            self.lw.release()
            self.lw = None
        self._unmap()
        for fd in (self.bell, self.irq):
            if fd >= 0:
                os.close(fd)
        self.bell = self.irq = -1


def _guest_region(mm):
    """The Region of a guest's memory, with the limits a kernel keeps."""
    r = Region(mm)
    try:
        if r.entries > MAX_RING_ENTRIES:
            raise TransportError(f"ring_entries {r.entries} > "
                                 f"{MAX_RING_ENTRIES}")
        if r.nkeys > MAX_KEY_SLOTS:
            raise TransportError(f"key_slots {r.nkeys} > {MAX_KEY_SLOTS}")
    except TransportError:
        r.release()
        raise
    return r


# ------------------------------------------------------------ service

class GuestService:
    """One socket's guests, served one after the other by one thread.

    ``make_helper(transport)`` builds the serving loop of an attached
    guest (a :class:`~kgpu_helper.serve.daemon.Helper`); ``crossover``: bytes
    per service, written to the link at every attach.
    """

    def __init__(self, path, region_size, make_helper, crossover=None):
        self.path = path
        self.region_size = region_size
        self.make_helper = make_helper
        self.crossover = dict(crossover or {})
        self.link = ServerLink(path, region_size)
        self.stopping = False
        self.helper = None
        self.served = self.attaches = self.errors = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name=f"ivshmem {path}")

    def stop(self):
        self.stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        h = self.helper
        if h is not None:
            h.request_stop()

    def _pause(self, seconds, fds=()):
        """Sleep ``seconds`` or until stopped or one of ``fds`` is
        readable; False if stopping."""
        select.select([self._wake_r, *fds], [], [], seconds)
        return not self.stopping

    def run(self):
        try:
            while not self.stopping:
                try:
                    fds = self._wait_guest()
                    if fds is None:
                        break
                    t = IvshmemTransport(self.link, *fds)
                    try:
                        self._serve_guest(t)
                    finally:
                        t.close()
                except ServerGone as e:
                    if self.stopping:
                        break
                    log.warning("%s; starting a new one", e)
                    self._reconnect()
        except Exception:  # noqa: BLE001 - a bug of ours: this socket only
            log.exception("%s: serving stopped", self.path)
        finally:
            self.link.bye()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)

    def _reconnect(self):
        while self._pause(1.0):
            try:
                self.link = ServerLink(self.path, self.region_size)
                return
            except TransportError as e:
                log.error("%s", e)

    def _wait_guest(self):
        """(memfd, doorbell, interrupt, size, guest id) of the next guest;
        None when stopping."""
        while not self.stopping:
            r, _, _ = select.select([self._wake_r, self.link], [], [])
            if self._wake_r in r:
                return None
            kind, a, b, fds = self.link.recv(nowait=True) or (b"", 0, 0, [])
            if kind == GUES and len(fds) == 3:
                log.info("%s: guest %d connected (%d MiB)", self.path, a,
                         b >> 20)
                return (*fds, b, a)
            for fd in fds:
                os.close(fd)
        return None

    def _serve_guest(self, t):
        errors = 0
        try:
            while not self.stopping:
                pause = 0
                h = None
                try:
                    if not t.attach(self.crossover, self._wake_r):
                        break
                    self.attaches += 1
                    r = t.region
                    log.info("%s: guest %d attached (token %#x; %d entries,"
                             " %d MiB data)", self.path, t.guest_id, t.token,
                             r.entries, r.data_size >> 20)
                    h = self.helper = self.make_helper(t)
                    if self.stopping:
                        h.request_stop()
                    h.serve()
                    errors = 0
                except (GuestGone, ServerGone):
                    raise
                except GuestDetached as e:
                    log.info("%s: %s (its module unloaded?); offering to "
                             "attach again", self.path, e)
                    errors = 0
                    pause = 0.05  # a real reload takes far longer
                except Exception as e:  # noqa: BLE001 - the guest's fault
                    errors += 1
                    self.errors += 1
                    log.error("%s: guest %d: %s; detaching it", self.path,
                              t.guest_id, e)
                    t.detach()
                    pause = min(5.0, 0.05 * 2 ** errors)
                finally:
                    if h is not None:
                        self.served += h.stats["answered"]
                        self.helper = None
                        h.close()
                        del h
                    t.drop_region()
                if pause:
                    self._pause(pause, [self.link])
                    t.check()
            t.detach()  # a clean stop: the guest takes back the rest
        except GuestGone:
            log.info("%s: guest %d is gone (QEMU disconnected)", self.path,
                     t.guest_id)


def serve(paths, region_size, make_helper, crossover=None):
    """Serve every socket of ``paths`` (one thread each) until SIGTERM or
    SIGINT; returns the GuestServices (their counters)."""
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise TransportError("the same --ivshmem socket is given twice")
    services = []
    try:
        for p in paths:
            services.append(GuestService(p, region_size, make_helper,
                                         crossover))
    except BaseException:
        for s in services:
            s.link.bye()
        raise

    def stop(*_):
        for s in services:
            s.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    for s in services:
        s.thread.start()
    for s in services:
        s.thread.join()
    return services

