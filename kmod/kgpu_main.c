// SPDX-License-Identifier: GPL-2.0
/*
 * kgpu core: the channel between the device-mapper targets (gpu-crypt,
 * gpu-raid6) and the user-space helper that runs their arithmetic on GPUs.
 *
 * Structures. One region of vmalloc_user() memory, allocated at load time
 * and laid out as uapi/kgpu.h describes: a read-only part (header page,
 * key slots) and a read-write part (ring indexes, submission ring,
 * completion ring, data space). The helper attaches by opening /dev/kgpu
 * (one helper at a time) and maps the two parts; it registers the
 * writable part with CUDA, so the GPU copies straight from and to the
 * pages the targets filled. Next to the region the core keeps, in kernel
 * memory the helper cannot touch, one struct kgpu_request per ring entry
 * (the "tag"), a bitmap of the data space in KGPU_DATA_ALIGN blocks, a
 * FIFO of the requests the helper owns, oldest first, and its own copy of
 * the header and of every key slot: the truth, written back to the region
 * at every attach, so that nothing a helper did outlives it.
 *
 * Hot path. kgpu_request_get() takes a free tag and a run of data blocks;
 * kgpu_submit() copies the parameters into the next SQ entry, publishes
 * sq_tail and wakes the helper's poll(). The helper drains the SQ, computes,
 * fills CQ entries and rings KGPU_IOC_COMPLETE once per batch; the ioctl
 * reaps every completion, checking tag and sequence number against the
 * kernel's own copy and the flags against the ones defined (nothing read
 * from the region is trusted), and calls done() of each request. No
 * syscall per request on either side. Since at most ring_entries requests
 * exist, neither ring can overflow; when tags or data space run out,
 * kgpu_request_get() waits (or fails with -EAGAIN for KGPU_NOWAIT):
 * back-pressure, never a dropped request.
 *
 * Locking. kg.lock (irq-safe) protects the tags, the data bitmap, the SQ
 * producer side, the CQ consumer side, the in-flight list, the helper
 * state and the counters. done() callbacks run after it is dropped, always
 * in process context. Two mutexes sit outside it, never nested with each
 * other: kg.key_mutex orders key writes against the write-back at attach,
 * and kgpu_param_lock orders timeout_ms writes against load and unload
 * (the timer is re-armed only while kg.live).
 *
 * Failure. A request the helper has not completed timeout_ms (the value
 * now, not at submission) after its submission is completed with
 * KGPU_FALLBACK: the submitter redoes it on the CPU. Its buffer stays
 * reserved until the helper completes it after all or detaches, because
 * the GPU may still be writing there. The helper is then "stalled" (the
 * log says so once, and `kgpu status`): one request at a time still goes
 * to it as a probe, the rest to the CPU, until it answers any request
 * again, which ends the stall (logged too). When the process that
 * attached closes its last descriptor of the file or exits (crash,
 * kill -9; a child it forked keeps nothing), every request it owned is
 * completed with KGPU_FALLBACK,
 * its mappings are torn down, the ring indexes start again at zero, and
 * the next open attaches a new helper; the module need not be reloaded.
 * With no helper attached, kgpu_request_get() fails with -ENODEV and the
 * targets use the CPU from the start.
 *
 * Providers. Where the region comes from is the one thing that differs
 * (module parameter region=): vmalloc, the above; or ivshmem, the BAR2
 * of QEMU's ivshmem-doorbell device in a guest without a GPU, served by
 * a helper on the host (kgpu_ivshmem.c, uapi/kgpu.h for the protocol).
 * There /dev/kgpu attaches nothing: struct kgpu_link and the device's
 * interrupt stand for open, close and KGPU_IOC_COMPLETE, and the same
 * kgpu_attach(), kgpu_detach_finish() and kgpu_reap_unlock() do the work;
 * kgpu_submit() rings the host's doorbell while the helper asks for it.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitmap.h>
#include <linux/debugfs.h>
#include <linux/fdtable.h>
#include <linux/fs.h>
#include <linux/jiffies.h>
#include <linux/log2.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/random.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/vmalloc.h>

#include "kgpu_internal.h"

static unsigned int ring_entries = 256;
module_param(ring_entries, uint, 0444);
MODULE_PARM_DESC(ring_entries,
		 "Requests in flight at most (SQ/CQ size), a power of two, 8..4096");

static unsigned int data_mb = 64;
module_param(data_mb, uint, 0444);
MODULE_PARM_DESC(data_mb, "Data space of the shared region in MiB, 1..2048");

static unsigned int key_slots = 64;
module_param(key_slots, uint, 0444);
MODULE_PARM_DESC(key_slots, "XTS key slots in the shared region, 1..4096");

static unsigned int timeout_ms = 5000;
/* Orders timeout_ms writes against load and unload; see kg.live. */
static DEFINE_MUTEX(kgpu_param_lock);
static int kgpu_set_timeout(const char *val, const struct kernel_param *kp);
static const struct kernel_param_ops kgpu_timeout_ops = {
	.set	= kgpu_set_timeout,
	.get	= param_get_uint,
};
module_param_cb(timeout_ms, &kgpu_timeout_ops, &timeout_ms, 0644);
MODULE_PARM_DESC(timeout_ms,
		 "A request the helper has not completed by then goes to the CPU (10..60000)");

/* region=: where the region comes from; after load, the one in use. */
enum { KGPU_REGION_AUTO, KGPU_REGION_VMALLOC, KGPU_REGION_IVSHMEM };
static const char *const kgpu_region_names[] = {
	[KGPU_REGION_AUTO] = "auto",
	[KGPU_REGION_VMALLOC] = "vmalloc",
	[KGPU_REGION_IVSHMEM] = "ivshmem",
};
static int region_mode = KGPU_REGION_AUTO;

static int kgpu_set_region(const char *val, const struct kernel_param *kp)
{
	int i = sysfs_match_string(kgpu_region_names, val);

	if (i < 0)
		return -EINVAL;
	*(int *)kp->arg = i;
	return 0;
}

static int kgpu_get_region(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%s\n", kgpu_region_names[*(int *)kp->arg]);
}

static const struct kernel_param_ops kgpu_region_ops = {
	.set	= kgpu_set_region,
	.get	= kgpu_get_region,
};
module_param_cb(region, &kgpu_region_ops, &region_mode, 0444);
MODULE_PARM_DESC(region,
		 "Where the shared region comes from: auto (ivshmem if a device 1af4:1110 is present, else vmalloc), vmalloc, or ivshmem");

