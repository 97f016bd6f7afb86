"""AES-XTS services: NIST CAVP vectors and the CPU backend's two paths."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kgpu_helper.services import KeyTable, aes_tables, get_backend
from kgpu_helper.services.cpu import CpuBackend
from xts_vectors import load

BACKENDS = [
    pytest.param("cpu-ecb", id="cpu-ecb"),
    pytest.param("cpu-openssl-xts", id="cpu-openssl-xts"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]


def make_backend(name):
    if name == "cpu-ecb":
        return CpuBackend(xts_impl="ecb")
    if name == "cpu-openssl-xts":
        return CpuBackend(xts_impl="openssl-xts")
    return get_backend(name)


def _run_batch(be, entries, raw):
    """All entries of one length in one call, one key slot per entry."""
    keys = KeyTable([e["key"] for e in entries])
    slots = np.arange(len(entries), dtype=np.int32)
    nbytes = entries[0]["bits"] // 8
    out = {}
    for op in ("encrypt", "decrypt"):
        sel = [i for i, e in enumerate(entries) if e["op"] == op]
        if not sel:
            continue
        src = np.frombuffer(b"".join(
            entries[i]["pt" if op == "encrypt" else "ct"] for i in sel),
            dtype=np.uint8).copy()
        fn = be.xts_encrypt if op == "encrypt" else be.xts_decrypt
        if raw:
            ivs = np.frombuffer(b"".join(entries[i]["tweak"] for i in sel),
                                dtype=np.uint8)
            res = fn(keys, src, slots=slots[sel], unit_size=nbytes,
                     iv_mode="raw", ivs=ivs)
        else:
            sec = np.array([entries[i]["seqno"] for i in sel],
                           dtype=np.uint64)
            res = fn(keys, src, sec, slots[sel], unit_size=nbytes)
        res = np.asarray(res).reshape(len(sel), nbytes)
        for row, i in enumerate(sel):
            out[i] = res[row].tobytes()
    return out


@pytest.mark.parametrize("bits", [128, 256])
@pytest.mark.parametrize("kind", ["tweak-128hexstr", "tweak-dataunitseqno"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nist_cavp(backend, kind, bits):
    be = make_backend(backend)
    entries = load(kind, bits)
    assert len(entries) == 600
    by_len = {}
    for e in entries:
        by_len.setdefault(e["bits"], []).append(e)
    checked = 0
    for group in by_len.values():
        got = _run_batch(be, group, raw=(kind == "tweak-128hexstr"))
        for i, e in enumerate(group):
            want = e["ct"] if e["op"] == "encrypt" else e["pt"]
            assert got[i] == want, (kind, bits, e["op"], e["count"])
            checked += 1
    assert checked == 600


def test_tables_against_openssl():
    """The GPU's T-tables and key schedules, run in Python, match OpenSSL."""
    rng = np.random.default_rng(1)
    for klen in (16, 32):
        for _ in range(4):
            key = rng.bytes(klen)
            block = rng.bytes(16)
            nr, ek = aes_tables.expand_key(key)
            want = Cipher(algorithms.AES(key), modes.ECB()).encryptor() \
                .update(block)
            assert aes_tables.encrypt_block_reference(nr, ek, block) == want
            dk = aes_tables.decryption_key(nr, ek)
            assert aes_tables.decrypt_block_reference(nr, dk, want) == block


def _openssl_unit(key, sector, unit, decrypt=False, plain=False):
    s = sector & 0xFFFFFFFF if plain else sector
    c = Cipher(algorithms.AES(key), modes.XTS(s.to_bytes(16, "little")))
    ctx = c.decryptor() if decrypt else c.encryptor()
    return ctx.update(unit)


@pytest.mark.parametrize("unit_size", [512, 1024, 2048, 4096])
@pytest.mark.parametrize("iv_mode", ["plain64", "plain"])
def test_cpu_ecb_matches_openssl_xts(unit_size, iv_mode):
    rng = np.random.default_rng(unit_size)
    keys = KeyTable([rng.bytes(32), rng.bytes(64), rng.bytes(64)])
    n = 37
    data = rng.integers(0, 256, (n, unit_size), dtype=np.uint8)
    sectors = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    sectors[:3] = [0, 2**64 - 1, 2**32 - 1]
    slots = rng.integers(0, 3, n).astype(np.int32)
    fast = CpuBackend(xts_impl="ecb")
    oracle = CpuBackend(xts_impl="openssl-xts")
    ct = fast.xts_encrypt(keys, data, sectors, slots, unit_size=unit_size,
                          iv_mode=iv_mode)
    assert np.array_equal(ct, oracle.xts_encrypt(
        keys, data, sectors, slots, unit_size=unit_size, iv_mode=iv_mode))
    for i in (0, 1, n - 1):
        want = _openssl_unit(keys.key(int(slots[i])), int(sectors[i]),
                             data[i].tobytes(), plain=iv_mode == "plain")
        assert ct[i].tobytes() == want
    pt = fast.xts_decrypt(keys, ct, sectors, slots, unit_size=unit_size,
                          iv_mode=iv_mode)
    assert np.array_equal(pt, data)


