/* SPDX-License-Identifier: GPL-2.0 */
/* kgpu core: state shared by the files of kgpu.ko (not an API). */
#ifndef _KGPU_INTERNAL_H
#define _KGPU_INTERNAL_H

#include <linux/spinlock.h>
#include <linux/wait.h>

#include "kgpu.h"

struct dentry;

#define KGPU_DATA_ALIGN	4096u

struct kgpu_svc_stats {
	u64 requests;
	u64 bytes;
	u64 gpu;
	u64 helper_cpu;
	u64 fallback;
	u64 errors;
	u32 crossover;
};

/* A consistent copy of the counters, for netlink and debugfs. */
struct kgpu_stats {
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

int kgpu_selftest_init(struct dentry *dir);
void kgpu_selftest_exit(void);

#endif /* _KGPU_INTERNAL_H */