const char *const kgpu_svc_names[KGPU_SVC_COUNT] = {
	[KGPU_SVC_NOP] = "nop",
	[KGPU_SVC_XTS_ENC] = "xts-enc",
	[KGPU_SVC_XTS_DEC] = "xts-dec",
	[KGPU_SVC_RAID6_GEN] = "raid6-gen",
	[KGPU_SVC_RAID6_REC] = "raid6-rec",
	[KGPU_SVC_RAID6_PQD] = "raid6-pqd",
};

static struct kgpu_core {
	spinlock_t lock;

	/* The region and its parts (kernel addresses). */
	void *region;
	size_t region_size;
	size_t rw_off;
	struct kgpu_region_hdr *hdr;
	struct kgpu_ring_idx *idx;
	struct kgpu_sqe *sq;
	struct kgpu_cqe *cq;
	struct kgpu_key_slot *keys;
	struct kgpu_link *link;		/* ivshmem only, else NULL */
	u8 *data;
	u64 data_off;
	u32 entries;
	u32 data_blocks;

	/* Kernel-only bookkeeping. */
	struct kgpu_region_hdr hdr_copy;	/* the header, as it must be */
	struct kgpu_key_slot *key_copy;		/* every slot, as it must be */
	struct mutex key_mutex;
	struct kgpu_request *reqs;
	unsigned long *data_map;
	unsigned long *key_map;
	u32 data_used_blocks;
	u32 frees;		/* bumped on every free: waiters watch it */
	u32 sq_tail;
	u32 cq_head;
	u64 next_seq;
	struct list_head inflight;
	u32 ninflight;
	u32 stale;		/* timed out, still owned by the helper */

	/*
	 * The helper: the file it opened and the file table of the process
	 * that opened it (the owner passed to ->flush). attached: requests
	 * may go to it (set once the region is written back, cleared when
	 * it starts to detach). stalled: one of its requests timed out and
	 * it has not answered anything since; probe: the one request it may
	 * hold meanwhile.
	 */
	struct file *helper_file;
	fl_owner_t helper_owner;
	bool attached;
	bool stalled;
	struct kgpu_request *probe;
	pid_t helper_pid;

	wait_queue_head_t poll_wq;
	wait_queue_head_t space_wq;
	struct workqueue_struct *wq;
	struct delayed_work timeout_work;
	bool live;		/* timeout_work may be armed (kgpu_param_lock) */
	struct dentry *debugfs;

	/* Counters. */
	u64 timeouts;
	u64 attaches;
	u64 bad_completions;
	u64 waits;
	struct kgpu_svc_stats svc[KGPU_SVC_COUNT];
} kg;

/* ---- requests ---------------------------------------------------------- */

static void kgpu_free_locked(struct kgpu_request *req)
{
	bitmap_clear(kg.data_map, req->first_block, req->nblocks);
	kg.data_used_blocks -= req->nblocks;
	kg.frees++;
	req->busy = false;
	req->data = NULL;
}

/* Drop one of the two owners; the slot is free when both are gone. */
static bool kgpu_release_locked(struct kgpu_request *req)
{
	if (req->user_ref || req->helper_ref)
		return false;
	kgpu_free_locked(req);
	return true;
}

static struct kgpu_request *kgpu_try_get(u32 nblocks)
{
	struct kgpu_request *req;
	unsigned long start;
	u32 tag;

	for (tag = 0; tag < kg.entries; tag++)
		if (!kg.reqs[tag].busy)
			break;
	if (tag == kg.entries)
		return NULL;
	start = bitmap_find_next_zero_area(kg.data_map, kg.data_blocks, 0,
					   nblocks, 0);
	if (start >= kg.data_blocks)
		return NULL;
	bitmap_set(kg.data_map, start, nblocks);
	kg.data_used_blocks += nblocks;

	req = &kg.reqs[tag];
	memset(&req->params, 0, sizeof(req->params));
	req->done = NULL;
	req->private = NULL;
	req->tag = tag;
	req->first_block = start;
	req->nblocks = nblocks;
	req->data = kg.data + (size_t)start * KGPU_DATA_ALIGN;
	req->size = (size_t)nblocks * KGPU_DATA_ALIGN;
	req->cqe_flags = 0;
	req->busy = true;
	req->user_ref = true;
	req->helper_ref = false;
	req->completed = false;
	INIT_LIST_HEAD(&req->node);
	return req;
}

/*
 * A stalled helper (one of its requests timed out, and it has answered
 * nothing since) is behind by more than the timeout, or stuck: it gets one
 * request at a time, a probe, and the rest goes to the CPU. Its first
 * answer ends the stall. This is also what keeps a stopped helper from
 * holding every tag while submitters wait.
 */
static bool kgpu_usable(void)
{
	/* READ_ONCE: also asked without kg.lock, by kgpu_offload(). */
	return READ_ONCE(kg.attached) &&
	       !(READ_ONCE(kg.stalled) && READ_ONCE(kg.probe));
}

/**
 * kgpu_request_get - a request with a buffer of at least @len bytes
 * @len: bytes of the buffer in the shared region
 * @flags: KGPU_NOWAIT, or 0 to wait (at most timeout_ms) for room
 *
 * Returns the request, or ERR_PTR(-ENODEV) when no helper is attached or
 * the helper is stalled and already holds its probe or has no room (see
 * kgpu_usable()), -E2BIG when @len can
 * never fit, -EAGAIN when the ring or the data space stayed full, -EINTR
 * when a wait was killed. done() callbacks must pass KGPU_NOWAIT: they may
 * run in the helper's own context.
 */
struct kgpu_request *kgpu_request_get(size_t len, unsigned int flags)
{
	struct kgpu_request *req = NULL;
	unsigned long deadline, irqf;
	bool waited = false;
	u32 nblocks, frees;
	long left;

	if (!len || len > (size_t)kg.data_blocks * KGPU_DATA_ALIGN)
		return ERR_PTR(-E2BIG);
	nblocks = DIV_ROUND_UP(len, KGPU_DATA_ALIGN);
	deadline = jiffies + msecs_to_jiffies(READ_ONCE(timeout_ms));