def test_cpu_threads_match():
    rng = np.random.default_rng(5)
    keys = KeyTable([rng.bytes(64), rng.bytes(32)])
    n = 301
    data = rng.integers(0, 256, (n, 512), dtype=np.uint8)
    sectors = rng.integers(0, 2**40, n, dtype=np.uint64)
    slots = rng.integers(0, 2, n)
    one = CpuBackend(threads=1).xts_encrypt(keys, data, sectors, slots)
    many = CpuBackend(threads=4).xts_encrypt(keys, data, sectors, slots)
    assert np.array_equal(one, many)


def test_equal_halves():
    """Accepted like Linux outside FIPS mode; OpenSSL's XTS refuses them."""
    half = bytes(range(32))
    keys = KeyTable([half + half])
    data = np.arange(1024, dtype=np.uint32).view(np.uint8)[:1024].copy()
    sectors = np.array([7, 8], dtype=np.uint64)
    ct = CpuBackend().xts_encrypt(keys, data, sectors)
    assert np.array_equal(CpuBackend().xts_decrypt(keys, ct, sectors), data)
    with pytest.raises(ValueError):
        CpuBackend(xts_impl="openssl-xts").xts_encrypt(keys, data, sectors)


def test_argument_errors():
    be = CpuBackend()
    keys = KeyTable(["00" * 16 + "11" * 16])
    data = np.zeros(1024, dtype=np.uint8)
    with pytest.raises(ValueError, match="32 or 64 bytes"):
        KeyTable([b"x" * 48])
    with pytest.raises(ValueError, match="hex"):
        KeyTable(["zz" * 32])
    with pytest.raises(ValueError, match="whole number"):
        be.xts_encrypt(keys, data[:1000], [0, 1])
    with pytest.raises(ValueError, match="one sector number per unit"):
        be.xts_encrypt(keys, data, [0])
    with pytest.raises(ValueError, match="out of range"):
        be.xts_encrypt(keys, data, [0, 1], [0, 1])
    with pytest.raises(ValueError, match="unit_size"):
        be.xts_encrypt(keys, data, [0], unit_size=1000)
    with pytest.raises(ValueError, match="iv_mode"):
        be.xts_encrypt(keys, data, [0, 1], iv_mode="essiv")
    keys.wipe(0)
    with pytest.raises(ValueError, match="empty"):
        be.xts_encrypt(keys, data, [0, 1])


def test_get_backend_cpu_without_cuda(monkeypatch):
    monkeypatch.setenv("KGPU_BACKEND", "cpu")
    assert get_backend().name == "cpu"
    with pytest.raises(ValueError, match="backend must be"):
        get_backend("opencl")


@pytest.mark.parametrize("unit", [512, 1024, 4096])
def test_cpu_cached_contexts_follow_key_changes(unit):
    """The ECB contexts cached per slot and generation: a key set again
    in the same slot is used at once, and every unit size (tweaks of
    32 to 256 blocks) agrees with OpenSSL's own XTS."""
    rng = np.random.default_rng(unit)
    be = CpuBackend(threads=1)
    oracle = CpuBackend(xts_impl="openssl-xts")
    keys = KeyTable([rng.bytes(64), rng.bytes(32)])
    data = rng.integers(0, 256, 8 * unit, dtype=np.uint8)
    sec = np.arange(8, dtype=np.uint64) + np.uint64(2 ** 40 - 3)
    for round_ in range(3):
        for slot in (0, 1):
            slots = np.full(8, slot, np.int32)
            got = be.xts_encrypt(keys, data, sec, slots, unit_size=unit)
            want = oracle.xts_encrypt(keys, data, sec, slots,
                                      unit_size=unit)
            assert np.array_equal(got, want), (round_, slot)
            back = be.xts_decrypt(keys, got, sec, slots, unit_size=unit)
            assert np.array_equal(back, data)
        keys.set(0, rng.bytes(64))
        keys.set(1, rng.bytes(32))


def test_cpu_small_requests_stay_on_the_calling_thread(monkeypatch):
    """Under 1 MiB nothing goes to the pool; from 1 MiB it is split."""
    be = CpuBackend(threads=4)
    calls = []
    real = be._pool.submit
    monkeypatch.setattr(be._pool, "submit",
                        lambda *a: calls.append(1) or real(*a))
    keys = KeyTable([bytes(range(64))])
    for size, split in ((4096, False), (512 << 10, False), (1 << 20, True)):
        calls.clear()
        d = np.zeros(size, np.uint8) + 7
        out = be.xts_encrypt(keys, d, np.arange(size // 512,
                                                dtype=np.uint64))
        assert bool(calls) == split, size
        ref = CpuBackend(threads=1).xts_encrypt(
            keys, d, np.arange(size // 512, dtype=np.uint64))
        assert np.array_equal(out, ref)
