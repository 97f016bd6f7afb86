"""The Python mirror of the ring ABI matches the C header, field by field,
and the helper's mapping honours the layout's read-only part.

A small C program is compiled against kmod/uapi/kgpu.h (with the system's
<linux/types.h>) and prints sizeof and offsetof for every structure and
field the mirror declares; the numbers must agree exactly.
"""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from kgpu_helper.rings import abi
from kgpu_helper.rings.ringdriver import layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(REPO, "kmod", "uapi", "kgpu.h")


def _c_program():
    lines = ['#include <stdio.h>', '#include <stddef.h>',
             f'#include "{HEADER}"', "int main(void) {"]
    for struct, fields in abi.STRUCTS.items():
        lines.append(f'printf("{struct} %zu\\n", sizeof(struct {struct}));')
        for name, _, _ in fields:
            lines.append(
                f'printf("{struct}.{name} %zu %zu\\n", '
                f'offsetof(struct {struct}, {name}), '
                f'sizeof(((struct {struct} *)0)->{name}));')
    for const in ("KGPU_MAGIC", "KGPU_ABI_VERSION", "KGPU_IOC_VERSION",
                  "KGPU_IOC_COMPLETE", "KGPU_SVC_COUNT", "KGPU_ATTR_MAX",
                  "KGPU_CMD_SET_CROSSOVER", "KGPU_RAID6_NONE",
                  "KGPU_CQE_CPU", "KGPU_CQE_RESIDENT", "KGPU_LINK_OFF",
                  "KGPU_IVSHMEM_HELPER_PEER", "KGPU_LINK_ATTACH",
                  "KGPU_LINK_DETACH", "KGPU_LINK_READY", *abi.ATTR_NAMES):
        lines.append(f'printf("{const} %llu\\n", '
                     f'(unsigned long long)({const}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "layout.c", d / "layout"
    src.write_text(_c_program())
    subprocess.run([cc, "-Wall", "-Werror", "-o", str(exe), str(src)],
                   check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True,
                         text=True).stdout
    layout = {}
    for line in out.splitlines():
        key, *nums = line.split()
        layout[key] = tuple(int(n) for n in nums)
    return layout


@pytest.mark.parametrize("struct", sorted(abi.STRUCTS))
def test_struct_layout_matches_header(c_layout, struct):
    fields = abi.STRUCTS[struct]
    dtype = abi.dtype_of(fields)
    assert c_layout[struct] == (dtype.itemsize,), struct
    for name, _, _ in fields:
        offset = dtype.fields[name][1]
        size = dtype.fields[name][0].itemsize
        assert c_layout[f"{struct}.{name}"] == (offset, size), (struct, name)


def test_constants_match_header(c_layout):
    assert c_layout["KGPU_MAGIC"] == (abi.MAGIC,)
    assert c_layout["KGPU_ABI_VERSION"] == (abi.ABI_VERSION,)
    assert c_layout["KGPU_IOC_VERSION"] == (abi.IOC_VERSION,)
    assert c_layout["KGPU_IOC_COMPLETE"] == (abi.IOC_COMPLETE,)
    assert c_layout["KGPU_SVC_COUNT"] == (abi.SVC_COUNT,)
    assert c_layout["KGPU_ATTR_MAX"] == (len(abi.ATTR_NAMES) - 1,)
    assert c_layout["KGPU_LINK_OFF"] == (abi.LINK_OFF,)
    assert c_layout["KGPU_IVSHMEM_HELPER_PEER"] == (abi.IVSHMEM_HELPER_PEER,)
    assert c_layout["KGPU_LINK_ATTACH"] == (abi.LINK_ATTACH,)
    assert c_layout["KGPU_LINK_DETACH"] == (abi.LINK_DETACH,)
    assert c_layout["KGPU_LINK_READY"] == (abi.LINK_READY,)
    assert abi.LINK_OFF + abi.LINK.itemsize <= 4096
    assert abi.LINK_OFF >= abi.REGION_HDR.itemsize
    assert c_layout["KGPU_CMD_SET_CROSSOVER"] == (abi.CMD_SET_CROSSOVER,)
    assert c_layout["KGPU_RAID6_NONE"] == (abi.RAID6_NONE,)
    assert c_layout["KGPU_CQE_CPU"] == (abi.CQE_CPU,)
    assert c_layout["KGPU_CQE_RESIDENT"] == (abi.CQE_RESIDENT,)
    assert abi.CQE_CPU & abi.CQE_RESIDENT == 0


def test_netlink_attribute_numbers_match_header(c_layout):
    """Each name of the mirror's list has its index as its C value, so an
    attribute inserted (rather than appended) or renamed shows here."""
    for i, name in enumerate(abi.ATTR_NAMES):
        assert c_layout[name] == (i,), name


def test_ring_indexes_on_separate_cache_lines():
    offs = [abi.SQ_TAIL_OFF, abi.SQ_HEAD_OFF, abi.CQ_TAIL_OFF, abi.CQ_HEAD_OFF]
    assert len({o // 64 for o in offs}) == 4
    assert abi.REGION_HDR.itemsize <= 4096
    assert abi.RING_IDX.itemsize <= 4096


@pytest.mark.parametrize("entries,slots", [(8, 1), (256, 64), (4096, 4096)])
def test_layout_read_only_part_first(entries, slots):
    """Header and keys lie below rw_off (mapped read-only by the helper);
    ring indexes, rings and data from rw_off on, in that order, each part
    page-aligned and none overlapping (the module's layout)."""
    lay = layout(entries, slots, 1 << 20)
    page = 4096
    assert lay["keys_off"] == page
    assert lay["keys_off"] + slots * abi.KEY_SLOT.itemsize <= lay["rw_off"]
    assert lay["idx_off"] == lay["rw_off"]
    assert lay["sq_off"] >= lay["idx_off"] + abi.RING_IDX.itemsize
    assert lay["cq_off"] >= lay["sq_off"] + entries * abi.SQE.itemsize
    assert lay["data_off"] >= lay["cq_off"] + entries * abi.CQE.itemsize
    assert lay["region_size"] == lay["data_off"] + (1 << 20)
    assert all(v % page == 0 for k, v in lay.items() if k.endswith("_off"))


_SCRIBBLE = r"""
import sys, threading
from kgpu_helper.rings.ringdriver import RingDriver
from kgpu_helper.rings.transport import ShmTransport
d = RingDriver(sys.argv[1], entries=8, data_size=1 << 20, key_slots=4)
d.set_key(0, bytes(range(64)))
box = []
th = threading.Thread(target=lambda: box.append(ShmTransport(sys.argv[1])))
th.start(); assert d.wait_attach(5); th.join(5)
t = box[0]
r = t.region
for what in ("hdr", "keys"):
    try:
        if what == "hdr":
            r.hdr["region_size"] = 1
        else:
            r.keys["key"][0, 0] ^= 1
    except ValueError:
        print(what, "read-only view", flush=True)
r.buf[r.data_off] = 1          # the writable part takes stores
r.idx[0] = r.idx[0]
print("data ok", flush=True)
r.mv[int(sys.argv[2])] = 0xff  # a raw store below rw_off: SIGSEGV
print("stored below rw_off", flush=True)
"""


@pytest.mark.parametrize("where", ["hdr", "keys"])
def test_helper_maps_header_and_keys_read_only(tmp_path, where):
    """Through the shm transport (the same mapping code as /dev/kgpu's),
    the helper's views of the header and keys refuse writes, and a raw
    store below rw_off kills the helper instead of changing them."""
    off = 8 if where == "hdr" else 4096 + 16
    p = subprocess.run([sys.executable, "-c", _SCRIBBLE,
                        str(tmp_path / "r.sock"), str(off)],
                       capture_output=True, text=True, timeout=60)
    assert "hdr read-only view" in p.stdout, p.stdout + p.stderr
    assert "keys read-only view" in p.stdout, p.stdout + p.stderr
    assert "data ok" in p.stdout, p.stdout + p.stderr
    assert "stored below rw_off" not in p.stdout
    assert p.returncode == -signal.SIGSEGV, (p.returncode, p.stderr)
