"""The compute-service interface that every backend implements.

Arrays in, arrays out; no ring, no transport. A backend is an object with
these methods (see :class:`Backend` for the full contract):

- ``xts_encrypt(keys, data, sectors, slots=None, *, unit_size=512,
  iv_mode="plain64", ivs=None, out=None)`` and ``xts_decrypt(...)``:
  AES-XTS over many data units in one call, Linux ``xts(aes)`` compatible.
- ``raid6_gen(data, p=None, q=None)``: md's P and Q syndromes.
- ``raid6_recover(blocks, failed)``: rebuild one or two lost members in
  place.
- ``raid6_pqd(delta, p, q, start)``: update P and Q in place for a
  read-modify-write, from old ^ new of data blocks start, start+1, ...

Keys live in a :class:`KeyTable` of slots, loaded once (the kernel's
``key set``), and requests name the slot of each data unit.
"""

import abc

import numpy as np

from kgpu_helper.services import aes_tables

IV_MODES = ("plain64", "plain", "raw")
UNIT_SIZES = (512, 1024, 2048, 4096)  # what dm-crypt uses
MIN_DISKS, MAX_DISKS = 4, 32

#: uint32 words per key slot in :attr:`KeyTable.schedule`:
#: [0:60) data-key (K1) encryption round keys, [60:120) tweak-key (K2)
#: encryption round keys, [120:180) K1 decryption round keys (equivalent
#: inverse cipher), [180] number of rounds (10 or 14), rest zero.
SLOT_WORDS = 192


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (no CuPy, no CUDA device...)."""


def _key_bytes(key):
    if isinstance(key, str):
        try:
            key = bytes.fromhex(key)
        except ValueError:
            raise ValueError("key must be hex digits (like dm-crypt's table "
                             "line) or bytes") from None
    key = bytes(key)
    if len(key) not in (32, 64):
        raise ValueError(
            f"XTS key must be 32 or 64 bytes (64 or 128 hex digits: K1||K2 "
            f"for AES-128-XTS or AES-256-XTS), got {len(key)} bytes")
    return key


class KeyTable:
    """XTS key slots, as dm-crypt keys: K1 (data key) || K2 (tweak key).

    ``KeyTable([key0, key1, ...])`` with each key 32 or 64 bytes (or hex).
    Slots may hold different key sizes; a batch may use any mix of slots.

    Keys whose two halves are equal are accepted, as Linux's ``xts(aes)``
    accepts them outside FIPS mode (dm-crypt does not ask for weak keys to
    be refused); the ``cryptography`` package refuses them, so only the CPU
    backend's ``xts_impl="openssl-xts"`` oracle cannot use such a slot.

    ``schedule`` is the expanded form (uint32, nslots x SLOT_WORDS) that
    the GPU kernels read; ``version`` changes whenever a slot changes, so
    that a backend can cache a device copy.
    """

    def __init__(self, keys=()):
        keys = list(keys)
        self._keys = [None] * len(keys)
        #: per slot, a count of its changes (set or wipe): a backend may
        #: cache whatever it derives from a slot under (slot, generation)
        self.generations = [0] * len(keys)
        self.schedule = np.zeros((len(keys), SLOT_WORDS), dtype=np.uint32)
        self.version = 0
        for slot, k in enumerate(keys):
            self.set(slot, k)

    def __len__(self):
        return len(self._keys)

    def add(self, key):
        """Append a slot; returns its index."""
        self._keys.append(None)
        self.generations.append(0)
        self.schedule = np.vstack(
            [self.schedule, np.zeros((1, SLOT_WORDS), np.uint32)])
        self.set(len(self._keys) - 1, key)
        return len(self._keys) - 1

    def set(self, slot, key):
        """Load ``key`` into ``slot`` (like ``dmsetup message ... key set``)."""
        key = _key_bytes(key)
        half = len(key) // 2
        k1, k2 = key[:half], key[half:]
        nr, e1 = aes_tables.expand_key(k1)
        _, e2 = aes_tables.expand_key(k2)
        d1 = aes_tables.decryption_key(nr, e1)
        row = np.zeros(SLOT_WORDS, dtype=np.uint32)
        row[0:len(e1)] = e1
        row[60:60 + len(e2)] = e2
        row[120:120 + len(d1)] = d1
        row[180] = nr
        self._keys[slot] = key
        self.schedule[slot] = row
        self.generations[slot] += 1
        self.version += 1

    def wipe(self, slot):
        """Forget the key of ``slot``; using the slot afterwards is an error."""
        self._keys[slot] = None
        self.schedule[slot] = 0
        self.generations[slot] += 1
        self.version += 1

    def key(self, slot):
        k = self._keys[slot]
        if k is None:
            raise ValueError(f"key slot {slot} is empty (wiped or never set)")
        return k

    def halves(self, slot):
        k = self.key(slot)
        h = len(k) // 2
        return k[:h], k[h:]


class XtsRequest:
    """Validated arguments of one XTS call (shared by the backends)."""

    __slots__ = ("n_units", "unit_size", "iv_mode", "ivs", "slots",
                 "nslots")

    def __init__(self, keys, data, sectors, slots, unit_size, iv_mode, ivs,
                 xp=np):
        if not isinstance(keys, KeyTable):
            raise TypeError("keys must be a KeyTable (build one with "
                            "KeyTable([key, ...]))")
        if len(keys) == 0:
            raise ValueError("the KeyTable has no slots")
        unit_size = int(unit_size)
        if unit_size % 16 or not 16 <= unit_size <= 4096:
            raise ValueError(
                f"unit_size must be a multiple of 16 from 16 to 4096 "
                f"(dm-crypt uses {', '.join(map(str, UNIT_SIZES))}), got "
                f"{unit_size}")
        if data.dtype != np.uint8:
            raise TypeError(f"data must be uint8, got {data.dtype}")
        if not data.flags.c_contiguous:
            raise ValueError("data must be C-contiguous")
        if data.size % unit_size:
            raise ValueError(
                f"data holds {data.size} bytes, not a whole number of "
                f"{unit_size}-byte units")
        n = data.size // unit_size
        if iv_mode not in IV_MODES:
            raise ValueError(
                f"iv_mode must be one of {', '.join(IV_MODES)}, got "
                f"{iv_mode!r}")
        if iv_mode == "raw":
            if ivs is None or sectors is not None:
                raise ValueError("iv_mode='raw' takes ivs= (n_units x 16 "
                                 "bytes) and no sectors")
            ivs = xp.ascontiguousarray(ivs)
            if ivs.dtype != np.uint8 or ivs.size != 16 * n:
                raise ValueError(
                    f"ivs must be uint8 with 16 bytes per unit ({16 * n}), "
                    f"got {ivs.dtype} x {ivs.size}")
            ivs = ivs.reshape(n, 16).view(np.uint64)  # (n, 2): lo, hi
        else:
            if ivs is not None or sectors is None:
                raise ValueError(f"iv_mode={iv_mode!r} takes sectors= "
                                 "(one uint64 per unit) and no ivs")
            sectors = xp.asarray(sectors)
            if sectors.dtype != np.uint64:
                if sectors.dtype.kind not in "iu":
                    raise TypeError("sectors must be integers (uint64)")
                sectors = sectors.astype(np.uint64)
            sectors = xp.ascontiguousarray(sectors).reshape(-1)
            if sectors.size != n:
                raise ValueError(
                    f"need one sector number per unit: {n} units, "
                    f"{sectors.size} sectors")
            if iv_mode == "plain":
                sectors = sectors & np.uint64(0xFFFFFFFF)
            ivs = sectors
        if slots is None:
            slots_arr = None
            if xp is np:
                keys.key(0)  # raises on an empty slot
        else:
            slots_arr = xp.ascontiguousarray(xp.asarray(slots)).reshape(-1)
            if slots_arr.dtype.kind not in "iu":
                raise TypeError("slots must be integers")
            if slots_arr.size != n:
                raise ValueError(f"need one key slot per unit: {n} units, "
                                 f"{slots_arr.size} slots")
            # Checking device-resident slots would stall the stream; the
            # caller (the ring layer) validates those, the kernels clamp.
            if xp is np and n:
                used = np.unique(slots_arr)
                if used[0] < 0 or used[-1] >= len(keys):
                    raise ValueError(
                        f"key slot out of range 0..{len(keys) - 1}")
                for s in used:
                    keys.key(int(s))  # raises on an empty slot
            slots_arr = slots_arr.astype(np.int32, copy=False)
        self.n_units = n
        self.unit_size = unit_size
        self.iv_mode = iv_mode
        self.ivs = ivs  # (n,) uint64 sectors, or (n, 2) uint64 raw IVs
        self.slots = slots_arr
        self.nslots = len(keys)


def _check_rows(a, what, extra):
    """Shape checks shared by gen and recover; returns (disks, n)."""
    if a.ndim != 2:
        raise ValueError(f"{what} must be ({what_shape(what)}, n), got "
                         f"shape {a.shape}")
    disks, n = a.shape[0] + extra, a.shape[1]
    if not MIN_DISKS <= disks <= MAX_DISKS:
        raise ValueError(f"RAID6 needs {MIN_DISKS} to {MAX_DISKS} disks, "
                         f"so k = {MIN_DISKS - 2}..{MAX_DISKS - 2} data "
                         f"blocks; got {disks} disks")
    if a.dtype != np.uint8 or not a.flags.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous uint8 array")
    if n % 16:
        raise ValueError(f"block length must be a multiple of 16 bytes, "
                         f"got {n}")
    return disks, n


def what_shape(what):
    return "k" if what == "data" else "k+2: data blocks, then P, then Q"


def check_raid6_gen(data, p, q):
    disks, n = _check_rows(data, "data", 2)
    for name, a in (("p", p), ("q", q)):
        if a is not None and (a.shape != (n,) or a.dtype != np.uint8
                              or not a.flags.c_contiguous):
            raise ValueError(f"{name} must be a contiguous uint8 array of "
                             f"shape ({n},)")
    return disks - 2, n


def check_raid6_recover(blocks, failed):
    disks, n = _check_rows(blocks, "blocks", 0)
    failed = sorted({int(f) for f in failed})
    if not 1 <= len(failed) <= 2:
        raise ValueError(f"RAID6 recovers one or two lost blocks, got "
                         f"{len(failed)}")
    if failed[0] < 0 or failed[-1] >= disks:
        raise ValueError(f"failed block index out of range 0..{disks - 1}")
    return disks - 2, n, failed


def check_raid6_pqd(delta, p, q, start):
    """Shape checks of a P/Q delta update; returns (rows, n)."""
    if delta.ndim != 2:
        raise ValueError(f"delta must be (changed data blocks, n), got "
                         f"shape {delta.shape}")
    rows, n = delta.shape
    start = int(start)
    if rows < 1 or start < 0 or start + rows > MAX_DISKS - 2:
        raise ValueError(f"delta rows {start}..{start + rows - 1} must lie "
                         f"in data blocks 0..{MAX_DISKS - 3}")
    if delta.dtype != np.uint8 or not delta.flags.c_contiguous:
        raise ValueError("delta must be a C-contiguous uint8 array")
    if n % 16:
        raise ValueError(f"block length must be a multiple of 16 bytes, "
                         f"got {n}")
    for name, a in (("p", p), ("q", q)):
        if a.shape != (n,) or a.dtype != np.uint8 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a contiguous uint8 array of "
                             f"shape ({n},)")
    return rows, n


class Backend(abc.ABC):
    """A compute backend. ``name`` is ``"cpu"`` or ``"cupy"``.

    Array arguments are numpy arrays for the CPU backend; the cupy backend
    takes cupy arrays (work stays on the GPU, asynchronous on the current
    stream) or numpy arrays (copied in, computed, copied back; returns
    when done). Outputs may be given (``out=``, ``p=``, ``q=``) to avoid
    allocation; they must not overlap the inputs unless stated.

    XTS: ``data`` holds n whole units of ``unit_size`` bytes (any shape,
    C-contiguous uint8; e.g. n x unit_size). Each unit i is encrypted
    with the key in slot ``slots[i]`` (all slot 0 when ``slots`` is None)
    and the IV of ``iv_mode``: ``plain64`` = ``sectors[i]`` as a 64-bit
    little-endian integer zero-padded to 16 bytes (dm-crypt's
    aes-xts-plain64), ``plain`` = its low 32 bits, ``raw`` = ``ivs[i]``
    taken as the 16-byte tweak input (NIST's "i" value). Units need not be
    contiguous sectors. ``unit_size`` is 512..4096 for dm-crypt; any
    multiple of 16 up to 4096 is accepted (no ciphertext stealing).

    RAID6: ``raid6_gen(data)`` with data (k, n) returns (P, Q), each (n,).
    ``raid6_recover(blocks, failed)`` with blocks (k+2, n) = data rows in
    md's data order, then P, then Q; the rows listed in ``failed`` (one or
    two indexes) are rebuilt in place from the others and ``blocks`` is
    returned. ``raid6_pqd(delta, p, q, start)`` with delta (r, n) = old ^
    new data of data blocks start..start+r-1 (zeros for a block that did
    not change) updates P and Q in place for a read-modify-write:
    P ^= sum(delta_i), Q ^= sum(g^(start+i) delta_i); returns (p, q).
    n (bytes per member, e.g. stripes x chunk) must be a
    multiple of 16; the math is per byte, so how stripes are laid out
    inside a row does not matter as long as every row uses the same one.
    """

    name = "?"

    @abc.abstractmethod
    def device_name(self):
        """Human-readable name of what computes (GPU model or CPU model)."""

    def xts_encrypt(self, keys, data, sectors=None, slots=None, *,
                    unit_size=512, iv_mode="plain64", ivs=None, out=None):
        """Encrypt n data units; returns the ciphertext (``out`` if given)."""
        return self._xts(False, keys, data, sectors, slots, unit_size,
                         iv_mode, ivs, out)

    def xts_decrypt(self, keys, data, sectors=None, slots=None, *,
                    unit_size=512, iv_mode="plain64", ivs=None, out=None):
        """Decrypt n data units; returns the plaintext (``out`` if given)."""
        return self._xts(True, keys, data, sectors, slots, unit_size,
                         iv_mode, ivs, out)

    @abc.abstractmethod
    def _xts(self, decrypt, keys, data, sectors, slots, unit_size, iv_mode,
             ivs, out):
        """The backend's XTS, both directions."""

    @abc.abstractmethod
    def raid6_gen(self, data, p=None, q=None):
        """P and Q of k data blocks; returns (p, q)."""

    @abc.abstractmethod
    def raid6_recover(self, blocks, failed):
        """Rebuild the ``failed`` rows of ``blocks`` in place; returns it."""

    @abc.abstractmethod
    def raid6_pqd(self, delta, p, q, start):
        """P and Q updated in place by data deltas; returns (p, q)."""

    def empty_host(self, shape, dtype=np.uint8):
        """A host buffer suited to this backend (pinned for cupy)."""
        return np.empty(shape, dtype=dtype)

    def synchronize(self):
        """Wait for all work queued by this backend (no-op on the CPU)."""