	for (;;) {
		spin_lock_irqsave(&kg.lock, irqf);
		if (!kgpu_usable()) {
			spin_unlock_irqrestore(&kg.lock, irqf);
			return ERR_PTR(-ENODEV);
		}
		req = kgpu_try_get(nblocks);
		if (kg.stalled) {
			/* The probe, or nothing: never wait for a stalled helper. */
			if (req)
				kg.probe = req;
			spin_unlock_irqrestore(&kg.lock, irqf);
			return req ? req : ERR_PTR(-ENODEV);
		}
		frees = kg.frees;
		if (!req && !waited) {
			kg.waits++;
			waited = true;
		}
		spin_unlock_irqrestore(&kg.lock, irqf);
		if (req)
			return req;
		left = (long)(deadline - jiffies);
		if ((flags & KGPU_NOWAIT) || left <= 0)
			return ERR_PTR(-EAGAIN);
		/* Woken by every free, timeout and detach; then try again. */
		left = wait_event_killable_timeout(kg.space_wq,
					!READ_ONCE(kg.attached) ||
					READ_ONCE(kg.stalled) ||
					READ_ONCE(kg.frees) != frees, left);
		if (left < 0)
			return ERR_PTR(-EINTR);
	}
}
EXPORT_SYMBOL_GPL(kgpu_request_get);

static void kgpu_fallback_work(struct work_struct *work)
{
	struct kgpu_request *req = container_of(work, struct kgpu_request, work);

	req->done(req, KGPU_FALLBACK);
}

static bool kgpu_params_valid(const struct kgpu_request *req)
{
	const struct kgpu_sqe *p = &req->params;

	if (p->service >= KGPU_SVC_COUNT || p->flags)
		return false;
	if (p->in_off > req->size || p->in_len > req->size - p->in_off ||
	    p->out_off > req->size || p->out_len > req->size - p->out_off)
		return false;
	if ((p->service == KGPU_SVC_XTS_ENC || p->service == KGPU_SVC_XTS_DEC) &&
	    (p->key_slot >= key_slots || !test_bit(p->key_slot, kg.key_map)))
		return false;
	return true;
}

static void kgpu_arm_timeout(void)
{
	unsigned long ms = max(READ_ONCE(timeout_ms) / 4, 10u);

	mod_delayed_work(kg.wq, &kg.timeout_work, msecs_to_jiffies(ms));
}

/**
 * kgpu_submit - hand a request to the helper
 * @req: from kgpu_request_get(), with params and done filled in
 *
 * Never fails: if the helper is gone or the parameters are wrong, done()
 * is called with KGPU_FALLBACK from the core's workqueue.
 */
void kgpu_submit(struct kgpu_request *req)
{
	struct kgpu_svc_stats *st;
	struct kgpu_sqe *sqe;
	unsigned long irqf;
	bool valid = kgpu_params_valid(req);

	if (WARN_ON_ONCE(!req->busy || !req->user_ref || req->helper_ref ||
			 req->completed || !req->done))
		return;
	spin_lock_irqsave(&kg.lock, irqf);
	st = &kg.svc[req->params.service < KGPU_SVC_COUNT ?
		     req->params.service : KGPU_SVC_NOP];
	st->requests++;
	st->bytes += req->params.in_len;
	/* Got before a stall began: only the probe goes to a stalled helper. */
	if (!kg.attached || (kg.stalled && kg.probe != req) || !valid) {
		if (kg.probe == req)
			kg.probe = NULL;
		if (!valid)
			st->errors++;
		st->fallback++;
		req->completed = true;
		spin_unlock_irqrestore(&kg.lock, irqf);
		INIT_WORK(&req->work, kgpu_fallback_work);
		queue_work(kg.wq, &req->work);
		return;
	}

	req->seq = ++kg.next_seq;
	req->helper_ref = true;
	req->submitted = jiffies;
	list_add_tail(&req->node, &kg.inflight);
	kg.ninflight++;

	sqe = &kg.sq[kg.sq_tail & (kg.entries - 1)];
	*sqe = req->params;
	sqe->seq = req->seq;
	sqe->tag = req->tag;
	sqe->in_off = kg.data_off + (req->data - (void *)kg.data) +
		      req->params.in_off;
	sqe->out_off = kg.data_off + (req->data - (void *)kg.data) +
		       req->params.out_off;
	kg.sq_tail++;
	/* The entry before the index: pairs with the helper's read of it. */
	smp_store_release(&kg.idx->sq_tail, kg.sq_tail);
	spin_unlock_irqrestore(&kg.lock, irqf);

	if (kg.link)
		kgpu_ivshmem_kick();
	else
		wake_up_interruptible(&kg.poll_wq);
	if (!delayed_work_pending(&kg.timeout_work))
		kgpu_arm_timeout();
}
EXPORT_SYMBOL_GPL(kgpu_submit);

/**
 * kgpu_request_put - release a request after its done() was called
 * @req: the request; the submitter must not touch it afterwards
 */
void kgpu_request_put(struct kgpu_request *req)
{
	unsigned long irqf;

	spin_lock_irqsave(&kg.lock, irqf);
	if (kg.probe == req)	/* got as the probe, never submitted */
		kg.probe = NULL;
	req->user_ref = false;
	kgpu_release_locked(req);
	spin_unlock_irqrestore(&kg.lock, irqf);
	wake_up(&kg.space_wq);
}
EXPORT_SYMBOL_GPL(kgpu_request_put);

struct page *kgpu_data_page(const struct kgpu_request *req, size_t off)
{
	if (WARN_ON_ONCE(!req->data || off >= req->size))
		return NULL;
	/* An ivshmem BAR is device memory: no struct pages. */
	if (kg.link)
		return NULL;
	/* The region is vmalloc_user() memory: every page has a struct page. */
	return vmalloc_to_page(req->data + off);
}
EXPORT_SYMBOL_GPL(kgpu_data_page);

/*
 * A quarter of the data space, at most 4 MiB: large enough for a launch to
 * pay off, small enough that several requests are always in flight.
 */
size_t kgpu_max_request(void)
{
	size_t max = (size_t)kg.data_blocks * KGPU_DATA_ALIGN / 4;

	max = min_t(size_t, max, 4u << 20);
	return max_t(size_t, max, KGPU_DATA_ALIGN);
}
EXPORT_SYMBOL_GPL(kgpu_max_request);

bool kgpu_offload(unsigned int service, size_t len)
{
	if (service >= KGPU_SVC_COUNT || !kgpu_usable())
		return false;
	return len >= READ_ONCE(kg.svc[service].crossover);
}
EXPORT_SYMBOL_GPL(kgpu_offload);

void kgpu_account_cpu(unsigned int service)
{
	unsigned long irqf;

	if (WARN_ON_ONCE(service >= KGPU_SVC_COUNT))
		return;
	spin_lock_irqsave(&kg.lock, irqf);
	kg.svc[service].kernel_cpu++;
	spin_unlock_irqrestore(&kg.lock, irqf);
}
EXPORT_SYMBOL_GPL(kgpu_account_cpu);

