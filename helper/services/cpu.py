"""The CPU backend: OpenSSL (through ``cryptography``) and numpy.

It is both the fallback when no GPU works and the oracle that the GPU
backend is tested against.

AES-XTS has two implementations, chosen with ``xts_impl``:

- ``"ecb"`` (default, fast): XTS built from its definition. The tweak
  input of every unit is encrypted with K2 in one OpenSSL ECB call per key
  slot, the per-block tweaks T_j = T_0 * alpha^j are derived with numpy
  (all j of a run of 64 blocks in one broadcast shift), and the data goes
  through one OpenSSL ECB call per slot between two XORs with the tweaks.
  This batches thousands of units per OpenSSL call. The ECB contexts of a
  key slot are made once per slot and generation (KeyTable.generations)
  and reused: no key setup per call. A call under SPLIT_MIN bytes runs on
  the calling thread; larger ones are split over the thread pool, each
  piece with contexts of its own (OpenSSL contexts are not shared across
  threads).
- ``"openssl-xts"`` (the oracle): one ``modes.XTS`` context per data unit,
  i.e. OpenSSL's own XTS. Slow (a Python call per unit) but independent
  of this package's tweak arithmetic. OpenSSL refuses keys whose two
  halves are equal, so this implementation raises ValueError for them.

RAID6 runs on numpy uint64 words: P is an XOR reduction, Q uses Horner's
rule with a branch-free multiply-by-2 on eight bytes at once, and the
recovery constants multiply through 256-byte lookup tables.
"""

import os
import platform
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kgpu_helper.services import gf256
from kgpu_helper.services.interface import (Backend, XtsRequest,
                                             check_raid6_gen,
                                             check_raid6_pqd,
                                             check_raid6_recover)

_HI = np.uint64(0x8080808080808080)
_LO7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_POLY = np.uint64(0x1D)
_ONE = np.uint64(1)
_SH7 = np.uint64(7)
_SH63 = np.uint64(63)

# Bytes of each member processed per step: big enough for numpy to be
# efficient, small enough that k rows stay in the cache.
_RAID_STEP = 64 * 1024
#: XTS calls of fewer bytes run on the calling thread (a thread hand-off
#: costs more than it saves below this)
SPLIT_MIN = 1 << 20
# shifts 1..63 of the broadcast tweak derivation, and 64 minus them
_R = np.arange(1, 64, dtype=np.uint64)
_BACK = np.uint64(64) - _R


