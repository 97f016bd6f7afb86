// SPDX-License-Identifier: GPL-2.0
/*
 * dm-gpu-raid6: md-compatible RAID6 as a device-mapper target, with P/Q
 * generation and recovery handed to the kgpu helper.
 *
 * The members hold exactly what md writes for the same layout, chunk size
 * and member order: data placement (raid5_compute_sector), P, and Q with
 * md's order of the data disks in the syndrome (raid6_idx_to_slot: from
 * the disk after Q for the md layouts, by device index with P and Q
 * counted as zero blocks for the ddf layouts). An array moves freely
 * between this target and mdadm.
 *
 * Structures. A gr_ctx per table: the members, a bitmap of members that
 * are missing or dead, a bio_set for member bios, a workqueue, a small
 * fixed set of stripe buffers (gr_buf: one block per syndrome slot,
 * allocated at table load) and hashed per-row mutexes.
 *
 * Hot path. dm splits bios at row boundaries (max_io_len is one row of
 * data). A read is split again at its chunk boundary and remapped straight
 * to its member when that member is alive. Everything else (writes, reads
 * whose member is dead) goes to the workqueue, which takes the row's
 * mutex, then a stripe buffer, and works through the bio's columns in
 * segments of at most GR_SEG bytes: read what the plan needs from the
 * members (read-modify-write or reconstruct-write, whichever reads less;
 * all survivors when a lost block has to be rebuilt), compute (helper,
 * else raid6_pq), write the changed data and P/Q. Lock order: row mutex,
 * then stripe buffer; nothing that holds a buffer waits for a row.
 *
 * Failures. A member I/O error marks the member dead (logged once) and
 * the work is redone degraded. With more than two members dead, I/O that
 * needs a dead member fails with -EIO, never with wrong data.
 *
 * The helper. P/Q (RAID6_GEN), recovery (RAID6_REC) and read-modify-
 * write's P/Q delta update (RAID6_PQD: old ^ new of the written data
 * blocks, old P and Q -> new P and Q) go to kgpu when kgpu_offload() says
 * a helper is usable and the request is above the crossover; the
 * request's buffer is filled from the stripe buffer, which stays intact,
 * so done(req, KGPU_FALLBACK) (no helper, it died, it timed out)
 * recomputes from it with kgpu_raid6_cpu() (raid6_pq). A read of the one
 * lost data block of a stripe whose P is alive is rebuilt by XOR on the
 * CPU from the other data blocks and P: a round trip to the helper costs
 * more than the XOR.
 */
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/completion.h>
#include <linux/device-mapper.h>
#include <linux/module.h>
#include <linux/delay.h>
#include <linux/mutex.h>
#include <linux/raid/md_p.h>
#include <linux/raid/pq.h>
#include <linux/random.h>
#include <linux/slab.h>
#include <linux/timekeeping.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "kgpu.h"

#define DM_MSG_PREFIX "gpu-raid6"

#define GR_MIN_DEVS	4
#define GR_MAX_DEVS	32
#define GR_MAX_SLOTS	(GR_MAX_DEVS + 2)
#define GR_NONE		0xff
#define GR_SEG		(64 * 1024)	/* bytes of one column segment */
#define GR_NBUF		16		/* stripe buffers per array: rows in flight */
#define GR_LOCKS	64		/* hashed row locks */
#define GR_MAX_CHUNK	(1U << 16)	/* sectors (32 MiB) */
#define GR_IN_SYNC	(~(sector_t)0)	/* resync_cp: nothing left to resync */
#define GR_SB_ROLES	((MD_SB_BYTES - 256) / 2)	/* max_dev in one block */
#define GR_SAFEMODE_MS	200		/* md's safe_mode_delay */
#define GR_RATE_MIN	1000		/* KiB/s per member: md's speed_limit_min */
#define GR_RATE_MAX	200000		/* KiB/s per member: md's speed_limit_max */
#define GR_READ_ERRORS	20		/* md's max_corrected_read_errors */
#define GR_LANES	8		/* rows of background work at once */
#define GR_BM_MAGIC	0x6d746962	/* "bitm": md's bitmap superblock */
#define GR_BM_HDR	256		/* its size: the bits follow it */
#define GR_BM_STALE	0x2		/* state: out of date, all dirty */
#define GR_BM_BITS	(PAGE_SIZE * 8)
#define GR_BM_MAX_BITS	(1UL << 22)	/* 512 KiB of bits, 12 MiB of counts */

/* Background work on the whole array, as dm-raid spells it. */
enum gr_action { GR_IDLE, GR_RESYNC, GR_RECOVER, GR_CHECK, GR_REPAIR };
static const char *const gr_action_name[] = {
	"idle", "resync", "recover", "check", "repair",
};

/* md's RAID6 algorithms (include/linux/raid/md_p.h numbering). */
enum {
	GR_LEFT_ASYMMETRIC = 0,
	GR_RIGHT_ASYMMETRIC = 1,
	GR_LEFT_SYMMETRIC = 2,
	GR_RIGHT_SYMMETRIC = 3,
	GR_ROTATING_ZERO_RESTART = 8,
	GR_ROTATING_N_RESTART = 9,
};

struct gr_layout {
	const char *name;	/* as md (mdadm) or dm-raid spell it */
	const char *dmraid;	/* dm-raid's raid type: status' first field */
	int algorithm;
	bool ddf;		/* Q over all device slots, P and Q as zeros */
};

static const struct gr_layout gr_layouts[] = {
	{ "left-asymmetric",  "raid6_la", GR_LEFT_ASYMMETRIC,	    false },
	{ "right-asymmetric", "raid6_ra", GR_RIGHT_ASYMMETRIC,	    false },
	{ "left-symmetric",   "raid6_ls", GR_LEFT_SYMMETRIC,	    false },
	{ "right-symmetric",  "raid6_rs", GR_RIGHT_SYMMETRIC,	    false },
	{ "raid6_zr",	      "raid6_zr", GR_ROTATING_ZERO_RESTART, true },
	{ "ddf-zero-restart", "raid6_zr", GR_ROTATING_ZERO_RESTART, true },
	{ "raid6_nr",	      "raid6_nr", GR_ROTATING_N_RESTART,    true },
	{ "ddf-N-restart",    "raid6_nr", GR_ROTATING_N_RESTART,    true },
};

/* Where the blocks of one row live. */
struct gr_row {
	u8 data[GR_MAX_DEVS];	/* logical data index -> member */
	u8 slot[GR_MAX_DEVS];	/* member -> syndrome slot */
	u8 phys[GR_MAX_SLOTS];	/* syndrome slot -> member, GR_NONE: zeros */
};

struct gr_batch;

struct gr_mio {
	struct gr_batch *b;
	unsigned int member;
};

/* Member bios in flight for one step of a segment. */
struct gr_batch {
	atomic_t pending;
	struct completion done;
	unsigned long errors;	/* members that failed */
	struct gr_mio mio[GR_MAX_DEVS];
};

struct gr_buf {
	struct list_head node;
	u8 *blk[GR_MAX_SLOTS];	/* GR_SEG bytes each, physically contiguous */
	u8 *nd[GR_MAX_DEVS];	/* ndata more: new data (RMW), new P/Q (sync) */
	struct gr_batch batch;
};

struct gr_ctx;

/* One lane of background work (gr_lane_run). */
struct gr_lane {
	struct work_struct work;
	struct gr_ctx *c;
	sector_t next;		/* the next row it takes */
	sector_t first_row;	/* where the work started: at first_col */
	sector_t first_col;
	bool ok;
};

/*
 * md's internal write-intent bitmap superblock (md-bitmap.h's
 * bitmap_super_t, little endian), at the front of the bitmap area that
 * each member carries bitmap_offset sectors from its own superblock.
 */
struct gr_bm_sb {
	__le32 magic;
	__le32 version;		/* 4: bits little endian; 3: host endian */
	u8 uuid[16];		/* the array's */
	__le64 events;		/* written before the md superblocks' */
	__le64 events_cleared;	/* events when bits were last cleared */
	__le64 sync_size;	/* per-member sectors the bits cover */
	__le32 state;
	__le32 chunksize;	/* bytes of each member per bit */
	__le32 daemon_sleep;	/* seconds between clearing passes */
	__le32 write_behind;
	__le32 sectors_reserved;
	__le32 nodes;		/* clustered md */
	u8 cluster_name[64];
	u8 pad[GR_BM_HDR - 136];
} __packed;

/* A member's md v1.x superblock (md_superblocks). */
struct gr_sb {
	struct page *page;	/* its block as last read or written */
	sector_t sector;	/* super_offset */
	unsigned int size;	/* bytes md writes: 256 + 2 * max_dev, rounded */
};

struct gr_ctx {
	struct dm_target *ti;
	const struct gr_layout *layout;
	unsigned int ndevs;
	unsigned int ndata;
	unsigned int nslots;	/* syndrome slots: ndevs, or ndevs + 2 (ddf) */
	u32 chunk;		/* sectors, a power of two */
	unsigned int chunk_shift;
	sector_t data_offset;
	bool data_offset_set;
	sector_t rows;		/* rows that the target covers */
	unsigned int seg_sectors;
	struct dm_dev *devs[GR_MAX_DEVS];	/* NULL: given as "-" */
	unsigned long missing;	/* given as "-" */
	unsigned long failed;	/* missing, stale or dead; atomic bitops */
	unsigned long rebuild_req;	/* "rebuild <idx>" in the table */
	unsigned long rebuilding;	/* being rebuilt: good below rec_cp */
	sector_t rec_cp;		/* per-member sectors rebuilt, whole rows */
	sector_t sync_rows;	/* rows that resync and check cover */
	u32 rate_min, rate_max;	/* KiB/s per member for background work */
	bool rate_min_set, rate_max_set;

	struct workqueue_struct *wq;
	struct bio_set bs;
	bool bs_ready;
	struct mutex locks[GR_LOCKS];
	spinlock_t buf_lock;
	struct list_head free_bufs;
	wait_queue_head_t buf_wait;
	struct gr_buf bufs[GR_NBUF];

	/*
	 * md state, under sb_lock: the members' superblocks (md_superblocks),
	 * events, clean (in_sync), resync_cp (md's recovery_cp: per-member
	 * sectors known in sync), the failures the superblocks record.
	 */
	bool md;
	struct gr_sb sb[GR_MAX_DEVS];
	int devnum[GR_MAX_DEVS];	/* role -> dev_number; -1: none */
	struct mutex sb_lock;
	u64 events;
	bool in_sync;
	sector_t resync_cp;
	sector_t written_cp;		/* resync_cp the superblocks hold */
	unsigned long recorded;
	bool sb_new;			/* a rebuilt member's superblock to write */
	atomic_t writes;		/* user writes in flight */
	struct workqueue_struct *mdwq;
	struct delayed_work safemode;
	struct work_struct event_work;

	/*
	 * md's write-intent bitmap, when the array has one: bm_img is the
	 * bitmap (header and bits) as the members hold it or are about to;
	 * bm_dirty its pages not written yet, bm_busy those being written
	 * (under bm_lock, from bm_io copies). bm_cnt: user writes in flight
	 * per bit; bm_age: clearing passes a bit has sat idle. Bits and
	 * counts under bm_spin.
	 */
	bool bm;
	s32 bm_offset;		/* sectors from each member's superblock */
	unsigned int bm_shift;	/* per-member sectors of a bit: 1 << bm_shift */
	unsigned long bm_bits;
	unsigned int bm_bytes;	/* header and bits */
	unsigned int bm_npages;
	struct page **bm_img;
	struct page **bm_io;
	unsigned long *bm_dirty;
	unsigned long *bm_busy;
	unsigned long *bm_todo;	/* bm_lock */
	u16 *bm_cnt;		/* at most c->wq's max_active */
	u8 *bm_age;
	struct page *bm_scratch;	/* a bitmap header read at load */
	spinlock_t bm_spin;
	struct mutex bm_lock;
	unsigned int bm_sleep;	/* seconds: daemon_sleep */
	struct delayed_work bm_work;
	atomic64_t bm_rows_synced;	/* by the last resync, and passed over */
	atomic64_t bm_rows_clean;

	/* background work, started and stopped under sync_lock */
	struct mutex sync_lock;
	struct work_struct sync_work;
	struct work_struct kick_work;	/* gr_sync_kick from the sync work */
	int action;			/* enum gr_action */
	bool sync_stop;
	atomic64_t sync_done;		/* per-member sectors the lanes did */
	unsigned long win_t;		/* speed limit: this window's start */
	u64 win_done;			/* and sync_done then */
	u32 sync_limit;			/* KiB/s per member now */
	struct workqueue_struct *syncwq;	/* the lanes */
	struct gr_lane lanes[GR_LANES];
	atomic_t lanes_left;
	struct completion lanes_done;
	sector_t sync_pos0;
	bool frozen;
	bool suspended;
	bool activated;			/* resumed once */
	sector_t sync_pos;
	atomic64_t mismatches;		/* sectors, as md's mismatch_cnt */
	atomic_t read_errors[GR_MAX_DEVS];	/* corrected, per member */
	atomic64_t user_ios;

	atomic64_t stripes_written;
	atomic64_t degraded_reads;
	atomic64_t by_gpu;
	atomic64_t by_helper_cpu;
	atomic64_t by_kernel;
};

/* Per bio. */
struct gr_io {
	struct gr_ctx *c;
	struct bio *bio;
	struct work_struct work;
	struct bvec_iter iter;		/* as mapped, for a redo */
	struct block_device *bdev;	/* as mapped, for a redo */
	sector_t sector;		/* target-relative */
	unsigned int member;		/* remapped to this member */
	bool remapped;			/* a read remapped to member */
	bool flush;			/* an empty flush remapped to member */
	bool fix;			/* its remapped read failed: correct it */
};

struct gr_wait {
	struct completion done;
	int status;
};

static u8 *gr_zero;	/* GR_SEG zero bytes: the ddf layouts' P/Q slots */

/* ---- geometry ----------------------------------------------------------- */

/* md's raid5_compute_sector and raid6_idx_to_slot for one row. */
static void gr_map_row(const struct gr_ctx *c, sector_t row, struct gr_row *r)
{
	unsigned int n = c->ndevs, k = c->ndata, pd, qd, j, i, cnt, d0;
	sector_t t = row;
	unsigned int rem = sector_div(t, n);
	bool sym = false;

	switch (c->layout->algorithm) {
	case GR_LEFT_ASYMMETRIC:
		pd = n - 1 - rem;
		break;
	case GR_LEFT_SYMMETRIC:
		pd = n - 1 - rem;
		sym = true;
		break;
	case GR_RIGHT_SYMMETRIC:
		pd = rem;
		sym = true;
		break;
	case GR_ROTATING_N_RESTART:
		t = row + 1;
		pd = n - 1 - sector_div(t, n);
		break;
	default:	/* right-asymmetric, rotating zero restart */
		pd = rem;
		break;
	}
	if (sym) {
		qd = (pd + 1) % n;
		for (j = 0; j < k; j++)
			r->data[j] = (pd + 2 + j) % n;
	} else if (pd == n - 1) {
		qd = 0;				/* Q D D D P */
		for (j = 0; j < k; j++)
			r->data[j] = j + 1;
	} else {
		qd = pd + 1;			/* D D P Q D */
		for (j = 0; j < k; j++)
			r->data[j] = j >= pd ? j + 2 : j;
	}

	if (c->layout->ddf) {
		for (i = 0; i < n; i++) {
			r->slot[i] = i;
			r->phys[i] = i;
		}
		r->phys[pd] = GR_NONE;
		r->phys[qd] = GR_NONE;
		r->slot[pd] = n;
		r->slot[qd] = n + 1;
		r->phys[n] = pd;
		r->phys[n + 1] = qd;
		return;
	}
	/* md: the syndrome starts with the disk after Q */
	d0 = qd == n - 1 ? 0 : qd + 1;
	i = d0;
	cnt = 0;
	do {
		unsigned int s;

		if (i == pd)
			s = k;
		else if (i == qd)
			s = k + 1;
		else
			s = cnt++;
		r->slot[i] = s;
		r->phys[s] = i;
		i = (i + 1) % n;
	} while (i != d0);
}

