/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * kgpu user-space ABI: /dev/kgpu, shared between the kernel module and the
 * helper process.
 *
 * Fixed-width fields only, no pointers, no unions, so that the Python
 * mirror (helper/rings/abi.py) describes every structure as a plain field
 * list; a test compiles this header and checks every size and offset
 * against that mirror.
 *
 * The region: the module allocates it, the helper maps it from /dev/kgpu
 * and registers its writable part with CUDA, so the GPU copies straight
 * from and to it. Layout, each part at the offset the header gives:
 *
 *	header	struct kgpu_region_hdr (one page): sizes, offsets	} read-only
 *	keys	key_slots x struct kgpu_key_slot, written by the kernel	} [0, rw_off)
 *	idx	struct kgpu_ring_idx (one page): the ring indexes	} read-write
 *	SQ	ring_entries x struct kgpu_sqe, written by the kernel	} [rw_off,
 *	CQ	ring_entries x struct kgpu_cqe, written by the helper	}  region_size)
 *	data	data_size bytes: the request buffers (kernel allocates)	}
 *
 * The helper maps the two parts with two mmap() calls on one range of its
 * address space: [0, rw_off) at file offset 0 with PROT_READ only, then
 * [rw_off, region_size) at file offset rw_off with PROT_READ | PROT_WRITE,
 * so that region offsets are the same on both sides. The module refuses a
 * writable mapping of anything below rw_off (EACCES) and any later
 * mprotect() that would make it writable: a helper cannot change the
 * geometry or the keys, even by a stray write.
 *
 * Ring protocol. Indexes are free-running __u32; entry i lives at
 * i & (ring_entries - 1). The kernel fills SQ entries then publishes
 * sq_tail (store-release); the helper, woken by poll(POLLIN) on /dev/kgpu,
 * reads every entry in [sq_head, sq_tail), then advances sq_head. The
 * helper fills CQ entries, publishes cq_tail, then rings the doorbell once
 * for the whole batch with KGPU_IOC_COMPLETE; the kernel reaps
 * [cq_head, cq_tail) and advances cq_head. At most ring_entries requests
 * are in flight, so neither ring can overflow.
 *
 * The kernel trusts nothing it reads from the region: a completion whose
 * tag or sequence number does not match a request in flight is counted as
 * an error and dropped; one with status 0 whose flags are not one of the
 * combinations defined below is counted as an error too, and its request
 * is computed on the kernel's CPU (see struct kgpu_cqe).
 *
 * Attachment. Opening /dev/kgpu attaches a helper (one at a time: EBUSY).
 * Only the process that opened it may map the region and ring the
 * doorbell. The helper detaches when that process closes its last
 * descriptor of the file or exits, even if a child it forked still holds
 * the file; the kernel then completes on its CPU whatever was in flight,
 * starts the rings over, and writes its own header and keys back before
 * the next helper attaches.
 */
#ifndef _UAPI_KGPU_H
#define _UAPI_KGPU_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define KGPU_MAGIC		0x6b677075u	/* "kgpu" */
#define KGPU_ABI_VERSION	5u

/* Services: what a request asks the helper to compute. */
enum kgpu_service {
	KGPU_SVC_NOP = 0,		/* nothing: round-trip tests */
	KGPU_SVC_XTS_ENC = 1,		/* AES-XTS encrypt, in -> out */
	KGPU_SVC_XTS_DEC = 2,		/* AES-XTS decrypt, in -> out */
	KGPU_SVC_RAID6_GEN = 3,		/* P and Q from the data blocks */
	KGPU_SVC_RAID6_REC = 4,		/* rebuild fail_a (and fail_b) */
	KGPU_SVC_RAID6_PQD = 5,		/* P and Q updated by a data delta */
	KGPU_SVC_COUNT
};

/* iv_mode of XTS requests, as dm-crypt names them. */
#define KGPU_IV_PLAIN64		0	/* tweak: 64-bit LE sector number */
#define KGPU_IV_PLAIN		1	/* tweak: its low 32 bits */

/* fail_a / fail_b of RAID6 requests when fewer than two blocks are lost. */
#define KGPU_RAID6_NONE		0xff

/*
 * struct kgpu_region_hdr - first page of the region, read-only for the
 * helper. The kernel keeps its own copy and never reads this one back.
 */