/* Until every request is back (all put): a region about to go away. */
void kgpu_wait_idle(void)
{
	wait_event(kg.space_wq, !READ_ONCE(kg.data_used_blocks));
}

static void kgpu_run_done(struct list_head *list, int status)
{
	struct kgpu_request *req, *next;

	list_for_each_entry_safe(req, next, list, node) {
		list_del_init(&req->node);
		req->done(req, status);
	}
}

/* ---- completions --------------------------------------------------------- */

/*
 * The flags of a successful completion: which path of the helper served
 * it, one at most. Anything else (a bit ABI 5 does not define, or the
 * CPU and the resident kernel at once) comes from a broken helper, whose
 * result is not used either.
 */
static bool kgpu_cqe_flags_valid(u16 flags)
{
	return flags == 0 || flags == KGPU_CQE_CPU ||
	       flags == KGPU_CQE_RESIDENT;
}

/*
 * Reap [cq_head, cq_tail) of the attached helper, entered with kg.lock
 * held (taken with @irqf); returns the number of valid completions.
 */
static int kgpu_reap_unlock(unsigned long irqf)
	__releases(&kg.lock)
{
	LIST_HEAD(ok);
	LIST_HEAD(failed);
	struct kgpu_request *req;
	bool resumed = false;
	u32 tail, n, i, nbad = 0, bad_flags = 0;
	int reaped = 0;
	pid_t pid;

	pid = kg.helper_pid;
	tail = smp_load_acquire(&kg.idx->cq_tail);
	n = tail - kg.cq_head;
	if (n > kg.entries) {
		/* A helper bug: more completions than could exist. */
		kg.bad_completions++;
		n = kg.entries;
	}
	for (i = 0; i < n; i++) {
		const struct kgpu_cqe *cqe =
			&kg.cq[(kg.cq_head + i) & (kg.entries - 1)];
		u64 seq = READ_ONCE(cqe->seq);
		u32 tag = READ_ONCE(cqe->tag);
		s16 status = READ_ONCE(cqe->status);
		u16 flags = READ_ONCE(cqe->flags);
		struct kgpu_svc_stats *st;

		if (tag >= kg.entries) {
			kg.bad_completions++;
			continue;
		}
		req = &kg.reqs[tag];
		if (!req->busy || !req->helper_ref || req->seq != seq) {
			kg.bad_completions++;
			continue;
		}
		req->helper_ref = false;
		reaped++;
		/* Any answer shows the helper is alive: the stall is over. */
		if (kg.probe == req)
			kg.probe = NULL;
		if (kg.stalled) {
			kg.stalled = false;
			kg.probe = NULL;
			resumed = true;
		}
		st = &kg.svc[req->params.service];
		if (req->completed) {
			/* Timed out before: the CPU already did it. */
			kg.stale--;
			kgpu_release_locked(req);
			continue;
		}
		list_del_init(&req->node);
		kg.ninflight--;
		req->completed = true;
		if (!status && !kgpu_cqe_flags_valid(flags)) {
			kg.bad_completions++;
			if (!nbad++)
				bad_flags = flags;
			status = -EPROTO;
		}
		if (status) {
			st->errors++;
			st->fallback++;
			list_add_tail(&req->node, &failed);
		} else {
			req->cqe_flags = flags;
			if (flags & KGPU_CQE_CPU) {
				st->helper_cpu++;
			} else {
				st->gpu++;
				if (flags & KGPU_CQE_RESIDENT)
					st->gpu_resident++;
			}
			list_add_tail(&req->node, &ok);
		}
	}
	kg.cq_head += n;
	/* Our reads of the entries before the helper may reuse them. */
	smp_store_release(&kg.idx->cq_head, kg.cq_head);
	spin_unlock_irqrestore(&kg.lock, irqf);

	if (resumed)
		pr_info("helper %d answers again; offloading resumed\n", pid);
	if (nbad)
		pr_warn_ratelimited("helper %d completed requests with flags ABI %u does not define (%u of them, the first 0x%x); doing them on the CPU\n",
				    pid, KGPU_ABI_VERSION, nbad, bad_flags);
	kgpu_run_done(&ok, 0);
	kgpu_run_done(&failed, KGPU_FALLBACK);
	wake_up(&kg.space_wq);
	return reaped;
}

/* KGPU_IOC_COMPLETE: only from the process that attached through @file. */
static int kgpu_reap(struct file *file)
{
	unsigned long irqf;

	spin_lock_irqsave(&kg.lock, irqf);
	if (!kg.attached || kg.helper_file != file ||
	    kg.helper_owner != current->files) {
		spin_unlock_irqrestore(&kg.lock, irqf);
		return -ENODEV;
	}
	return kgpu_reap_unlock(irqf);
}

/* The link's interrupt (ivshmem): the helper posted completions. */
void kgpu_link_reap(void)
{
	unsigned long irqf;

	spin_lock_irqsave(&kg.lock, irqf);
	if (!kg.attached) {
		spin_unlock_irqrestore(&kg.lock, irqf);
		return;
	}
	kgpu_reap_unlock(irqf);
}

/*
 * Expire the requests submitted at least timeout_ms ago. The timeout is
 * read now, so that a lower value also reaches the requests in flight;
 * since every request gets the same one, deadlines follow submission
 * order and the scan stops at the first request still in time.
 */
static void kgpu_timeout_fn(struct work_struct *work)
{
	LIST_HEAD(expired);
	struct kgpu_request *req, *next;
	unsigned int ms = READ_ONCE(timeout_ms);
	unsigned long tmo = msecs_to_jiffies(ms);
	unsigned long irqf;
	bool stalled = false, more;
	pid_t pid;

	spin_lock_irqsave(&kg.lock, irqf);
	list_for_each_entry_safe(req, next, &kg.inflight, node) {
		if (time_before(jiffies, req->submitted + tmo))
			break;	/* FIFO: the rest are younger */
		list_move_tail(&req->node, &expired);
		kg.ninflight--;
		req->completed = true;
		kg.stale++;
		kg.timeouts++;
		kg.svc[req->params.service].fallback++;
		if (kg.probe == req)
			kg.probe = NULL;	/* the next request probes */
		if (!kg.stalled) {
			kg.stalled = true;
			stalled = true;
		}
	}
	more = !list_empty(&kg.inflight);
	pid = kg.helper_pid;
	spin_unlock_irqrestore(&kg.lock, irqf);

	if (stalled)
		pr_warn("helper %d stalled: a request got no answer within %u ms; requests go to the CPU (one at a time still to the helper) until it answers again\n",
			pid, ms);
	if (!list_empty(&expired))
		pr_warn_ratelimited("helper did not complete requests within %u ms; doing them on the CPU\n",
				    ms);
	kgpu_run_done(&expired, KGPU_FALLBACK);
	if (!list_empty(&expired))
		wake_up_all(&kg.space_wq);	/* waiters give up: helper behind */
	if (more)
		kgpu_arm_timeout();
}