static bool gr_dead(struct gr_ctx *c, unsigned int m)
{
	return test_bit(m, &c->failed);
}

static void gr_fail(struct gr_ctx *c, unsigned int m)
{
	if (test_and_set_bit(m, &c->failed))
		return;
	schedule_work(&c->event_work);	/* dm_table_event: process context */
	if (hweight_long(READ_ONCE(c->failed)) > 2)
		DMERR("member %u (%s) failed: more than two members lost, I/O that needs them fails",
		      m, c->devs[m]->name);
	else
		DMERR("member %u (%s) failed: running degraded", m,
		      c->devs[m]->name);
}

static unsigned int gr_nfailed(struct gr_ctx *c)
{
	return hweight_long(READ_ONCE(c->failed));
}

/*
 * The members that row cannot use: the failed ones, and those being
 * rebuilt unless the rebuild has passed the row (it goes a whole row at a
 * time, under the row's lock).
 */
static unsigned long gr_failed_row(struct gr_ctx *c, sector_t row)
{
	unsigned long failed = READ_ONCE(c->failed);

	if (((row + 1) << c->chunk_shift) > READ_ONCE(c->rec_cp))
		failed |= READ_ONCE(c->rebuilding);
	return failed;
}

/* ---- buffers and member I/O ---------------------------------------------- */

static struct gr_buf *gr_buf_get(struct gr_ctx *c)
{
	struct gr_buf *b = NULL;

	wait_event(c->buf_wait, ({
		spin_lock(&c->buf_lock);
		b = list_first_entry_or_null(&c->free_bufs, struct gr_buf, node);
		if (b)
			list_del(&b->node);
		spin_unlock(&c->buf_lock);
		b != NULL;
	}));
	return b;
}

static void gr_buf_put(struct gr_ctx *c, struct gr_buf *b)
{
	spin_lock(&c->buf_lock);
	list_add(&b->node, &c->free_bufs);
	spin_unlock(&c->buf_lock);
	wake_up(&c->buf_wait);
}

static void gr_batch_start(struct gr_batch *b)
{
	atomic_set(&b->pending, 1);
	init_completion(&b->done);
	b->errors = 0;
}

static void gr_mio_end(struct bio *bio)
{
	struct gr_mio *mio = bio->bi_private;
	struct gr_batch *b = mio->b;

	if (bio->bi_status)
		set_bit(mio->member, &b->errors);
	bio_put(bio);
	if (atomic_dec_and_test(&b->pending))
		complete(&b->done);
}

/* len bytes of buf at sector (of the member, not of its data) on m. */
static void gr_mio_at(struct gr_ctx *c, struct gr_batch *b, unsigned int m,
		      blk_opf_t opf, sector_t sector, void *buf,
		      unsigned int len)
{
	struct bio *bio;

	bio = bio_alloc_bioset(c->devs[m]->bdev, 1, opf, GFP_NOIO, &c->bs);
	bio->bi_iter.bi_sector = sector;
	__bio_add_page(bio, virt_to_page(buf), len, offset_in_page(buf));
	b->mio[m].b = b;
	b->mio[m].member = m;
	bio->bi_private = &b->mio[m];
	bio->bi_end_io = gr_mio_end;
	atomic_inc(&b->pending);
	submit_bio_noacct(bio);
}

/* len bytes at column sector col of row on member m, from or into buf. */
static void gr_mio(struct gr_ctx *c, struct gr_batch *b, unsigned int m,
		   blk_opf_t opf, sector_t row, sector_t col, u8 *buf,
		   unsigned int len)
{
	gr_mio_at(c, b, m, opf,
		  c->data_offset + (row << c->chunk_shift) + col, buf, len);
}

/* Wait for the batch; the members whose I/O failed. */
static unsigned long gr_batch_end(struct gr_batch *b)
{
	if (!atomic_dec_and_test(&b->pending))
		wait_for_completion_io(&b->done);
	return b->errors;
}

/* Wait for the batch; mark the members that failed. True if none did. */
static bool gr_batch_wait(struct gr_ctx *c, struct gr_batch *b)
{
	unsigned long errors = gr_batch_end(b);
	unsigned int m;

	for_each_set_bit(m, &errors, c->ndevs)
		gr_fail(c, m);
	return !errors;
}

enum gr_copy { GR_TO_BIO, GR_FROM_BIO, GR_XOR_FROM_BIO };

static void gr_xor(u8 *dst, const u8 *src, unsigned int len)
{
	unsigned int i = 0;

	if (IS_ALIGNED((unsigned long)dst | (unsigned long)src, 8))
		for (; i + 8 <= len; i += 8)
			*(u64 *)(dst + i) ^= *(const u64 *)(src + i);
	for (; i < len; i++)
		dst[i] ^= src[i];
}

/*
 * Between the bio (skip bytes into io->iter) and buf, len bytes: copy to
 * the bio, copy from it, or XOR the bio's bytes into buf.
 */
static void gr_copy_bio(struct gr_io *io, unsigned int skip, u8 *buf,
			unsigned int len, enum gr_copy how)
{
	struct bvec_iter iter = io->iter;
	struct bio *bio = io->bio;

	bio_advance_iter(bio, &iter, skip);
	while (len) {
		struct bio_vec bv = bio_iter_iovec(bio, iter);
		unsigned int n = min(len, bv.bv_len);
		u8 *p;

		if (how == GR_TO_BIO) {
			memcpy_to_page(bv.bv_page, bv.bv_offset, buf, n);
		} else if (how == GR_FROM_BIO) {
			memcpy_from_page(buf, bv.bv_page, bv.bv_offset, n);
		} else {
			p = kmap_local_page(bv.bv_page);
			gr_xor(buf, p + bv.bv_offset, n);
			kunmap_local(p);
		}
		bio_advance_iter_single(bio, &iter, n);
		buf += n;
		len -= n;
	}
}

/* ---- P/Q and recovery ----------------------------------------------------- */

static void gr_req_done(struct kgpu_request *req, int status)
{
	struct gr_wait *w = req->private;

	w->status = status;
	complete(&w->done);
}

/*
 * Request block i of a service's buffer (uapi/kgpu.h): the slot it comes
 * from. PQD sends slots a..b, then P and Q; GEN and REC all slots.
 */
static unsigned int gr_req_slot(unsigned int svc, unsigned int nslots,
				unsigned int nblk, unsigned int a,
				unsigned int i)
{
	if (svc != KGPU_SVC_RAID6_PQD)
		return i;
	return i < nblk - 2 ? a + i : nslots - nblk + i;
}

/*
 * GEN, REC or PQD of the blocks at ptrs (a, b: kgpu_raid6_cpu's), through
 * the helper when it is usable and the request is above the crossover;
 * else, or when the helper does not answer, raid6_pq on this CPU from
 * ptrs, which the helper never sees.
 */
static void gr_compute(struct gr_ctx *c, unsigned int svc, void **ptrs,
		       unsigned int len, unsigned int a, unsigned int b)
{
	unsigned int n = c->nslots, nblk = n, i, s;
	struct kgpu_request *req;
	struct gr_wait w;
	size_t total;

	if (svc == KGPU_SVC_RAID6_PQD)
		nblk = b - a + 3;
	total = (size_t)nblk * len;
	req = ERR_PTR(-ENODEV);
	if (n <= GR_MAX_DEVS && kgpu_offload(svc, total))
		req = kgpu_request_get(total, 0);
	if (IS_ERR(req)) {
		kgpu_account_cpu(svc);	/* never offered to the helper */
		goto cpu;
	}
	for (i = 0; i < nblk; i++) {
		s = gr_req_slot(svc, n, nblk, a, i);
		/* GEN needs no old P/Q, REC no lost block */
		if ((svc == KGPU_SVC_RAID6_GEN && s >= n - 2) ||
		    (svc == KGPU_SVC_RAID6_REC && (s == a || s == b)))
			continue;
		memcpy(req->data + (size_t)i * len, ptrs[s], len);
	}
	memset(&req->params, 0, sizeof(req->params));
	req->params.service = svc;
	req->params.in_len = total;
	req->params.out_len = total;
	req->params.unit_size = len;
	req->params.ndisks = n;
	req->params.fail_a = svc == KGPU_SVC_RAID6_GEN ? KGPU_RAID6_NONE : a;
	req->params.fail_b = svc == KGPU_SVC_RAID6_GEN ? KGPU_RAID6_NONE : b;
	req->done = gr_req_done;
	req->private = &w;
	init_completion(&w.done);
	kgpu_submit(req);
	wait_for_completion(&w.done);
	if (w.status == 0) {
		/* what the service wrote: P and Q, or the lost blocks */
		for (i = 0; i < nblk; i++) {
			s = gr_req_slot(svc, n, nblk, a, i);
			if (svc == KGPU_SVC_RAID6_REC ? s == a || s == b :
			    s >= n - 2)
				memcpy(ptrs[s], req->data + (size_t)i * len,
				       len);
		}
		if (req->cqe_flags & KGPU_CQE_CPU)
			atomic64_inc(&c->by_helper_cpu);
		else
			atomic64_inc(&c->by_gpu);
		kgpu_request_put(req);
		return;
	}
	kgpu_request_put(req);
cpu:
	atomic64_inc(&c->by_kernel);
	kgpu_raid6_cpu(svc, n, ptrs, len, a, b);
}

/* ---- the stripe engine ---------------------------------------------------- */

/* Blocks of a segment: buffer blocks, or zeros for ddf's P/Q slots. */
static void gr_ptrs(struct gr_ctx *c, struct gr_buf *buf,
		    const struct gr_row *r, void **ptrs)
{
	unsigned int s;

	for (s = 0; s < c->nslots; s++)
		ptrs[s] = r->phys[s] == GR_NONE ? gr_zero : buf->blk[s];
}

/* The dead slots of a row in the snapshot failed, at most two; false if more. */
static bool gr_lost(struct gr_ctx *c, unsigned long failed,
		    const struct gr_row *r, unsigned int *a, unsigned int *b)
{
	unsigned int m, n = 0;

	*a = *b = GR_NONE;
	for_each_set_bit(m, &failed, c->ndevs) {
		if (n == 0)
			*a = r->slot[m];
		else if (n == 1)
			*b = r->slot[m];
		n++;
	}
	return n <= 2;
}

/*
 * Write the part of io's bio that falls into columns [col, col + nsec) of
 * row. Returns 0 or -EIO.
 *
 * Each attempt works from one snapshot of the failed members; a member
 * that fails during it (an error in this attempt's reads, or another
 * bio's) starts a new attempt. The new data is copied out of the bio once:
 * into the stripe buffer for reconstruct-write, into buf->nd for
 * read-modify-write, where the P/Q delta and the data written must be the
 * same bytes even if the writer changes its pages meanwhile.
 */
static int gr_write_seg(struct gr_ctx *c, struct gr_io *io, struct gr_buf *buf,
			const struct gr_row *r, sector_t row, sector_t col,
			unsigned int nsec)
{
	unsigned int k = c->ndata, P = c->nslots - 2, Q = c->nslots - 1;
	sector_t wlo[GR_MAX_DEVS], whi[GR_MAX_DEVS], ulo = ~0ULL, uhi = 0;
	sector_t row0 = row * k << c->chunk_shift;
	sector_t bs = io->sector, be = bs + (io->iter.bi_size >> 9);
	blk_opf_t wopf = REQ_OP_WRITE | (io->bio->bi_opf & (REQ_FUA | REQ_SYNC));
	struct gr_batch *b = &buf->batch;
	void *ptrs[GR_MAX_SLOTS];
	unsigned int j, s, m, len, nw = 0, lo = GR_NONE, hi = 0, fa, fb;
	unsigned long failed, dead;
	bool rmw, rec;

	for (j = 0; j < k; j++) {
		sector_t cs = row0 + ((sector_t)j << c->chunk_shift) + col;
		sector_t x = max(cs, bs), y = min(cs + nsec, be);

		wlo[j] = whi[j] = 0;
		if (x >= y)
			continue;
		wlo[j] = x - cs + col;
		whi[j] = y - cs + col;
		ulo = min(ulo, wlo[j]);
		uhi = max(uhi, whi[j]);
		nw++;
	}
	if (!nw)
		return 0;
	len = (uhi - ulo) << 9;

redo:
	dead = READ_ONCE(c->failed);
	failed = gr_failed_row(c, row) | dead;
	if (!gr_lost(c, failed, r, &fa, &fb))
		return -EIO;
	gr_ptrs(c, buf, r, ptrs);
	rec = false;
	rmw = false;
	if (!failed) {
		unsigned int rcw_reads = 0;

		for (j = 0; j < k; j++)
			if (wlo[j] != ulo || whi[j] != uhi)
				rcw_reads++;
		/*
		 * Read-modify-write reads the old data it overwrites, P and
		 * Q; reconstruct-write the data it does not overwrite. A tie
		 * goes to read-modify-write, which reads fewer bytes (only
		 * the columns it writes). Rows not resynced yet have no P/Q
		 * to update: reconstruct-write makes them right.
		 */
		rmw = nw + 2 <= rcw_reads &&
		      ((row + 1) << c->chunk_shift) <= READ_ONCE(c->resync_cp);
	} else {
		for (j = 0; j < k; j++)
			if (test_bit(r->data[j], &failed) &&
			    (wlo[j] != ulo || whi[j] != uhi))
				rec = true;
	}

	/* read */
	gr_batch_start(b);
	for (j = 0; j < k; j++) {
		bool full = wlo[j] == ulo && whi[j] == uhi;
		bool written = whi[j] > wlo[j];

		m = r->data[j];
		if (test_bit(m, &failed))
			continue;
		if (rmw && written)
			gr_mio(c, b, m, REQ_OP_READ, row, wlo[j],
			       buf->blk[r->slot[m]] + ((wlo[j] - ulo) << 9),
			       (whi[j] - wlo[j]) << 9);
		else if (!rmw && (rec || !full))
			gr_mio(c, b, m, REQ_OP_READ, row, ulo,
			       buf->blk[r->slot[m]], len);
	}
	if (rmw || rec) {
		for (s = P; s <= Q; s++)
			if (!test_bit(r->phys[s], &failed))
				gr_mio(c, b, r->phys[s], REQ_OP_READ, row, ulo,
				       buf->blk[s], len);
	}
	if (!gr_batch_wait(c, b) || gr_failed_row(c, row) != failed)
		goto redo;

	/* compute */
	if (rmw) {
		/*
		 * The new data goes to buf->nd[j] (at the same offsets), the
		 * written blocks become old ^ new (zero outside the columns
		 * written), then one P/Q delta update (RAID6_PQD).
		 */
		for (j = 0; j < k; j++) {
			unsigned int o = (wlo[j] - ulo) << 9;
			unsigned int n = (whi[j] - wlo[j]) << 9;
			u8 *blk;

			s = r->slot[r->data[j]];
			if (whi[j] <= wlo[j]) {
				ptrs[s] = gr_zero;
				continue;
			}
			blk = buf->blk[s];
			gr_copy_bio(io, (row0 + ((sector_t)j << c->chunk_shift) +
					 wlo[j] - bs) << 9,
				    buf->nd[j] + o, n, GR_FROM_BIO);
			memset(blk, 0, o);
			memset(blk + o + n, 0, len - o - n);
			gr_xor(blk + o, buf->nd[j] + o, n);
			lo = min(lo, s);
			hi = max(hi, s);
		}
		gr_compute(c, KGPU_SVC_RAID6_PQD, ptrs, len, lo, hi);
	} else {
		if (rec)
			gr_compute(c, KGPU_SVC_RAID6_REC, ptrs, len, fa, fb);
		for (j = 0; j < k; j++) {
			if (whi[j] <= wlo[j])
				continue;
			gr_copy_bio(io, (row0 + ((sector_t)j << c->chunk_shift) +
					 wlo[j] - bs) << 9,
				    buf->blk[r->slot[r->data[j]]] +
				    ((wlo[j] - ulo) << 9),
				    (whi[j] - wlo[j]) << 9, GR_FROM_BIO);
		}
		gr_compute(c, KGPU_SVC_RAID6_GEN, ptrs, len, GR_NONE, GR_NONE);
	}

	/*
	 * Write the new data, P and Q: to every member that is not dead,
	 * members being rebuilt included (a row rebuilt ahead of rec_cp by
	 * another lane stays right; one not rebuilt yet is redone anyway).
	 */
	gr_batch_start(b);
	for (j = 0; j < k; j++) {
		m = r->data[j];
		if (whi[j] <= wlo[j] || test_bit(m, &dead))
			continue;
		gr_mio(c, b, m, wopf, row, wlo[j],
		       (rmw ? buf->nd[j] : buf->blk[r->slot[m]]) +
		       ((wlo[j] - ulo) << 9),
		       (whi[j] - wlo[j]) << 9);
	}
	for (s = P; s <= Q; s++)
		if (!test_bit(r->phys[s], &dead))
			gr_mio(c, b, r->phys[s], wopf, row, ulo, buf->blk[s],
			       len);
	gr_batch_wait(c, b);
	/* a member lost now is rebuilt from the others, which hold the new data */
	return gr_nfailed(c) > 2 ? -EIO : 0;
}