struct kgpu_region_hdr {
	__u32 magic;		/* KGPU_MAGIC */
	__u32 abi_version;	/* KGPU_ABI_VERSION */
	__u64 region_size;	/* bytes, the whole region */
	__u32 ring_entries;	/* SQ and CQ entries, a power of two */
	__u32 sqe_size;		/* sizeof(struct kgpu_sqe) */
	__u32 cqe_size;		/* sizeof(struct kgpu_cqe) */
	__u32 key_slots;	/* number of key slots */
	__u32 key_slot_size;	/* sizeof(struct kgpu_key_slot) */
	__u32 data_align;	/* request buffers start on this boundary */
	__u64 sq_off;		/* region offsets of the parts */
	__u64 cq_off;
	__u64 keys_off;
	__u64 data_off;
	__u64 data_size;
	__u64 rw_off;		/* the helper may write from here on */
	__u64 idx_off;		/* struct kgpu_ring_idx */
	__u64 link_off;		/* struct kgpu_link (ivshmem), KGPU_LINK_OFF */
	__u64 reserved[3];	/* [0]: random, new at every load of the
				 * module: a guest that reloaded or rebooted
				 * under an ivshmem helper shows a new one */
};

/*
 * struct kgpu_ring_idx - the four ring indexes, in separate 64-byte lines;
 * the kernel writes sq_tail and cq_head, the helper writes sq_head and
 * cq_tail. The kernel keeps its own sq_tail and cq_head and trusts nothing
 * it reads here.
 */
struct kgpu_ring_idx {
	__u32 sq_tail;		/* kernel: entries published */
	__u32 pad_sq_tail[15];
	__u32 sq_head;		/* helper: entries taken */
	__u32 pad_sq_head[15];
	__u32 cq_tail;		/* helper: completions published */
	__u32 pad_cq_tail[15];
	__u32 cq_head;		/* kernel: completions reaped */
	__u32 pad_cq_head[15];
};

/*
 * struct kgpu_sqe - one request (64 bytes).
 *
 * Buffers are given as region offsets. XTS: in_len bytes of data units of
 * unit_size bytes at in_off go to out_off (out_off == in_off: in place);
 * unit i uses the tweak sector + i * sector_step and key slot key_slot.
 * RAID6: the buffer at in_off (== out_off) holds ndisks blocks of
 * unit_size bytes each, data blocks first in Q order, then P, then Q;
 * GEN writes P and Q, REC rewrites blocks fail_a and fail_b from the
 * others (in_len == out_len == ndisks * unit_size).
 *
 * RAID6_PQD (read-modify-write, ABI 3): ndisks is the stripe's number of
 * syndrome slots (data, then P, then Q) and fail_a <= fail_b < ndisks - 2
 * are the first and last data slot that changed. The buffer at in_off
 * (== out_off) holds fail_b - fail_a + 3 blocks of unit_size bytes: the
 * deltas D'_i ^ D_i (old data XOR new data; zeros for a slot in the range
 * that did not change) of data slots fail_a..fail_b, then the old P, then
 * the old Q. The helper rewrites the last two blocks with the new
 *	P' = P ^ sum(delta_i),  Q' = Q ^ sum(g^i * delta_i)
 * (i the data slot, g = 2 in GF(2^8) mod 0x11d, as raid6_pq's
 * xor_syndrome(ndisks, fail_a, fail_b, ...)), and leaves the deltas
 * as they were. in_len == out_len == (fail_b - fail_a + 3) * unit_size.
 */
struct kgpu_sqe {
	__u64 seq;		/* unique per request, echoed in the CQE */
	__u32 tag;		/* the kernel's request slot, echoed */
	__u16 service;		/* enum kgpu_service */
	__u16 flags;		/* none defined yet: must be 0 */
	__u64 in_off;
	__u32 in_len;
	__u32 out_len;
	__u64 out_off;
	__u32 unit_size;	/* XTS data unit / RAID6 block bytes */
	__u32 sector_step;	/* XTS: tweak increment per data unit */
	__u64 sector;		/* XTS: tweak of the first data unit */
	__u16 key_slot;		/* XTS: index into the key slots */
	__u8 iv_mode;		/* XTS: KGPU_IV_* */
	__u8 ndisks;		/* RAID6: blocks in the buffer, 4..32 */
	__u8 fail_a;		/* RAID6 REC: lost blocks, or KGPU_RAID6_NONE */
	__u8 fail_b;
	__u16 reserved;
};

/*
 * struct kgpu_cqe - one completion (16 bytes).
 *
 * flags says which path of the helper computed the request, for the
 * counters only: 0 (its GPU, in a batched launch), KGPU_CQE_CPU or
 * KGPU_CQE_RESIDENT, never both, no other bit (ABI 5). With status 0 and
 * any other value the kernel does not use the result: it counts the
 * completion in KGPU_ATTR_BAD_COMPLETIONS and as an error of the service,
 * and computes the request on its CPU. With a nonzero status flags is
 * ignored.
 */
struct kgpu_cqe {
	__u64 seq;		/* the request's seq */
	__u32 tag;		/* the request's tag */
	__s16 status;		/* 0, or a negative errno: the kernel then
				 * computes the request on its CPU */
	__u16 flags;		/* KGPU_CQE_* */
};