static int kgpu_set_timeout(const char *val, const struct kernel_param *kp)
{
	unsigned int ms;
	int ret = kstrtouint(val, 0, &ms);

	if (ret)
		return ret;
	if (ms < 10 || ms > 60000)
		return -EINVAL;
	/*
	 * Parameters stay writable while the module loads and unloads: arm
	 * the timer only between the end of kgpu_init() and the start of
	 * kgpu_exit(), never after its cancel.
	 */
	mutex_lock(&kgpu_param_lock);
	WRITE_ONCE(timeout_ms, ms);
	/* Re-arm now rather than when a longer timer fires. */
	if (kg.live)
		kgpu_arm_timeout();
	mutex_unlock(&kgpu_param_lock);
	return 0;
}

/* ---- the helper's file ------------------------------------------------- */

/*
 * Pages a GPU driver pinned (cudaHostRegister) can outlive the helper's
 * mapping and file: its DMA may still be running. A new helper would get
 * buffers that the old DMA still writes, so it waits until they are free.
 */
static bool kgpu_region_pinned(void)
{
	size_t off;

	for (off = 0; off < kg.region_size; off += PAGE_SIZE) {
		struct page *page = vmalloc_to_page(kg.region + off);

		if (page && folio_maybe_dma_pinned(page_folio(page)))
			return true;
	}
	return false;
}

/*
 * Write the kernel's header and keys back and start the ring indexes at
 * zero. Only at attach, before the new helper can map anything: the
 * previous one's mappings are gone (exit, munmap, or torn down at detach).
 */
static void kgpu_region_restore(void)
{
	mutex_lock(&kg.key_mutex);
	memcpy(kg.hdr, &kg.hdr_copy, sizeof(kg.hdr_copy));
	memcpy(kg.keys, kg.key_copy, key_slots * sizeof(*kg.keys));
	memset(kg.idx, 0, sizeof(*kg.idx));
	mutex_unlock(&kg.key_mutex);
}

/*
 * Attach helper @pid: the region written back, requests go to it from
 * now on. The helper's file is claimed (vmalloc) or the link's work item
 * runs this (ivshmem): one attach at a time.
 */
static void kgpu_attach(pid_t pid)
{
	unsigned long irqf;

	kgpu_region_restore();

	spin_lock_irqsave(&kg.lock, irqf);
	kg.attached = true;
	kg.stalled = false;
	kg.probe = NULL;
	kg.helper_pid = pid;
	kg.attaches++;
	spin_unlock_irqrestore(&kg.lock, irqf);
}

/*
 * The link (ivshmem): a helper on the host asked to be served, with its
 * crossovers, one per service (bytes, at most the data space).
 */
void kgpu_link_attach(pid_t pid, const u32 *crossover, unsigned int n)
{
	size_t max = (size_t)kg.data_blocks * KGPU_DATA_ALIGN;
	unsigned int i;

	for (i = 0; i < KGPU_SVC_COUNT && i < n; i++)
		WRITE_ONCE(kg.svc[i].crossover,
			   min_t(size_t, crossover[i], max));
	kgpu_attach(pid);
	pr_info("helper %d on the host attached (ivshmem)\n", pid);
}

static int kgpu_open(struct inode *inode, struct file *file)
{
	unsigned long irqf;
	pid_t pid = task_tgid_nr(current);

	if (kg.link) {
		pr_info_ratelimited("/dev/kgpu attaches nothing here: the region is the ivshmem device's, served by a helper on the host\n");
		return -ENODEV;
	}
	if (kgpu_region_pinned()) {
		pr_warn_ratelimited("the region is still pinned for DMA by the previous helper; try again\n");
		return -EAGAIN;
	}
	spin_lock_irqsave(&kg.lock, irqf);
	if (kg.helper_file) {
		spin_unlock_irqrestore(&kg.lock, irqf);
		return -EBUSY;
	}
	/* Ours, not yet attached: nothing is submitted until restored. */
	kg.helper_file = file;
	kg.helper_owner = current->files;
	spin_unlock_irqrestore(&kg.lock, irqf);

	kgpu_attach(pid);
	pr_info("helper %d attached\n", pid);
	return 0;
}

/*
 * The second half of a detach, once kg.attached is false: complete on the
 * CPU whatever the helper owned and start the ring over.
 */
static void kgpu_detach_finish(void)
{
	LIST_HEAD(orphans);
	unsigned long irqf;
	u32 tag, n = 0;
	pid_t pid;

	spin_lock_irqsave(&kg.lock, irqf);
	pid = kg.helper_pid;
	kg.helper_pid = 0;
	list_splice_init(&kg.inflight, &orphans);
	kg.ninflight = 0;
	for (tag = 0; tag < kg.entries; tag++) {
		struct kgpu_request *req = &kg.reqs[tag];

		if (!req->busy || !req->helper_ref)
			continue;
		req->helper_ref = false;
		if (!req->completed) {
			req->completed = true;
			kg.svc[req->params.service].fallback++;
			n++;
		}
		kgpu_release_locked(req);
	}
	kg.stale = 0;
	kg.stalled = false;
	kg.probe = NULL;
	kg.sq_tail = 0;
	kg.cq_head = 0;
	WRITE_ONCE(kg.idx->sq_tail, 0);
	WRITE_ONCE(kg.idx->sq_head, 0);
	WRITE_ONCE(kg.idx->cq_tail, 0);
	WRITE_ONCE(kg.idx->cq_head, 0);
	kg.helper_file = NULL;
	kg.helper_owner = NULL;
	spin_unlock_irqrestore(&kg.lock, irqf);

	if (n)
		pr_warn("helper %d detached with %u requests in flight; doing them on the CPU\n",
			pid, n);
	else
		pr_info("helper %d detached\n", pid);
	kgpu_run_done(&orphans, KGPU_FALLBACK);
	wake_up_all(&kg.space_wq);
}

/*
 * Detach the helper if @file is its file: complete on the CPU whatever it
 * owned, tear down its mappings, start the ring over.
 */
