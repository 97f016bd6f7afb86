"""Testbed pieces that need no VM: kernel discovery and fio's JSON."""

import json

import pytest

from kgpu_testbed import fio
from kgpu_testbed.kernels import Kernel, find_kernel, list_kernels


def test_kernel_series():
    assert Kernel("6.1.0-56-amd64", "/x").series == "6.1"
    assert Kernel("6.12.117+deb12-amd64", "/x").series == "6.12"


def test_no_kernels_is_a_clear_error(tmp_path):
    assert list_kernels(boot=str(tmp_path)) == []
    with pytest.raises(LookupError, match="make deps"):
        find_kernel("6.1", boot=str(tmp_path))


def test_series_does_not_match_prefix():
    kernels = list_kernels()
    if not any(k.series == "6.12" for k in kernels):
        pytest.skip("no 6.12 kernel installed")
    # "6.1" must never pick a 6.12 kernel.
    try:
        assert find_kernel("6.1").series == "6.1"
    except LookupError:
        pass
    assert find_kernel("6.12").series == "6.12"


def _job(name, rbw, wbw, err=0):
    def side(bw):
        return {"bw_bytes": bw, "iops": bw / 4096}
    return {"jobname": name, "error": err, "read": side(rbw),
            "write": side(wbw)}


def test_fio_parse_skips_leading_warnings():
    text = ("fio: some warning\n" +
            json.dumps({"jobs": [_job("a", 0, 50_000_000)]}))
    (rate,) = fio.parse(text)
    assert rate.job == "a"
    assert rate.write_mbps == pytest.approx(50.0)
    assert rate.read_mbps == 0
    assert rate.errors == 0


def test_fio_parse_rejects_garbage():
    with pytest.raises(ValueError):
        fio.parse("no json here")
    with pytest.raises(ValueError):
        fio.parse('{"jobs": []}')