/*
 * Start a batch reading columns [col, col + len bytes) of row from every
 * member not in failed, each into its slot of the stripe buffer.
 */
static void gr_read_row(struct gr_ctx *c, struct gr_buf *buf,
			const struct gr_row *r, sector_t row, sector_t col,
			unsigned int len, unsigned long failed)
{
	unsigned int m;

	gr_batch_start(&buf->batch);
	for (m = 0; m < c->ndevs; m++)
		if (!test_bit(m, &failed))
			gr_mio(c, &buf->batch, m, REQ_OP_READ, row, col,
			       buf->blk[r->slot[m]], len);
}

/*
 * md's read-error correction. Member m failed to read columns [col, col +
 * nsec) of row: rebuild them from the others, write them back and read
 * them again. The member fails only if that rewrite or re-read fails, or
 * after GR_READ_ERRORS corrections. Row lock held; the buffer is free.
 */
static void gr_fix_block(struct gr_ctx *c, struct gr_buf *buf,
			 const struct gr_row *r, sector_t row, sector_t col,
			 unsigned int nsec, unsigned int m)
{
	unsigned int len = nsec << 9, s = r->slot[m], fa, fb;
	struct gr_batch *b = &buf->batch;
	void *ptrs[GR_MAX_SLOTS];
	unsigned long failed;
	bool ok;

redo:
	if (test_bit(m, &c->failed))
		return;
	failed = gr_failed_row(c, row) | BIT(m);
	if (!gr_lost(c, failed, r, &fa, &fb)) {
		gr_fail(c, m);		/* nothing to rebuild it from */
		return;
	}
	gr_read_row(c, buf, r, row, col, len, failed);
	if (!gr_batch_wait(c, b))
		goto redo;
	gr_ptrs(c, buf, r, ptrs);
	gr_compute(c, KGPU_SVC_RAID6_REC, ptrs, len, fa, fb);
	gr_batch_start(b);
	gr_mio(c, b, m, REQ_OP_WRITE | REQ_FUA, row, col, buf->blk[s], len);
	ok = !gr_batch_end(b);
	if (ok) {
		gr_batch_start(b);
		gr_mio(c, b, m, REQ_OP_READ, row, col, buf->nd[0], len);
		ok = !gr_batch_end(b) && !memcmp(buf->nd[0], buf->blk[s], len);
	}
	if (!ok) {
		DMERR_LIMIT("member %u (%s): read error at sector %llu not corrected: the rewrite failed",
			    m, c->devs[m]->name, (unsigned long long)
			    (c->data_offset + (row << c->chunk_shift) + col));
		gr_fail(c, m);
		return;
	}
	if (c->md) {
		struct mdp_superblock_1 *sb = page_address(c->sb[m].page);

		mutex_lock(&c->sb_lock);	/* md's count, written with the next update */
		le32_add_cpu(&sb->cnt_corrected_read, 1);
		mutex_unlock(&c->sb_lock);
	}
	if (atomic_inc_return(&c->read_errors[m]) > GR_READ_ERRORS) {
		DMERR("member %u (%s): more than %d read errors corrected: failing it",
		      m, c->devs[m]->name, GR_READ_ERRORS);
		gr_fail(c, m);
		return;
	}
	DMWARN_LIMIT("member %u (%s): read error at sector %llu (%u sectors) corrected from parity",
		     m, c->devs[m]->name, (unsigned long long)
		     (c->data_offset + (row << c->chunk_shift) + col), nsec);
}

/*
 * Read columns [col, col + nsec) of data block j of row, rebuilding it if
 * its member is dead: from P alone, with XOR on this CPU, when it is the
 * only data block lost and P is alive (the other data blocks and P are
 * read, not Q); else from all survivors through RAID6_REC.
 */
static int gr_read_seg(struct gr_ctx *c, struct gr_io *io, struct gr_buf *buf,
		       const struct gr_row *r, sector_t row, unsigned int j,
		       sector_t col, unsigned int nsec, unsigned int skip)
{
	unsigned int m = r->data[j], s = r->slot[m], len = nsec << 9, fa, fb, i;
	unsigned int P = c->nslots - 2, Q = c->nslots - 1;
	struct gr_batch *b = &buf->batch;
	void *ptrs[GR_MAX_SLOTS];
	unsigned long failed;
	bool dead, xor;

redo:
	failed = gr_failed_row(c, row);
	dead = test_bit(m, &failed);
	if (dead && !gr_lost(c, failed, r, &fa, &fb))
		return -EIO;
	/* lost: this block, perhaps Q; P alive */
	xor = dead && (fb == GR_NONE || fb == Q || fa == Q);
	gr_batch_start(b);
	for (i = 0; i < c->ndevs; i++) {
		if (test_bit(i, &failed) || (i != m && !dead) ||
		    (xor && r->slot[i] == Q))
			continue;
		gr_mio(c, b, i, REQ_OP_READ, row, col, buf->blk[r->slot[i]],
		       len);
	}
	if (!gr_batch_wait(c, b) || gr_failed_row(c, row) != failed)
		goto redo;
	if (xor) {
		memcpy(buf->blk[s], buf->blk[P], len);
		for (i = 0; i < c->ndevs; i++)
			if (i != m && r->slot[i] < P)
				gr_xor(buf->blk[s], buf->blk[r->slot[i]], len);
		atomic64_inc(&c->by_kernel);
	} else if (dead) {
		gr_ptrs(c, buf, r, ptrs);
		gr_compute(c, KGPU_SVC_RAID6_REC, ptrs, len, fa, fb);
	}
	gr_copy_bio(io, skip, buf->blk[s], len, GR_TO_BIO);
	return 0;
}

/* ---- md state: superblocks, failures, clean and dirty --------------------- */

/*
 * md v1.x superblocks (md_superblocks). At load every member's superblock
 * is read and checked against the table and against the freshest one (most
 * events); a member that lags it by more than one event, that it records
 * as faulty or spare, or that is part way through a recovery is stale: out
 * of the array ('D') and never read. While the table runs, the target
 * owns the superblocks as md does: the freshest's array state is written
 * to every live member, events bumped, when a member fails (before a
 * write that depended on it is acknowledged), when the array goes dirty
 * (before the first write after a clean state) and clean (GR_SAFEMODE_MS
 * after the last write, and at suspend), and at resync checkpoints.
 * Per-member fields (dev_number, offsets, device UUID) stay each member's.
 */

static __le32 gr_sb_csum(struct mdp_superblock_1 *sb)
{
	unsigned int size = 256 + 2 * le32_to_cpu(sb->max_dev);
	const __le32 *w = (const __le32 *)sb;
	__le32 saved = sb->sb_csum;
	u64 sum = 0;

	sb->sb_csum = 0;
	for (; size >= 4; size -= 4)
		sum += le32_to_cpu(*w++);
	if (size == 2)
		sum += le16_to_cpu(*(const __le16 *)w);
	sb->sb_csum = saved;
	return cpu_to_le32((u32)sum + (u32)(sum >> 32));
}

static u16 gr_sb_role(struct mdp_superblock_1 *sb, u32 dn)
{
	if (dn >= le32_to_cpu(sb->max_dev))
		return MD_DISK_ROLE_SPARE;
	return le16_to_cpu(sb->dev_roles[dn]);
}

/* len bytes (whole logical blocks) of member m from sector into buf. */
static int gr_read_at(struct gr_ctx *c, unsigned int m, sector_t sector,
		      void *buf, unsigned int len)
{
	struct gr_batch b;

	gr_batch_start(&b);
	gr_mio_at(c, &b, m, REQ_OP_READ, sector, buf, len);
	return gr_batch_end(&b) ? -EIO : 0;
}

/* A superblock's worth of member m at sector into its superblock page. */
static int gr_read_block(struct gr_ctx *c, unsigned int m, sector_t sector)
{
	return gr_read_at(c, m, sector, page_address(c->sb[m].page),
			  MD_SB_BYTES);
}

enum { GR_SB_OK, GR_SB_NONE, GR_SB_BAD, GR_SB_IOERR, GR_SB_090 };

/* Find member m's v1.x superblock: 1.2 (4 KiB in), 1.1 (start), 1.0 (end). */
static int gr_sb_find(struct gr_ctx *c, unsigned int m)
{
	sector_t size = bdev_nr_sectors(c->devs[m]->bdev);
	struct mdp_superblock_1 *sb = page_address(c->sb[m].page);
	sector_t at[3] = { 8, 0, (size - 16) & ~(sector_t)7 };
	unsigned int i, max_dev;

	for (i = 0; i < 3 && size >= 16; i++) {
		if (gr_read_block(c, m, at[i]))
			return GR_SB_IOERR;
		if (le32_to_cpu(sb->magic) != MD_SB_MAGIC ||
		    le32_to_cpu(sb->major_version) != 1 ||
		    le64_to_cpu(sb->super_offset) != at[i])
			continue;
		c->sb[m].sector = at[i];
		max_dev = le32_to_cpu(sb->max_dev);
		if (max_dev > GR_SB_ROLES || sb->sb_csum != gr_sb_csum(sb))
			return GR_SB_BAD;
		c->sb[m].size = round_up(256 + 2 * max_dev,
				bdev_logical_block_size(c->devs[m]->bdev));
		return GR_SB_OK;
	}
	/* 0.90: 64 KiB aligned, 64 KiB before the end; the magic comes first */
	if (size >= 2 * MD_RESERVED_SECTORS &&
	    !gr_read_block(c, m, MD_NEW_SIZE_SECTORS(size)) &&
	    le32_to_cpu(sb->magic) == MD_SB_MAGIC)
		return GR_SB_090;
	return GR_SB_NONE;
}

/*
 * A new superblock for member m, to be rebuilt: the array's (f), with the
 * role's device slot (the replaced device's, or the first free one), a new
 * device UUID, this device's offsets, and a recovery offset of 0. The
 * slot is m's in f's roles from now on.
 */
static int gr_sb_new(struct gr_ctx *c, unsigned int m,
		     struct mdp_superblock_1 *f, char **error)
{
	struct mdp_superblock_1 *sb = page_address(c->sb[m].page);
	sector_t size = bdev_nr_sectors(c->devs[m]->bdev), at, avail;
	u32 max_dev = le32_to_cpu(f->max_dev), dn;
	unsigned int i;

	dn = c->devnum[m] >= 0 ? c->devnum[m] : max_dev;
	for (i = 0; dn == max_dev && i < max_dev; i++) {
		u16 role = le16_to_cpu(f->dev_roles[i]);

		if (role == MD_DISK_ROLE_SPARE || role == MD_DISK_ROLE_FAULTY)
			dn = i;
	}
	if (dn >= max_dev) {
		*error = "No free device slot in the md superblocks";
		return -EINVAL;
	}
	/* 1.1 and 1.2 keep the superblock before the data, 1.0 at the end */
	at = le64_to_cpu(f->super_offset);
	if (at > c->data_offset) {
		s32 off = (s32)le32_to_cpu(f->bitmap_offset);

		at = (size - 16) & ~(sector_t)7;
		avail = at - c->data_offset;
		/* 1.0 keeps a bitmap before the superblock, after the data */
		if ((le32_to_cpu(f->feature_map) & MD_FEATURE_BITMAP_OFFSET) &&
		    off < 0)
			avail = at > c->data_offset - off ?
				at + off - c->data_offset : 0;
	} else {
		avail = size - c->data_offset;
	}
	if (size < 16 || avail < le64_to_cpu(f->size)) {
		*error = "Member to rebuild is too small for the md array";
		return -EINVAL;
	}
	memcpy(sb, f, MD_SB_BYTES);
	sb->dev_number = cpu_to_le32(dn);
	get_random_bytes(sb->device_uuid, sizeof(sb->device_uuid));
	sb->feature_map = cpu_to_le32((le32_to_cpu(f->feature_map) &
				       ~MD_FEATURE_BAD_BLOCKS) |
				      MD_FEATURE_RECOVERY_OFFSET);
	sb->recovery_offset = 0;
	sb->super_offset = cpu_to_le64(at);
	sb->data_size = cpu_to_le64(avail);
	sb->cnt_corrected_read = 0;
	sb->devflags = 0;
	f->dev_roles[dn] = cpu_to_le16(m);
	sb->dev_roles[dn] = cpu_to_le16(m);
	c->devnum[m] = dn;
	c->sb[m].sector = at;
	c->sb[m].size = round_up(256 + 2 * max_dev,
				 bdev_logical_block_size(c->devs[m]->bdev));
	return 0;
}