#define KGPU_CQE_CPU		0x1	/* the helper used its CPU backend */
#define KGPU_CQE_RESIDENT	0x2	/* served by the GPU-resident service
					 * kernel, no launch: the GPU (ABI 5) */

/*
 * struct kgpu_key_slot - a raw XTS key (K1 || K2), set by the kernel at
 * table load or "key set", wiped at "key wipe" or unload.
 *
 * generation is a sequence count: the kernel makes it odd, rewrites
 * key_len and key, then makes it even again. A reader takes generation,
 * then key_len and key, then generation again, and uses what it read only
 * if both were the same even number; the helper re-expands a slot
 * whenever its generation changed.
 */
struct kgpu_key_slot {
	__u32 key_len;		/* 32 or 64 bytes; 0: empty */
	__u32 generation;
	__u64 reserved;
	__u8 key[64];
	__u8 pad[48];
};

/*
 * The ivshmem region provider (ABI 4). A guest without a GPU loads kgpu.ko
 * with region=ivshmem (or auto, the default, when a PCI device 1af4:1110
 * is present): the region is then the BAR2 of QEMU's ivshmem-doorbell
 * device, a shared-memory file of its host, and the helper is a process
 * on the host ("kgpu helper --ivshmem SOCKET", the device's ivshmem
 * server). Same layout, same rings; what /dev/kgpu does on one machine is
 * done through struct kgpu_link and two interrupts:
 *
 *  - helper -> guest: the helper signals the eventfd of the guest's MSI-X
 *    vector 0 (attach, detach, and once per batch of completions); the
 *    guest handles it on a workqueue: link state first, then the CQ;
 *  - guest -> helper: the guest writes (KGPU_IVSHMEM_HELPER_PEER << 16 | 0)
 *    to the BAR0 Doorbell register after publishing sq_tail, only while
 *    need_wakeup is set (the helper sets it, then looks at the SQ once
 *    more, before it sleeps; it clears it when it wakes): once per burst.
 *
 * Attach: the helper writes its crossovers, pid and a new nonzero token,
 * then helper_state = KGPU_LINK_ATTACH, and interrupts the guest. The
 * guest (at probe, or on that interrupt, once guest_state is
 * KGPU_LINK_READY) completes on its CPU whatever an earlier helper still
 * had, writes its header, keys and zeroed ring indexes back, sets
 * guest_token = helper_token and rings the doorbell; the helper serves
 * once it reads guest_state == READY and guest_token == its token. A
 * helper that stops cleanly sets helper_state = KGPU_LINK_DETACH and
 * interrupts; the guest detaches as when /dev/kgpu closes. A helper that
 * dies says nothing: its requests time out into the CPU (the stall of
 * the netlink section), and the next helper's attach replaces it. The
 * guest unloading sets guest_state and guest_token to 0 and rings.
 *
 * Trust: the host is trusted by the guest as a hypervisor is; the guest
 * is not trusted by the helper, which checks every request against that
 * guest's own region, as it does with /dev/kgpu.
 */
#define KGPU_LINK_OFF		2048	/* in the header page */
#define KGPU_IVSHMEM_HELPER_PEER 0	/* the helper's ivshmem peer id */
#define KGPU_IVSHMEM_VENDOR	0x1af4
#define KGPU_IVSHMEM_DEVICE	0x1110

#define KGPU_LINK_NONE		0
#define KGPU_LINK_ATTACH	1	/* helper_state: serve me */
#define KGPU_LINK_DETACH	2	/* helper_state: I stopped */
#define KGPU_LINK_READY		1	/* guest_state: the region is valid */

/* struct kgpu_link - at KGPU_LINK_OFF; each side writes its own line. */
struct kgpu_link {
	/* written by the helper */
	__u32 helper_state;	/* KGPU_LINK_NONE, _ATTACH or _DETACH */
	__u32 helper_token;	/* nonzero, new for every attach */
	__u32 helper_pid;	/* its pid on the host, for kgpu status */
	__u32 need_wakeup;	/* 1 while it sleeps: ring the doorbell */
	__u32 crossover[8];	/* bytes, per service: see SET_CROSSOVER */
	__u32 pad_helper[4];
	/* written by the guest */
	__u32 guest_state;	/* KGPU_LINK_READY once the region is valid */
	__u32 guest_token;	/* helper_token of the helper attached */
	__u32 guest_id;		/* its ivshmem IVPosition */
	__u32 pad_guest[13];
};

/* KGPU_IOC_VERSION: the module's magic and ABI version. */
struct kgpu_version {
	__u32 magic;
	__u32 abi_version;
};

