/* SPDX-License-Identifier: GPL-2.0 */
/* kgpu core: state shared by the files of kgpu.ko (not an API). */
#ifndef _KGPU_INTERNAL_H
#define _KGPU_INTERNAL_H

#include <linux/spinlock.h>
#include <linux/wait.h>

#include "kgpu.h"

struct dentry;

#define KGPU_DATA_ALIGN	4096u

/* Per service; what each counts: uapi/kgpu.h, KGPU_ATTR_SVC_*. */
struct kgpu_svc_stats {
	u64 requests;
	u64 bytes;
	u64 gpu;
	u64 gpu_resident;	/* of gpu */
	u64 helper_cpu;
	u64 fallback;
	u64 errors;		/* of fallback */
	u64 kernel_cpu;		/* not in requests */
	u32 crossover;
};

/* A consistent copy of the counters, for netlink and debugfs. */
struct kgpu_stats {
	const char *provider;	/* "vmalloc" or "ivshmem" */
	pid_t helper_pid;
	bool helper_stalled;
	u32 ring_entries;
	u32 inflight;
	u64 data_size;
	u64 data_used;
	u32 timeout_ms;
	u64 timeouts;
	u64 attaches;
	u64 bad_completions;
	u64 waits;
	struct kgpu_svc_stats svc[KGPU_SVC_COUNT];
};

extern const char *const kgpu_svc_names[KGPU_SVC_COUNT];

void kgpu_get_stats(struct kgpu_stats *st);
int kgpu_set_crossover(unsigned int service, u32 bytes);

int kgpu_netlink_init(void);
void kgpu_netlink_exit(void);
void kgpu_stats_debugfs_init(struct dentry *dir);

int kgpu_selftest_init(struct dentry *dir);
void kgpu_selftest_exit(void);

/*
 * Region providers. kgpu_main.c lays the region out and runs the rings;
 * a provider supplies the memory and the helper's attach, detach and
 * doorbell. vmalloc (kgpu_main.c): the helper is a local process that
 * opens /dev/kgpu. ivshmem (kgpu_ivshmem.c): the region is the BAR2 of
 * QEMU's ivshmem-doorbell device, the helper a process on the host, and
 * struct kgpu_link plus two interrupts stand for the file.
 */
size_t kgpu_region_data_size(size_t avail);
int kgpu_region_setup(void *base, size_t data_size, struct kgpu_link *link);
void kgpu_region_wipe_keys(void);
void kgpu_link_attach(pid_t pid, const u32 *crossover, unsigned int n);
void kgpu_link_detach(void);
void kgpu_wait_idle(void);
void kgpu_link_reap(void);

/* 0: the ivshmem device is the region; -ENODEV: none (or not usable). */
int kgpu_ivshmem_init(bool required);
void kgpu_ivshmem_stop(void);
void kgpu_ivshmem_exit(void);
void kgpu_ivshmem_kick(void);

#endif /* _KGPU_INTERNAL_H */