/* ---- md's write-intent bitmap ----------------------------------------------
 *
 * Kept as md keeps its internal bitmap (md-bitmap.c): one bit per
 * bitmap chunk of each member's data, the same bits on every member.
 * Before a user write touches a region, its bit is set and written to
 * every live member (flush, FUA), and the write waits for that. A bit is
 * cleared lazily: after two clearing passes (daemon_sleep seconds apart)
 * in which its region saw no write, if the region is in sync and no
 * member is out (md keeps the bits of writes that missed a member). At
 * suspend every clearable bit goes at once. The bitmap's events are
 * written before the superblocks' at each superblock update, so md and
 * this target take it as current; one older than the superblocks, or
 * marked stale, counts as all dirty. After a crash, the resync passes
 * over the rows whose bits are all clear.
 */

static unsigned long gr_bm_pageno(unsigned long b)
{
	return (b + GR_BM_HDR * 8) / GR_BM_BITS;
}

/* Bit b's page in pages, and its number there. */
static void *gr_bm_at(struct page **pages, unsigned long b, unsigned int *nr)
{
	unsigned long pos = b + GR_BM_HDR * 8;

	*nr = pos % GR_BM_BITS;
	return page_address(pages[pos / GR_BM_BITS]);
}

static bool gr_bm_test(struct gr_ctx *c, unsigned long b)
{
	unsigned int nr;
	void *pg = gr_bm_at(c->bm_img, b, &nr);

	return test_bit_le(nr, pg);
}

static struct gr_bm_sb *gr_bm_hdr(struct gr_ctx *c)
{
	return page_address(c->bm_img[0]);
}

/* The bits of per-member sectors [s, e): first and last. */
static void gr_bm_range(struct gr_ctx *c, sector_t s, sector_t e,
			unsigned long *first, unsigned long *last)
{
	*first = s >> c->bm_shift;
	*last = min_t(unsigned long, (e - 1) >> c->bm_shift, c->bm_bits - 1);
}

/* Where page p of the bitmap lies on member m, and its length there. */
static sector_t gr_bm_page_sector(struct gr_ctx *c, unsigned int m,
				  unsigned int p)
{
	return c->sb[m].sector + c->bm_offset + p * (PAGE_SIZE >> 9);
}

static unsigned int gr_bm_page_len(struct gr_ctx *c, unsigned int m,
				   unsigned int p)
{
	unsigned int len = min_t(unsigned int, PAGE_SIZE,
				 c->bm_bytes - p * PAGE_SIZE);

	return round_up(len, bdev_logical_block_size(c->devs[m]->bdev));
}

/*
 * Write the pages marked dirty to every live member, and wait: the
 * images as they are now (bm_io copies, so bits can change meanwhile).
 * Anyone who set a bit before this took bm_lock finds it written when
 * this returns. A member that cannot take it fails.
 */
static void gr_bm_flush(struct gr_ctx *c)
{
	unsigned long failed, errors;
	unsigned int p, m;
	struct gr_batch b;

	mutex_lock(&c->bm_lock);
	spin_lock(&c->bm_spin);
	bitmap_copy(c->bm_todo, c->bm_dirty, c->bm_npages);
	bitmap_zero(c->bm_dirty, c->bm_npages);
	for_each_set_bit(p, c->bm_todo, c->bm_npages) {
		copy_page(page_address(c->bm_io[p]),
			  page_address(c->bm_img[p]));
		__set_bit(p, c->bm_busy);
	}
	spin_unlock(&c->bm_spin);
	for_each_set_bit(p, c->bm_todo, c->bm_npages) {
		failed = READ_ONCE(c->failed);
		gr_batch_start(&b);
		for (m = 0; m < c->ndevs; m++) {
			if (test_bit(m, &failed))
				continue;
			gr_mio_at(c, &b, m, REQ_OP_WRITE | REQ_SYNC |
				  REQ_PREFLUSH | REQ_FUA,
				  gr_bm_page_sector(c, m, p),
				  page_address(c->bm_io[p]),
				  gr_bm_page_len(c, m, p));
		}
		errors = gr_batch_end(&b);
		for_each_set_bit(m, &errors, c->ndevs)
			gr_fail(c, m);
	}
	spin_lock(&c->bm_spin);
	bitmap_andnot(c->bm_busy, c->bm_busy, c->bm_todo, c->bm_npages);
	spin_unlock(&c->bm_spin);
	mutex_unlock(&c->bm_lock);
}

/*
 * md's bitmap_startwrite: a user write to per-member sectors [s, e) of
 * the rows it touches. Returns once their bits are on the members.
 */
static void gr_bm_start(struct gr_ctx *c, sector_t s, sector_t e)
{
	unsigned long b, last, p;
	unsigned int nr;
	bool wait = false;
	void *pg;

	if (!c->bm)
		return;
	gr_bm_range(c, s, e, &b, &last);
	spin_lock(&c->bm_spin);
	for (; b <= last; b++) {
		c->bm_cnt[b]++;
		c->bm_age[b] = 0;
		pg = gr_bm_at(c->bm_img, b, &nr);
		p = gr_bm_pageno(b);
		if (!test_bit_le(nr, pg)) {
			__set_bit_le(nr, pg);
			__set_bit(p, c->bm_dirty);
		}
		/* set by someone else, and maybe not on the members yet */
		if (test_bit(p, c->bm_dirty) || test_bit(p, c->bm_busy))
			wait = true;
	}
	spin_unlock(&c->bm_spin);
	if (wait)
		gr_bm_flush(c);
}

static void gr_bm_end(struct gr_ctx *c, sector_t s, sector_t e)
{
	unsigned long b, last;

	if (!c->bm)
		return;
	gr_bm_range(c, s, e, &b, &last);
	spin_lock(&c->bm_spin);
	for (; b <= last; b++)
		c->bm_cnt[b]--;
	spin_unlock(&c->bm_spin);
}

/*
 * True if a bit of row is set: resync cannot pass it over (nor a row
 * the bitmap does not cover, which load refuses).
 */
static bool gr_bm_row_dirty(struct gr_ctx *c, sector_t row)
{
	unsigned long b, last;
	bool dirty;

	gr_bm_range(c, row << c->chunk_shift, (row + 1) << c->chunk_shift,
		    &b, &last);
	dirty = b > last;
	spin_lock(&c->bm_spin);
	for (; b <= last && !dirty; b++)
		dirty = gr_bm_test(c, b);
	spin_unlock(&c->bm_spin);
	return dirty;
}

/*
 * A clearing pass: bits with no write in flight, in sync (below the
 * resync checkpoint) and with no member out are cleared on their second
 * pass idle, or now if force. Written before it returns.
 */
static void gr_bm_clear(struct gr_ctx *c, bool force)
{
	sector_t cp = READ_ONCE(c->resync_cp);
	bool out = READ_ONCE(c->failed) || READ_ONCE(c->rebuilding);
	unsigned long p, b, lo, hi, nr;
	bool cleared = false;
	void *pg;

	if (out)
		return;
	spin_lock(&c->bm_spin);
	for (p = 0; p < c->bm_npages; p++) {
		pg = page_address(c->bm_img[p]);
		lo = p ? 0 : GR_BM_HDR * 8;
		hi = min_t(unsigned long, GR_BM_BITS,
			   c->bm_bits + GR_BM_HDR * 8 - p * GR_BM_BITS);
		for (nr = find_next_bit_le(pg, hi, lo); nr < hi;
		     nr = find_next_bit_le(pg, hi, nr + 1)) {
			b = p * GR_BM_BITS + nr - GR_BM_HDR * 8;
			if (c->bm_cnt[b] ||
			    (cp != GR_IN_SYNC &&
			     ((sector_t)(b + 1) << c->bm_shift) > cp))
				continue;
			if (!force && ++c->bm_age[b] < 2)
				continue;
			__clear_bit_le(nr, pg);
			__set_bit(p, c->bm_dirty);
			cleared = true;
		}
	}
	if (cleared) {
		gr_bm_hdr(c)->events_cleared = gr_bm_hdr(c)->events;
		__set_bit(0, c->bm_dirty);
	}
	spin_unlock(&c->bm_spin);
	if (cleared)
		gr_bm_flush(c);
}

static void gr_bm_daemon(struct work_struct *work)
{
	struct gr_ctx *c = container_of(to_delayed_work(work), struct gr_ctx,
					bm_work);

	gr_bm_clear(c, false);
	if (!READ_ONCE(c->suspended))
		queue_delayed_work(c->mdwq, &c->bm_work, c->bm_sleep * HZ);
}

/* The bitmap's events, before a superblock update writes them. */
static void gr_bm_sync(struct gr_ctx *c)
{
	if (!c->bm)
		return;
	spin_lock(&c->bm_spin);
	gr_bm_hdr(c)->events = cpu_to_le64(c->events);
	__set_bit(0, c->bm_dirty);
	spin_unlock(&c->bm_spin);
	gr_bm_flush(c);
}

static unsigned long gr_bm_weight(struct gr_ctx *c)
{
	unsigned long b, n = 0;

	for (b = 0; b < c->bm_bits; b++)
		n += gr_bm_test(c, b);
	return n;
}

static void gr_bm_free(struct gr_ctx *c)
{
	unsigned int p;

	for (p = 0; p < c->bm_npages; p++) {
		if (c->bm_img && c->bm_img[p])
			__free_page(c->bm_img[p]);
		if (c->bm_io && c->bm_io[p])
			__free_page(c->bm_io[p]);
	}
	kfree(c->bm_img);
	kfree(c->bm_io);
	bitmap_free(c->bm_dirty);
	bitmap_free(c->bm_busy);
	bitmap_free(c->bm_todo);
	kvfree(c->bm_cnt);
	kvfree(c->bm_age);
}

static int gr_bm_alloc(struct gr_ctx *c)
{
	unsigned int p, n = c->bm_npages;

	c->bm_img = kcalloc(n, sizeof(*c->bm_img), GFP_KERNEL);
	c->bm_io = kcalloc(n, sizeof(*c->bm_io), GFP_KERNEL);
	c->bm_dirty = bitmap_zalloc(n, GFP_KERNEL);
	c->bm_busy = bitmap_zalloc(n, GFP_KERNEL);
	c->bm_todo = bitmap_zalloc(n, GFP_KERNEL);
	c->bm_cnt = kvcalloc(c->bm_bits, sizeof(*c->bm_cnt),
			     GFP_KERNEL | __GFP_NOWARN);
	c->bm_age = kvcalloc(c->bm_bits, sizeof(*c->bm_age),
			     GFP_KERNEL | __GFP_NOWARN);
	if (!c->bm_img || !c->bm_io || !c->bm_dirty || !c->bm_busy ||
	    !c->bm_todo || !c->bm_cnt || !c->bm_age)
		return -ENOMEM;
	for (p = 0; p < n; p++) {
		c->bm_img[p] = alloc_page(GFP_KERNEL | __GFP_ZERO);
		c->bm_io[p] = alloc_page(GFP_KERNEL | __GFP_ZERO);
		if (!c->bm_img[p] || !c->bm_io[p])
			return -ENOMEM;
	}
	return 0;
}

/* n pages of member m's bitmap into pages. */
static int gr_bm_read(struct gr_ctx *c, unsigned int m, struct page **pages)
{
	unsigned int p;

	for (p = 0; p < c->bm_npages; p++)
		if (gr_read_at(c, m, gr_bm_page_sector(c, m, p),
			       page_address(pages[p]), gr_bm_page_len(c, m, p)))
			return -EIO;
	return 0;
}

/* One block of member m at sector into the scratch page. */
static int gr_bm_read_hdr(struct gr_ctx *c, unsigned int m, sector_t sector)
{
	return gr_read_at(c, m, sector, page_address(c->bm_scratch),
			  bdev_logical_block_size(c->devs[m]->bdev));
}

/*
 * The md array's bitmap (f: the freshest superblock), checked and read:
 * the header from the first member of use (fresh first) that can be
 * read, as md does, the bits or'ed over all of them (a bit set on any
 * counts). placed: every member that gets the bitmap written. A table
 * loaded before its first resume reads it again, and it must not have
 * changed shape. 0, or -EINVAL with *error (-ENOMEM).
 */
