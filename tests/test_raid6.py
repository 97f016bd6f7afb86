"""RAID6 services against a simple per-byte reference, and recovery of
every failure pair."""

import itertools

import numpy as np
import pytest

from kgpu_helper.services import get_backend, gf256
from kgpu_helper.services.cpu import CpuBackend
import raid6_ref

BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cpu-threads", id="cpu-threads"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]


def make_backend(name):
    if name == "cpu":
        return CpuBackend()
    if name == "cpu-threads":
        return CpuBackend(threads=3)
    return get_backend(name)


def test_field_tables():
    # g = 2 generates all 255 non-zero elements; MUL agrees with the
    # bitwise reference multiply.
    assert sorted(gf256.EXP[:255]) == list(range(1, 256))
    rng = np.random.default_rng(0)
    for a, b in rng.integers(0, 256, (200, 2)):
        assert gf256.MUL[a, b] == raid6_ref.gmul(int(a), int(b))
    for x, y in [(0, 1), (2, 7), (0, 29)]:
        a, b = gf256.recovery_coefficients(x, y)
        # A = g^(y-x) / (g^(y-x)+1), B = g^-x / (g^(y-x)+1)
        d = raid6_ref.gpow2(y - x)
        assert raid6_ref.gmul(a, d ^ 1) == d
        assert raid6_ref.gmul(raid6_ref.gmul(b, d ^ 1), raid6_ref.gpow2(x)) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 3, 8, 30])
def test_gen_matches_reference(backend, k):
    be = make_backend(backend)
    rng = np.random.default_rng(k)
    n = 256 if k < 30 else 64
    data = rng.integers(0, 256, (k, n), dtype=np.uint8)
    p, q = be.raid6_gen(data)
    rp, rq = raid6_ref.pq([bytes(r) for r in data])
    assert np.asarray(p).tobytes() == rp
    assert np.asarray(q).tobytes() == rq


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("disks", [4, 6, 12])
def test_recover_every_pair(backend, disks):
    """Lose every single block and every pair; rebuild byte-exact."""
    be = make_backend(backend)
    k = disks - 2
    rng = np.random.default_rng(disks)
    n = 4096 + 64  # more than one step of the CPU backend's split
    data = rng.integers(0, 256, (k, n), dtype=np.uint8)
    p, q = be.raid6_gen(data)
    good = np.vstack([data, np.asarray(p)[None], np.asarray(q)[None]])
    cases = [(i,) for i in range(disks)] + list(
        itertools.combinations(range(disks), 2))
    for failed in cases:
        blocks = good.copy()
        blocks[list(failed)] = rng.integers(0, 256, (len(failed), n),
                                            dtype=np.uint8)  # garbage
        out = be.raid6_recover(blocks, failed)
        assert np.array_equal(np.asarray(out), good), failed


@pytest.mark.parametrize("failed", [(0,), (1, 4), (2, 5), (0, 2), (4, 5),
                                    (3, 4)])
def test_recover_matches_reference(failed):
    """The reference solves the equations its own way; agree with it."""
    rng = np.random.default_rng(7)
    k = 4
    data = [rng.bytes(48) for _ in range(k)]
    rp, rq = raid6_ref.pq(data)
    rows = data + [rp, rq]
    damaged = [r if i not in failed else b"\0" * 48
               for i, r in enumerate(rows)]
    assert raid6_ref.recover(damaged, set(failed)) == rows
    blocks = np.frombuffer(b"".join(damaged), np.uint8).reshape(6, 48).copy()
    CpuBackend().raid6_recover(blocks, failed)
    assert [bytes(r) for r in blocks] == rows


def test_large_threads_match():
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (8, 1 << 20), dtype=np.uint8)
    p1, q1 = CpuBackend().raid6_gen(data)
    p2, q2 = CpuBackend(threads=4).raid6_gen(data)
    assert np.array_equal(p1, p2) and np.array_equal(q1, q2)
    assert np.array_equal(p1, np.bitwise_xor.reduce(data, axis=0))


def test_argument_errors():
    be = CpuBackend()
    with pytest.raises(ValueError, match="k = 2..30"):
        be.raid6_gen(np.zeros((1, 16), np.uint8))
    with pytest.raises(ValueError, match="multiple of 16"):
        be.raid6_gen(np.zeros((4, 20), np.uint8))
    with pytest.raises(ValueError, match="one or two"):
        be.raid6_recover(np.zeros((6, 16), np.uint8), [0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        be.raid6_recover(np.zeros((6, 16), np.uint8), [6])
    with pytest.raises(ValueError, match="4 to 32 disks"):
        be.raid6_recover(np.zeros((3, 16), np.uint8), [0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,start,rows", [(2, 0, 1), (2, 1, 1), (4, 0, 4),
                                          (6, 2, 3), (8, 7, 1), (30, 5, 20),
                                          (30, 29, 1)])
def test_pqd_matches_reference(backend, k, start, rows):
    """Read-modify-write by delta (RAID6_PQD): the P and Q of the stripe
    with the new data, computed from scratch by the per-byte reference."""
    be = make_backend(backend)
    rng = np.random.default_rng(100 * k + start)
    n = 4096 + 64 if k < 30 else 64
    old = rng.integers(0, 256, (k, n), dtype=np.uint8)
    new = old.copy()
    changed = [start + i for i in range(rows) if i % 3 != 1 or rows == 1]
    for i in changed:  # some rows inside the range stay as they were
        new[i] = rng.integers(0, 256, n, dtype=np.uint8)
    op, oq = raid6_ref.pq([bytes(r) for r in old])
    rp, rq = raid6_ref.pq([bytes(r) for r in new])
    delta = np.ascontiguousarray(old[start:start + rows] ^
                                 new[start:start + rows])
    p = np.frombuffer(op, np.uint8).copy()
    q = np.frombuffer(oq, np.uint8).copy()
    before = delta.copy()
    be.raid6_pqd(delta, p, q, start)
    assert p.tobytes() == rp and q.tobytes() == rq
    assert np.array_equal(delta, before), "the deltas stay as they were"


def test_pqd_argument_errors():
    be = CpuBackend()
    z = np.zeros(16, np.uint8)
    with pytest.raises(ValueError, match="data blocks 0..29"):
        be.raid6_pqd(np.zeros((2, 16), np.uint8), z, z.copy(), 29)
    with pytest.raises(ValueError, match="multiple of 16"):
        be.raid6_pqd(np.zeros((1, 20), np.uint8), np.zeros(20, np.uint8),
                     np.zeros(20, np.uint8), 0)
    with pytest.raises(ValueError, match="p must be"):
        be.raid6_pqd(np.zeros((1, 16), np.uint8), np.zeros(32, np.uint8),
                     z, 0)