static void kgpu_detach(struct file *file)
{
	unsigned long irqf;

	spin_lock_irqsave(&kg.lock, irqf);
	if (kg.helper_file != file || !kg.attached) {
		spin_unlock_irqrestore(&kg.lock, irqf);
		return;
	}
	/* No new request, mapping or doorbell from here on. */
	kg.attached = false;
	spin_unlock_irqrestore(&kg.lock, irqf);

	/*
	 * Mappings left (a helper that closed its file but kept the region
	 * mapped) fault from now on. Every mapping of the region is this
	 * helper's: the next one cannot open before helper_file is cleared.
	 */
	unmap_mapping_range(file->f_mapping, 0, 0, 1);
	kgpu_detach_finish();
}

/* The link (ivshmem): the helper stopped, or another one replaces it. */
void kgpu_link_detach(void)
{
	unsigned long irqf;

	spin_lock_irqsave(&kg.lock, irqf);
	if (!kg.attached) {
		spin_unlock_irqrestore(&kg.lock, irqf);
		return;
	}
	kg.attached = false;
	spin_unlock_irqrestore(&kg.lock, irqf);
	kgpu_detach_finish();
}

static int kgpu_same_file(const void *p, struct file *file, unsigned int fd)
{
	return file == p;
}

/*
 * Called at every close() of a descriptor of the file, and for each one
 * at exit, once that descriptor is out of the file table @id. The helper
 * is the process that opened the file: closing its last descriptor of it
 * (a dup, such as the one Python's mmap keeps, counts) or exiting
 * detaches, while a child it forked (another file table) that still holds
 * the file keeps nothing.
 */
static int kgpu_flush(struct file *file, fl_owner_t id)
{
	if (READ_ONCE(kg.helper_file) != file ||
	    READ_ONCE(kg.helper_owner) != id)
		return 0;
	if (iterate_fd(id, 0, kgpu_same_file, file))
		return 0;
	kgpu_detach(file);
	return 0;
}

/* The last reference to a file is gone; detach if it is still attached. */
static int kgpu_release(struct inode *inode, struct file *file)
{
	kgpu_detach(file);
	return 0;
}

/*
 * Two parts, as uapi/kgpu.h describes: below rw_off (header and key
 * slots) read-only, from rw_off on read-write. Only the helper's own
 * process maps, and only while attached.
 */
