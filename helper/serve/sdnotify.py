"""systemd's readiness protocol (sd_notify), for ``Type=notify`` units.

Under a unit, systemd passes the address of its notification socket in
$NOTIFY_SOCKET (a path, or an abstract name written with a leading "@");
each message is one datagram of newline-separated VAR=value lines:
READY=1 once serving, STOPPING=1 when stopping, STATUS=... for
``systemctl status``. Outside systemd (no $NOTIFY_SOCKET) every call does
nothing, so the daemon calls it unconditionally.
"""

import logging
import os
import socket

log = logging.getLogger("kgpu.helper")


def notify(**fields):
    """Send ``READY=1``-style fields (``notify(READY=1, STATUS="...")``);
    True when a systemd socket took them."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not fields:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(msg)
    except OSError as e:
        log.warning("cannot tell systemd %s: %s", ", ".join(fields), e)
        return False
    return True