static int gr_bm_load(struct gr_ctx *c, struct mdp_superblock_1 *f,
		      unsigned int fresh, unsigned long use,
		      unsigned long placed, u64 max_ev, char **error)
{
	s32 off = (s32)le32_to_cpu(f->bitmap_offset);
	sector_t size = le64_to_cpu(f->size), s, e;
	unsigned int npages, p, m, nr, shift, src = fresh;
	unsigned long dirty, order[GR_MAX_DEVS];
	u64 bits, bytes, ev;
	struct gr_bm_sb *h;
	u32 csize, version;
	unsigned int n = 0;
	int r;

	if (!(le32_to_cpu(f->feature_map) & MD_FEATURE_BITMAP_OFFSET)) {
		if (c->bm) {
			*error = "The md bitmap went away since the table was loaded";
			return -EINVAL;
		}
		return 0;
	}
	for_each_set_bit(m, &placed, c->ndevs) {
		if ((s64)c->sb[m].sector + off < 0 ||
		    c->sb[m].sector + off >= bdev_nr_sectors(c->devs[m]->bdev)) {
			*error = "md bitmap offset points outside a member";
			return -EINVAL;
		}
	}
	if (test_bit(fresh, &use))
		order[n++] = fresh;
	for_each_set_bit(m, &use, c->ndevs)
		if (m != fresh)
			order[n++] = m;
	for (p = 0; p < n; p++) {
		src = order[p];
		if (!gr_bm_read_hdr(c, src, c->sb[src].sector + off))
			break;
		DMERR("member %u (%s): bitmap unreadable: read from another",
		      src, c->devs[src]->name);
	}
	if (p == n) {
		*error = "Cannot read the md bitmap from any member";
		return -EINVAL;
	}
	h = page_address(c->bm_scratch);
	version = le32_to_cpu(h->version);
	if (le32_to_cpu(h->magic) != GR_BM_MAGIC) {
		*error = "md bitmap damaged: bad magic";
		return -EINVAL;
	}
	if (version == 5 || le32_to_cpu(h->nodes) > 1) {
		*error = "md clustered bitmaps are not supported";
		return -EINVAL;
	}
	if (version != 3 && version != 4) {
		*error = "md bitmap version not supported (3 and 4 are)";
		return -EINVAL;
	}
	if (memcmp(h->uuid, f->set_uuid, sizeof(h->uuid))) {
		*error = "md bitmap belongs to another array (UUID differs)";
		return -EINVAL;
	}
	csize = le32_to_cpu(h->chunksize);
	if (csize < 512 || !is_power_of_2(csize)) {
		*error = "md bitmap chunk size is invalid";
		return -EINVAL;
	}
	if (!le32_to_cpu(h->daemon_sleep)) {
		*error = "md bitmap daemon sleep period out of range";
		return -EINVAL;
	}
	shift = ilog2(csize >> 9);
	bits = (size >> shift) + !!(size & ((1ULL << shift) - 1));
	if (bits > GR_BM_MAX_BITS) {
		*error = "md bitmap has too many chunks (more than 4194304)";
		return -EINVAL;
	}
	bytes = GR_BM_HDR + DIV_ROUND_UP(bits, 8);
	npages = DIV_ROUND_UP(bytes, PAGE_SIZE);
	if (le32_to_cpu(h->sectors_reserved) &&
	    bytes > (u64)le32_to_cpu(h->sectors_reserved) << 9) {
		*error = "md bitmap larger than the space reserved for it";
		return -EINVAL;
	}
	for_each_set_bit(m, &placed, c->ndevs) {
		s = c->sb[m].sector + off;
		e = s + (round_up(bytes, bdev_logical_block_size(
					  c->devs[m]->bdev)) >> 9);
		if (e > bdev_nr_sectors(c->devs[m]->bdev) ||
		    (s < c->data_offset + size && c->data_offset < e) ||
		    (s < c->sb[m].sector + (c->sb[m].size >> 9) &&
		     c->sb[m].sector < e)) {
			DMERR("member %u (%s): bitmap at sectors %llu-%llu overlaps its data or superblock",
			      m, c->devs[m]->name, (unsigned long long)s,
			      (unsigned long long)e);
			*error = "md bitmap overlaps a member's data or superblock";
			return -EINVAL;
		}
	}
	if (c->bm_img) {
		if (bits != c->bm_bits || shift != c->bm_shift ||
		    off != c->bm_offset) {
			*error = "The md bitmap changed since the table was loaded";
			return -EINVAL;
		}
	} else {
		c->bm_bits = bits;
		c->bm_shift = shift;
		c->bm_offset = off;
		c->bm_bytes = bytes;
		c->bm_npages = npages;
		r = gr_bm_alloc(c);
		if (r) {
			*error = "Cannot allocate the md bitmap";
			return r;
		}
	}

	if (gr_bm_read(c, src, c->bm_img)) {
		*error = "Cannot read the md bitmap";
		return -EINVAL;
	}
	for_each_set_bit(m, &use, c->ndevs) {
		if (m == src)
			continue;
		if (gr_bm_read(c, m, c->bm_io)) {
			DMERR("member %u (%s): bitmap unreadable: the others' counts",
			      m, c->devs[m]->name);
			continue;
		}
		for (p = 0; p < npages; p++) {
			unsigned long *d = page_address(c->bm_img[p]);
			const unsigned long *o = page_address(c->bm_io[p]);
			unsigned int w = p ? 0 : GR_BM_HDR / sizeof(long);

			for (; w < PAGE_SIZE / sizeof(long); w++)
				d[w] |= o[w];
		}
	}
	/* nothing past the last bit */
	for (p = bytes % PAGE_SIZE ? bytes % PAGE_SIZE : PAGE_SIZE;
	     p < PAGE_SIZE; p++)
		((u8 *)page_address(c->bm_img[npages - 1]))[p] = 0;
	for (nr = (GR_BM_HDR * 8 + bits) % GR_BM_BITS; nr % 8; nr++)
		__clear_bit_le(nr, page_address(c->bm_img[npages - 1]));

	h = gr_bm_hdr(c);
	ev = le64_to_cpu(h->events);
	if ((le32_to_cpu(h->state) & GR_BM_STALE) || ev < max_ev) {
		DMINFO("%s: md bitmap out of date (events %llu of %llu%s): every region counts as dirty",
		       dm_table_device_name(c->ti->table), ev, max_ev,
		       le32_to_cpu(h->state) & GR_BM_STALE ? ", stale" : "");
		for (dirty = 0; dirty < bits; dirty++) {
			void *pg = gr_bm_at(c->bm_img, dirty, &nr);

			__set_bit_le(nr, pg);
		}
		h->state &= ~cpu_to_le32(GR_BM_STALE);
	}
	c->bm_sleep = clamp_t(u32, le32_to_cpu(h->daemon_sleep), 1, 3600);
	bitmap_fill(c->bm_dirty, npages);	/* to every member at resume */
	bitmap_zero(c->bm_busy, npages);
	memset(c->bm_cnt, 0, bits * sizeof(*c->bm_cnt));
	memset(c->bm_age, 0, bits);
	c->bm = true;
	dirty = gr_bm_weight(c);
	DMINFO("%s: md bitmap: %lu of %llu chunks of %u KiB dirty",
	       dm_table_device_name(c->ti->table), dirty, bits, csize >> 10);
	return 0;
}

/*
 * Read and check the members' superblocks; set the array's state from
 * them. 0, or -EINVAL with *error set.
 */
static int gr_md_load(struct gr_ctx *c, char **error)
{
	struct mdp_superblock_1 *sb, *f = NULL;
	unsigned long bad = 0, stale = 0, rebuilding = 0, failed, placed;
	u64 rec = GR_IN_SYNC;
	int r;
	unsigned int m, fresh = 0, nsb = 0, max_dev;
	u64 ev, max_ev = 0, size, cp;
	u32 features, dn;
	u16 role;

	for (m = 0; m < c->ndevs; m++) {
		if (!c->devs[m] || test_bit(m, &c->rebuild_req))
			continue;	/* a rebuilt member gets a new superblock */
		switch (gr_sb_find(c, m)) {
		case GR_SB_OK:
			break;
		case GR_SB_BAD:
			DMERR("member %u (%s): bad superblock checksum: counted as missing",
			      m, c->devs[m]->name);
			__set_bit(m, &bad);
			continue;
		case GR_SB_IOERR:
			DMERR("member %u (%s): superblock unreadable: counted as missing",
			      m, c->devs[m]->name);
			__set_bit(m, &bad);
			continue;
		case GR_SB_090:
			*error = "md 0.90 metadata is not supported (1.0, 1.1 and 1.2 are)";
			return -EINVAL;
		default:
			DMERR("member %u (%s) has no md v1.x superblock", m,
			      c->devs[m]->name);
			*error = "Member without an md v1.x superblock";
			return -EINVAL;
		}
		ev = le64_to_cpu(((struct mdp_superblock_1 *)
				  page_address(c->sb[m].page))->events);
		if (!nsb++ || ev > max_ev) {
			max_ev = ev;
			fresh = m;
		}
	}
	if (!nsb) {
		*error = "No member has a valid md superblock";
		return -EINVAL;
	}
	f = page_address(c->sb[fresh].page);
	bad |= c->rebuild_req;		/* no superblock of theirs to check */
	for (m = 0; m < c->ndevs; m++) {
		if (!c->devs[m] || test_bit(m, &bad))
			continue;
		sb = page_address(c->sb[m].page);
		if (memcmp(sb->set_uuid, f->set_uuid, sizeof(f->set_uuid))) {
			DMERR("member %u (%s) belongs to array %pU, member %u to %pU",
			      m, c->devs[m]->name, sb->set_uuid, fresh, f->set_uuid);
			*error = "Members of different md arrays (array UUIDs differ)";
			return -EINVAL;
		}
	}
	if (le32_to_cpu(f->level) != 6) {
		*error = "The md superblocks are not RAID6's";
		return -EINVAL;
	}
	if (le32_to_cpu(f->raid_disks) != c->ndevs) {
		*error = "Number of members differs from the md superblocks";
		return -EINVAL;
	}
	if (le32_to_cpu(f->layout) != c->layout->algorithm) {
		*error = "Layout differs from the md superblocks";
		return -EINVAL;
	}
	if (le32_to_cpu(f->chunksize) != c->chunk) {
		*error = "Chunk size differs from the md superblocks";
		return -EINVAL;
	}
	features = le32_to_cpu(f->feature_map);
	if (features & MD_FEATURE_RESHAPE_ACTIVE) {
		*error = "The md array is part way through a reshape";
		return -EINVAL;
	}
	if (features & (MD_FEATURE_JOURNAL | MD_FEATURE_PPL |
			MD_FEATURE_MULTIPLE_PPLS | MD_FEATURE_CLUSTERED)) {
		*error = "md journal, PPL and clustered arrays are not supported";
		return -EINVAL;
	}
	size = le64_to_cpu(f->size) >> c->chunk_shift;	/* rows */
	if (c->ti->len > (size * c->ndata) << c->chunk_shift) {
		*error = "Target length exceeds the md array";
		return -EINVAL;
	}

	for (m = 0; m < c->ndevs; m++) {
		if (!c->devs[m] || test_bit(m, &bad))
			continue;
		sb = page_address(c->sb[m].page);
		if (le64_to_cpu(sb->data_offset) != c->data_offset) {
			*error = "data_offset differs from the md superblocks";
			return -EINVAL;
		}
		if (le64_to_cpu(f->size) > bdev_nr_sectors(c->devs[m]->bdev) -
		    min(c->data_offset, bdev_nr_sectors(c->devs[m]->bdev))) {
			DMERR("member %u (%s) is smaller than the array's data",
			      m, c->devs[m]->name);
			*error = "Member is smaller than the md array's data";
			return -EINVAL;
		}
		dn = le32_to_cpu(sb->dev_number);
		role = gr_sb_role(sb, dn);
		if (role < MD_DISK_ROLE_MAX && role != m) {
			DMERR("member %u (%s) has role %u in its superblock",
			      m, c->devs[m]->name, role);
			*error = "Member order differs from the md superblocks' roles";
			return -EINVAL;
		}
		ev = le64_to_cpu(sb->events);
		if (role != m || gr_sb_role(f, dn) != m || ev + 1 < max_ev) {
			DMERR("member %u (%s) is stale (events %llu of %llu, role %x by the array): out until rebuilt",
			      m, c->devs[m]->name, ev, max_ev,
			      gr_sb_role(f, dn));
			__set_bit(m, &stale);
		} else if ((le32_to_cpu(sb->feature_map) &
			    MD_FEATURE_RECOVERY_OFFSET) &&
			   le64_to_cpu(sb->recovery_offset) <
			   le64_to_cpu(f->size)) {
			/* an interrupted rebuild: it goes on from there */
			__set_bit(m, &rebuilding);
			rec = min_t(u64, rec, le64_to_cpu(sb->recovery_offset) &
				    ~(u64)(c->chunk - 1));
		}
	}
	rebuilding |= c->rebuild_req;
	if (c->rebuild_req)
		rec = 0;
	failed = (c->missing | bad | stale) & ~c->rebuild_req;
	if (hweight_long(failed | rebuilding) > 2) {
		*error = "More than two members missing, stale or rebuilding";
		return -EINVAL;
	}
	cp = le64_to_cpu(f->resync_offset);
	if (cp >= size << c->chunk_shift)
		cp = GR_IN_SYNC;
	if (cp != GR_IN_SYNC && hweight_long(failed | rebuilding) > 1) {
		*error = "Dirty md array with two members out: parity cannot be trusted";
		return -EINVAL;
	}

	/* the array's state: the freshest superblock's */
	max_dev = le32_to_cpu(f->max_dev);
	for (m = 0; m < c->ndevs; m++)
		c->devnum[m] = -1;
	for (dn = 0; dn < max_dev; dn++) {
		role = le16_to_cpu(f->dev_roles[dn]);
		if (role < c->ndevs)
			c->devnum[role] = dn;
	}
	for_each_set_bit(m, &c->rebuild_req, c->ndevs)
		if (gr_sb_new(c, m, f, error))
			return -EINVAL;
	placed = 0;
	for (m = 0; m < c->ndevs; m++)
		if (c->devs[m] && !test_bit(m, &failed))
			__set_bit(m, &placed);
	r = gr_bm_load(c, f, fresh, placed & ~rebuilding, placed, max_ev,
		       error);
	if (r)
		return r;
	for (m = 0; m < c->ndevs; m++) {
		if (!c->devs[m] || test_bit(m, &failed) || m == fresh ||
		    test_bit(m, &c->rebuild_req))
			continue;
		sb = page_address(c->sb[m].page);
		memcpy(sb->dev_roles, f->dev_roles,
		       2 * min(max_dev, le32_to_cpu(sb->max_dev)));
	}
	c->failed = failed;
	c->recorded = failed;
	c->rebuilding = rebuilding;
	c->rec_cp = rec;
	c->sb_new = c->rebuild_req != 0;
	c->events = max_ev;
	c->in_sync = true;
	c->resync_cp = cp;
	c->written_cp = cp;
	c->sync_rows = size;
	return 0;
}

/*
 * Write the array's state into every live member's superblock, events
 * bumped, and wait. A member that cannot take it fails, and the others
 * record that too. sb_lock held.
 */
static void gr_sb_update(struct gr_ctx *c)
{
	u64 now = ktime_get_real_seconds() & ((1ULL << 40) - 1);
	unsigned long failed, errors;
	struct gr_batch b;
	unsigned int m, i;

	do {
		failed = READ_ONCE(c->failed);
		if (!c->md)
			break;
		c->events++;
		gr_bm_sync(c);	/* the bitmap's events first, as md */
		failed = READ_ONCE(c->failed);
		gr_batch_start(&b);
		for (m = 0; m < c->ndevs; m++) {
			struct mdp_superblock_1 *sb;

			if (test_bit(m, &failed))
				continue;
			sb = page_address(c->sb[m].page);
			sb->events = cpu_to_le64(c->events);
			sb->utime = cpu_to_le64(now);
			sb->resync_offset = cpu_to_le64(c->in_sync ?
							c->resync_cp : 0);
			if (test_bit(m, &c->rebuilding)) {
				sb->feature_map |=
					cpu_to_le32(MD_FEATURE_RECOVERY_OFFSET);
				sb->recovery_offset = cpu_to_le64(c->rec_cp);
			} else {
				sb->feature_map &=
					~cpu_to_le32(MD_FEATURE_RECOVERY_OFFSET);
				sb->recovery_offset = 0;
			}
			for_each_set_bit(i, &failed, c->ndevs)
				if (c->devnum[i] >= 0 &&
				    c->devnum[i] < le32_to_cpu(sb->max_dev))
					sb->dev_roles[c->devnum[i]] =
						cpu_to_le16(MD_DISK_ROLE_FAULTY);
			sb->sb_csum = gr_sb_csum(sb);
			gr_mio_at(c, &b, m, REQ_OP_WRITE | REQ_SYNC |
				  REQ_PREFLUSH | REQ_FUA, c->sb[m].sector,
				  sb, c->sb[m].size);
		}
		errors = gr_batch_end(&b);
		for_each_set_bit(m, &errors, c->ndevs)
			gr_fail(c, m);
	} while (errors);
	c->written_cp = c->in_sync ? c->resync_cp : 0;
	c->recorded = failed;
}

/* Record member failures not recorded yet; before a write is acknowledged. */
static void gr_sb_settle(struct gr_ctx *c)
{
	if (!(READ_ONCE(c->failed) & ~READ_ONCE(c->recorded)))
		return;
	mutex_lock(&c->sb_lock);
	if (c->failed & ~c->recorded)
		gr_sb_update(c);
	mutex_unlock(&c->sb_lock);
}

/* md_write_start: the superblocks say active before the first write. */
static void gr_write_start(struct gr_ctx *c)
{
	if (!c->md)
		return;
	mutex_lock(&c->sb_lock);
	atomic_inc(&c->writes);
	if (c->in_sync) {
		c->in_sync = false;
		gr_sb_update(c);
	}
	mutex_unlock(&c->sb_lock);
}

static void gr_write_end(struct gr_ctx *c)
{
	if (c->md && atomic_dec_and_test(&c->writes))
		mod_delayed_work(c->mdwq, &c->safemode,
				 msecs_to_jiffies(GR_SAFEMODE_MS));
}

