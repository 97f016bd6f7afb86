"""The "kgpu" generic netlink messages, built and parsed with pyroute2's
own encoder and decoder (no kernel needed)."""

import pytest

from kgpu_helper import abi

# pyroute2 is a dependency of the package, but a GPU host that only runs
# the helper on a user-space ring may lack it: skip with the reason.
pytest.importorskip("pyroute2", reason="kgpu status needs pyroute2")

from kgpu_helper.netlink import (NLA_MAP, crossover_request, format_stats,
                                 kgpumsg, parse_stats)


def roundtrip(msg):
    msg["header"]["type"] = 0x20
    msg.encode()
    back = kgpumsg(msg.data)
    back.decode()
    return back


def test_attribute_map_follows_the_abi():
    assert [n for n, _ in NLA_MAP] == abi.ATTR_NAMES


def test_stats_reply_parses():
    msg = kgpumsg()
    msg["cmd"] = abi.CMD_GET_STATS
    msg["version"] = 1
    msg["attrs"] = [
        ("KGPU_ATTR_HELPER_PID", 4242), ("KGPU_ATTR_RING_ENTRIES", 256),
        ("KGPU_ATTR_INFLIGHT", 3), ("KGPU_ATTR_PAD", b""),
        ("KGPU_ATTR_DATA_SIZE", 64 << 20), ("KGPU_ATTR_TIMEOUTS", 1),
        ("KGPU_ATTR_SERVICE", {"attrs": [
            ("KGPU_ATTR_SVC_ID", abi.SVC_XTS_ENC),
            ("KGPU_ATTR_SVC_NAME", "xts-enc"),
            ("KGPU_ATTR_SVC_REQUESTS", 10), ("KGPU_ATTR_SVC_GPU", 7),
            ("KGPU_ATTR_SVC_BYTES", 1 << 40),
            ("KGPU_ATTR_SVC_CROSSOVER", 65536)]}, 0x8000),
        ("KGPU_ATTR_SERVICE", {"attrs": [
            ("KGPU_ATTR_SVC_ID", abi.SVC_RAID6_GEN)]}, 0x8000),
    ]
    st = parse_stats(roundtrip(msg))
    assert st["helper_pid"] == 4242 and st["inflight"] == 3
    assert st["data_size"] == 64 << 20 and st["waits"] is None
    xts, gen = st["services"]
    assert (xts["id"], xts["name"], xts["requests"], xts["gpu"],
            xts["bytes"], xts["crossover"]) == (
        1, "xts-enc", 10, 7, 1 << 40, 65536)
    assert gen["name"] == "raid6-gen"  # no name sent: from the ABI
    text = format_stats(st)
    assert "pid 4242" in text and "xts-enc" in text


def test_set_crossover_request():
    back = roundtrip(crossover_request(abi.SVC_RAID6_REC, 131072))
    assert back["cmd"] == abi.CMD_SET_CROSSOVER
    assert back.get_attr("KGPU_ATTR_SVC_ID") == abi.SVC_RAID6_REC
    assert back.get_attr("KGPU_ATTR_SVC_CROSSOVER") == 131072