def cpu_name():
    """The CPU model, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mul2(q):
    """Multiply every byte of a uint64 array by g = 2, in place."""
    hi = q & _HI
    q &= _LO7
    q <<= _ONE
    hi >>= _SH7
    hi *= _POLY
    q ^= hi
    return q


class CpuBackend(Backend):
    """numpy / OpenSSL backend. ``threads`` > 1 splits each call over a
    thread pool (OpenSSL and numpy release the GIL on large buffers)."""

    name = "cpu"

    def __init__(self, threads=1, xts_impl="ecb"):
        if xts_impl not in ("ecb", "openssl-xts"):
            raise ValueError(f"xts_impl must be 'ecb' or 'openssl-xts', got "
                             f"{xts_impl!r}")
        self.threads = max(1, int(threads or os.cpu_count() or 1))
        self.xts_impl = xts_impl
        self._pool = (ThreadPoolExecutor(self.threads)
                      if self.threads > 1 else None)
        # (id(keys), slot) -> (keys, generation, [enc1, dec1, enc2]); the
        # KeyTable is held so that its id cannot be reused meanwhile
        self._ctx = {}

    def device_name(self):
        return cpu_name()

    # ---------------------------------------------------------------- XTS

    def _xts(self, decrypt, keys, data, sectors, slots, unit_size, iv_mode,
             ivs, out):
        req = XtsRequest(keys, data, sectors, slots, unit_size, iv_mode, ivs)
        if out is None:
            out = np.empty_like(data)
        elif (out.dtype != np.uint8 or out.size != data.size
              or not out.flags.c_contiguous):
            raise ValueError("out must be a C-contiguous uint8 array of the "
                             "size of data")
        n = req.n_units
        if n == 0:
            return out
        src = data.reshape(n, unit_size)
        dst = out.reshape(n, unit_size)
        iv16 = self._iv_bytes(req)
        if req.slots is None:
            groups = [(0, None)]
        else:
            lo, hi = int(req.slots.min()), int(req.slots.max())
            if lo == hi:
                groups = [(lo, None)]
            else:
                groups = [(int(s), np.nonzero(req.slots == s)[0])
                          for s in np.unique(req.slots)]
        run = (self._xts_group_openssl if self.xts_impl == "openssl-xts"
               else self._xts_group_ecb)
        split = self._pool is not None and data.size >= SPLIT_MIN
        for slot, idx in groups:
            k1, k2 = keys.halves(slot)
            # one thread: the slot's cached contexts; split: fresh ones
            ctx = None if split else self._contexts(keys, slot, k1, k2)
            if idx is None:
                self._split(n if split else 1, lambda a, b: run(
                    decrypt, k1, k2, src[a:b], iv16[a:b], dst[a:b], ctx)
                    if split else run(decrypt, k1, k2, src, iv16, dst, ctx))
            else:
                s = np.ascontiguousarray(src[idx])
                d = np.empty_like(s)
                self._split(len(idx) if split else 1, lambda a, b: run(
                    decrypt, k1, k2, s[a:b], iv16[idx[a:b]], d[a:b], ctx)
                    if split else run(decrypt, k1, k2, s, iv16[idx], d, ctx))
                dst[idx] = d
        return out

    def _contexts(self, keys, slot, k1, k2):
        """[K1 encryptor, K1 decryptor, K2 encryptor] (ECB) of a slot,
        made once per slot generation."""
        gen = keys.generations[slot]
        c = self._ctx.get((id(keys), slot))
        if c is not None and c[0] is keys and c[1] == gen:
            return c[2]
        ctx = [Cipher(algorithms.AES(k1), modes.ECB()).encryptor(),
               Cipher(algorithms.AES(k1), modes.ECB()).decryptor(),
               Cipher(algorithms.AES(k2), modes.ECB()).encryptor()]
        if len(self._ctx) > 4096:
            self._ctx.clear()
        self._ctx[(id(keys), slot)] = (keys, gen, ctx)
        return ctx

    @staticmethod
    def _iv_bytes(req):
        """The 16-byte tweak input of every unit, as an (n, 16) uint8."""
        if req.ivs.ndim == 2:
            return req.ivs.view(np.uint8).reshape(req.n_units, 16)
        iv = np.zeros((req.n_units, 2), dtype="<u8")
        iv[:, 0] = req.ivs
        return iv.view(np.uint8)

    def _split(self, n, fn):
        """Run fn(a, b) over [0, n) in up to ``threads`` pieces."""
        if self._pool is None or n < 2 * self.threads:
            fn(0, n)
            return
        step = -(-n // self.threads)
        futures = [self._pool.submit(fn, a, min(a + step, n))
                   for a in range(0, n, step)]
        for f in futures:
            f.result()

    @staticmethod
    def _xts_group_openssl(decrypt, k1, k2, src, iv16, dst, ctx=None):
        key = k1 + k2
        for i in range(src.shape[0]):
            c = Cipher(algorithms.AES(key), modes.XTS(iv16[i].tobytes()))
            ctx = c.decryptor() if decrypt else c.encryptor()
            dst[i] = np.frombuffer(ctx.update(src[i].tobytes()),
                                   dtype=np.uint8)

    @staticmethod
    def _xts_group_ecb(decrypt, k1, k2, src, iv16, dst, ctx=None):
        m, unit = src.shape
        if m == 0:
            return
        bpu = unit // 16
        if ctx is None:
            ctx = [Cipher(algorithms.AES(k1), modes.ECB()).decryptor()
                   if decrypt else
                   Cipher(algorithms.AES(k1), modes.ECB()).encryptor(),
                   None, Cipher(algorithms.AES(k2), modes.ECB()).encryptor()]
            ctx[1] = ctx[0]
        # T_0 = E_K2(iv) for every unit, one ECB call.
        t = np.empty(m * 16 + 15, dtype=np.uint8)
        ctx[2].update_into(np.ascontiguousarray(iv16).reshape(-1), t)
        tw = _tweaks(t[:m * 16].view("<u8").reshape(m, 2), bpu)
        x = src.view("<u8").reshape(m, bpu, 2) ^ tw
        # update_into a buffer we own: a few times faster than update(),
        # which allocates the output; it asks for one block of slack.
        buf = np.empty(x.nbytes + 15, dtype=np.uint8)
        (ctx[1] if decrypt else ctx[0]).update_into(
            x.reshape(-1).view(np.uint8), buf)
        y = buf[:x.nbytes].view("<u8").reshape(m, bpu, 2)
        np.bitwise_xor(y, tw, out=dst.view("<u8").reshape(m, bpu, 2))

    # -------------------------------------------------------------- RAID6

    def raid6_gen(self, data, p=None, q=None):
        k, n = check_raid6_gen(data, p, q)
        if p is None:
            p = np.empty(n, dtype=np.uint8)
        if q is None:
            q = np.empty(n, dtype=np.uint8)
        rows = data.view("<u8")
        pw, qw = p.view("<u8"), q.view("<u8")

        def part(a, b):
            pw[a:b], qw[a:b] = _syndromes(rows, k, a, b, ())
        self._split_bytes(n, part)
        return p, q

    def raid6_recover(self, blocks, failed):
        k, n, failed = check_raid6_recover(blocks, failed)
        rows = blocks.view("<u8")
        lost_data = [f for f in failed if f < k]
        mul = gf256.MUL

        def part(a, b):
            pw, qw = rows[k, a:b], rows[k + 1, a:b]
            pxy, qxy = _syndromes(rows, k, a, b, lost_data)
            if len(lost_data) == 2:
                x, y = lost_data
                ca, cb = gf256.recovery_coefficients(x, y)
                pxy ^= pw
                qxy ^= qw
                dx = (mul[ca][pxy.view(np.uint8)]
                      ^ mul[cb][qxy.view(np.uint8)])
                rows[x, a:b] = dx.view("<u8")
                rows[y, a:b] = pxy ^ dx.view("<u8")
            elif len(lost_data) == 1:
                x = lost_data[0]
                if k in failed:  # data + P: the data comes from Q
                    qxy ^= qw
                    dx = mul[gf256.gpow(-x)][qxy.view(np.uint8)]
                    rows[x, a:b] = dx.view("<u8")
                    pw[:] = pxy ^ rows[x, a:b]
                else:  # data (+ Q): the data comes from P
                    dxw = pxy ^ pw
                    rows[x, a:b] = dxw
                    if k + 1 in failed:
                        qw[:] = qxy ^ mul[gf256.gpow(x)][
                            dxw.view(np.uint8)].view("<u8")
            else:  # only P and/or Q
                if k in failed:
                    pw[:] = pxy
                if k + 1 in failed:
                    qw[:] = qxy
        self._split_bytes(n, part)
        return blocks

    def raid6_pqd(self, delta, p, q, start):
        rows, n = check_raid6_pqd(delta, p, q, start)
        dw = delta.view("<u8")
        pw, qw = p.view("<u8"), q.view("<u8")

        def part(a, b):
            # Horner over the delta rows, then times g^start
            dp, dq = _syndromes(dw, rows, a, b, ())
            for _ in range(int(start)):
                _mul2(dq)
            pw[a:b] ^= dp
            qw[a:b] ^= dq
        self._split_bytes(n, part)
        return p, q

    def _split_bytes(self, n, fn):
        """Run fn(a, b) over word ranges of at most _RAID_STEP bytes."""
        words = n // 8
        step = _RAID_STEP // 8
        ranges = [(a, min(a + step, words)) for a in range(0, words, step)]
        if self._pool is None or len(ranges) < 2:
            for a, b in ranges:
                fn(a, b)
            return
        for f in [self._pool.submit(fn, a, b) for a, b in ranges]:
            f.result()


def _tweaks(t0, bpu):
    """The tweaks T_j = T_0 * alpha^j, j < bpu, of units whose T_0 are
    the rows of ``t0`` ((m, 2) uint64: lo, hi); returns (m, bpu, 2).
    T_{64c} come one after the other (a 64-bit shift each); the 63 that
    follow each of them, T_{64c + r} = T_{64c} * x^r, in one broadcast."""
    m = t0.shape[0]
    run = min(bpu, 64)
    nb = bpu // run
    tw = np.empty((m, nb, run, 2), dtype="<u8")
    tw[:, 0, 0] = t0
    for c in range(1, nb):
        tw[:, c, 0, 0], tw[:, c, 0, 1] = _mul_alpha_pow(
            tw[:, c - 1, 0, 0], tw[:, c - 1, 0, 1], 64)
    if run > 1:
        r, back = _R[:run - 1], _BACK[:run - 1]
        lo = tw[:, :, :1, 0]
        hi = tw[:, :, :1, 1]
        ov = hi >> back
        nlo = lo << r
        nhi = (hi << r) | (lo >> back)
        # ov * x^128 = ov * (x^7 + x^2 + x + 1), ov < 2^63
        nlo ^= ov ^ (ov << _ONE) ^ (ov << np.uint64(2)) ^ (ov << _SH7)
        nhi ^= (ov >> _SH63) ^ (ov >> np.uint64(62)) ^ (ov >> np.uint64(57))
        tw[:, :, 1:, 0] = nlo
        tw[:, :, 1:, 1] = nhi
    return tw.reshape(m, bpu, 2)


def _mul_alpha_pow(lo, hi, j):
    """(lo, hi) * alpha^j in GF(2^128), XTS's little-endian convention
    (value = lo + hi * 2^64); j > 0. Returns new (lo, hi) arrays."""
    while j:
        step = min(j, 64)
        if step == 64:
            ov, hi, lo = hi, lo.copy(), np.zeros_like(lo)
        else:
            sh, back = np.uint64(step), np.uint64(64 - step)
            ov = hi >> back
            hi = hi << sh
            hi |= lo >> back
            lo = lo << sh
        # add ov * x^128 = ov * (x^7 + x^2 + x + 1)
        lo ^= ov
        lo ^= ov << _ONE
        lo ^= ov << np.uint64(2)
        lo ^= ov << _SH7
        if step > 56:
            hi ^= ov >> _SH63
            hi ^= ov >> np.uint64(62)
            hi ^= ov >> np.uint64(57)
        j -= step
    return lo, hi


def _syndromes(rows, k, a, b, skip):
    """P and Q of words [a, b) of data rows 0..k-1 of ``rows`` (uint64
    view), with the rows in ``skip`` taken as zero. Returns (P, Q)."""
    present = [i for i in range(k) if i not in skip]
    p = np.zeros(b - a, dtype="<u8")
    q = np.zeros(b - a, dtype="<u8")
    top = present[-1] if present else -1
    # Horner from the highest data index down: Q = (..(D_top*2 + ..)*2 + D_0)
    for i in range(top, -1, -1):
        if i != top:
            _mul2(q)
        if i in skip:
            continue
        d = rows[i, a:b]
        p ^= d
        q ^= d
    return p, q