/* md's safe mode: clean again once no write came for a while. */
static void gr_safemode(struct work_struct *work)
{
	struct gr_ctx *c = container_of(to_delayed_work(work), struct gr_ctx,
					safemode);

	mutex_lock(&c->sb_lock);
	if (!c->in_sync && !atomic_read(&c->writes)) {
		c->in_sync = true;
		gr_sb_update(c);
	}
	mutex_unlock(&c->sb_lock);
}

static void gr_event(struct work_struct *work)
{
	struct gr_ctx *c = container_of(work, struct gr_ctx, event_work);

	dm_table_event(c->ti->table);
}

/* A resync checkpoint; written now if the array is clean. */
static void gr_resync_cp(struct gr_ctx *c, sector_t cp)
{
	mutex_lock(&c->sb_lock);
	WRITE_ONCE(c->resync_cp, cp);
	if (c->md && c->in_sync && c->written_cp != cp)
		gr_sb_update(c);
	mutex_unlock(&c->sb_lock);
}

/* ---- background work: resync, check, repair -------------------------------- */

/*
 * One segment of every member: read all, recompute P and Q, compare in
 * 4 KiB columns (md's stripe unit: a mismatch counts 8 sectors) and, for
 * resync and repair, write P/Q where they differ. A row with a data block
 * lost has nothing to compare with and is passed over. False when the
 * array has lost more than two members.
 */
static bool gr_sync_seg(struct gr_ctx *c, struct gr_buf *buf,
			const struct gr_row *r, sector_t row, sector_t col,
			unsigned int nsec, int action)
{
	unsigned int P = c->nslots - 2, Q = c->nslots - 1, len = nsec << 9;
	struct gr_batch *b = &buf->batch;
	void *ptrs[GR_MAX_SLOTS];
	unsigned int i, m, bad = 0;
	unsigned long failed, errors;
	bool hp, hq;

redo:
	failed = gr_failed_row(c, row);
	if (hweight_long(failed) > 2)
		return false;
	for (i = 0; i < c->ndata; i++)
		if (test_bit(r->data[i], &failed))
			return true;
	hp = !test_bit(r->phys[P], &failed);
	hq = !test_bit(r->phys[Q], &failed);
	gr_read_row(c, buf, r, row, col, len, failed);
	errors = gr_batch_end(b);
	if (errors) {			/* a scrub corrects what it finds */
		for_each_set_bit(m, &errors, c->ndevs)
			gr_fix_block(c, buf, r, row, col, nsec, m);
		goto redo;
	}
	if (gr_failed_row(c, row) != failed)
		goto redo;
	/* P and Q as they should be, beside P and Q as read */
	gr_ptrs(c, buf, r, ptrs);
	ptrs[P] = buf->nd[0];
	ptrs[Q] = buf->nd[1];
	gr_compute(c, KGPU_SVC_RAID6_GEN, ptrs, len, GR_NONE, GR_NONE);
	for (i = 0; i < len; i += PAGE_SIZE) {
		unsigned int n = min_t(unsigned int, PAGE_SIZE, len - i);

		if ((hp && memcmp(buf->nd[0] + i, buf->blk[P] + i, n)) ||
		    (hq && memcmp(buf->nd[1] + i, buf->blk[Q] + i, n)))
			bad++;
	}
	if (!bad)
		return true;
	if (action != GR_RESYNC)	/* md counts check and repair */
		atomic64_add(bad * (PAGE_SIZE >> 9), &c->mismatches);
	if (action == GR_CHECK)
		return true;
	gr_batch_start(b);
	for (i = P; i <= Q; i++)
		if (!test_bit(r->phys[i], &failed))
			gr_mio(c, b, r->phys[i], REQ_OP_WRITE, row, col,
			       buf->nd[i - P], len);
	gr_batch_wait(c, b);
	return true;
}

/*
 * Rebuild one segment of the members being rebuilt: read the others,
 * recover the lost slots (RAID6_REC: up to two, rebuilt or dead), write
 * the rebuilt ones. False when the array has lost too much.
 */
static bool gr_recover_seg(struct gr_ctx *c, struct gr_buf *buf,
			   const struct gr_row *r, sector_t row, sector_t col,
			   unsigned int nsec)
{
	unsigned int len = nsec << 9, m, fa, fb;
	struct gr_batch *b = &buf->batch;
	void *ptrs[GR_MAX_SLOTS];
	unsigned long failed, todo;

redo:
	failed = gr_failed_row(c, row);
	todo = READ_ONCE(c->rebuilding) & ~READ_ONCE(c->failed);
	if (!gr_lost(c, failed, r, &fa, &fb))
		return false;
	if (!todo)
		return true;
	gr_read_row(c, buf, r, row, col, len, failed);
	if (!gr_batch_wait(c, b) || gr_failed_row(c, row) != failed)
		goto redo;
	gr_ptrs(c, buf, r, ptrs);
	gr_compute(c, KGPU_SVC_RAID6_REC, ptrs, len, fa, fb);
	gr_batch_start(b);
	for_each_set_bit(m, &todo, c->ndevs)
		gr_mio(c, b, m, REQ_OP_WRITE, row, col, buf->blk[r->slot[m]],
		       len);
	gr_batch_wait(c, b);	/* a rebuilt member that fails is dead */
	return true;
}

/*
 * md's speed limits, per member: at most rate_max KiB/s, and no more than
 * rate_min while user I/O came in since the last look (gr_sync_window,
 * each tick of gr_sync_run). A lane waits before each row until the
 * rate since the window's start is under the limit, in sleeps of at most
 * 100 ms, so a stop is seen quickly; a window lasts about a second.
 */
static void gr_lane_throttle(struct gr_ctx *c)
{
	for (;;) {
		unsigned long ms = jiffies_to_msecs(jiffies -
						    READ_ONCE(c->win_t)) + 1;
		u64 done = atomic64_read(&c->sync_done) - READ_ONCE(c->win_done);
		u64 need = div_u64((done >> 1) * 1000, READ_ONCE(c->sync_limit));

		if (need <= ms || READ_ONCE(c->sync_stop))
			return;
		msleep(min_t(u64, need - ms, 100));
	}
}

static void gr_sync_window(struct gr_ctx *c, u64 *ios)
{
	u64 now_ios = atomic64_read(&c->user_ios);

	WRITE_ONCE(c->sync_limit, now_ios != *ios ? c->rate_min : c->rate_max);
	*ios = now_ios;
	if (time_after(jiffies, READ_ONCE(c->win_t) + HZ)) {
		WRITE_ONCE(c->win_done, atomic64_read(&c->sync_done));
		WRITE_ONCE(c->win_t, jiffies);
	}
}

/* A rebuild checkpoint; done (GR_IN_SYNC): the members are in the array. */
static void gr_rec_cp(struct gr_ctx *c, sector_t cp)
{
	mutex_lock(&c->sb_lock);
	if (cp == GR_IN_SYNC)
		WRITE_ONCE(c->rebuilding, 0);
	WRITE_ONCE(c->rec_cp, cp);
	gr_sb_update(c);
	mutex_unlock(&c->sb_lock);
}

/*
 * One lane of background work: rows first, first + GR_LANES, ... to the
 * end, a whole row at a time under the row's lock (a rebuilt row must not
 * see a write between its segments). lane->next: the next row it takes;
 * every row below the smallest lane->next is done.
 */
static void gr_lane_run(struct work_struct *work)
{
	struct gr_lane *lane = container_of(work, struct gr_lane, work);
	struct gr_ctx *c = lane->c;
	sector_t row;

	for (row = lane->next; lane->ok && row < c->sync_rows &&
	     !READ_ONCE(c->sync_stop); row += GR_LANES) {
		struct mutex *lock = &c->locks[row % GR_LOCKS];
		sector_t col = row == lane->first_row ? lane->first_col : 0;
		struct gr_buf *buf;
		struct gr_row r;
		unsigned int n;

		if (c->action == GR_RESYNC && c->bm) {
			/* md's bitmap_start_sync: a clean region is in sync */
			if (!gr_bm_row_dirty(c, row)) {
				atomic64_inc(&c->bm_rows_clean);
				WRITE_ONCE(lane->next, row + GR_LANES);
				cond_resched();
				continue;
			}
			atomic64_inc(&c->bm_rows_synced);
		}
		gr_lane_throttle(c);
		gr_map_row(c, row, &r);
		mutex_lock(lock);
		buf = gr_buf_get(c);
		for (; lane->ok && col < c->chunk; col += n) {
			n = min_t(sector_t, c->seg_sectors, c->chunk - col);
			if (c->action == GR_RECOVER)
				lane->ok = gr_recover_seg(c, buf, &r, row, col,
							  n);
			else
				lane->ok = gr_sync_seg(c, buf, &r, row, col, n,
						       c->action);
		}
		gr_buf_put(c, buf);
		mutex_unlock(lock);
		if (lane->ok)
			WRITE_ONCE(lane->next, row + GR_LANES);
		atomic64_add(c->chunk, &c->sync_done);
		cond_resched();
	}
	if (atomic_dec_and_test(&c->lanes_left))
		complete(&c->lanes_done);
}

/* Per-member sectors done by all lanes: below the smallest next row. */
static sector_t gr_lanes_done(struct gr_ctx *c)
{
	sector_t row = c->sync_rows;
	unsigned int k;

	for (k = 0; k < GR_LANES; k++)
		row = min(row, READ_ONCE(c->lanes[k].next));
	return max(row << c->chunk_shift, c->sync_pos0);
}

/*
 * Resync, rebuild, check or repair, from sync_pos to the end of the
 * members' data: GR_LANES lanes of rows at once (member I/O, copies and
 * the helper's launches of one lane overlap the others'), watched here for
 * progress, checkpoints (every second) and md's speed limits.
 */
static void gr_sync_run(struct work_struct *work)
{
	struct gr_ctx *c = container_of(work, struct gr_ctx, sync_work);
	sector_t end = c->sync_rows << c->chunk_shift, pos = c->sync_pos;
	sector_t row0 = pos >> c->chunk_shift;
	unsigned long ck = jiffies;
	u64 ios = atomic64_read(&c->user_ios);
	int action = c->action;
	unsigned int k;
	bool ok = true;

	DMINFO("%s: %s from sector %llu of %llu per member",
	       dm_table_device_name(c->ti->table), gr_action_name[action],
	       (unsigned long long)pos, (unsigned long long)end);
	c->sync_pos0 = pos;
	atomic64_set(&c->sync_done, 0);
	c->win_done = 0;
	c->win_t = jiffies;
	c->sync_limit = c->rate_max;
	reinit_completion(&c->lanes_done);
	atomic_set(&c->lanes_left, GR_LANES);
	for (k = 0; k < GR_LANES; k++) {
		struct gr_lane *lane = &c->lanes[k];

		lane->c = c;
		lane->ok = true;
		lane->next = row0 + k;
		lane->first_row = row0;
		lane->first_col = pos & (c->chunk - 1);
		INIT_WORK(&lane->work, gr_lane_run);
		queue_work(c->syncwq, &lane->work);
	}
	for (;;) {
		bool all = wait_for_completion_timeout(&c->lanes_done, HZ / 20);

		pos = gr_lanes_done(c);
		WRITE_ONCE(c->sync_pos, pos);
		if (action == GR_RECOVER)
			WRITE_ONCE(c->rec_cp, pos);
		if (all)
			break;
		if (time_after(jiffies, ck + HZ)) {
			if (action == GR_RESYNC)
				gr_resync_cp(c, pos);
			else if (action == GR_RECOVER)
				gr_rec_cp(c, pos);
			ck = jiffies;
		}
		gr_sync_window(c, &ios);
	}
	for (k = 0; k < GR_LANES; k++)
		ok &= c->lanes[k].ok;
	gr_sb_settle(c);
	if (action == GR_RESYNC)
		gr_resync_cp(c, pos >= end ? GR_IN_SYNC : pos);
	else if (action == GR_RECOVER)
		gr_rec_cp(c, pos >= end ? GR_IN_SYNC : pos);
	DMINFO("%s: %s %s at sector %llu, %llu mismatched sectors",
	       dm_table_device_name(c->ti->table), gr_action_name[action],
	       pos >= end ? "done" : ok ? "interrupted" : "aborted",
	       (unsigned long long)pos,
	       (unsigned long long)atomic64_read(&c->mismatches));
	if (action == GR_RESYNC && c->bm)
		DMINFO("%s: resync by the bitmap: %llu rows resynced, %llu clean rows passed over",
		       dm_table_device_name(c->ti->table),
		       (unsigned long long)atomic64_read(&c->bm_rows_synced),
		       (unsigned long long)atomic64_read(&c->bm_rows_clean));
	WRITE_ONCE(c->action, GR_IDLE);
	schedule_work(&c->event_work);
	/* a resync may be owed after a rebuild */
	if (action == GR_RECOVER && pos >= end && ok)
		queue_work(c->mdwq, &c->kick_work);
}

/* Start, stop and restart background work: sync_lock held. */
static void gr_sync_start(struct gr_ctx *c, int action)
{
	if (action == GR_RESYNC) {
		c->sync_pos = READ_ONCE(c->resync_cp);
		atomic64_set(&c->bm_rows_synced, 0);
		atomic64_set(&c->bm_rows_clean, 0);
	} else if (action == GR_RECOVER) {
		c->sync_pos = READ_ONCE(c->rec_cp);
	} else {
		c->sync_pos = 0;
		atomic64_set(&c->mismatches, 0);
	}
	c->sync_stop = false;
	WRITE_ONCE(c->action, action);
	queue_work(system_long_wq, &c->sync_work);
}

static void gr_sync_stop(struct gr_ctx *c)
{
	WRITE_ONCE(c->sync_stop, true);
	flush_work(&c->sync_work);
	c->sync_stop = false;
}

/*
 * The work the array needs starts unless frozen or suspended: a rebuild
 * first, then a resync.
 */
static void gr_sync_kick(struct gr_ctx *c)
{
	if (c->frozen || c->suspended || READ_ONCE(c->action) != GR_IDLE ||
	    gr_nfailed(c) > 2)
		return;
	if ((READ_ONCE(c->rebuilding) & ~READ_ONCE(c->failed)) &&
	    READ_ONCE(c->rec_cp) != GR_IN_SYNC)
		gr_sync_start(c, GR_RECOVER);
	else if (READ_ONCE(c->resync_cp) != GR_IN_SYNC)
		gr_sync_start(c, GR_RESYNC);
}

static void gr_kick_work(struct work_struct *work)
{
	struct gr_ctx *c = container_of(work, struct gr_ctx, kick_work);

	mutex_lock(&c->sync_lock);
	gr_sync_kick(c);
	mutex_unlock(&c->sync_lock);
}

