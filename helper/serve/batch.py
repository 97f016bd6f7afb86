"""One drained batch: key slots, validation, completions.

- :class:`KeyCache`: the region's key slots as a KeyTable, re-read when a
  slot's generation moves.
- :func:`validate`: per request 0 or a negative errno, in numpy (the
  fallback of :mod:`kgpu_helper.serve.fastpath`, which does the same in C) or,
  for a few requests, in plain Python.
- :func:`cqes`: completions of a group; :class:`Done`: completions that
  are ready now.

No GPU and no ring code here: arrays in, arrays out.
"""

import errno
import struct

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.serve import fastpath
from kgpu_helper.services.interface import KeyTable

EINVAL = -errno.EINVAL
ENOKEY = -errno.ENOKEY
EIO = -errno.EIO
XTS_SVCS = (abi.SVC_XTS_ENC, abi.SVC_XTS_DEC)
RAID_SVCS = (abi.SVC_RAID6_GEN, abi.SVC_RAID6_REC, abi.SVC_RAID6_PQD)
_DUMMY_KEY = bytes(range(1, 33))


# ------------------------------------------------------------------ keys

class KeyCache:
    """The region's key slots as a KeyTable, re-expanded when a slot's
    generation changes (checked only for the slots a batch uses)."""

    def __init__(self, keys_view):
        self.view = keys_view
        n = len(keys_view)
        # generation of slot s: word 32 * s + 1 (read per request)
        self.words = keys_view.view(np.uint32).reshape(-1) if n else None
        self.table = KeyTable([_DUMMY_KEY] * n) if n else KeyTable()
        for s in range(n):
            self.table.wipe(s)
        self.gen = [None] * n
        self.loaded = np.zeros(max(n, 1), dtype=bool)

    def refresh(self, slots):
        for s in slots:
            s = int(s)
            if s >= len(self.gen):
                continue
            g = int(self.words[32 * s + 1])
            if g == self.gen[s]:
                continue
            # A sequence count (uapi/kgpu.h): odd while the kernel rewrites
            # the slot; a read counts only between two equal even values.
            for _ in range(1000):
                g = int(self.words[32 * s + 1])
                if g & 1:
                    continue
                klen = int(self.view["key_len"][s])
                key = self.view["key"][s, :64].tobytes()[:klen]
                if int(self.words[32 * s + 1]) == g:
                    break
            else:
                # Still changing: cache nothing, so the next batch reads
                # it again; this one's requests find the slot unloaded.
                if self.loaded[s]:
                    self.table.wipe(s)
                self.loaded[s] = False
                self.gen[s] = None
                continue
            if klen in (32, 64):
                self.table.set(s, key)
                self.loaded[s] = True
            else:
                if self.loaded[s]:
                    self.table.wipe(s)
                self.loaded[s] = False
            self.gen[s] = g


# ------------------------------------------------------------ validation

#: below this many requests a batch is validated in plain Python (numpy's
#: per-call overhead dominates small batches)
SMALL_BATCH = 8


def _check_one(r, lo, hi, keys):
    """validate() for one request, as a tuple in abi.SQE field order."""
    (_seq, _tag, svc, flags, in_off, in_len, out_len, out_off, unit,
     _step, _sector, key_slot, iv_mode, nd, fa, fb, _res) = r
    if flags or svc >= abi.SVC_COUNT:
        return EINVAL
    if svc == abi.SVC_NOP:
        return 0
    if not (lo <= in_off <= hi and in_len <= hi - in_off and lo <= out_off
            <= hi and out_len <= hi - out_off and in_len > 0
            and in_len == out_len and unit > 0 and unit % 16 == 0):
        return EINVAL
    if svc in XTS_SVCS:
        if unit > 4096 or in_len % unit or iv_mode > abi.IV_PLAIN:
            return EINVAL
        if out_off != in_off and out_off < in_off + in_len and \
                in_off < out_off + out_len:
            return EINVAL
        if key_slot >= len(keys.gen):
            return EINVAL
        keys.refresh((key_slot,))
        return 0 if keys.loaded[key_slot] else ENOKEY
    if svc == abi.SVC_RAID6_PQD:
        # deltas of data slots fa..fb, then P and Q (uapi/kgpu.h)
        if not (4 <= nd <= 32 and in_off == out_off and fa <= fb < nd - 2
                and in_len == (fb - fa + 3) * unit):
            return EINVAL
        return 0
    if not (4 <= nd <= 32 and in_off == out_off and in_len == nd * unit):
        return EINVAL
    if svc == abi.SVC_RAID6_REC and not (
            fa < nd and (fb == abi.RAID6_NONE or (fb < nd and fb != fa))):
        return EINVAL
    return 0


