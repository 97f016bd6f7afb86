"""kgpu crypt's table handling and the crypt bench's arithmetic (no VM)."""

import pytest

from kgpu_helper.cli.crypt import TableError, format_table, parse_crypt_table
from kgpu_testbed.demo.bench import summarize

HEX = "00" * 64
LUKS2 = "0 1040384 crypt aes-xts-plain64 :64:logon:cryptsetup:3f2c-d0 0 7:0 32768"


def test_luks2_keyring_line_round_trips():
    t = parse_crypt_table(LUKS2 + "\n", "crypt")
    assert t["key"] == ":64:logon:cryptsetup:3f2c-d0"
    assert format_table(t, "gpu-crypt") == LUKS2.replace(" crypt ", " gpu-crypt ")


def test_options_are_kept_in_order():
    line = (f"0 8 crypt aes-xts-plain {HEX} 8 7:1 0 3 allow_discards "
            "sector_size:4096 iv_large_sectors")
    t = parse_crypt_table(line, "crypt")
    assert t["opts"] == ["allow_discards", "sector_size:4096", "iv_large_sectors"]
    assert format_table(t, "crypt") == line


@pytest.mark.parametrize("line, why", [
    (f"0 8 crypt aes-cbc-essiv:sha256 {HEX[:64]} 0 7:0 0", "cipher"),
    (f"0 8 crypt aes-xts-plain64 {HEX} 0 7:0 0 1 integrity:28:aead", "integrity"),
    (f"0 8 linear 7:0 0", "linear"),
    (f"0 8 crypt aes-xts-plain64 {HEX} 0 7:0 0\n8 8 crypt aes-xts-plain64 {HEX} 0 7:0 8", "2 targets"),
    (f"0 8 crypt aes-xts-plain64 {HEX} 0 7:0 0 2 allow_discards", "malformed"),
    ("0 8 crypt aes-xts-plain64 - 0 7:0 0", "no key"),
])
def test_what_gpu_crypt_cannot_take_is_refused(line, why):
    with pytest.raises(TableError, match=why.split()[0]):
        parse_crypt_table(line, "crypt")


def test_bench_summary_is_median_and_range():
    pts = [dict(target="crypt", bs="4k", rw="read", rep=i, bytes=b,
                seconds=1.0, errors=0, kernel_cpu_s=0.5, helper_cpu_s=0.0)
           for i, b in enumerate((10e6, 30e6, 20e6))]
    (row,) = summarize(pts)
    assert row["mbps_median"] == pytest.approx(20.0)
    assert (row["mbps_min"], row["mbps_max"]) == (10.0, 30.0)
    assert row["runs"] == 3
    assert row["kernel_cpu_s_per_gb"] == pytest.approx(0.5 / 0.02)
