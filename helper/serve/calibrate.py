"""Helper start-up calibration: per service, the request size from which
the GPU beats the CPU."""

import time

import numpy as np

from kgpu_helper.rings import abi
from kgpu_helper.serve.batch import XTS_SVCS
from kgpu_helper.services.interface import KeyTable


CAL_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)


def calibrate(gpu, cpu, sizes=CAL_SIZES, reps=5):
    """Per service: the request size (bytes) from which ``gpu`` beats
    ``cpu`` on one request (copy in, compute, copy out), or None if it
    never does within ``sizes``. The CPU side is this helper's CPU backend,
    a stand-in for the kernel's own CPU code."""
    rng = np.random.default_rng(1)
    keys = KeyTable([rng.bytes(64)])
    res = {abi.SVC_NOP: 0}

    def best(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    for svc in (abi.SVC_XTS_ENC, abi.SVC_XTS_DEC, abi.SVC_RAID6_GEN,
                abi.SVC_RAID6_REC, abi.SVC_RAID6_PQD):
        cross = None
        for size in sizes:
            if svc in XTS_SVCS:
                data = gpu.empty_host((size,))
                data[:] = rng.integers(0, 256, size, dtype=np.uint8)
                sec = np.arange(size // 512, dtype=np.uint64)
                out = gpu.empty_host((size,))
                f = "xts_decrypt" if svc == abi.SVC_XTS_DEC else "xts_encrypt"
                tg = best(lambda: getattr(gpu, f)(keys, data, sec, out=out))
                tc = best(lambda: getattr(cpu, f)(keys, data, sec, out=out))
            else:
                k = 8
                n = max(16, size // k // 16 * 16)
                blocks = gpu.empty_host((k + 2, n))
                blocks[:] = rng.integers(0, 256, blocks.shape, dtype=np.uint8)
                if svc == abi.SVC_RAID6_GEN:
                    tg = best(lambda: gpu.raid6_gen(blocks[:k], blocks[k],
                                                    blocks[k + 1]))
                    tc = best(lambda: cpu.raid6_gen(blocks[:k], blocks[k],
                                                    blocks[k + 1]))
                elif svc == abi.SVC_RAID6_PQD:
                    # read-modify-write of two data blocks: 2 deltas, P, Q
                    b = blocks
                    tg = best(lambda: gpu.raid6_pqd(b[:2], b[2], b[3], 3))
                    tc = best(lambda: cpu.raid6_pqd(b[:2], b[2], b[3], 3))
                else:
                    tg = best(lambda: gpu.raid6_recover(blocks, [1, 5]))
                    tc = best(lambda: cpu.raid6_recover(blocks, [1, 5]))
            if tg < tc:
                if cross is None:
                    cross = size
            else:
                cross = None
        res[svc] = cross
    return res
