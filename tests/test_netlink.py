"""The "kgpu" generic netlink messages, built and parsed with pyroute2's
own encoder and decoder (no kernel needed)."""

import pytest

from kgpu_helper.rings import abi

# pyroute2 is a dependency of the package, but a GPU host that only runs
# the helper on a user-space ring may lack it: skip with the reason.
pytest.importorskip("pyroute2", reason="kgpu status needs pyroute2")

from kgpu_helper.rings.netlink import (NLA_MAP, crossover_request,
                                       format_stats, kgpumsg, parse_stats)


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


def _service_reply(**counts):
    """A GET_STATS reply with one xts-enc service holding ``counts``
    (KGPU_ATTR_SVC_<NAME upper case>)."""
    msg = kgpumsg()
    msg["cmd"] = abi.CMD_GET_STATS
    msg["version"] = 1
    attrs = [("KGPU_ATTR_SVC_ID", abi.SVC_XTS_ENC),
             ("KGPU_ATTR_SVC_NAME", "xts-enc")]
    attrs += [("KGPU_ATTR_SVC_" + k.upper(), v) for k, v in counts.items()]
    msg["attrs"] = [("KGPU_ATTR_HELPER_PID", 7), ("KGPU_ATTR_INFLIGHT", 0),
                    ("KGPU_ATTR_SERVICE", {"attrs": attrs}, 0x8000)]
    return parse_stats(roundtrip(msg))


def _row(text, name):
    """The cells of service ``name``'s row of the table."""
    for line in text.splitlines():
        if line.split()[:1] == [name]:
            return line.split()[1:]
    raise AssertionError(f"no row for {name}:\n{text}")


def test_every_path_is_parsed_and_shown():
    st = _service_reply(requests=100, bytes=3 << 20, gpu=60, gpu_resident=25,
                        helper_cpu=30, fallback=10, errors=4, kernel_cpu=7,
                        crossover=16384)
    (s,) = st["services"]
    assert (s["gpu"], s["gpu_resident"], s["gpu_batched"], s["helper_cpu"],
            s["fallback"], s["errors"], s["kernel_cpu"], s["total"]) == (
        60, 25, 35, 30, 10, 4, 7, 107)
    text = format_stats(st)
    # requests (all), resident, batched, helper CPU, kernel fallback,
    # kernel by choice, errors, bytes sent, crossover
    assert _row(text, "xts-enc") == ["107", "25", "35", "30", "10", "7",
                                     "4", "3", "MiB", "16", "KiB"]
    head = [ln for ln in text.splitlines() if ln.startswith("service")][0]
    assert head.split() == ["service", "requests", "resident", "batched",
                            "CPU", "fallback", "by", "choice", "errors",
                            "sent", "crossover"]
    assert "requests in flight count" not in text    # none in flight


def test_module_before_abi_5_still_shows_its_counters():
    """No GPU_RESIDENT, no KERNEL_CPU: every GPU answer is a batched one,
    and requests are those handed to kgpu; the missing columns show '-'."""
    st = _service_reply(requests=10, gpu=6, helper_cpu=4)
    (s,) = st["services"]
    assert s["gpu_resident"] is None and s["kernel_cpu"] is None
    assert s["gpu_batched"] == 6 and s["total"] == 10
    assert _row(format_stats(st), "xts-enc")[:6] == ["10", "-", "6", "4",
                                                     "-", "-"]


def test_requests_in_flight_are_said():
    st = _service_reply(requests=5, gpu=2, helper_cpu=0, fallback=0)
    st["inflight"] = 3
    assert "The 3 requests in flight" in format_stats(st)