static void gr_work(struct work_struct *work)
{
	struct gr_io *io = container_of(work, struct gr_io, work);
	struct gr_ctx *c = io->c;
	struct bio *bio = io->bio;
	unsigned int k = c->ndata, nsec = io->iter.bi_size >> 9, j, n;
	sector_t chunk = io->sector >> c->chunk_shift;
	sector_t off = io->sector & (c->chunk - 1);
	sector_t row = chunk, col, end;
	struct mutex *lock;
	struct gr_buf *buf;
	struct gr_row r;
	int ret = 0;

	j = sector_div(row, k);
	if (WARN_ON_ONCE(bio_data_dir(bio) == WRITE &&
			 j * c->chunk + off + nsec > k * c->chunk)) {
		bio_io_error(bio);	/* dm splits at rows: cannot happen */
		return;
	}
	gr_map_row(c, row, &r);
	/* columns that a write touches: all of them if it spans chunks */
	if (off + nsec <= c->chunk) {
		col = off;
		end = off + nsec;
	} else {
		col = 0;
		end = c->chunk;
	}
	if (bio_data_dir(bio) == WRITE) {
		gr_write_start(c);
		gr_bm_start(c, (row << c->chunk_shift) + col,
			    (row << c->chunk_shift) + end);
	}
	lock = &c->locks[row % GR_LOCKS];
	mutex_lock(lock);
	buf = gr_buf_get(c);
	if (bio_data_dir(bio) == READ) {
		/* one chunk: map() split it */
		atomic64_inc(&c->degraded_reads);
		for (col = off; col < off + nsec && !ret; col += n) {
			n = min_t(sector_t, c->seg_sectors, off + nsec - col);
			if (io->fix)
				gr_fix_block(c, buf, &r, row, col, n,
					     io->member);
			ret = gr_read_seg(c, io, buf, &r, row, j, col, n,
					  (col - off) << 9);
		}
	} else {
		sector_t at;

		for (at = col; at < end && !ret; at += n) {
			n = min_t(sector_t, c->seg_sectors, end - at);
			ret = gr_write_seg(c, io, buf, &r, row, at, n);
		}
		atomic64_inc(&c->stripes_written);
	}
	gr_buf_put(c, buf);
	mutex_unlock(lock);
	/* a failure this write counted on is on the superblocks first */
	gr_sb_settle(c);
	if (bio_data_dir(bio) == WRITE) {
		gr_bm_end(c, (row << c->chunk_shift) + col,
			  (row << c->chunk_shift) + end);
		gr_write_end(c);
	}
	bio->bi_status = ret ? BLK_STS_IOERR : BLK_STS_OK;
	bio_endio(bio);
}

/* A flush that failed on a member: acknowledged once the failure is recorded. */
static void gr_flush_work(struct work_struct *work)
{
	struct gr_io *io = container_of(work, struct gr_io, work);

	gr_sb_settle(io->c);
	io->bio->bi_status = gr_nfailed(io->c) > 2 ? BLK_STS_IOERR : BLK_STS_OK;
	bio_endio(io->bio);
}

/* ---- target --------------------------------------------------------------- */

static void gr_dtr(struct dm_target *ti)
{
	struct gr_ctx *c = ti->private;
	unsigned int i, s;

	if (!c)
		return;
	/* presuspend stopped background work; a table never resumed has none */
	cancel_work_sync(&c->sync_work);
	cancel_work_sync(&c->kick_work);
	cancel_delayed_work_sync(&c->safemode);
	cancel_delayed_work_sync(&c->bm_work);
	cancel_work_sync(&c->event_work);
	if (c->mdwq)
		destroy_workqueue(c->mdwq);
	if (c->syncwq)
		destroy_workqueue(c->syncwq);
	if (c->wq)
		destroy_workqueue(c->wq);
	for (i = 0; i < GR_NBUF; i++) {
		for (s = 0; s < GR_MAX_SLOTS; s++)
			if (c->bufs[i].blk[s])
				free_pages((unsigned long)c->bufs[i].blk[s],
					   get_order(GR_SEG));
		for (s = 0; s < GR_MAX_DEVS; s++)
			if (c->bufs[i].nd[s])
				free_pages((unsigned long)c->bufs[i].nd[s],
					   get_order(GR_SEG));
	}
	for (i = 0; i < GR_MAX_DEVS; i++)
		if (c->sb[i].page) {
			memzero_page(c->sb[i].page, 0, PAGE_SIZE);
			__free_page(c->sb[i].page);
		}
	gr_bm_free(c);
	if (c->bm_scratch)
		__free_page(c->bm_scratch);
	if (c->bs_ready)
		bioset_exit(&c->bs);
	for (i = 0; i < GR_MAX_DEVS; i++)
		if (c->devs[i])
			dm_put_device(ti, c->devs[i]);
	for (i = 0; i < GR_LOCKS; i++)
		mutex_destroy(&c->locks[i]);
	mutex_destroy(&c->sb_lock);
	mutex_destroy(&c->sync_lock);
	mutex_destroy(&c->bm_lock);
	kfree(c);
	ti->private = NULL;
}

/* The number after an optional parameter's name: 0, or -EINVAL and *error. */
static int gr_opt_number(struct dm_arg_set *as, unsigned int *nopt,
			 unsigned long long *v, char **error, char *missing,
			 char *invalid)
{
	char dummy;

	if (!*nopt) {
		*error = missing;
		return -EINVAL;
	}
	(*nopt)--;
	if (sscanf(dm_shift_arg(as), "%llu%c", v, &dummy) != 1) {
		*error = invalid;
		return -EINVAL;
	}
	return 0;
}

/*
 * Construct a gpu-raid6 mapping:
 *
 *   <layout> <chunk_sectors> <#devs> <dev0> ... <devN-1>
 *	[<#opt_params> <opt_params>...]
 *
 * <layout>		left-symmetric (md algorithm 2), raid6_zr (md's
 *			ddf-zero-restart, algorithm 8), also left-asymmetric,
 *			right-asymmetric, right-symmetric, raid6_nr
 *			(ddf-N-restart)
 * <chunk_sectors>	a power of two, at least 8
 * <#devs>		4 to 32 members, in md's role order; "-": missing
 *			(at most two)
 * opt params:		data_offset <sectors>: where data starts on every
 *			member (md metadata 1.1/1.2)
 *			md_superblocks: the members carry md v1.x superblocks
 *			(metadata 1.0, 1.1, 1.2) and the target keeps the
 *			array's state in them as md does (see "md state");
 *			without it the array has no persistent state
 *			rebuild <idx>: rebuild member idx (a new device) from
 *			the others in the background (at most two; with
 *			md_superblocks it gets a new superblock, and an
 *			interrupted rebuild goes on at the next load without
 *			this parameter, from its recovery_offset)
 *			min_recovery_rate <KiB/s>, max_recovery_rate <KiB/s>:
 *			per member, for resync, check and repair (dm-raid's
 *			names; md's speed_limit_min/max, 1000 and 200000)
 *
 * The target is at most #devs - 2 data chunks per row times the rows that
 * fit the smallest member after data_offset (with md_superblocks: the
 * rows of the array's per-member size).
 */
static int gr_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	static const struct dm_arg _args[] = {
		{0, 11, "Invalid number of optional parameters"},
	};
	struct dm_arg_set as = { .argc = argc, .argv = argv };
	unsigned long long v;
	sector_t min_size = ~(sector_t)0, rows;
	unsigned int i, j, s, nopt, ndevs;
	struct gr_ctx *c;
	const char *arg;
	char dummy;
	int r;

	if (argc < 3) {
		ti->error = "Not enough arguments";
		return -EINVAL;
	}
	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c) {
		ti->error = "Cannot allocate context";
		return -ENOMEM;
	}
	c->ti = ti;
	ti->private = c;
	for (i = 0; i < GR_LOCKS; i++)
		mutex_init(&c->locks[i]);
	spin_lock_init(&c->buf_lock);
	INIT_LIST_HEAD(&c->free_bufs);
	init_waitqueue_head(&c->buf_wait);
	mutex_init(&c->sb_lock);
	mutex_init(&c->sync_lock);
	INIT_DELAYED_WORK(&c->safemode, gr_safemode);
	INIT_DELAYED_WORK(&c->bm_work, gr_bm_daemon);
	spin_lock_init(&c->bm_spin);
	mutex_init(&c->bm_lock);
	INIT_WORK(&c->event_work, gr_event);
	INIT_WORK(&c->sync_work, gr_sync_run);
	INIT_WORK(&c->kick_work, gr_kick_work);
	init_completion(&c->lanes_done);
	c->in_sync = true;
	c->resync_cp = GR_IN_SYNC;
	c->written_cp = GR_IN_SYNC;
	c->rec_cp = GR_IN_SYNC;
	c->rate_min = GR_RATE_MIN;
	c->rate_max = GR_RATE_MAX;

	r = -EINVAL;
	arg = dm_shift_arg(&as);
	for (i = 0; i < ARRAY_SIZE(gr_layouts); i++)
		if (!strcmp(arg, gr_layouts[i].name))
			c->layout = &gr_layouts[i];
	if (!c->layout) {
		ti->error = "Unknown layout";
		goto bad;
	}

	arg = dm_shift_arg(&as);
	if (sscanf(arg, "%llu%c", &v, &dummy) != 1 || !v) {
		ti->error = "Invalid chunk size";
		goto bad;
	}
	if (!is_power_of_2(v)) {
		ti->error = "Chunk size is not a power of two";
		goto bad;
	}
	if (v < 8 || v > GR_MAX_CHUNK) {
		ti->error = "Chunk size out of range (8 to 65536 sectors)";
		goto bad;
	}
	c->chunk = v;
	c->chunk_shift = __ffs(c->chunk);
	c->seg_sectors = min_t(u32, c->chunk, GR_SEG >> 9);

	arg = dm_shift_arg(&as);
	if (sscanf(arg, "%u%c", &ndevs, &dummy) != 1) {
		ti->error = "Invalid number of members";
		goto bad;
	}
	if (ndevs < GR_MIN_DEVS) {
		ti->error = "Too few members (RAID6 needs at least 4)";
		goto bad;
	}
	if (ndevs > GR_MAX_DEVS) {
		ti->error = "Too many members (at most 32)";
		goto bad;
	}
	if (as.argc < ndevs) {
		ti->error = "Fewer member devices than #devs";
		goto bad;
	}
	c->ndevs = ndevs;
	c->ndata = ndevs - 2;
	c->nslots = c->layout->ddf ? ndevs + 2 : ndevs;
	for (i = 0; i < ndevs; i++) {
		arg = dm_shift_arg(&as);
		if (!strcmp(arg, "-")) {
			__set_bit(i, &c->missing);
			continue;
		}
		r = dm_get_device(ti, arg, dm_table_get_mode(ti->table),
				  &c->devs[i]);
		if (r) {
			ti->error = "Member device lookup failed";
			goto bad;
		}
	}
	r = -EINVAL;
	for (i = 0; i < ndevs; i++)
		for (j = i + 1; j < ndevs; j++)
			if (c->devs[i] && c->devs[j] &&
			    c->devs[i]->bdev == c->devs[j]->bdev) {
				ti->error = "The same device is given as two members";
				goto bad;
			}
	if (hweight_long(c->missing) > 2) {
		ti->error = "More than two members missing";
		goto bad;
	}
	c->failed = c->missing;

	if (as.argc) {
		r = dm_read_arg_group(_args, &as, &nopt, &ti->error);
		if (r)
			goto bad;
		r = -EINVAL;
		while (nopt--) {
			r = -EINVAL;
			arg = dm_shift_arg(&as);
			if (!strcasecmp(arg, "data_offset")) {
				r = gr_opt_number(&as, &nopt, &v, &ti->error,
						  "data_offset needs a value",
						  "Invalid data_offset");
				if (r)
					goto bad;
				c->data_offset = v;
				c->data_offset_set = true;
			} else if (!strcasecmp(arg, "md_superblocks")) {
				c->md = true;
			} else if (!strcasecmp(arg, "rebuild")) {
				r = gr_opt_number(&as, &nopt, &v, &ti->error,
						  "rebuild needs a member index",
						  "Invalid rebuild index");
				if (r)
					goto bad;
				r = -EINVAL;
				if (v >= ndevs) {
					ti->error = "Rebuild index out of range";
					goto bad;
				}
				if (test_bit(v, &c->missing)) {
					ti->error = "Cannot rebuild a missing member (given as -)";
					goto bad;
				}
				__set_bit(v, &c->rebuild_req);
			} else if (!strcasecmp(arg, "min_recovery_rate") ||
				   !strcasecmp(arg, "max_recovery_rate")) {
				bool max = !strcasecmp(arg, "max_recovery_rate");

				r = gr_opt_number(&as, &nopt, &v, &ti->error,
						  "Recovery rate needs a value",
						  "Invalid recovery rate (KiB/s per member, 1 or more)");
				if (!r && (!v || v > INT_MAX)) {
					ti->error = "Invalid recovery rate (KiB/s per member, 1 or more)";
					r = -EINVAL;
				}
				if (r)
					goto bad;
				if (max) {
					c->rate_max = v;
					c->rate_max_set = true;
				} else {
					c->rate_min = v;
					c->rate_min_set = true;
				}
			} else {
				ti->error = "Unknown optional parameter";
				goto bad;
			}
		}
	}
	r = -EINVAL;
	if (as.argc) {
		ti->error = "Too many arguments";
		goto bad;
	}

	for (i = 0; i < ndevs; i++)
		if (c->devs[i])
			min_size = min(min_size, bdev_nr_sectors(c->devs[i]->bdev));
	if (min_size <= c->data_offset) {
		ti->error = "Members are not larger than data_offset";
		goto bad;
	}
	rows = (min_size - c->data_offset) >> c->chunk_shift;
	if (ti->len > ((rows * c->ndata) << c->chunk_shift)) {
		ti->error = "Target length does not fit the members";
		goto bad;
	}
	c->rows = DIV_ROUND_UP_SECTOR_T(ti->len,
					(sector_t)c->ndata << c->chunk_shift);
	c->sync_rows = c->rows;
	if (hweight_long(c->rebuild_req) > 2) {
		ti->error = "More than two members to rebuild";
		goto bad;
	}
	if (hweight_long(c->missing | c->rebuild_req) > 2) {
		ti->error = "More than two members missing or rebuilding";
		goto bad;
	}
	c->rebuilding = c->rebuild_req;	/* md_superblocks: set again below */
	if (c->rebuilding)
		c->rec_cp = 0;
	/* one limit given: the other default gives way to it */
	if (c->rate_min > c->rate_max) {
		if (c->rate_min_set && c->rate_max_set) {
			ti->error = "min_recovery_rate is above max_recovery_rate";
			goto bad;
		}
		if (c->rate_max_set)
			c->rate_min = c->rate_max;
		else
			c->rate_max = c->rate_min;
	}

	/*
	 * member bios: GR_NBUF stripe buffers', one superblock update's and
	 * one bitmap write's
	 */
	r = -ENOMEM;
	if (bioset_init(&c->bs, ndevs * (GR_NBUF + 2), 0, BIOSET_NEED_BVECS)) {
		ti->error = "Cannot allocate bio set";
		goto bad;
	}
	c->bs_ready = true;
	if (c->md) {
		for (i = 0; i < ndevs; i++) {
			if (!c->devs[i])
				continue;
			c->sb[i].page = alloc_page(GFP_KERNEL);
			if (!c->sb[i].page) {
				ti->error = "Cannot allocate superblock pages";
				goto bad;
			}
		}
		c->bm_scratch = alloc_page(GFP_KERNEL);
		if (!c->bm_scratch) {
			ti->error = "Cannot allocate superblock pages";
			goto bad;
		}
		r = gr_md_load(c, &ti->error);
		if (r)
			goto bad;
		r = -ENOMEM;
	}
	for (i = 0; i < GR_NBUF; i++) {
		for (s = 0; s < c->nslots + c->ndata; s++) {
			u8 *p = (u8 *)__get_free_pages(GFP_KERNEL,
						       get_order(GR_SEG));

			if (!p) {
				ti->error = "Cannot allocate stripe buffers";
				goto bad;
			}
			if (s < c->nslots)
				c->bufs[i].blk[s] = p;
			else
				c->bufs[i].nd[s - c->nslots] = p;
		}
		list_add(&c->bufs[i].node, &c->free_bufs);
	}
	c->wq = alloc_workqueue("kgpu_raid6", WQ_MEM_RECLAIM | WQ_UNBOUND, 0);
	c->mdwq = alloc_ordered_workqueue("kgpu_raid6_md", WQ_MEM_RECLAIM);
	c->syncwq = alloc_workqueue("kgpu_raid6_sync",
				    WQ_UNBOUND | WQ_MEM_RECLAIM, GR_LANES);
	if (!c->wq || !c->mdwq || !c->syncwq) {
		ti->error = "Cannot allocate workqueue";
		goto bad;
	}
	r = dm_set_target_max_io_len(ti, (sector_t)c->ndata << c->chunk_shift);
	if (r)
		goto bad;

	ti->num_flush_bios = ndevs;
	ti->per_io_data_size = sizeof(struct gr_io);
	return 0;
