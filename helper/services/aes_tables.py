"""AES tables and key schedules for the table-driven (T-table) GPU kernels.

Conventions (shared with ``kgpu_helper/cuda/aes.cuh``): the 16-byte AES state
is four little-endian 32-bit column words, ``w_c = s[0,c] | s[1,c] << 8 |
s[2,c] << 16 | s[3,c] << 24``, so a block loads from memory as a plain
little-endian uint4. With that convention a full encryption round is

    out_c = T0[b0(w_c)] ^ rotl8(T0[b1(w_c+1)]) ^ rotl16(T0[b2(w_c+2)])
            ^ rotl24(T0[b3(w_c+3)]) ^ rk_c

with ``T0[x] = 2S(x) | S(x) << 8 | S(x) << 16 | 3S(x) << 24`` (bN = byte N,
column indexes mod 4). Decryption uses the equivalent inverse cipher
(FIPS-197 section 5.3.5): ``Td0[x] = 14S'(x) | 9S'(x) << 8 | 13S'(x) << 16 |
11S'(x) << 24`` with columns c, c-1, c-2, c-3, and round keys run through
InvMixColumns.

The tables are computed here from the field arithmetic, not typed in.
"""

import numpy as np

_AES_POLY = 0x11B  # the AES field, not RAID6's 0x11d


def _xtime(a):
    a <<= 1
    return a ^ _AES_POLY if a & 0x100 else a


def _mul(a, b):
    r = 0
    while b:
        if b & 1:
            r ^= a
        a = _xtime(a)
        b >>= 1
    return r


def _build_sbox():
    inv = [0] * 256
    for a in range(1, 256):
        for b in range(1, 256):
            if _mul(a, b) == 1:
                inv[a] = b
                break
    sbox = [0] * 256
    for x in range(256):
        b = inv[x]
        s = b
        for k in range(1, 5):
            s ^= ((b << k) | (b >> (8 - k))) & 0xFF
        sbox[x] = s ^ 0x63
    isbox = [0] * 256
    for x, s in enumerate(sbox):
        isbox[s] = x
    return sbox, isbox


_SBOX, _ISBOX = _build_sbox()
SBOX = np.array(_SBOX, dtype=np.uint8)
INV_SBOX = np.array(_ISBOX, dtype=np.uint8)


def _col(b0, b1, b2, b3):
    return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)


#: Encryption table T0 (uint32[256]); T1..T3 are its rotations.
TE0 = np.array(
    [_col(_mul(s, 2), s, s, _mul(s, 3)) for s in _SBOX], dtype=np.uint32)
#: Decryption table Td0 (uint32[256]); Td1..Td3 are its rotations.
TD0 = np.array(
    [_col(_mul(s, 14), _mul(s, 9), _mul(s, 13), _mul(s, 11)) for s in _ISBOX],
    dtype=np.uint32)

_RCON = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1B, 0x36]

#: Words per expanded key in the tables below: 15 round keys of 4 words,
#: enough for AES-256; AES-128 uses the first 44.
RK_WORDS = 60


def expand_key(key):
    """FIPS-197 key expansion of a 16- or 32-byte key.

    Returns (nr, words): the number of rounds and a list of 4*(nr+1) column
    words in the little-endian convention above.
    """
    nk = len(key) // 4
    if len(key) not in (16, 32):
        raise ValueError(f"AES key must be 16 or 32 bytes, got {len(key)}")
    nr = nk + 6
    w = [list(key[4 * i:4 * i + 4]) for i in range(nk)]
    for i in range(nk, 4 * (nr + 1)):
        t = list(w[i - 1])
        if i % nk == 0:
            t = t[1:] + t[:1]
            t = [_SBOX[b] for b in t]
            t[0] ^= _RCON[i // nk - 1]
        elif nk > 6 and i % nk == 4:
            t = [_SBOX[b] for b in t]
        w.append([a ^ b for a, b in zip(w[i - nk], t)])
    return nr, [_col(*c) for c in w]


def _inv_mix_column(word):
    a = [(word >> (8 * r)) & 0xFF for r in range(4)]
    out = []
    for r in range(4):
        out.append(_mul(a[r], 14) ^ _mul(a[(r + 1) % 4], 11)
                   ^ _mul(a[(r + 2) % 4], 13) ^ _mul(a[(r + 3) % 4], 9))
    return _col(*out)


def decryption_key(nr, enc_words):
    """Round keys of the equivalent inverse cipher, in the order used."""
    rounds = [enc_words[4 * r:4 * r + 4] for r in range(nr + 1)]
    out = list(rounds[nr])
    for r in range(nr - 1, 0, -1):
        out += [_inv_mix_column(w) for w in rounds[r]]
    out += rounds[0]
    return out


def encrypt_block_reference(nr, rk, block):
    """One AES block through the T-tables, in Python.

    This mirrors the GPU kernel's data flow exactly (same tables, same
    word convention, same last-round trick of reading the S-box out of
    T0), so a test can check the tables and key schedule against OpenSSL
    without a GPU. Slow; for tests only.
    """
    def rotl(x, n):
        return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF

    te = [int(v) for v in TE0]
    s = [int.from_bytes(block[4 * c:4 * c + 4], "little") ^ rk[c]
         for c in range(4)]
    for r in range(1, nr):
        s = [te[s[c] & 0xFF]
             ^ rotl(te[(s[(c + 1) % 4] >> 8) & 0xFF], 8)
             ^ rotl(te[(s[(c + 2) % 4] >> 16) & 0xFF], 16)
             ^ rotl(te[s[(c + 3) % 4] >> 24], 24)
             ^ rk[4 * r + c] for c in range(4)]
    out = []
    for c in range(4):
        w = (((te[s[c] & 0xFF] >> 8) & 0xFF)
             | (te[(s[(c + 1) % 4] >> 8) & 0xFF] & 0xFF00)
             | (te[(s[(c + 2) % 4] >> 16) & 0xFF] & 0xFF0000)
             | ((te[s[(c + 3) % 4] >> 24] << 16) & 0xFF000000))
        out.append(w ^ rk[4 * nr + c])
    return b"".join(w.to_bytes(4, "little") for w in out)


def decrypt_block_reference(nr, dk, block):
    """Inverse of :func:`encrypt_block_reference`, with ``decryption_key``."""
    def rotl(x, n):
        return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF

    td = [int(v) for v in TD0]
    s = [int.from_bytes(block[4 * c:4 * c + 4], "little") ^ dk[c]
         for c in range(4)]
    for r in range(1, nr):
        s = [td[s[c] & 0xFF]
             ^ rotl(td[(s[(c - 1) % 4] >> 8) & 0xFF], 8)
             ^ rotl(td[(s[(c - 2) % 4] >> 16) & 0xFF], 16)
             ^ rotl(td[s[(c - 3) % 4] >> 24], 24)
             ^ dk[4 * r + c] for c in range(4)]
    out = []
    for c in range(4):
        w = (_ISBOX[s[c] & 0xFF]
             | _ISBOX[(s[(c - 1) % 4] >> 8) & 0xFF] << 8
             | _ISBOX[(s[(c - 2) % 4] >> 16) & 0xFF] << 16
             | _ISBOX[s[(c - 3) % 4] >> 24] << 24)
        out.append(w ^ dk[4 * nr + c])
    return b"".join(w.to_bytes(4, "little") for w in out)
