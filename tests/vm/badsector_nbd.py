"""A disk with bad sectors, for the vm tests: an NBD device served from a
file, in this process, over a socketpair (no nbd-client needed).

    python3 badsector_nbd.py /dev/nbd0 FILE BADLIST &

BADLIST is a file of lines "<sector> heal" or "<sector> stick", read again
on SIGUSR1 (to the server's pid, the last word of the first line
printed). A read that touches a bad sector fails (EIO), as a drive's
unreadable sector does. A write over a "heal" sector succeeds and clears
it, as a drive remaps the sector on write; a write over a "stick" sector
fails too. Each event is logged on stdout ("read-error <sector>", "healed
<sector>", "write-error <sector>"). Stops when the device is disconnected
(an NBD_DISCONNECT ioctl on the device, from anyone).

The NBD wire protocol and ioctls are the kernel's (include/uapi/linux/
nbd.h, Documentation/admin-guide/blockdev/nbd.rst): requests of 28 bytes
(magic 0x25609513, type, handle, offset, length; big-endian), replies of
16 (magic 0x67446698, error, handle), read data after a reply.
"""

import errno
import fcntl
import os
import signal
import socket
import struct
import sys

NBD_SET_SOCK, NBD_SET_BLKSIZE, NBD_DO_IT, NBD_CLEAR_SOCK = (
    0xab00, 0xab01, 0xab03, 0xab04)
NBD_SET_SIZE_BLOCKS, NBD_SET_TIMEOUT = 0xab07, 0xab09
REQ = struct.Struct(">IIQQI")   # magic, type, handle, from, len
REPLY = struct.Struct(">II8s")
REQ_MAGIC, REPLY_MAGIC = 0x25609513, 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3


def load(path):
    bad = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                sector, kind = line.split()
                bad[int(sector)] = kind
    return bad


def recv_all(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def serve(sock, path, badlist):
    bad = load(badlist)

    def reload(*_):
        bad.clear()
        bad.update(load(badlist))
    signal.signal(signal.SIGUSR1, reload)
    fd = os.open(path, os.O_RDWR)
    out = sys.stdout
    while True:
        try:
            magic, typ, handle, off, length = REQ.unpack(
                recv_all(sock, REQ.size))
        except EOFError:
            return
        assert magic == REQ_MAGIC, hex(magic)
        cmd = typ & 0xffff
        hit = [s for s in range(off >> 9, (off + length + 511) >> 9)
               if s in bad]
        h = struct.pack(">Q", handle)
        if cmd == CMD_READ:
            if hit:
                # the whole request fails, as a drive's would: its range
                # says which neighbours failed with the bad sector
                print("read-error", hit[0], off >> 9, length >> 9,
                      flush=True, file=out)
                sock.sendall(REPLY.pack(REPLY_MAGIC, errno.EIO, h))
            else:
                sock.sendall(REPLY.pack(REPLY_MAGIC, 0, h)
                             + os.pread(fd, length, off))
        elif cmd == CMD_WRITE:
            data = recv_all(sock, length)
            if any(bad[s] == "stick" for s in hit):
                print("write-error", hit[0], flush=True, file=out)
                sock.sendall(REPLY.pack(REPLY_MAGIC, errno.EIO, h))
                continue
            os.pwrite(fd, data, off)
            for s in hit:
                print("healed", s, flush=True, file=out)
                del bad[s]
            sock.sendall(REPLY.pack(REPLY_MAGIC, 0, h))
        elif cmd == CMD_FLUSH:
            os.fsync(fd)
            sock.sendall(REPLY.pack(REPLY_MAGIC, 0, h))
        elif cmd == CMD_DISC:
            return
        else:
            sock.sendall(REPLY.pack(REPLY_MAGIC, errno.EINVAL, h))


def main():
    dev, path, badlist = sys.argv[1:4]
    size = os.path.getsize(path)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    nbd = os.open(dev, os.O_RDWR)
    fcntl.ioctl(nbd, NBD_CLEAR_SOCK)
    fcntl.ioctl(nbd, NBD_SET_BLKSIZE, 512)
    fcntl.ioctl(nbd, NBD_SET_SIZE_BLOCKS, size // 512)
    fcntl.ioctl(nbd, NBD_SET_TIMEOUT, 60)
    fcntl.ioctl(nbd, NBD_SET_SOCK, theirs.fileno())
    pid = os.fork()
    if pid == 0:                 # the server
        theirs.close()
        serve(mine, path, badlist)
        os._exit(0)
    mine.close()
    # SIGUSR1 goes to the server (pid printed): this process sits in
    # NBD_DO_IT, where a Python handler would not run
    print("serving", dev, size, pid, flush=True)
    try:
        fcntl.ioctl(nbd, NBD_DO_IT)      # until disconnected
    except OSError:
        pass
    fcntl.ioctl(nbd, NBD_CLEAR_SOCK)
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
