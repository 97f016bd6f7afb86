/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kgpu: in-kernel API for the device-mapper targets.
 *
 * A target asks for a request with a buffer in the shared region, fills
 * the buffer and the parameters, and submits it; exactly one call of its
 * done() follows, in process context, with no kgpu lock held:
 *
 *	done(req, 0)			the helper computed it: the result is in
 *					req->data
 *	done(req, KGPU_FALLBACK)	the helper could not (none attached, it
 *					died, it timed out, it failed): the
 *					submitter computes it on its own CPU,
 *					from its own copy of the input, and must
 *					not read req->data, which the helper may
 *					still be writing
 *
 * and then the submitter releases the request with kgpu_request_put().
 *
 *	req = kgpu_request_get(len, 0);
 *	if (IS_ERR(req))
 *		... do it on the CPU (no helper, or too large) ...
 *	memcpy(req->data, src, len);
 *	req->params.service = KGPU_SVC_XTS_ENC; ...
 *	req->done = my_done;
 *	kgpu_submit(req);
 */
#ifndef _KGPU_H
#define _KGPU_H

#include <linux/list.h>
#include <linux/types.h>
#include <linux/workqueue.h>

#include "uapi/kgpu.h"

#define KGPU_FALLBACK	1

/* kgpu_request_get() flags */
#define KGPU_NOWAIT	0x1	/* fail with -EAGAIN instead of waiting */

struct kgpu_request;
typedef void (*kgpu_done_t)(struct kgpu_request *req, int status);

struct kgpu_request {
	/*
	 * Filled by the submitter: the service and its parameters, with
	 * in_off and out_off relative to data. seq and tag are the core's.
	 */
	struct kgpu_sqe params;
	kgpu_done_t done;
	void *private;

	/* Set by the core, read-only for the submitter. */
	void *data;		/* the request's buffer in the shared region */
	size_t size;		/* its length, at least what was asked */
	u16 cqe_flags;		/* with done(req, 0): 0, KGPU_CQE_CPU or
				 * KGPU_CQE_RESIDENT, never both */

	/* Private to the core. */
	u32 tag;
	u32 first_block;
	u32 nblocks;
	u64 seq;
	unsigned long submitted;	/* jiffies */
	bool busy;		/* not free */
	bool user_ref;		/* the submitter holds it */
	bool helper_ref;	/* the helper may touch its buffer */
	bool completed;		/* done() has been called or queued */
	struct list_head node;	/* in flight (FIFO) or on a done list */
	struct work_struct work;
};

struct kgpu_request *kgpu_request_get(size_t len, unsigned int flags);
void kgpu_submit(struct kgpu_request *req);
void kgpu_request_put(struct kgpu_request *req);

/*
 * The page behind req->data + @off, for a target that wants to put the
 * region's own pages into a bio (no copy), or NULL when the region has no
 * struct pages (device memory, such as an ivshmem BAR): the target must then
 * bounce through pages of its own. The page stays valid until
 * kgpu_request_put().
 */
struct page *kgpu_data_page(const struct kgpu_request *req, size_t off);

/* The largest len that kgpu_request_get() can ever grant, in bytes. */
size_t kgpu_max_request(void);

/*
 * True when a helper is attached and len is at least the crossover; false
 * also while the helper is stalled (a request of it timed out) and already
 * holds the one request it may have until it answers again.
 */
bool kgpu_offload(unsigned int service, size_t len);

/*
 * The submitter did a request of @service on its own CPU without handing
 * it to kgpu: kgpu_offload() said no, or kgpu_request_get() failed. Only
 * counted (`kgpu status`: kernel CPU by choice); a request that came back
 * with KGPU_FALLBACK is already counted and must not be counted again.
 * Any context; does not sleep.
 */
void kgpu_account_cpu(unsigned int service);

/*
 * RAID6 services on the kernel's CPU (raid6_pq), as the helper computes
 * them: GEN, REC or PQD over nslots blocks (data in syndrome order, P, Q)
 * of len bytes. a, b: REC's lost blocks, PQD's first and last changed
 * data slot (uapi/kgpu.h). For targets' fallbacks and the self-test.
 */
#define KGPU_RAID6_MAX_SLOTS	34	/* 32 members, ddf's two zero slots */
void kgpu_raid6_cpu(unsigned int svc, unsigned int nslots, void **ptrs,
		    size_t len, unsigned int a, unsigned int b);

/* XTS key slots in the region: raw K1 || K2, 32 or 64 bytes. */
int kgpu_key_get(void);
int kgpu_key_set(int slot, const u8 *key, unsigned int len);
void kgpu_key_put(int slot);

#endif /* _KGPU_H */
