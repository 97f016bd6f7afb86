"""The resident XTS path's shared memory layout: the control block
(``ctl``) that the persistent kernel (cuda/resident.cu), the host thread
(native/resident_host.c) and Python all read and write, word by word, and
the rules by which the kernel takes a request (:func:`check`).

Every constant here mirrors one in resident.cu or resident_host.c; the
two sides must change together. Imports only the ring ABI.
"""

import numpy as np

from kgpu_helper.rings import abi

_MASK32 = 0xFFFFFFFF

# ctl words: resident.cu's CTL_*
CTL_STOP = 0
CTL_SPILL_TAIL = 16
CTL_SPILL_HEAD = 32
CTL_SPILL_CQ_TAIL = 48
CTL_STOP_AT = 64
CTL_STOPPED = 80
CTL_RUNNING = 96
CTL_FWD = 112
CTL_BLK_BYTE = 4096
SPILL_SQ_BYTE = 8192
#: servers whose words fit between CTL_BLK_BYTE and SPILL_SQ_BYTE
MAX_SERVERS = (SPILL_SQ_BYTE - CTL_BLK_BYTE) // 16
# a server's state word (resident.cu's RES_ST_*)
ST_IDLE, ST_WAIT, ST_SERVE, ST_SPILL, ST_DONE = range(5)

# device state words: resident.cu's D_*
D_CLAIM, D_CQ_ALLOC, D_CQ_PUB, D_SPILL_ALLOC, D_SPILL_PUB, D_SQ_READ = range(6)
D_SQ_SEEN = 10
D_STATS, D_STATS_PER = 16, 4
#: resident.cu's per-server statistics, in order
SERVER_STATS = ("served", "spilled", "key_expansions", "encrypted")

# resident_host.c's RH_STAT_*
HOST_STATS = ("loops", "bells", "spill_signals", "idle_polls", "sleeps",
              "hangup", "spin_ns")

RES_THREADS = 256
#: T0 and Td0 replicated per bank, and the inverse S-box (xts.cu)
SMEM_BYTES = 2 * 256 * 32 * 4 + 256 * 32
SLOT_WORDS = 192

# res_check's reasons (resident.cu)
RES_OK, RES_NOT_XTS, RES_FLAGS, RES_NOT_IN_PLACE, RES_TOO_BIG, RES_UNIT, \
    RES_RANGE, RES_SLOT, RES_IV_MODE = range(9)

_HOST_REGISTER_PORTABLE, _HOST_REGISTER_MAPPED = 1, 2
_HOST_REGISTER_READ_ONLY = 8
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class ResidentError(RuntimeError):
    """The resident path cannot run here; ``str`` says why."""


def ctl_bytes(entries):
    """Size of the control block for a ring of ``entries``."""
    return SPILL_SQ_BYTE + entries * (abi.SQE.itemsize + abi.CQE.itemsize)


def check(sqe, data_off, data_size, max_bytes, nslots):
    """Python mirror of resident.cu's ``res_check``: RES_OK if the GPU
    takes the request (a numpy SQE record or a row of ``SQE.names``),
    else why it goes to the spill ring."""
    f = dict(zip(abi.SQE.names, sqe.tolist() if hasattr(sqe, "tolist")
                 else sqe))
    u, n, off = f["unit_size"], f["in_len"], f["in_off"]
    if f["service"] not in (abi.SVC_XTS_ENC, abi.SVC_XTS_DEC):
        return RES_NOT_XTS
    if f["flags"]:
        return RES_FLAGS
    if off != f["out_off"] or n != f["out_len"]:
        return RES_NOT_IN_PLACE
    if n == 0 or n > max_bytes:
        return RES_TOO_BIG
    if u not in (512, 1024, 2048, 4096) or n % u:
        return RES_UNIT
    if off % 16 or off < data_off or off - data_off > data_size or \
            n > data_off + data_size - off:
        return RES_RANGE
    if f["key_slot"] >= nslots:
        return RES_SLOT
    if f["iv_mode"] > 1:
        return RES_IV_MODE
    return RES_OK


def spill_rings(ctl, entries):
    """The spill SQ and spill CQ of the control block ``ctl`` (uint8), as
    SQE and CQE arrays over it."""
    sq = ctl[SPILL_SQ_BYTE:SPILL_SQ_BYTE + entries * abi.SQE.itemsize]
    cq0 = SPILL_SQ_BYTE + entries * abi.SQE.itemsize
    cq = ctl[cq0:cq0 + entries * abi.CQE.itemsize]
    return sq.view(abi.SQE), cq.view(abi.CQE)


def server_words(ctl, servers):
    """Each server's (claim, state) words of ``ctl``, one row per server."""
    w = ctl[:SPILL_SQ_BYTE].view(np.uint32)
    return w[CTL_BLK_BYTE // 4:CTL_BLK_BYTE // 4 + 4 * servers].reshape(
        servers, 4)[:, :2]


def _i32(x):
    """A free-running u32 index difference as a signed number."""
    x &= _MASK32
    return x - (1 << 32) if x & 0x80000000 else x