static int kgpu_mmap(struct file *file, struct vm_area_struct *vma)
{
	unsigned long len = vma->vm_end - vma->vm_start;
	unsigned long off;
	unsigned long irqf;
	bool ours;

	spin_lock_irqsave(&kg.lock, irqf);
	ours = kg.attached && kg.helper_file == file &&
	       kg.helper_owner == current->files;
	spin_unlock_irqrestore(&kg.lock, irqf);
	if (!ours)
		return -ENODEV;
	if (vma->vm_pgoff >= kg.region_size >> PAGE_SHIFT ||
	    !(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	off = vma->vm_pgoff << PAGE_SHIFT;
	if (len > kg.region_size - off)
		return -EINVAL;
	if (off < kg.rw_off) {
		/* Header and keys: neither now nor after an mprotect(). */
		if (vma->vm_flags & VM_WRITE)
			return -EACCES;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
		vm_flags_clear(vma, VM_MAYWRITE);
#else
		vma->vm_flags &= ~VM_MAYWRITE;
#endif
	}
	/* A forked child must not keep the helper's region (and it) alive. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, VM_DONTCOPY);
	vm_flags_clear(vma, VM_MAYEXEC);
#else
	vma->vm_flags |= VM_DONTCOPY;
	vma->vm_flags &= ~VM_MAYEXEC;
#endif
	return remap_vmalloc_range(vma, kg.region, vma->vm_pgoff);
}

static __poll_t kgpu_poll(struct file *file, poll_table *wait)
{
	poll_wait(file, &kg.poll_wq, wait);
	/* A file that is not (or no longer) the helper's has nothing to do. */
	if (READ_ONCE(kg.helper_file) != file || !READ_ONCE(kg.attached))
		return EPOLLERR | EPOLLHUP;
	if (READ_ONCE(kg.idx->sq_head) != READ_ONCE(kg.sq_tail))
		return EPOLLIN | EPOLLRDNORM;
	return 0;
}

static long kgpu_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct kgpu_version v = {
		.magic = KGPU_MAGIC,
		.abi_version = KGPU_ABI_VERSION,
	};

	switch (cmd) {
	case KGPU_IOC_VERSION:
		if (copy_to_user((void __user *)arg, &v, sizeof(v)))
			return -EFAULT;
		return 0;
	case KGPU_IOC_COMPLETE:
		return kgpu_reap(file);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations kgpu_fops = {
	.owner		= THIS_MODULE,
	.open		= kgpu_open,
	.flush		= kgpu_flush,
	.release	= kgpu_release,
	.mmap		= kgpu_mmap,
	.poll		= kgpu_poll,
	.unlocked_ioctl	= kgpu_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.llseek		= noop_llseek,
};

static struct miscdevice kgpu_misc = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "kgpu",
	.fops	= &kgpu_fops,
	.mode	= 0600,
};

/* ---- keys ------------------------------------------------------------ */

int kgpu_key_get(void)
{
	unsigned long irqf;
	unsigned long slot;

	spin_lock_irqsave(&kg.lock, irqf);
	slot = find_first_zero_bit(kg.key_map, key_slots);
	if (slot < key_slots)
		set_bit(slot, kg.key_map);
	spin_unlock_irqrestore(&kg.lock, irqf);
	return slot < key_slots ? (int)slot : -ENOSPC;
}
EXPORT_SYMBOL_GPL(kgpu_key_get);

/*
 * A key slot is written under a sequence count, as uapi/kgpu.h describes:
 * generation odd while the slot changes, even again once it is stable.
 * The kernel's copy (@copy) is written first and is the truth: the slot
 * in the region gets it back at every attach. Under kg.key_mutex.
 */
static void kgpu_key_write(int slot, const u8 *key, unsigned int len)
{
	struct kgpu_key_slot *copy = &kg.key_copy[slot];
	struct kgpu_key_slot *ks = &kg.keys[slot];
	u32 gen = copy->generation;

	memzero_explicit(copy->key, sizeof(copy->key));
	if (len)
		memcpy(copy->key, key, len);
	copy->key_len = len;
	copy->generation = gen + 2;

	WRITE_ONCE(ks->generation, gen + 1);
	smp_wmb();
	memzero_explicit(ks->key, sizeof(ks->key));
	if (len)
		memcpy(ks->key, key, len);
	WRITE_ONCE(ks->key_len, len);
	smp_wmb();
	WRITE_ONCE(ks->generation, gen + 2);
}

/* Call only while no request uses @slot (dm: table load, suspended). */
int kgpu_key_set(int slot, const u8 *key, unsigned int len)
{
	if (slot < 0 || slot >= key_slots || (len != 32 && len != 64))
		return -EINVAL;
	mutex_lock(&kg.key_mutex);
	kgpu_key_write(slot, key, len);
	mutex_unlock(&kg.key_mutex);
	return 0;
}
EXPORT_SYMBOL_GPL(kgpu_key_set);

void kgpu_key_put(int slot)
{
	unsigned long irqf;

	if (slot < 0 || slot >= key_slots)
		return;
	mutex_lock(&kg.key_mutex);
	kgpu_key_write(slot, NULL, 0);
	mutex_unlock(&kg.key_mutex);
	spin_lock_irqsave(&kg.lock, irqf);
	clear_bit(slot, kg.key_map);
	spin_unlock_irqrestore(&kg.lock, irqf);
}
EXPORT_SYMBOL_GPL(kgpu_key_put);

/* ---- stats and tunables -------------------------------------------------- */

void kgpu_get_stats(struct kgpu_stats *st)
{
	unsigned long irqf;

	st->provider = kg.link ? "ivshmem" : "vmalloc";
	spin_lock_irqsave(&kg.lock, irqf);
	st->helper_pid = kg.attached ? kg.helper_pid : 0;
	st->helper_stalled = kg.attached && kg.stalled;
	st->ring_entries = kg.entries;
	st->inflight = kg.ninflight;
	st->data_size = (u64)kg.data_blocks * KGPU_DATA_ALIGN;
	st->data_used = (u64)kg.data_used_blocks * KGPU_DATA_ALIGN;
	st->timeout_ms = READ_ONCE(timeout_ms);
	st->timeouts = kg.timeouts;
	st->attaches = kg.attaches;
	st->bad_completions = kg.bad_completions;
	st->waits = kg.waits;
	memcpy(st->svc, kg.svc, sizeof(st->svc));
	spin_unlock_irqrestore(&kg.lock, irqf);
}

int kgpu_set_crossover(unsigned int service, u32 bytes)
{
	if (service >= KGPU_SVC_COUNT)
		return -EINVAL;
	WRITE_ONCE(kg.svc[service].crossover, bytes);
	return 0;
}

/* ---- load and unload --------------------------------------------------- */

static int kgpu_check_params(void)
{
	if (ring_entries < 8 || ring_entries > 4096 ||
	    !is_power_of_2(ring_entries)) {
		pr_err("ring_entries must be a power of two in 8..4096, not %u\n",
		       ring_entries);
		return -EINVAL;
	}
	if (data_mb < 1 || data_mb > 2048) {
		pr_err("data_mb must be in 1..2048, not %u\n", data_mb);
		return -EINVAL;
	}
	if (key_slots < 1 || key_slots > 4096) {
		pr_err("key_slots must be in 1..4096, not %u\n", key_slots);
		return -EINVAL;
	}
	return 0;
}

/* Offsets of the parts, from the parameters; the data space comes last. */
struct kgpu_layout {
	size_t keys_off, rw_off, idx_off, sq_off, cq_off, data_off;
};

static void kgpu_layout(struct kgpu_layout *l)
{
	/* Read-only for the helper: header, keys. Then ring indexes on. */
	l->keys_off = PAGE_SIZE;
	l->rw_off = l->keys_off +
		    PAGE_ALIGN(key_slots * sizeof(struct kgpu_key_slot));
	l->idx_off = l->rw_off;
	l->sq_off = l->idx_off + PAGE_SIZE;
	l->cq_off = l->sq_off +
		    PAGE_ALIGN(ring_entries * sizeof(struct kgpu_sqe));
	l->data_off = l->cq_off +
		      PAGE_ALIGN(ring_entries * sizeof(struct kgpu_cqe));
}

/*
 * The data space a region of @avail bytes holds: data_mb MiB, or less if
 * that does not fit, in whole KGPU_DATA_ALIGN blocks; 0 if none does.
 */
size_t kgpu_region_data_size(size_t avail)
{
	struct kgpu_layout l;

	kgpu_layout(&l);
	if (avail <= l.data_off)
		return 0;
	return round_down(min_t(size_t, avail - l.data_off,
				(size_t)data_mb << 20), KGPU_DATA_ALIGN);
}

/*
 * Lay the region out at @base: the parts, the header (here and in the
 * kernel's copy), zeroed keys and ring indexes, and the kernel's own
 * bookkeeping. @link: the ivshmem link in the header page, or NULL.
 */
int kgpu_region_setup(void *base, size_t data_size, struct kgpu_link *link)
{
	struct kgpu_region_hdr *h = &kg.hdr_copy;
	struct kgpu_layout l;

	BUILD_BUG_ON(sizeof(struct kgpu_region_hdr) > KGPU_LINK_OFF);
	BUILD_BUG_ON(KGPU_LINK_OFF + sizeof(struct kgpu_link) > PAGE_SIZE);
	BUILD_BUG_ON(sizeof(struct kgpu_ring_idx) > PAGE_SIZE);
	BUILD_BUG_ON(sizeof(struct kgpu_sqe) != 64);
	BUILD_BUG_ON(sizeof(struct kgpu_cqe) != 16);
	BUILD_BUG_ON(sizeof(struct kgpu_key_slot) != 128);

	kgpu_layout(&l);
	kg.key_copy = kcalloc(key_slots, sizeof(*kg.key_copy), GFP_KERNEL);
	kg.reqs = kcalloc(ring_entries, sizeof(*kg.reqs), GFP_KERNEL);
	kg.data_map = bitmap_zalloc(data_size / KGPU_DATA_ALIGN, GFP_KERNEL);
	kg.key_map = bitmap_zalloc(key_slots, GFP_KERNEL);
	if (!kg.key_copy || !kg.reqs || !kg.data_map || !kg.key_map) {
		bitmap_free(kg.key_map);
		bitmap_free(kg.data_map);
		kfree(kg.reqs);
		kfree(kg.key_copy);
		kg.key_map = kg.data_map = NULL;
		kg.reqs = NULL;
		kg.key_copy = NULL;
		return -ENOMEM;
	}

	kg.region = base;
	kg.region_size = l.data_off + data_size;
	kg.entries = ring_entries;
	kg.rw_off = l.rw_off;
	kg.hdr = base;
	kg.keys = base + l.keys_off;
	kg.idx = base + l.idx_off;
	kg.sq = base + l.sq_off;
	kg.cq = base + l.cq_off;
	kg.data = base + l.data_off;
	kg.data_off = l.data_off;
	kg.data_blocks = data_size / KGPU_DATA_ALIGN;
	kg.link = link;

	memset(h, 0, sizeof(*h));
	h->magic = KGPU_MAGIC;
	h->abi_version = KGPU_ABI_VERSION;
	h->region_size = kg.region_size;
	h->ring_entries = ring_entries;
	h->sqe_size = sizeof(struct kgpu_sqe);
	h->cqe_size = sizeof(struct kgpu_cqe);
	h->key_slots = key_slots;
	h->key_slot_size = sizeof(struct kgpu_key_slot);
	h->data_align = KGPU_DATA_ALIGN;
	h->sq_off = l.sq_off;
	h->cq_off = l.cq_off;
	h->keys_off = l.keys_off;
	h->data_off = l.data_off;
	h->data_size = data_size;
	h->rw_off = l.rw_off;
	h->idx_off = l.idx_off;
	h->link_off = link ? KGPU_LINK_OFF : 0;
	/*
	 * New at every load: a helper that kept serving an ivshmem region
	 * across a reload or reboot of its guest sees the header change, and
	 * its old completions match no new (tag, seq).
	 */
	h->reserved[0] = get_random_u64();
	kg.next_seq = get_random_u64();
	/* Not the link: a helper on the host may already be waiting there. */
	memcpy(kg.hdr, h, sizeof(*h));
	memset(kg.keys, 0, key_slots * sizeof(*kg.keys));
	memset(kg.idx, 0, sizeof(*kg.idx));
	return 0;
}

static int kgpu_region_alloc(void)
{
	size_t data_size = (size_t)data_mb << 20;
	struct kgpu_layout l;
	void *region;
	int ret;

	kgpu_layout(&l);
	region = vmalloc_user(l.data_off + data_size);
	if (!region)
		return -ENOMEM;
	ret = kgpu_region_setup(region, data_size, NULL);
	if (ret)
		vfree(region);
	return ret;
}

/* Wipe the key slots in the region (not the kernel's copy): unload. */
void kgpu_region_wipe_keys(void)
{
	mutex_lock(&kg.key_mutex);
	if (kg.keys)
		memzero_explicit(kg.keys, key_slots * sizeof(*kg.keys));
	mutex_unlock(&kg.key_mutex);
}

/* The bookkeeping, and the region if it is ours (vmalloc). */
static void kgpu_region_free(void)
{
	bitmap_free(kg.key_map);
	bitmap_free(kg.data_map);
	kfree(kg.reqs);
	kfree_sensitive(kg.key_copy);
	if (!kg.link && kg.region) {
		memzero_explicit(kg.keys, key_slots * sizeof(*kg.keys));
		vfree(kg.region);
	}
	kg.region = NULL;
	kg.keys = NULL;
	kg.link = NULL;
}

/*
 * region=: ivshmem when asked, or for auto when the device is there and
 * usable (kgpu_ivshmem_init() says why not); else vmalloc.
 */
static int kgpu_region_init(void)
{
	int ret;

	if (region_mode != KGPU_REGION_VMALLOC) {
		ret = kgpu_ivshmem_init(region_mode == KGPU_REGION_IVSHMEM);
		if (!ret) {
			region_mode = KGPU_REGION_IVSHMEM;
			return 0;
		}
		if (region_mode == KGPU_REGION_IVSHMEM)
			return ret;
	}
	region_mode = KGPU_REGION_VMALLOC;
	return kgpu_region_alloc();
}

static int __init kgpu_init(void)
{
	int ret;

	ret = kgpu_check_params();
	if (ret)
		return ret;
	spin_lock_init(&kg.lock);
	mutex_init(&kg.key_mutex);
	INIT_LIST_HEAD(&kg.inflight);
	init_waitqueue_head(&kg.poll_wq);
	init_waitqueue_head(&kg.space_wq);
	INIT_DELAYED_WORK(&kg.timeout_work, kgpu_timeout_fn);

	kg.wq = alloc_workqueue("kgpu", WQ_MEM_RECLAIM, 0);
	if (!kg.wq)
		return -ENOMEM;
	ret = kgpu_region_init();
	if (ret)
		goto bad_region;
	ret = kgpu_netlink_init();
	if (ret)
		goto bad_netlink;
	ret = misc_register(&kgpu_misc);
	if (ret)
		goto bad_misc;
	kg.debugfs = debugfs_create_dir("kgpu", NULL);
	kgpu_selftest_init(kg.debugfs);
	kgpu_stats_debugfs_init(kg.debugfs);

	/* From here on a timeout_ms write may arm the timer. */
	mutex_lock(&kgpu_param_lock);
	kg.live = true;
	mutex_unlock(&kgpu_param_lock);

	pr_info("loaded, ABI %u: region %s, %u ring entries, %u KiB data, %u key slots, timeout %u ms\n",
		KGPU_ABI_VERSION, kgpu_region_names[region_mode], ring_entries,
		kg.data_blocks * (KGPU_DATA_ALIGN / 1024), key_slots,
		READ_ONCE(timeout_ms));
	return 0;

bad_misc:
	kgpu_netlink_exit();
bad_netlink:
	if (kg.link) {
		kgpu_ivshmem_stop();
		kgpu_ivshmem_exit();
	}
	kgpu_region_free();
bad_region:
	/* Never armed: kg.live was not set. */
	destroy_workqueue(kg.wq);
	kg.wq = NULL;
	return ret;
}

static void __exit kgpu_exit(void)
{
	/*
	 * No submitter is left, and no local helper (it holds a module
	 * reference); a helper on the host (ivshmem) is told to stop and
	 * whatever it had is completed on the CPU before the self-test's
	 * batches go. timeout_ms stays writable until after we return: stop
	 * its writes from arming the timer before cancelling it for good.
	 */
	mutex_lock(&kgpu_param_lock);
	kg.live = false;
	mutex_unlock(&kgpu_param_lock);

	debugfs_remove_recursive(kg.debugfs);
	if (kg.link)
		kgpu_ivshmem_stop();
	kgpu_selftest_exit();
	misc_deregister(&kgpu_misc);
	kgpu_netlink_exit();
	cancel_delayed_work_sync(&kg.timeout_work);
	destroy_workqueue(kg.wq);
	kg.wq = NULL;
	if (kg.link)
		kgpu_ivshmem_exit();	/* the BARs: after the last use */
	kgpu_region_free();
	pr_info("unloaded\n");
}

module_init(kgpu_init);
module_exit(kgpu_exit);

MODULE_AUTHOR("kgpu developers");
MODULE_DESCRIPTION("kgpu core: GPU offload channel for dm targets");
MODULE_LICENSE("GPL");