def validate(sqes, region, keys):
    """Per request: 0 if it may be computed, else a negative errno."""
    n = len(sqes)
    if n <= SMALL_BATCH:
        lo = region.data_off
        hi = lo + region.data_size
        return np.array([_check_one(r, lo, hi, keys) for r in sqes.tolist()],
                        dtype=np.int16)
    st = np.zeros(n, dtype=np.int16)
    lo = np.uint64(region.data_off)
    hi = np.uint64(region.data_off + region.data_size)
    svc = sqes["service"]
    in_off, out_off = sqes["in_off"], sqes["out_off"]
    in_len = sqes["in_len"].astype(np.uint64)
    out_len = sqes["out_len"].astype(np.uint64)
    unit = sqes["unit_size"].astype(np.uint64)

    def inside(off, ln):
        return (off >= lo) & (off <= hi) & (ln <= hi - np.minimum(off, hi))

    bad = (svc >= abi.SVC_COUNT) | (sqes["flags"] != 0)
    xts = (svc == abi.SVC_XTS_ENC) | (svc == abi.SVC_XTS_DEC)
    pqd = svc == abi.SVC_RAID6_PQD
    raid = (svc == abi.SVC_RAID6_GEN) | (svc == abi.SVC_RAID6_REC)
    data = xts | raid | pqd
    buf_ok = (inside(in_off, in_len) & inside(out_off, out_len)
              & (in_len > 0) & (in_len == out_len))
    unit_ok = (unit > 0) & (unit % np.uint64(16) == 0)
    safe_unit = np.where(unit_ok, unit, np.uint64(1))
    bad |= data & ~(buf_ok & unit_ok)
    # XTS: whole units, unit 16..4096, in place or disjoint, known IV mode
    overlap = ((out_off != in_off) & (out_off < in_off + in_len)
               & (in_off < out_off + out_len))
    bad |= xts & ((unit > np.uint64(4096)) | (in_len % safe_unit != 0)
                  | overlap | (sqes["iv_mode"] > abi.IV_PLAIN))
    # RAID6: ndisks blocks in place, lost blocks in range and distinct
    nd = sqes["ndisks"].astype(np.uint64)
    fa, fb = sqes["fail_a"], sqes["fail_b"]
    rshape = ((nd >= 4) & (nd <= 32) & (in_off == out_off)
              & (in_len == nd * unit))
    rec = svc == abi.SVC_RAID6_REC
    fail_ok = ((fa < nd) & ((fb == abi.RAID6_NONE) | ((fb < nd) & (fb != fa))))
    bad |= raid & ~rshape
    bad |= rec & ~fail_ok
    # RAID6_PQD: deltas of data slots fa..fb, then P and Q
    fa64, fb64 = fa.astype(np.uint64), fb.astype(np.uint64)
    pshape = ((nd >= 4) & (nd <= 32) & (in_off == out_off) & (fa64 <= fb64)
              & (fb64 + np.uint64(2) < nd)
              & (in_len == (fb64 - np.minimum(fa64, fb64) + np.uint64(3))
                 * unit))
    bad |= pqd & ~pshape
    st[bad] = EINVAL
    # XTS: the key slot must hold a key
    ks = sqes["key_slot"].astype(np.int64)
    kx = xts & ~bad
    if kx.any():
        inrange = ks < len(keys.gen)
        keys.refresh(np.unique(ks[kx & inrange]))
        loaded = np.zeros(n, dtype=bool)
        loaded[inrange] = keys.loaded[ks[inrange]]
        st[kx & ~inrange] = EINVAL
        st[kx & inrange & ~loaded] = ENOKEY
    return st


def xts_ivs(reqs, unit):
    """Sector number of every data unit of ``reqs`` (one uint64 per unit,
    already masked to 32 bits for iv_mode plain) and the unit counts."""
    if len(reqs) == 1:
        (_seq, _tag, _svc, _fl, _io, in_len, _ol, _oo, _u, step, sector,
         _ks, iv_mode, *_rest) = reqs.tolist()[0]
        count = in_len // unit
        sec = np.arange(count, dtype=np.uint64)
        sec *= np.uint64(step)
        sec += np.uint64(sector)
        if iv_mode == abi.IV_PLAIN:
            sec &= np.uint64(0xFFFFFFFF)
        return sec, np.array([count], dtype=np.int64)
    counts = (reqs["in_len"] // unit).astype(np.int64)
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    rel = (np.arange(total, dtype=np.uint64)
           - np.repeat(starts.astype(np.uint64), counts))
    sec = (np.repeat(reqs["sector"], counts)
           + rel * np.repeat(reqs["sector_step"].astype(np.uint64), counts))
    plain = reqs["iv_mode"] == abi.IV_PLAIN
    if plain.any():
        mask = np.where(plain, np.uint64(0xFFFFFFFF), ~np.uint64(0))
        sec &= np.repeat(mask, counts)
    return sec, counts


# ------------------------------------------------------------ completions

class Done:
    """Completions that are ready now."""

    def __init__(self, cqes):
        self.cqes = cqes

    def done(self):
        return True

    def wait(self, spin=0.0):
        pass

    def finish(self):
        return self.cqes


_STATUS_FLAGS = struct.Struct("<hH")


def cqes(reqs, status=0, flags=0):
    """CQEs of ``reqs`` with one status (or one each) and flags."""
    if len(reqs) == 1 and not isinstance(status, np.ndarray):
        # seq and tag open both an SQE and a CQE: 12 bytes, then 4 more
        raw = bytearray(reqs[:1].tobytes()[:12])
        raw += _STATUS_FLAGS.pack(int(status), flags)
        return np.frombuffer(raw, dtype=abi.CQE)
    c = fastpath.cqes(reqs, status, flags)
    if c is not None:
        return c
    c = np.zeros(len(reqs), dtype=abi.CQE)
    c["seq"] = reqs["seq"]
    c["tag"] = reqs["tag"]
    c["status"] = status
    c["flags"] = flags
    return c