#define KGPU_IOC_BASE		0xb7
#define KGPU_IOC_VERSION	_IOR(KGPU_IOC_BASE, 0x00, struct kgpu_version)
/* Doorbell: reap the CQ up to cq_tail. Returns the number reaped. */
#define KGPU_IOC_COMPLETE	_IO(KGPU_IOC_BASE, 0x01)

/*
 * Generic netlink family "kgpu": statistics and tunables.
 *
 * KGPU_CMD_GET_STATS answers with the global attributes and one nested
 * KGPU_ATTR_SERVICE per service. KGPU_CMD_SET_CROSSOVER takes
 * KGPU_ATTR_SVC_ID and KGPU_ATTR_SVC_CROSSOVER: requests smaller than that
 * many bytes are done on the kernel's CPU (needs CAP_NET_ADMIN).
 *
 * Per service, every request is counted once, by the path that finished
 * it (ABI 5). The requests handed to kgpu (SVC_REQUESTS, SVC_BYTES) end
 * in SVC_GPU, SVC_HELPER_CPU or SVC_FALLBACK: once none is in flight,
 *	SVC_REQUESTS == SVC_GPU + SVC_HELPER_CPU + SVC_FALLBACK.
 * SVC_GPU_RESIDENT is the part of SVC_GPU that the GPU-resident kernel
 * served (the rest went through batched launches), so readers that know
 * only SVC_GPU still see every GPU answer. SVC_ERRORS is the part of
 * SVC_FALLBACK that the helper answered with an error or with undefined
 * flags, or that was invalid to begin with. SVC_KERNEL_CPU counts what a
 * submitter did on its own CPU without handing it to kgpu (below the
 * crossover, no helper attached or a stalled one, no room): not part of
 * SVC_REQUESTS.
 *
 * A helper is "stalled" from the moment one of its requests times out
 * until it answers any request again: meanwhile one request at a time
 * still goes to it, as a probe, and the rest to the kernel's CPU.
 */
#define KGPU_GENL_NAME		"kgpu"
#define KGPU_GENL_VERSION	1

enum kgpu_genl_cmd {
	KGPU_CMD_UNSPEC,
	KGPU_CMD_GET_STATS,
	KGPU_CMD_SET_CROSSOVER,
	__KGPU_CMD_MAX,
};

enum kgpu_genl_attr {
	KGPU_ATTR_UNSPEC,
	KGPU_ATTR_HELPER_PID,		/* u32, 0 when no helper is attached */
	KGPU_ATTR_RING_ENTRIES,		/* u32 */
	KGPU_ATTR_INFLIGHT,		/* u32: requests owned by the helper */
	KGPU_ATTR_DATA_SIZE,		/* u64: bytes of data space */
	KGPU_ATTR_DATA_USED,		/* u64: bytes allocated now */
	KGPU_ATTR_TIMEOUT_MS,		/* u32 */
	KGPU_ATTR_TIMEOUTS,		/* u64: requests that timed out */
	KGPU_ATTR_ATTACHES,		/* u64: helpers attached so far */
	KGPU_ATTR_BAD_COMPLETIONS,	/* u64: CQEs refused as invalid */
	KGPU_ATTR_WAITS,		/* u64: submitters that had to wait */
	KGPU_ATTR_SERVICE,		/* nested, one per service */
	KGPU_ATTR_SVC_ID,		/* u32, enum kgpu_service */
	KGPU_ATTR_SVC_NAME,		/* string */
	KGPU_ATTR_SVC_REQUESTS,		/* u64: submitted */
	KGPU_ATTR_SVC_BYTES,		/* u64: input bytes submitted */
	KGPU_ATTR_SVC_GPU,		/* u64: completed by the helper's GPU */
	KGPU_ATTR_SVC_HELPER_CPU,	/* u64: completed by the helper's CPU */
	KGPU_ATTR_SVC_FALLBACK,		/* u64: handed to the kernel's CPU */
	KGPU_ATTR_SVC_ERRORS,		/* u64: of SVC_FALLBACK, an error
					 * answer, a bad one, or invalid */
	KGPU_ATTR_SVC_CROSSOVER,	/* u32: bytes, see above */
	KGPU_ATTR_PAD,
	KGPU_ATTR_HELPER_STALLED,	/* u32: 1 while the helper is stalled */
	KGPU_ATTR_PROVIDER,		/* string: "vmalloc" or "ivshmem" */
	KGPU_ATTR_SVC_GPU_RESIDENT,	/* u64: of SVC_GPU, served by the
					 * GPU-resident kernel (ABI 5) */
	KGPU_ATTR_SVC_KERNEL_CPU,	/* u64: done on the kernel's CPU, never
					 * handed to kgpu (ABI 5) */
	__KGPU_ATTR_MAX,
};
#define KGPU_ATTR_MAX (__KGPU_ATTR_MAX - 1)

#endif /* _UAPI_KGPU_H */
