"""The ivshmem server of one socket: a small process without GPU code.

QEMU's ``ivshmem-doorbell`` device connects to a Unix socket and expects
an ivshmem server there (QEMU's docs/specs/ivshmem-spec.rst). QEMU cannot
connect again to a server that restarted, while the helper must be
replaceable (``kill -9`` mid-I/O, then a new helper): so the server is
this separate process, started by ``kgpu helper --ivshmem SOCKET`` when
none runs for SOCKET, in its own session (killing the helper, or
``pkill -f 'kgpu helper'``, leaves it alone), and the helper talks to it
over a control socket.

Per QEMU connection (one at a time per socket: a second QEMU is refused,
its greeting is the version -16, -EBUSY, which QEMU rejects) the server creates a fresh
memfd of ``region_size`` bytes (zeroed: a guest never sees a previous
guest's keys or data; sealed against shrinking, so no one can make a
mapping of it fault) and two eventfds: the helper's doorbell (peer 0's
vector 0: QEMU signals it when the guest writes the Doorbell register)
and the guest's interrupt (the guest's own vector 0: the helper signals
it). Greeting, each message an 8-byte little-endian signed integer, some
with one file descriptor (SCM_RIGHTS)::

    0                     protocol version
    1                     the guest's peer id (KGPU guest: always 1)
    -1   + memfd          the shared memory
    0    + doorbell fd    peer 0 (the helper), vector 0
    1    + interrupt fd   the guest itself, vector 0

Control socket ``SOCKET.ctl`` (SOCK_SEQPACKET), one helper at a time;
every message is ``struct.pack("<4sIQ", kind, a, b)``:

    server -> helper
      HELO  a = server pid, b = region size          on connect
      BUSY  a = pid of the helper already attached   then closes
      GUES  a = guest id, b = region size, fds: memfd, doorbell, interrupt
      GONE  a = guest id: its QEMU disconnected (the doorbell eventfd is
            signalled just after, to wake a sleeping helper)
    helper -> server
      BYE   a clean stop

Lifetime: the server runs while a guest (QEMU) is connected or a helper
is attached, and exits when both are gone after a clean helper stop
(BYE). A helper that dies without BYE leaves the server waiting for the
next helper, guest or not. SIGTERM or SIGINT stops it at once (QEMU then
loses its server). The socket files are removed on exit; stale ones of a
dead server are replaced (``SOCKET.lock``, held with flock while the
server lives and holding its pid, tells a live server from a dead one).

Run as ``python -m kgpu_helper.rings.ivshmem_server SOCKET [--region-size N]``.
"""

import argparse
import errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import sys

log = logging.getLogger("kgpu.ivshmem-server")

GUEST_ID = 1
HELPER_PEER = 0
PROTOCOL_VERSION = 0
REFUSED = -errno.EBUSY   # sent instead of the version to a second QEMU
CTL_MSG = struct.Struct("<4sIQ")
HELO, BUSY, GUES, GONE, BYE = b"HELO", b"BUSY", b"GUES", b"GONE", b"BYE\0"
_MSG = struct.Struct("<q")


def ctl_path(path):
    return path + ".ctl"


def lock_path(path):
    return path + ".lock"


def log_path(path):
    return path + ".log"


def check_region_size(n):
    """``n`` if it is a valid region size (a power of two, from 1 MiB: a
    PCI BAR), else ValueError saying why."""
    if n < (1 << 20) or n & (n - 1):
        raise ValueError(f"the region size must be a power of two of at "
                         f"least 1 MiB (it is a PCI BAR), got {n}")
    return n


