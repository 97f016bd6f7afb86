"""helper/native/fastpath.c against the numpy path it replaces: the same
statuses, groups, CQEs and XTS descriptors on random and adversarial
batches (no GPU)."""

import numpy as np
import pytest

from kgpu_helper.rings import abi
from kgpu_helper.serve import fastpath
from kgpu_helper.serve.daemon import Helper, _cqes, validate
from kgpu_helper.native import NativeUnavailable, build

from test_daemon import Served, bad_requests


@pytest.fixture(autouse=True)
def _need_cc():
    try:
        build("fastpath", shared=True)
    except NativeUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def srv(tmp_path):
    s = Served(tmp_path)
    yield s
    s.close()


def random_batch(rng, d, n):
    """Mostly valid requests of every service and a few shapes, with
    random corruption of some fields."""
    off = d.buffer(1 << 20)
    end = d.data_off + d.data_size
    s = np.zeros(n, abi.SQE)
    s["seq"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    s["tag"] = rng.integers(0, 2**32, n, dtype=np.uint32)
    s["service"] = rng.choice([0, 1, 1, 1, 2, 2, 3, 4, 5, 5, 7], n)
    unit = rng.choice([512, 4096, 1024], n)
    s["unit_size"] = unit
    s["in_off"] = off + rng.integers(0, 16, n) * 4096
    s["out_off"] = s["in_off"]
    s["in_len"] = unit * rng.integers(1, 8, n)
    s["key_slot"] = rng.choice([0, 1, 1, 2, 9], n)
    s["iv_mode"] = rng.choice([0, 1, 0, 2], n)
    s["sector"] = rng.integers(0, 2**40, n, dtype=np.uint64)
    s["sector_step"] = rng.choice([1, 8], n)
    raid = (s["service"] == 3) | (s["service"] == 4)
    nd = rng.choice([4, 6, 6, 33], n)
    s["ndisks"] = np.where(raid, nd, 0)
    s["in_len"] = np.where(raid, nd * 512, s["in_len"])
    s["unit_size"] = np.where(raid, 512, s["unit_size"])
    s["fail_a"] = rng.choice([1, 2, 5, 40], n)
    s["fail_b"] = rng.choice([abi.RAID6_NONE, 2, 3], n)
    # RAID6_PQD: deltas of data slots fail_a..fail_b, then P and Q; mostly
    # well shaped, some with fail_b below fail_a or past the data disks
    pqd = s["service"] == 5
    s["ndisks"] = np.where(pqd, nd, s["ndisks"])
    pa = rng.choice([0, 1, 1, 2, 3], n)
    pb = pa + rng.choice([0, 0, 1, 2, 9], n)
    pb = np.where(rng.random(n) < 0.1, np.maximum(pa, 1) - 1, pb)
    s["fail_a"] = np.where(pqd, pa, s["fail_a"])
    s["fail_b"] = np.where(pqd, pb, s["fail_b"])
    s["in_len"] = np.where(pqd, (np.abs(pb - pa) + 3) * 512, s["in_len"])
    s["unit_size"] = np.where(pqd, 512, s["unit_size"])
    s["out_len"] = s["in_len"]
    # corruption
    k = rng.random(n)
    s["flags"] = np.where(k < 0.03, 1, 0)
    s["out_len"] = np.where((k > 0.03) & (k < 0.06), s["in_len"] + 16,
                            s["out_len"])
    s["in_off"] = np.where((k > 0.06) & (k < 0.08), end - 512, s["in_off"])
    s["out_off"] = np.where((k > 0.08) & (k < 0.1), s["in_off"] + 16,
                            s["out_off"])
    s["in_off"] = np.where((k > 0.1) & (k < 0.11), 2**64 - 8, s["in_off"])
    return s


def groups_numpy(ok):
    out = {}
    for key, reqs in Helper._groups(ok):
        svc = key[0]
        shape = (reqs["unit_size"][0] if svc in (1, 2) else
                 reqs["ndisks"][0] if svc == 3 else
                 (reqs["ndisks"][0], reqs["fail_a"][0], reqs["fail_b"][0]))
        out[(svc, int(np.asarray(shape).sum()), tuple(np.atleast_1d(shape)))] \
            = reqs["seq"].tolist()
    return out


@pytest.mark.parametrize("seed", range(6))
def test_classify_matches_numpy(srv, seed):
    rng = np.random.default_rng(seed)
    fp = srv.h.fast
    assert fp is not None
    for n in (2, 9, 64):
        batch = random_batch(rng, srv.d, n)
        want = validate(batch, srv.h.region, srv.h.keys)
        st, ready, groups, err, nnop = fp.classify(batch)
        assert list(st) == list(want)
        # the ready CQEs: every invalid request and every nop, in order
        sel = (want != 0) | ((batch["service"] == 0) & (want == 0))
        if sel.any():
            assert ready.tolist() == _cqes(batch[sel], want[sel]).tolist()
        else:
            assert ready is None
        assert nnop == int(((batch["service"] == 0) & (want == 0)).sum())
        assert int(err.sum()) == int((want != 0).sum())
        ok = batch[(want == 0) & (batch["service"] != 0)]
        mine = {}
        for svc, reqs in groups:
            g = groups_numpy(reqs)
            assert len(g) == 1 and list(g)[0][0] == svc  # one shape each
            mine.update(g)
        assert mine == groups_numpy(ok) if len(ok) else mine == {}
        srv.d.reset_buffers()


def test_bad_requests_match(srv):
    cases = bad_requests(srv.d)
    batch = np.concatenate([c for c, _ in cases] * 3)
    st = srv.h.fast.classify(batch)[0]
    assert list(st) == [w for _, w in cases] * 3


def test_key_generation_change_is_seen(srv):
    """A slot rewritten between two batches is re-read before use."""
    x = dict(in_off=srv.d.buffer(4096), in_len=4096, out_len=4096,
             unit_size=512, key_slot=2)
    x["out_off"] = x["in_off"]
    b = np.concatenate([np.zeros(1, abi.SQE)] * 2)
    for k, v in x.items():
        b[k] = v
    b["service"] = abi.SVC_XTS_ENC
    assert list(srv.h.fast.classify(b)[0]) == [-126, -126]
    srv.d.set_key(2, bytes(range(64)))
    assert list(srv.h.fast.classify(b)[0]) == [0, 0]
    srv.d.wipe_key(2)
    assert list(srv.h.fast.classify(b)[0]) == [-126, -126]


def test_cqes_and_descs_match_numpy():
    rng = np.random.default_rng(3)
    s = np.zeros(50, abi.SQE)
    for f in ("seq", "tag", "in_off", "out_off", "sector"):
        s[f] = rng.integers(0, 2**31, 50)
    s["in_len"] = rng.integers(1, 9, 50) * 512
    s["sector_step"] = rng.integers(0, 9, 50)
    s["key_slot"] = rng.integers(0, 5, 50)
    s["iv_mode"] = rng.integers(0, 2, 50)
    st = rng.integers(-30, 1, 50).astype(np.int16)
    for status in (0, -5, st):
        c = fastpath.cqes(s, status, abi.CQE_CPU)
        assert c.tolist() == _numpy_cqes(s, status, abi.CQE_CPU).tolist()
    xts_desc = np.dtype([("in_off", "<u8"), ("out_off", "<u8"),
                         ("sector", "<u8"), ("unit0", "<u8"),
                         ("step", "<u4"), ("slot", "<i4"), ("plain", "<u4"),
                         ("pad", "<u4")])
    d, units = fastpath.xts_descs(s, 512, np.empty(64, xts_desc))
    assert units == int(s["in_len"].sum()) // 512
    assert d["unit0"].tolist() == (np.cumsum(s["in_len"] // 512)
                                   - s["in_len"] // 512).tolist()
    for a, b in (("in_off", "in_off"), ("sector", "sector"),
                 ("step", "sector_step"), ("slot", "key_slot")):
        assert d[a].tolist() == s[b].tolist()
    assert d["plain"].tolist() == (s["iv_mode"] == 1).astype(int).tolist()


def _numpy_cqes(reqs, status, flags):
    c = np.zeros(len(reqs), dtype=abi.CQE)
    c["seq"], c["tag"] = reqs["seq"], reqs["tag"]
    c["status"], c["flags"] = status, flags
    return c


def test_helper_serves_the_same_without_the_fast_path(tmp_path):
    """The numpy fallback (no C compiler) answers the same batch alike."""
    answers = []
    for fast in (True, False):
        (tmp_path / str(fast)).mkdir()
        s = Served(tmp_path / str(fast))
        try:
            if not fast:
                s.h.fast = None
            cases = bad_requests(s.d)
            res = s.run(np.concatenate([c for c, _ in cases]))
            answers.append([r[2] for r in res])
        finally:
            s.close()
    assert answers[0] == answers[1]
