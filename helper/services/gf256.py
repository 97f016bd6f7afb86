"""Arithmetic in md's RAID6 field: GF(2^8) modulo x^8+x^4+x^3+x^2+1 (0x11d).

The generator is g = 2 (the polynomial x), as in Linux's lib/raid6 and in
H. Peter Anvin's "The mathematics of RAID-6". P is the XOR of the data
blocks, Q = sum over i of g^i * D_i, with i the data index in md's order.

Everything here is small tables and scalar helpers; the backends build on
them (the CPU backend indexes ``MUL`` with numpy, the GPU backend passes
constants to its kernels).
"""

import numpy as np

POLY = 0x11D


def _build():
    exp = np.zeros(512, dtype=np.uint8)
    log = np.zeros(256, dtype=np.int32)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    exp[255:510] = exp[0:255]
    log[0] = -1  # log(0) is undefined; never used as an index
    return exp, log


EXP, LOG = _build()


def mul(a, b):
    """Product of two field elements (ints 0..255)."""
    if a == 0 or b == 0:
        return 0
    return int(EXP[LOG[a] + LOG[b]])


def inv(a):
    """Multiplicative inverse; a must not be 0."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(EXP[255 - LOG[a]])


def div(a, b):
    return mul(a, inv(b))


def gpow(i):
    """g^i for any integer i (negative too)."""
    return int(EXP[i % 255])


def _build_mul_table():
    t = np.zeros((256, 256), dtype=np.uint8)
    for a in range(1, 256):
        la = LOG[a]
        for b in range(1, 256):
            t[a, b] = EXP[la + LOG[b]]
    return t


#: MUL[c] is the 256-byte table of b -> c*b, so ``MUL[c][array]`` multiplies
#: a whole uint8 array by the constant c.
MUL = _build_mul_table()


def recovery_coefficients(x, y):
    """Constants for two lost data blocks x < y (md's raid6_2data_recov).

    With Pxy = P + (sum of the surviving data) and Qxy = Q + (sum of
    g^i D_i over the surviving data), the lost blocks are
    D_x = A*Pxy + B*Qxy and D_y = Pxy + D_x, where
    A = g^(y-x) / (g^(y-x) + 1) and B = g^(-x) / (g^(y-x) + 1).
    Returns (A, B).
    """
    if not 0 <= x < y:
        raise ValueError(f"need 0 <= x < y, got x={x} y={y}")
    gyx = gpow(y - x)
    denom = inv(gyx ^ 1)
    return mul(gyx, denom), mul(gpow(-x), denom)
