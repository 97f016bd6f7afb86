"""Python mirror of the ring ABI in kmod/uapi/kgpu.h.

Each structure is one field list, in C order with C types; everything else
(numpy dtypes for vectorised access to whole rings, sizes, offsets) is
derived from it. tests/test_abi.py compiles the C header and checks that
every size and offset here matches it.

::

    struct kgpu_sqe {                 struct kgpu_cqe {
        __u64 seq;                        __u64 seq;
        __u32 tag;                        __u32 tag;
        __u16 service;                    __s16 status;
        ...                               __u16 flags;
    };                                };
"""

import numpy as np

MAGIC = 0x6B677075
ABI_VERSION = 5

# enum kgpu_service
(SVC_NOP, SVC_XTS_ENC, SVC_XTS_DEC, SVC_RAID6_GEN, SVC_RAID6_REC,
 SVC_RAID6_PQD) = range(6)
SVC_COUNT = 6
SERVICE_NAMES = {
    SVC_NOP: "nop", SVC_XTS_ENC: "xts-enc", SVC_XTS_DEC: "xts-dec",
    SVC_RAID6_GEN: "raid6-gen", SVC_RAID6_REC: "raid6-rec",
    SVC_RAID6_PQD: "raid6-pqd",
}

IV_PLAIN64 = 0
IV_PLAIN = 1
RAID6_NONE = 0xFF
# struct kgpu_cqe flags: which path served a request, one at most (ABI 5)
CQE_CPU = 0x1           # the helper's CPU backend
CQE_RESIDENT = 0x2      # the GPU-resident service kernel, no launch

_C_TYPES = {
    "__u8": "u1", "__u16": "<u2", "__u32": "<u4", "__u64": "<u8",
    "__s16": "<i2", "__s32": "<i4",
}

# (name, C type, array length or 1), in C order. The C compiler adds no
# padding to any of these: every field is naturally aligned already.
REGION_HDR_FIELDS = [
    ("magic", "__u32", 1),
    ("abi_version", "__u32", 1),
    ("region_size", "__u64", 1),
    ("ring_entries", "__u32", 1),
    ("sqe_size", "__u32", 1),
    ("cqe_size", "__u32", 1),
    ("key_slots", "__u32", 1),
    ("key_slot_size", "__u32", 1),
    ("data_align", "__u32", 1),
    ("sq_off", "__u64", 1),
    ("cq_off", "__u64", 1),
    ("keys_off", "__u64", 1),
    ("data_off", "__u64", 1),
    ("data_size", "__u64", 1),
    ("rw_off", "__u64", 1),
    ("idx_off", "__u64", 1),
    ("link_off", "__u64", 1),
    ("reserved", "__u64", 3),
]

# struct kgpu_ring_idx: the page of ring indexes, at idx_off.
RING_IDX_FIELDS = [
    ("sq_tail", "__u32", 1),
    ("pad_sq_tail", "__u32", 15),
    ("sq_head", "__u32", 1),
    ("pad_sq_head", "__u32", 15),
    ("cq_tail", "__u32", 1),
    ("pad_cq_tail", "__u32", 15),
    ("cq_head", "__u32", 1),
    ("pad_cq_head", "__u32", 15),
]

# struct kgpu_link: the ivshmem handshake, at LINK_OFF in the header page.
LINK_FIELDS = [
    ("helper_state", "__u32", 1),
    ("helper_token", "__u32", 1),
    ("helper_pid", "__u32", 1),
    ("need_wakeup", "__u32", 1),
    ("crossover", "__u32", 8),
    ("pad_helper", "__u32", 4),
    ("guest_state", "__u32", 1),
    ("guest_token", "__u32", 1),
    ("guest_id", "__u32", 1),
    ("pad_guest", "__u32", 13),
]
LINK_OFF = 2048
IVSHMEM_HELPER_PEER = 0
IVSHMEM_VENDOR, IVSHMEM_DEVICE = 0x1AF4, 0x1110
LINK_NONE, LINK_ATTACH, LINK_DETACH = 0, 1, 2
LINK_READY = 1

SQE_FIELDS = [
    ("seq", "__u64", 1),
    ("tag", "__u32", 1),
    ("service", "__u16", 1),
    ("flags", "__u16", 1),
    ("in_off", "__u64", 1),
    ("in_len", "__u32", 1),
    ("out_len", "__u32", 1),
    ("out_off", "__u64", 1),
    ("unit_size", "__u32", 1),
    ("sector_step", "__u32", 1),
    ("sector", "__u64", 1),
    ("key_slot", "__u16", 1),
    ("iv_mode", "__u8", 1),
    ("ndisks", "__u8", 1),
    ("fail_a", "__u8", 1),
    ("fail_b", "__u8", 1),
    ("reserved", "__u16", 1),
]

