"""The Python mirror of the ring ABI matches the C header, field by field.

A small C program is compiled against kmod/uapi/kgpu.h (with the system's
<linux/types.h>) and prints sizeof and offsetof for every structure and
field the mirror declares; the numbers must agree exactly.
"""

import os
import shutil
import subprocess

import pytest

from kgpu_helper import abi

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
                  "KGPU_CQE_CPU"):
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
    assert c_layout["KGPU_CMD_SET_CROSSOVER"] == (abi.CMD_SET_CROSSOVER,)
    assert c_layout["KGPU_RAID6_NONE"] == (abi.RAID6_NONE,)
    assert c_layout["KGPU_CQE_CPU"] == (abi.CQE_CPU,)


def test_ring_indexes_on_separate_cache_lines():
    offs = [abi.SQ_TAIL_OFF, abi.SQ_HEAD_OFF, abi.CQ_TAIL_OFF, abi.CQ_HEAD_OFF]
    assert len({o // 64 for o in offs}) == 4
    assert abi.REGION_HDR.itemsize <= 4096
