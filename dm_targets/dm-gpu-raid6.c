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
#include <linux/mutex.h>
#include <linux/raid/pq.h>
#include <linux/slab.h>
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
	int algorithm;
	bool ddf;		/* Q over all device slots, P and Q as zeros */
};

static const struct gr_layout gr_layouts[] = {
	{ "left-asymmetric",	GR_LEFT_ASYMMETRIC,	  false },
	{ "right-asymmetric",	GR_RIGHT_ASYMMETRIC,	  false },
	{ "left-symmetric",	GR_LEFT_SYMMETRIC,	  false },
	{ "right-symmetric",	GR_RIGHT_SYMMETRIC,	  false },
	{ "raid6_zr",		GR_ROTATING_ZERO_RESTART, true },
	{ "ddf-zero-restart",	GR_ROTATING_ZERO_RESTART, true },
	{ "raid6_nr",		GR_ROTATING_N_RESTART,	  true },
	{ "ddf-N-restart",	GR_ROTATING_N_RESTART,	  true },
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
	struct gr_batch batch;
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
	unsigned long failed;	/* missing or dead; atomic bitops */

	struct workqueue_struct *wq;
	struct bio_set bs;
	bool bs_ready;
	struct mutex locks[GR_LOCKS];
	spinlock_t buf_lock;
	struct list_head free_bufs;
	wait_queue_head_t buf_wait;
	struct gr_buf bufs[GR_NBUF];

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

/* len bytes at column sector col of row on member m, from or into buf. */
static void gr_mio(struct gr_ctx *c, struct gr_batch *b, unsigned int m,
		   blk_opf_t opf, sector_t row, sector_t col, u8 *buf,
		   unsigned int len)
{
	struct bio *bio;

	bio = bio_alloc_bioset(c->devs[m]->bdev, 1, opf, GFP_NOIO, &c->bs);
	bio->bi_iter.bi_sector = c->data_offset + (row << c->chunk_shift) + col;
	__bio_add_page(bio, virt_to_page(buf), len, offset_in_page(buf));
	b->mio[m].b = b;
	b->mio[m].member = m;
	bio->bi_private = &b->mio[m];
	bio->bi_end_io = gr_mio_end;
	atomic_inc(&b->pending);
	submit_bio_noacct(bio);
}

/* Wait for the batch; mark the members that failed. True if none did. */
static bool gr_batch_wait(struct gr_ctx *c, struct gr_batch *b)
{
	unsigned int m;

	if (!atomic_dec_and_test(&b->pending))
		wait_for_completion_io(&b->done);
	for_each_set_bit(m, &b->errors, c->ndevs)
		gr_fail(c, m);
	return !b->errors;
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

/* The dead slots of a row, at most two; false if more. */
static bool gr_lost(struct gr_ctx *c, const struct gr_row *r,
		    unsigned int *a, unsigned int *b)
{
	unsigned int m, n = 0;

	*a = *b = GR_NONE;
	for_each_set_bit(m, &c->failed, c->ndevs) {
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
	if (!gr_lost(c, r, &fa, &fb))
		return -EIO;
	gr_ptrs(c, buf, r, ptrs);
	rec = false;
	rmw = false;
	if (!READ_ONCE(c->failed)) {
		unsigned int rcw_reads = 0;

		for (j = 0; j < k; j++)
			if (wlo[j] != ulo || whi[j] != uhi)
				rcw_reads++;
		/*
		 * Read-modify-write reads the old data it overwrites, P and
		 * Q; reconstruct-write the data it does not overwrite. A tie
		 * goes to read-modify-write, which reads fewer bytes (only
		 * the columns it writes).
		 */
		rmw = nw + 2 <= rcw_reads;
	} else {
		for (j = 0; j < k; j++)
			if (gr_dead(c, r->data[j]) &&
			    (wlo[j] != ulo || whi[j] != uhi))
				rec = true;
	}

	/* read */
	gr_batch_start(b);
	for (j = 0; j < k; j++) {
		bool full = wlo[j] == ulo && whi[j] == uhi;
		bool written = whi[j] > wlo[j];

		m = r->data[j];
		if (gr_dead(c, m))
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
			if (!gr_dead(c, r->phys[s]))
				gr_mio(c, b, r->phys[s], REQ_OP_READ, row, ulo,
				       buf->blk[s], len);
	}
	if (!gr_batch_wait(c, b))
		goto redo;

	/* compute */
	if (rmw) {
		/*
		 * The written blocks become old ^ new (zero outside the
		 * columns written), then one P/Q delta update (RAID6_PQD).
		 */
		for (j = 0; j < k; j++) {
			u8 *blk;

			s = r->slot[r->data[j]];
			if (whi[j] <= wlo[j]) {
				ptrs[s] = gr_zero;
				continue;
			}
			blk = buf->blk[s];
			memset(blk, 0, (wlo[j] - ulo) << 9);
			memset(blk + ((whi[j] - ulo) << 9), 0,
			       (uhi - whi[j]) << 9);
			gr_copy_bio(io, (row0 + ((sector_t)j << c->chunk_shift) +
					 wlo[j] - bs) << 9,
				    blk + ((wlo[j] - ulo) << 9),
				    (whi[j] - wlo[j]) << 9, GR_XOR_FROM_BIO);
			lo = min(lo, s);
			hi = max(hi, s);
		}
		gr_compute(c, KGPU_SVC_RAID6_PQD, ptrs, len, lo, hi);
	} else if (rec) {
		gr_compute(c, KGPU_SVC_RAID6_REC, ptrs, len, fa, fb);
	}
	for (j = 0; j < k; j++) {
		if (whi[j] <= wlo[j])
			continue;
		gr_copy_bio(io, (row0 + ((sector_t)j << c->chunk_shift) +
				 wlo[j] - bs) << 9,
			    buf->blk[r->slot[r->data[j]]] + ((wlo[j] - ulo) << 9),
			    (whi[j] - wlo[j]) << 9, GR_FROM_BIO);
	}
	if (!rmw)
		gr_compute(c, KGPU_SVC_RAID6_GEN, ptrs, len, GR_NONE, GR_NONE);

	/* write the new data, P and Q */
	gr_batch_start(b);
	for (j = 0; j < k; j++) {
		m = r->data[j];
		if (whi[j] <= wlo[j] || gr_dead(c, m))
			continue;
		gr_mio(c, b, m, wopf, row, wlo[j],
		       buf->blk[r->slot[m]] + ((wlo[j] - ulo) << 9),
		       (whi[j] - wlo[j]) << 9);
	}
	for (s = P; s <= Q; s++)
		if (!gr_dead(c, r->phys[s]))
			gr_mio(c, b, r->phys[s], wopf, row, ulo, buf->blk[s],
			       len);
	gr_batch_wait(c, b);
	/* a member lost now is rebuilt from the others, which hold the new data */
	return gr_nfailed(c) > 2 ? -EIO : 0;
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
	bool dead, xor;

redo:
	dead = gr_dead(c, m);
	if (dead && !gr_lost(c, r, &fa, &fb))
		return -EIO;
	/* lost: this block, perhaps Q; P alive */
	xor = dead && (fb == GR_NONE || fb == Q || fa == Q);
	gr_batch_start(b);
	for (i = 0; i < c->ndevs; i++) {
		if (gr_dead(c, i) || (i != m && !dead) ||
		    (xor && r->slot[i] == Q))
			continue;
		gr_mio(c, b, i, REQ_OP_READ, row, col, buf->blk[r->slot[i]],
		       len);
	}
	if (!gr_batch_wait(c, b))
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
	lock = &c->locks[row % GR_LOCKS];
	mutex_lock(lock);
	buf = gr_buf_get(c);
	if (bio_data_dir(bio) == READ) {
		/* one chunk: map() split it */
		atomic64_inc(&c->degraded_reads);
		for (col = off; col < off + nsec && !ret; col += n) {
			n = min_t(sector_t, c->seg_sectors, off + nsec - col);
			ret = gr_read_seg(c, io, buf, &r, row, j, col, n,
					  (col - off) << 9);
		}
	} else {
		/* columns that the bio touches: all of them if it spans chunks */
		if (off + nsec <= c->chunk) {
			col = off;
			end = off + nsec;
		} else {
			col = 0;
			end = c->chunk;
		}
		for (; col < end && !ret; col += n) {
			n = min_t(sector_t, c->seg_sectors, end - col);
			ret = gr_write_seg(c, io, buf, &r, row, col, n);
		}
		atomic64_inc(&c->stripes_written);
	}
	gr_buf_put(c, buf);
	mutex_unlock(lock);
	bio->bi_status = ret ? BLK_STS_IOERR : BLK_STS_OK;
	bio_endio(bio);
}

/* ---- target --------------------------------------------------------------- */

static void gr_dtr(struct dm_target *ti)
{
	struct gr_ctx *c = ti->private;
	unsigned int i, s;

	if (!c)
		return;
	if (c->wq)
		destroy_workqueue(c->wq);
	for (i = 0; i < GR_NBUF; i++)
		for (s = 0; s < GR_MAX_SLOTS; s++)
			if (c->bufs[i].blk[s])
				free_pages((unsigned long)c->bufs[i].blk[s],
					   get_order(GR_SEG));
	if (c->bs_ready)
		bioset_exit(&c->bs);
	for (i = 0; i < GR_MAX_DEVS; i++)
		if (c->devs[i])
			dm_put_device(ti, c->devs[i]);
	for (i = 0; i < GR_LOCKS; i++)
		mutex_destroy(&c->locks[i]);
	kfree(c);
	ti->private = NULL;
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
 *
 * The target is at most #devs - 2 data chunks per row times the rows that
 * fit the smallest member after data_offset.
 */
static int gr_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	static const struct dm_arg _args[] = {
		{0, 2, "Invalid number of optional parameters"},
	};
	struct dm_arg_set as = { .argc = argc, .argv = argv };
	unsigned long long v;
	sector_t min_size = ~(sector_t)0, rows;
	unsigned int i, s, nopt, ndevs;
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
			arg = dm_shift_arg(&as);
			if (!strcasecmp(arg, "data_offset")) {
				if (!nopt--) {
					ti->error = "data_offset needs a value";
					goto bad;
				}
				arg = dm_shift_arg(&as);
				if (sscanf(arg, "%llu%c", &v, &dummy) != 1) {
					ti->error = "Invalid data_offset";
					goto bad;
				}
				c->data_offset = v;
				c->data_offset_set = true;
			} else {
				ti->error = "Unknown optional parameter";
				goto bad;
			}
		}
	}
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

	r = -ENOMEM;
	if (bioset_init(&c->bs, ndevs * GR_NBUF, 0, BIOSET_NEED_BVECS)) {
		ti->error = "Cannot allocate bio set";
		goto bad;
	}
	c->bs_ready = true;
	for (i = 0; i < GR_NBUF; i++) {
		for (s = 0; s < c->nslots; s++) {
			c->bufs[i].blk[s] = (u8 *)__get_free_pages(GFP_KERNEL,
							get_order(GR_SEG));
			if (!c->bufs[i].blk[s]) {
				ti->error = "Cannot allocate stripe buffers";
				goto bad;
			}
		}
		list_add(&c->bufs[i].node, &c->free_bufs);
	}
	c->wq = alloc_workqueue("kgpu_raid6", WQ_MEM_RECLAIM | WQ_UNBOUND, 0);
	if (!c->wq) {
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
	unsigned int j, m;
	struct gr_row r;

	io->c = c;
	io->bio = bio;
	io->remapped = false;
	io->flush = false;
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
		if (!gr_dead(c, m)) {
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
		/* a member that cannot flush is dead; the array carries on */
		gr_fail(c, io->member);
		if (gr_nfailed(c) <= 2)
			*error = BLK_STS_OK;
		return DM_ENDIO_DONE;
	}
	if (!io->remapped)
		return DM_ENDIO_DONE;
	/* a healthy read failed: the member is dead, rebuild from the rest */
	io->remapped = false;
	gr_fail(c, io->member);
	bio->bi_iter = io->iter;
	bio_set_dev(bio, io->bdev);
	bio->bi_status = BLK_STS_OK;
	INIT_WORK(&io->work, gr_work);
	queue_work(c->wq, &io->work);
	return DM_ENDIO_INCOMPLETE;
}

/*
 * Status:
 *   <#devs> <health> <stripes_written> <degraded_reads> <gpu> <helper_cpu>
 *   <kernel>
 * health: one character per member, A (alive) or D (dead or missing);
 * the last three count P/Q and recovery computations done by the helper's
 * GPU, the helper's CPU and the kernel's raid6_pq.
 */
static void gr_status(struct dm_target *ti, status_type_t type,
		      unsigned int status_flags, char *result,
		      unsigned int maxlen)
{
	struct gr_ctx *c = ti->private;
	unsigned int sz = 0, i;

	switch (type) {
	case STATUSTYPE_INFO:
		DMEMIT("%u ", c->ndevs);
		for (i = 0; i < c->ndevs; i++)
			DMEMIT("%c", gr_dead(c, i) ? 'D' : 'A');
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
		if (c->data_offset_set)
			DMEMIT(" 2 data_offset %llu",
			       (unsigned long long)c->data_offset);
		break;
	case STATUSTYPE_IMA:
		*result = '\0';
		break;
	}
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
	.version	 = {1, 0, 0},
	.module		 = THIS_MODULE,
	.ctr		 = gr_ctr,
	.dtr		 = gr_dtr,
	.map		 = gr_map,
	.end_io		 = gr_end_io,
	.status		 = gr_status,
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