bad:
	gr_dtr(ti);
	return r;
}

static int gr_map(struct dm_target *ti, struct bio *bio)
{
	struct gr_ctx *c = ti->private;
	struct gr_io *io = dm_per_bio_data(bio, sizeof(struct gr_io));
	sector_t chunk, off, row;
	unsigned long failed;
	unsigned int j, m;
	struct gr_row r;

	io->c = c;
	io->bio = bio;
	io->remapped = false;
	io->flush = false;
	io->fix = false;
	if (unlikely(bio->bi_opf & REQ_PREFLUSH) && !bio_sectors(bio)) {
		/* one flush per member; a dead member's goes to a live one */
		m = dm_bio_get_target_bio_nr(bio);
		if (m >= c->ndevs || gr_dead(c, m)) {
			m = find_first_zero_bit(&c->failed, c->ndevs);
			if (m >= c->ndevs)
				return DM_MAPIO_KILL;
		}
		io->flush = true;
		io->member = m;
		bio_set_dev(bio, c->devs[m]->bdev);
		return DM_MAPIO_REMAPPED;
	}
	/*
	 * Discard, write-zeroes and secure erase are not advertised
	 * (num_discard_bios and friends are 0), so dm answers them with
	 * EOPNOTSUPP before they get here; anything else is refused.
	 */
	if (!bio_sectors(bio) ||
	    (bio_op(bio) != REQ_OP_READ && bio_op(bio) != REQ_OP_WRITE))
		return DM_MAPIO_KILL;

	atomic64_inc(&c->user_ios);	/* background work yields to it */
	io->sector = dm_target_offset(ti, bio->bi_iter.bi_sector);
	chunk = io->sector >> c->chunk_shift;
	off = io->sector & (c->chunk - 1);
	if (bio_data_dir(bio) == READ) {
		if (off + bio_sectors(bio) > c->chunk)
			dm_accept_partial_bio(bio, c->chunk - off);
		row = chunk;
		j = sector_div(row, c->ndata);
		gr_map_row(c, row, &r);
		m = r.data[j];
		io->iter = bio->bi_iter;
		io->bdev = bio->bi_bdev;
		failed = gr_failed_row(c, row);
		if (!test_bit(m, &failed)) {
			io->remapped = true;
			io->member = m;
			bio_set_dev(bio, c->devs[m]->bdev);
			bio->bi_iter.bi_sector = c->data_offset +
				(row << c->chunk_shift) + off;
			return DM_MAPIO_REMAPPED;
		}
	} else {
		io->iter = bio->bi_iter;
		io->bdev = bio->bi_bdev;
	}
	INIT_WORK(&io->work, gr_work);
	queue_work(c->wq, &io->work);
	return DM_MAPIO_SUBMITTED;
}

static int gr_end_io(struct dm_target *ti, struct bio *bio,
		     blk_status_t *error)
{
	struct gr_ctx *c = ti->private;
	struct gr_io *io = dm_per_bio_data(bio, sizeof(struct gr_io));

	if (!*error)
		return DM_ENDIO_DONE;
	if (io->flush) {
		/*
		 * A member that cannot flush is dead; the array carries on,
		 * once the superblocks say so (gr_flush_work, which ends the
		 * bio again: then io->flush is false).
		 */
		gr_fail(c, io->member);
		io->flush = false;
		bio->bi_status = BLK_STS_OK;
		INIT_WORK(&io->work, gr_flush_work);
		queue_work(c->wq, &io->work);
		return DM_ENDIO_INCOMPLETE;
	}
	if (!io->remapped)
		return DM_ENDIO_DONE;
	/*
	 * A healthy read failed: not a dead disk yet. gr_work rebuilds the
	 * block from the others and writes it back (gr_fix_block), then reads.
	 */
	io->remapped = false;
	io->fix = true;
	bio->bi_iter = io->iter;
	bio_set_dev(bio, io->bdev);
	bio->bi_status = BLK_STS_OK;
	INIT_WORK(&io->work, gr_work);
	queue_work(c->wq, &io->work);
	return DM_ENDIO_INCOMPLETE;
}

/*
 * Status, dm-raid's fields first, then kgpu's counters:
 *   <raid_type> <#devs> <health> <sync_ratio> <sync_action> <mismatch_cnt>
 *   <data_offset> <journal> <stripes_written> <degraded_reads> <gpu>
 *   <helper_cpu> <kernel>
 * raid_type: dm-raid's name of the layout (raid6_ls, raid6_zr, ...);
 * health: per member, D (dead, missing or stale), a (alive, the array not
 * in sync yet, or being rebuilt), A (alive and in sync); sync_ratio:
 * per-member sectors done of the resync, rebuild or check running, or in
 * sync; sync_action: idle, frozen, resync, recover, check or repair; mismatch_cnt: sectors, as md's; journal: "-"
 * (none); the last three count P/Q and recovery computations done by the
 * helper's GPU, the helper's CPU and the kernel's raid6_pq.
 */
static void gr_status(struct dm_target *ti, status_type_t type,
		      unsigned int status_flags, char *result,
		      unsigned int maxlen)
{
	struct gr_ctx *c = ti->private;
	sector_t total = c->sync_rows << c->chunk_shift, cur;
	sector_t cp = READ_ONCE(c->resync_cp);
	int action = READ_ONCE(c->action);
	unsigned int sz = 0, i, nopt;
	unsigned long rb;

	switch (type) {
	case STATUSTYPE_INFO:
		DMEMIT("%s %u ", c->layout->dmraid, c->ndevs);
		for (i = 0; i < c->ndevs; i++)
			DMEMIT("%c", gr_dead(c, i) ? 'D' :
			       cp == GR_IN_SYNC &&
			       !test_bit(i, &c->rebuilding) ? 'A' : 'a');
		if (action != GR_IDLE)
			cur = READ_ONCE(c->sync_pos);
		else if (READ_ONCE(c->rebuilding))
			cur = READ_ONCE(c->rec_cp);
		else
			cur = cp == GR_IN_SYNC ? total : cp;
		DMEMIT(" %llu/%llu %s %llu %llu -", (unsigned long long)cur,
		       (unsigned long long)total,
		       action == GR_IDLE && c->frozen ? "frozen" :
		       gr_action_name[action],
		       (unsigned long long)atomic64_read(&c->mismatches),
		       (unsigned long long)c->data_offset);
		DMEMIT(" %llu %llu %llu %llu %llu",
		       (unsigned long long)atomic64_read(&c->stripes_written),
		       (unsigned long long)atomic64_read(&c->degraded_reads),
		       (unsigned long long)atomic64_read(&c->by_gpu),
		       (unsigned long long)atomic64_read(&c->by_helper_cpu),
		       (unsigned long long)atomic64_read(&c->by_kernel));
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%s %u %u", c->layout->name, c->chunk, c->ndevs);
		for (i = 0; i < c->ndevs; i++)
			DMEMIT(" %s", c->devs[i] ? c->devs[i]->name : "-");
		rb = READ_ONCE(c->rebuilding) & c->rebuild_req;
		nopt = 2 * c->data_offset_set + c->md + 2 * c->rate_min_set +
		       2 * c->rate_max_set + 2 * hweight_long(rb);
		if (nopt)
			DMEMIT(" %u", nopt);
		if (c->data_offset_set)
			DMEMIT(" data_offset %llu",
			       (unsigned long long)c->data_offset);
		if (c->md)
			DMEMIT(" md_superblocks");
		for_each_set_bit(i, &rb, c->ndevs)
			DMEMIT(" rebuild %u", i);
		if (c->rate_min_set)
			DMEMIT(" min_recovery_rate %u", c->rate_min);
		if (c->rate_max_set)
			DMEMIT(" max_recovery_rate %u", c->rate_max);
		break;
	case STATUSTYPE_IMA:
		*result = '\0';
		break;
	}
}

/*
 * Messages, as dm-raid's:
 *   check	read every stripe, recompute P/Q, count mismatches (sectors)
 *   repair	the same, and rewrite P/Q where they differ
 *   idle	stop a check or repair (a resync the array needs goes on)
 *   frozen	stop all background work, resync included, until "idle"
 */
static int gr_message(struct dm_target *ti, unsigned int argc, char **argv,
		      char *result, unsigned int maxlen)
{
	struct gr_ctx *c = ti->private;
	int r = 0, action;

	if (argc != 1) {
		DMWARN("a message is one word: check, repair, idle or frozen");
		return -EINVAL;
	}
	if (!strcasecmp(argv[0], "check")) {
		action = GR_CHECK;
	} else if (!strcasecmp(argv[0], "repair")) {
		action = GR_REPAIR;
	} else if (!strcasecmp(argv[0], "idle") ||
		   !strcasecmp(argv[0], "frozen")) {
		action = GR_IDLE;
	} else {
		DMWARN("unrecognised message '%s' (check, repair, idle, frozen)",
		       argv[0]);
		return -EINVAL;
	}

	mutex_lock(&c->sync_lock);
	if (action == GR_IDLE) {
		gr_sync_stop(c);
		c->frozen = !strcasecmp(argv[0], "frozen");
		gr_sync_kick(c);
	} else if (c->suspended) {
		DMWARN("%s: the array is suspended", argv[0]);
		r = -EBUSY;
	} else if (READ_ONCE(c->action) != GR_IDLE) {
		DMWARN("%s: %s is running ('idle' stops a check or repair)",
		       argv[0], gr_action_name[READ_ONCE(c->action)]);
		r = -EBUSY;
	} else if (READ_ONCE(c->rebuilding) & ~READ_ONCE(c->failed)) {
		DMWARN("%s: a member is being rebuilt ('idle' resumes it)",
		       argv[0]);
		r = -EBUSY;
	} else if (READ_ONCE(c->resync_cp) != GR_IN_SYNC) {
		DMWARN("%s: the array needs a resync first ('idle' starts it)",
		       argv[0]);
		r = -EBUSY;
	} else {
		c->frozen = false;
		gr_sync_start(c, action);
	}
	mutex_unlock(&c->sync_lock);
	return r;
}

static void gr_presuspend(struct dm_target *ti)
{
	struct gr_ctx *c = ti->private;

	mutex_lock(&c->sync_lock);
	c->suspended = true;
	gr_sync_stop(c);
	mutex_unlock(&c->sync_lock);
}

/* No I/O in flight: the array is clean, with its resync checkpoint. */
static void gr_postsuspend(struct dm_target *ti)
{
	struct gr_ctx *c = ti->private;

	cancel_delayed_work_sync(&c->safemode);
	cancel_delayed_work_sync(&c->bm_work);
	if (c->bm)
		gr_bm_clear(c, true);
	mutex_lock(&c->sb_lock);
	if (!c->in_sync || c->written_cp != c->resync_cp ||
	    (c->failed & ~c->recorded)) {
		c->in_sync = true;
		gr_sb_update(c);
	}
	mutex_unlock(&c->sb_lock);
}

/*
 * A table loaded while another ran read the superblocks before that one's
 * last update: read them again before the first resume.
 */
static int gr_preresume(struct dm_target *ti)
{
	struct gr_ctx *c = ti->private;
	char *error = NULL;
	int r;

	if (!c->md || c->activated)
		return 0;
	mutex_lock(&c->sb_lock);
	r = gr_md_load(c, &error);
	mutex_unlock(&c->sb_lock);
	if (r)
		DMERR("%s: cannot resume: %s",
		      dm_table_device_name(ti->table), error);
	return r;
}

static void gr_resume(struct dm_target *ti)
{
	struct gr_ctx *c = ti->private;

	c->activated = true;
	mutex_lock(&c->sb_lock);
	if (c->sb_new) {		/* the rebuilt members' superblocks */
		gr_sb_update(c);
		c->sb_new = false;
	}
	mutex_unlock(&c->sb_lock);
	gr_sb_settle(c);
	if (c->bm)
		gr_bm_flush(c);		/* what the load found, to every member */
	mutex_lock(&c->sync_lock);
	c->suspended = false;
	gr_sync_kick(c);
	mutex_unlock(&c->sync_lock);
	if (c->bm)
		queue_delayed_work(c->mdwq, &c->bm_work, c->bm_sleep * HZ);
}

static int gr_iterate_devices(struct dm_target *ti,
			      iterate_devices_callout_fn fn, void *data)
{
	struct gr_ctx *c = ti->private;
	unsigned int i;
	int r = 0;

	for (i = 0; i < c->ndevs && !r; i++)
		if (c->devs[i])
			r = fn(ti, c->devs[i], c->data_offset,
			       c->rows << c->chunk_shift, data);
	return r;
}

static void gr_io_hints(struct dm_target *ti, struct queue_limits *limits)
{
	struct gr_ctx *c = ti->private;

	limits->io_min = c->chunk << 9;
	limits->io_opt = (c->chunk << 9) * c->ndata;
}

static struct target_type gr_target = {
	.name		 = "gpu-raid6",
	.version	 = {1, 1, 0},
	.module		 = THIS_MODULE,
	.ctr		 = gr_ctr,
	.dtr		 = gr_dtr,
	.map		 = gr_map,
	.end_io		 = gr_end_io,
	.presuspend	 = gr_presuspend,
	.postsuspend	 = gr_postsuspend,
	.preresume	 = gr_preresume,
	.resume		 = gr_resume,
	.status		 = gr_status,
	.message	 = gr_message,
	.iterate_devices = gr_iterate_devices,
	.io_hints	 = gr_io_hints,
};

static int __init gr_init(void)
{
	int r;

	gr_zero = kzalloc(GR_SEG, GFP_KERNEL);
	if (!gr_zero)
		return -ENOMEM;
	r = dm_register_target(&gr_target);
	if (r) {
		DMERR("register failed %d", r);
		kfree(gr_zero);
	}
	return r;
}

static void __exit gr_exit(void)
{
	dm_unregister_target(&gr_target);
	kfree(gr_zero);
}

module_init(gr_init);
module_exit(gr_exit);

MODULE_DESCRIPTION(DM_NAME " md-compatible RAID6 with P/Q offloaded through kgpu");
MODULE_AUTHOR("kgpu");
MODULE_LICENSE("GPL");