def server_pid(path):
    """The pid of the live server of ``path``, or None."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return int(os.pread(fd, 32, 0) or b"0") or None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds it: a stale file
    finally:
        os.close(fd)


class _Guest:
    """One connected QEMU and what was made for it."""

    def __init__(self, conn, size):
        self.conn = conn
        self.id = GUEST_ID
        self.memfd = os.memfd_create(
            "kgpu-ivshmem", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, size)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        self.bell = os.eventfd(0, flags)   # peer 0 (the helper), vector 0
        self.irq = os.eventfd(0, flags)    # the guest's own vector 0

    def greet(self):
        """The ivshmem greeting, in the order QEMU reads it."""
        c = self.conn
        c.sendall(_MSG.pack(PROTOCOL_VERSION))
        c.sendall(_MSG.pack(self.id))
        socket.send_fds(c, [_MSG.pack(-1)], [self.memfd])
        socket.send_fds(c, [_MSG.pack(HELPER_PEER)], [self.bell])
        socket.send_fds(c, [_MSG.pack(self.id)], [self.irq])

    def fds(self):
        return [self.memfd, self.bell, self.irq]

    def close(self):
        self.conn.close()
        for fd in self.fds():
            os.close(fd)


class Server:
    """The select loop of one socket."""

    def __init__(self, path, region_size):
        self.path = path
        self.size = check_region_size(region_size)
        self.guest = None
        self.helper = None          # the control connection
        self.keep = True            # until a helper says BYE
        self.stopping = False
        self.sel = selectors.DefaultSelector()
        self.lock_fd = -1
        self.listener = self.ctl = None

    # -- start-up

    def bind(self):
        """Take the lock and the two sockets. Returns None, or why not."""
        self.lock_fd = os.open(lock_path(self.path),
                               os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            self.lock_fd = -1
            return "running"
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, b"%d\n" % os.getpid(), 0)
        for p in (self.path, ctl_path(self.path)):
            if not os.path.exists(p):
                continue
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(p)
            except OSError as e:
                if e.errno == errno.EPROTOTYPE:  # a live SEQPACKET socket
                    return f"{p} is in use by another process"
                os.unlink(p)  # stale: its server is gone
                continue
            finally:
                probe.close()
            return f"{p} is in use by another process"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ctl.bind(ctl_path(self.path))
        self.ctl.listen(4)
        for s in (self.listener, self.ctl):
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)
        return None

    # -- events

    def _send(self, kind, a=0, b=0, fds=()):
        if self.helper is None:
            return
        try:
            if fds:
                socket.send_fds(self.helper, [CTL_MSG.pack(kind, a, b)],
                                list(fds))
            else:
                self.helper.send(CTL_MSG.pack(kind, a, b))
        except OSError as e:
            clean = self._queued_bye()
            log.info("helper connection lost (%s)%s", e,
                     ": it had said BYE" if clean else "")
            self._drop_helper(clean=clean)

    def _queued_bye(self):
        """Whether the helper's BYE waits behind a failure on its socket.

        A helper that stops sends BYE and closes. A send to it after that
        fails (EPIPE) with the BYE still unread; and if it closed with one
        of our messages unread, our next recv() fails (ECONNRESET) before
        the queued BYE comes. Either way it stopped cleanly."""
        for _ in range(64):
            try:
                data = self.helper.recv(64)
            except BlockingIOError:
                return False
            except OSError:
                continue        # the error is reported once; data follows
            if not data:
                return False
            if data[:4] == BYE:
                return True
        return False

    def _accept_qemu(self):
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.guest is not None:
            log.warning("refusing a second QEMU on %s: one guest per "
                        "socket (the first is still connected)", self.path)
            # A bare close would leave QEMU waiting for the greeting
            # forever; a version it does not speak makes its device fail:
            # "server sent version -16, expecting 0" (-EBUSY).
            try:
                conn.send(_MSG.pack(REFUSED))
            except OSError:
                pass
            conn.close()
            return
        try:
            g = _Guest(conn, self.size)
        except OSError as e:
            log.error("cannot make the shared memory for a guest: %s", e)
            conn.close()
            return
        try:
            conn.setblocking(True)
            g.greet()
            conn.setblocking(False)
        except OSError as e:
            log.warning("QEMU went away during the greeting: %s", e)
            g.close()
            return
        self.guest = g
        self.sel.register(conn, selectors.EVENT_READ)
        log.info("guest %d connected (%d MiB region)", g.id, self.size >> 20)
        self._send(GUES, g.id, self.size, g.fds())

    def _qemu_event(self):
        g = self.guest
        try:
            data = g.conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # QEMU sends nothing after connecting: ignore
        log.info("guest %d disconnected", g.id)
        self._drop_guest()

    def _drop_guest(self):
        g, self.guest = self.guest, None
        self.sel.unregister(g.conn)
        self._send(GONE, g.id)
        try:
            os.eventfd_write(g.bell, 1)  # wake a helper asleep on it
        except OSError:
            pass
        g.close()

    def _accept_helper(self):
        try:
            conn, _ = self.ctl.accept()
        except BlockingIOError:
            return
        if self.helper is not None:
            pid = _peer_pid(self.helper)
            try:
                conn.send(CTL_MSG.pack(BUSY, pid, 0))
            except OSError:
                pass
            conn.close()
            log.warning("refused a second helper: helper pid %d is attached",
                        pid)
            return
        self.helper = conn
        self.keep = True
        self.sel.register(conn, selectors.EVENT_READ)
        log.info("helper pid %d attached", _peer_pid(conn))
        self._send(HELO, os.getpid(), self.size)
        if self.guest is not None:
            g = self.guest
            self._send(GUES, g.id, self.size, g.fds())

    def _helper_event(self):
        try:
            data = self.helper.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = BYE if self._queued_bye() else b""
        if data[:4] == BYE:
            log.info("helper stopped")
            self._drop_helper(clean=True)
        elif not data:
            log.info("helper went away without a word: keeping the guest's "
                     "memory for the next one")
            self._drop_helper(clean=False)

    def _drop_helper(self, clean):
        h, self.helper = self.helper, None
        if h is None:
            return
        try:
            self.sel.unregister(h)
        except (KeyError, ValueError):
            pass
        h.close()
        if clean:
            self.keep = False

    # -- the loop

    def stop(self, *_):
        self.stopping = True

    def run(self):
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        self.sel.register(rfd, selectors.EVENT_READ)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.stop)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        try:
            while not self.stopping:
                if not (self.guest or self.helper or self.keep):
                    log.info("no guest and no helper: exiting")
                    break
                for key, _ in self.sel.select():
                    o = key.fileobj
                    if o is self.listener:
                        self._accept_qemu()
                    elif o is self.ctl:
                        self._accept_helper()
                    elif self.guest is not None and o is self.guest.conn:
                        self._qemu_event()
                    elif self.helper is not None and o is self.helper:
                        self._helper_event()
                    elif o == rfd:
                        try:
                            os.read(rfd, 64)
                        except BlockingIOError:
                            pass
        finally:
            self.close()
        return 0

    def close(self):
        if self.guest is not None:
            self._drop_guest()
        self._drop_helper(clean=False)
        for s in (self.listener, self.ctl):
            if s is not None:
                s.close()
        if self.lock_fd >= 0:
            for p in (self.path, ctl_path(self.path), lock_path(self.path)):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            os.close(self.lock_fd)
            self.lock_fd = -1


def _peer_pid(sock):
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                               struct.calcsize("3i"))
        return struct.unpack("3i", cred)[0]
    except OSError:
        return 0


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m kgpu_helper.rings.ivshmem_server",
        description="ivshmem server of one socket for kgpu (started by "
                    "'kgpu helper --ivshmem SOCKET'; see the module doc)")
    p.add_argument("socket")
    p.add_argument("--region-size", type=int, default=64 << 20)
    p.add_argument("--ready-fd", type=int, default=-1,
                   help="write 'ok', 'running' or the error there once "
                        "listening, then close it")
    p.add_argument("--detach", action="store_true",
                   help="fork, the parent exiting at once: the server is "
                        "no child of whoever started it")
    a = p.parse_args(argv)
    if a.detach and os.fork():
        os._exit(0)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO,
        format="%(asctime)s kgpu-ivshmem-server[%(process)d] %(levelname)s: "
               "%(message)s")

    def ready(msg):
        if a.ready_fd >= 0:
            try:
                os.write(a.ready_fd, msg.encode())
            finally:
                os.close(a.ready_fd)
            a.ready_fd = -1

    try:
        srv = Server(os.path.abspath(a.socket), a.region_size)
        why = srv.bind()
    except (OSError, ValueError) as e:
        ready(f"cannot serve {a.socket}: {e}")
        return 1
    if why:
        ready(why)
        return 0 if why == "running" else 1
    log.info("serving %s (%d MiB regions)", srv.path, srv.size >> 20)
    ready("ok")
    return srv.run()


if __name__ == "__main__":
    sys.exit(main())