CQE_FIELDS = [
    ("seq", "__u64", 1),
    ("tag", "__u32", 1),
    ("status", "__s16", 1),
    ("flags", "__u16", 1),
]

KEY_SLOT_FIELDS = [
    ("key_len", "__u32", 1),
    ("generation", "__u32", 1),
    ("reserved", "__u64", 1),
    ("key", "__u8", 64),
    ("pad", "__u8", 48),
]

VERSION_FIELDS = [
    ("magic", "__u32", 1),
    ("abi_version", "__u32", 1),
]

# C struct name -> field list, for the layout test.
STRUCTS = {
    "kgpu_region_hdr": REGION_HDR_FIELDS,
    "kgpu_ring_idx": RING_IDX_FIELDS,
    "kgpu_link": LINK_FIELDS,
    "kgpu_sqe": SQE_FIELDS,
    "kgpu_cqe": CQE_FIELDS,
    "kgpu_key_slot": KEY_SLOT_FIELDS,
    "kgpu_version": VERSION_FIELDS,
}


def dtype_of(fields):
    """The numpy structured dtype of a field list (packed, C order)."""
    spec = []
    for name, ctype, count in fields:
        base = _C_TYPES[ctype]
        spec.append((name, base, (count,)) if count > 1 else (name, base))
    return np.dtype(spec)


REGION_HDR = dtype_of(REGION_HDR_FIELDS)
RING_IDX = dtype_of(RING_IDX_FIELDS)
LINK = dtype_of(LINK_FIELDS)
SQE = dtype_of(SQE_FIELDS)
CQE = dtype_of(CQE_FIELDS)
KEY_SLOT = dtype_of(KEY_SLOT_FIELDS)
VERSION = dtype_of(VERSION_FIELDS)

# Byte offsets of the ring indexes inside struct kgpu_ring_idx.
SQ_TAIL_OFF = RING_IDX.fields["sq_tail"][1]
SQ_HEAD_OFF = RING_IDX.fields["sq_head"][1]
CQ_TAIL_OFF = RING_IDX.fields["cq_tail"][1]
CQ_HEAD_OFF = RING_IDX.fields["cq_head"][1]


# ioctl numbers, as <asm-generic/ioctl.h> builds them.
def _ioc(direction, nr, size, base=0xB7):
    return (direction << 30) | (size << 16) | (base << 8) | nr


IOC_VERSION = _ioc(2, 0x00, VERSION.itemsize)   # _IOR
IOC_COMPLETE = _ioc(0, 0x01, 0)                  # _IO

# Generic netlink family "kgpu".
GENL_NAME = "kgpu"
GENL_VERSION = 1
CMD_GET_STATS = 1
CMD_SET_CROSSOVER = 2
ATTR_NAMES = [
    "KGPU_ATTR_UNSPEC", "KGPU_ATTR_HELPER_PID", "KGPU_ATTR_RING_ENTRIES",
    "KGPU_ATTR_INFLIGHT", "KGPU_ATTR_DATA_SIZE", "KGPU_ATTR_DATA_USED",
    "KGPU_ATTR_TIMEOUT_MS", "KGPU_ATTR_TIMEOUTS", "KGPU_ATTR_ATTACHES",
    "KGPU_ATTR_BAD_COMPLETIONS", "KGPU_ATTR_WAITS", "KGPU_ATTR_SERVICE",
    "KGPU_ATTR_SVC_ID", "KGPU_ATTR_SVC_NAME", "KGPU_ATTR_SVC_REQUESTS",
    "KGPU_ATTR_SVC_BYTES", "KGPU_ATTR_SVC_GPU", "KGPU_ATTR_SVC_HELPER_CPU",
    "KGPU_ATTR_SVC_FALLBACK", "KGPU_ATTR_SVC_ERRORS",
    "KGPU_ATTR_SVC_CROSSOVER", "KGPU_ATTR_PAD", "KGPU_ATTR_HELPER_STALLED",
    "KGPU_ATTR_PROVIDER", "KGPU_ATTR_SVC_GPU_RESIDENT",
    "KGPU_ATTR_SVC_KERNEL_CPU",
]
