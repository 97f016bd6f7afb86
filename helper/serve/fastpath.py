"""The helper's batch bookkeeping in C (helper/native/fastpath.c).

One call per drained batch validates every request, answers the invalid
ones and the nops, and groups the rest by service and shape; one call per
group builds its CQEs, one its XTS descriptor table. The C is built at
run time with the system's compiler (:mod:`kgpu_helper.native`); where
there is none, :func:`get` returns None and the daemon keeps its numpy
path (``daemon.validate`` and friends), which computes the same things
(tests/test_fastpath.py compares the two on random batches).
"""

import ctypes
import logging
import os

import numpy as np

from kgpu_helper.rings import abi

log = logging.getLogger("kgpu.helper")

_P = ctypes.c_void_p
_U32, _U64, _I32, _I16, _U16 = (ctypes.c_uint32, ctypes.c_uint64,
                                ctypes.c_int, ctypes.c_int16,
                                ctypes.c_uint16)
_LIB = []


def _lib():
    if not _LIB:
        lib = None
        if os.environ.get("KGPU_FASTPATH", "1") != "0":
            try:
                from kgpu_helper.native import build
                lib = ctypes.CDLL(build("fastpath", shared=True))
                lib.kgpu_classify.restype = ctypes.c_int
                lib.kgpu_classify.argtypes = [_P, _U32, _I32, _P]
                for f in (lib.kgpu_cqes, lib.kgpu_cqes_status):
                    f.restype = None
                lib.kgpu_cqes.argtypes = [_P, _U32, _I16, _U16, _P]
                lib.kgpu_cqes_status.argtypes = [_P, _U32, _P, _U16, _P]
                lib.kgpu_xts_descs.restype = _U64
                lib.kgpu_xts_descs.argtypes = [_P, _U32, _U32, _P]
            except Exception as e:  # noqa: BLE001 - numpy path instead
                log.info("batch fast path unavailable (%s): numpy path", e)
                lib = None
        _LIB.append(lib)
    return _LIB[0]


class _Ctx(ctypes.Structure):
    """struct classify_ctx of fastpath.c."""
    _fields_ = [("lo", _U64), ("hi", _U64), ("keys", _P), ("nkeys", _U32),
                ("key_size", _U32)] + [(f, _P) for f in (
                    "gen_seen", "loaded", "need", "status", "ready", "order",
                    "gkey", "gstart", "gcount", "gsvc", "svc_err",
                    "scratch")] + [("nready", _U32), ("nnop", _U32)]


def _ptr(a):
    # not __array_interface__: it builds the descr list of a structured
    # dtype on every call (20 us for an SQE array)
    return a.ctypes.data


class FastPath:
    """Per-helper scratch buffers (sized for the ring) and the calls."""

    def __init__(self, lib, region, keys):
        self.lib = lib
        self.region = region
        self.keys = keys
        n = region.entries
        self.lo = region.data_off
        self.hi = region.data_off + region.data_size
        kv = keys.view
        self.nkeys = len(kv)
        self.keys_ptr = _ptr(kv) if self.nkeys else 0
        self.key_size = abi.KEY_SLOT.itemsize
        k = max(self.nkeys, 1)
        self.gen_seen = np.full(k, -1, np.int64)
        self.loaded = np.zeros(k, np.uint8)
        self.need = np.zeros(k, np.uint8)
        self.status = np.zeros(n, np.int16)
        self.ready = np.zeros(n, abi.CQE)
        self.order = np.zeros(n, np.uint32)
        self.gkey = np.zeros(n, np.uint64)
        self.gstart = np.zeros(n, np.uint32)
        self.gcount = np.zeros(n, np.uint32)
        self.gsvc = np.zeros(n, np.uint32)
        self.svc_err = np.zeros(abi.SVC_COUNT + 1, np.uint32)
        self.scratch = np.zeros(n, np.uint32)
        c = self.ctx = _Ctx()
        c.lo, c.hi = self.lo, self.hi
        c.keys, c.nkeys, c.key_size = self.keys_ptr, self.nkeys, self.key_size
        for f in ("gen_seen", "loaded", "need", "status", "ready", "order",
                  "gkey", "gstart", "gcount", "gsvc", "svc_err", "scratch"):
            setattr(c, f, _ptr(getattr(self, f)))
        self._ctx_ref = ctypes.byref(c)

    def _sync_keys(self):
        """Mirror the KeyCache's view of the slots for the C side."""
        kc = self.keys
        for s in np.nonzero(self.need[:self.nkeys])[0]:
            kc.refresh((int(s),))
            g = kc.gen[s]
            self.gen_seen[s] = -1 if g is None else g
            self.loaded[s] = bool(kc.loaded[s])
        self.need[:] = 0

    def classify(self, sqes):
        """(status, ready CQEs, [(service, requests)], errors per service
        (SVC_COUNT + 1 counts), nops)."""
        n = len(sqes)
        if n > len(self.status):  # a ring larger than told: never here
            raise ValueError(f"batch of {n} on a ring of "
                             f"{len(self.status)} entries")
        p = _ptr(sqes)
        for stale_ok in (0, 1):
            ng = self.lib.kgpu_classify(p, n, stale_ok, self._ctx_ref)
            if ng >= 0:
                break
            self._sync_keys()
        nr = self.ctx.nready
        ready = self.ready[:nr].copy() if nr else None
        groups = []
        if ng == 1 and nr == 0:
            groups.append((int(self.gsvc[0]), sqes))
        else:
            for g in range(ng):
                a = int(self.gstart[g])
                sel = self.order[a:a + int(self.gcount[g])]
                groups.append((int(self.gsvc[g]), sqes[sel]))
        return (self.status[:n], ready, groups, self.svc_err,
                self.ctx.nnop)



def cqes(reqs, status=0, flags=0):
    """The CQEs of ``reqs`` (a contiguous SQE array) with one status (or
    one each), or None without the C library."""
    lib = _lib()
    if lib is None or not reqs.flags.c_contiguous:
        return None
    out = np.empty(len(reqs), abi.CQE)
    if isinstance(status, np.ndarray):
        st = np.ascontiguousarray(status, np.int16)
        lib.kgpu_cqes_status(_ptr(reqs), len(reqs), _ptr(st), flags,
                             _ptr(out))
    else:
        lib.kgpu_cqes(_ptr(reqs), len(reqs), int(status), flags, _ptr(out))
    return out


def xts_descs(reqs, unit, out):
    """Fill ``out`` (an XTS_DESC array of at least len(reqs)) from a
    contiguous SQE array of one unit size; returns (the filled part,
    number of data units), or None without the C library."""
    lib = _lib()
    if lib is None or not reqs.flags.c_contiguous:
        return None
    n = len(reqs)
    units = lib.kgpu_xts_descs(_ptr(reqs), n, unit, _ptr(out))
    return out[:n], int(units)


def get(region, keys):
    """A FastPath for this region, or None (no C compiler)."""
    lib = _lib()
    return FastPath(lib, region, keys) if lib is not None else None
