"""A deliberately simple RAID6 reference, written apart from both backends.

One byte at a time, the field multiply done bit by bit (Russian-peasant,
reducing by 0x11d), no tables shared with ``kgpu_helper``. Slow: use it on
a few KiB. It follows the definitions in H. Peter Anvin's "The mathematics
of RAID-6": P = D_0 + ... + D_{k-1}, Q = g^0 D_0 + ... + g^{k-1} D_{k-1},
g = 2, in GF(2^8) with x^8 + x^4 + x^3 + x^2 + 1.
"""


def gmul(a, b):
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return r


def gpow2(i):
    r = 1
    for _ in range(i % 255):
        r = gmul(r, 2)
    return r


def ginv(a):
    # brute force: the field is tiny
    for b in range(1, 256):
        if gmul(a, b) == 1:
            return b
    raise ZeroDivisionError(a)


def pq(data_rows):
    """P and Q (bytes) of a list of equal-length bytes objects."""
    n = len(data_rows[0])
    coef = [gpow2(i) for i in range(len(data_rows))]
    p = bytearray(n)
    q = bytearray(n)
    for j in range(n):
        pv = qv = 0
        for i, row in enumerate(data_rows):
            pv ^= row[j]
            qv ^= gmul(coef[i], row[j])
        p[j] = pv
        q[j] = qv
    return bytes(p), bytes(q)


def recover(rows, failed):
    """Rebuild rows (list of k data rows, then P, then Q) listed in failed.

    Solves the two syndrome equations directly for each byte, case by
    case, without md's precomputed constants. Returns the full list.
    """
    k = len(rows) - 2
    rows = [bytearray(r) if i not in failed else None
            for i, r in enumerate(rows)]
    n = len(next(r for r in rows if r is not None))
    lost = sorted(failed)
    data_lost = [f for f in lost if f < k]
    for j in range(n):
        ps = qs = 0  # partial syndromes of the surviving data
        for i in range(k):
            if rows[i] is not None:
                ps ^= rows[i][j]
                qs ^= gmul(gpow2(i), rows[i][j])
        val = {}
        if len(data_lost) == 2:
            x, y = data_lost
            # Dx + Dy = P + ps ; g^x Dx + g^y Dy = Q + qs
            a = rows[k][j] ^ ps
            b = rows[k + 1][j] ^ qs
            gx, gy = gpow2(x), gpow2(y)
            # Dx = (b + g^y a) / (g^x + g^y)
            dx = gmul(b ^ gmul(gy, a), ginv(gx ^ gy))
            val[x] = dx
            val[y] = a ^ dx
        elif len(data_lost) == 1:
            x = data_lost[0]
            if k not in lost:
                val[x] = rows[k][j] ^ ps
            else:
                val[x] = gmul(rows[k + 1][j] ^ qs, ginv(gpow2(x)))
        full_p = ps
        full_q = qs
        for x, v in val.items():
            full_p ^= v
            full_q ^= gmul(gpow2(x), v)
        for x, v in val.items():
            rows[x] = rows[x] or bytearray(n)
            rows[x][j] = v
        if k in lost:
            rows[k] = rows[k] or bytearray(n)
            rows[k][j] = full_p
        if k + 1 in lost:
            rows[k + 1] = rows[k + 1] or bytearray(n)
            rows[k + 1][j] = full_q
    return [bytes(r) for r in rows]
