// SPDX-License-Identifier: GPL-2.0
/*
 * gpu-crypt: dm-crypt's "crypt" target for aes-xts-plain64 and
 * aes-xts-plain, with the AES-XTS done by the kgpu helper (a GPU) when one
 * is attached, and by the kernel's "xts(aes)" otherwise. The table line is
 * dm-crypt's and so are the bytes on disk: a volume written through either
 * target reads back through the other.
 *
 * Data path. Every data bio is cut to at most GC_MAX_IO bytes and handed
 * to the crypt workqueue, which picks a path:
 *
 *  - offload (a helper is attached, the bio is at least the crossover and
 *    the key has a slot): a request in the kgpu region.
 *    Write: the plaintext is copied once into the region, the helper
 *    encrypts it in place, and the clone bio writes the region's own pages.
 *    Read: the clone bio reads into the region's pages, the helper decrypts
 *    in place, and the plaintext is copied once into the caller's pages.
 *    Where the region has no struct pages (kgpu_data_page() says NULL) the
 *    clone uses bounce pages from our mempool and one more copy.
 *  - CPU: the kernel's xts(aes). Write: encrypt the caller's pages into
 *    pages from our mempool, write those. Read: read into the caller's
 *    pages and decrypt them in place, as dm-crypt does.
 *
 * A request the helper cannot finish (no helper, timeout, helper death, an
 * error) comes back as KGPU_FALLBACK and is redone on the CPU from data we
 * still have: a write from the caller's pages, a read by reading the sectors
 * again into the caller's pages. Either way the result is the same bytes.
 *
 * Contexts. kgpu calls our done() in the helper's completion ioctl (or
 * at a timeout); it never sleeps: it gives back what a failed request's io
 * holds and queues work. Three workqueues: "crypt" starts I/O (it may wait
 * for region space, our page mempool, or the CPU cipher), "io" finishes it
 * (copies out, submits clones made ready by the crypt queue, puts
 * requests, ends bios), never allocates, and never waits on anything the
 * crypt queue holds, so region space and pages are always given back;
 * "fb" redoes on the CPU what the helper did not answer, holding nothing
 * of the pools until it runs (gc_kgpu_done()). All are WQ_MEM_RECLAIM:
 * writeback through this target makes progress under memory pressure.
 * Nothing in the I/O path allocates outside per-bio data, the bio_set
 * (64 in reserve, as dm-crypt) and the page mempool (256 pages).
 */
#include <crypto/skcipher.h>
#include <keys/user-type.h>
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/crypto.h>
#include <linux/ctype.h>
#include <linux/device-mapper.h>
#include <linux/key.h>
#include <linux/mempool.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/random.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/workqueue.h>

#include "kgpu.h"

#define DM_MSG_PREFIX "gpu-crypt"

/* Bytes of one clone at most: a bio of BIO_MAX_VECS pages. */
#define GC_MAX_IO	(BIO_MAX_VECS << PAGE_SHIFT)
#define GC_MAX_PAGES	BIO_MAX_VECS
#define GC_MIN_IOS	64	/* the bio_set's reserve, as dm-crypt's */
/* Scatterlist entries for one data unit (4096 bytes over 512-byte bvecs). */
#define GC_UNIT_SEGS	9

static bool bounce;
module_param(bounce, bool, 0644);
MODULE_PARM_DESC(bounce,
		 "Bounce region data through our own pages, as for a region without struct pages (device memory); for tests");

enum gc_flags {
	GC_ALLOW_DISCARDS,
	GC_SAME_CPU,		/* dm-crypt's tuning flags: accepted, shown */
	GC_SUBMIT_FROM_CRYPT,
	GC_NO_READ_WQ,
	GC_NO_WRITE_WQ,
	GC_IV_LARGE_SECTORS,
	GC_KEY_VALID,
};

struct gc_ctx {
	struct dm_dev *dev;
	sector_t start;		/* data offset on dev, 512-byte sectors */
	u64 iv_offset;
	unsigned int sector_size;
	unsigned int sector_shift;	/* log2(sector_size / 512) */
	u8 iv_mode;		/* KGPU_IV_PLAIN64 or KGPU_IV_PLAIN */
	unsigned long flags;

	char *cipher_string;	/* as given, for the table line */
	char *key_string;	/* "logon:desc" of a keyring key, or NULL */
	unsigned int key_size;
	u8 *key;		/* a hex key (K1 || K2, key_size bytes); zeros for a keyring key */
	int key_slot;		/* kgpu key slot, or -1: CPU only */

	struct crypto_skcipher *tfm;
	struct bio_set bs;
	mempool_t page_pool;
	struct mutex page_lock;	/* one multi-page allocation at a time */
	struct workqueue_struct *crypt_wq;
	struct workqueue_struct *io_wq;
	struct workqueue_struct *fb_wq;	/* fallbacks: see gc_kgpu_done() */

	/* Requests (bios after splitting) by who did the crypto. */
	atomic64_t n_gpu;
	atomic64_t n_helper_cpu;
	atomic64_t n_kernel;
	atomic64_t n_fallback;	/* offered to the helper, came back */
};

/* Which clone is in flight for an io. */
enum gc_stage {
	GC_W_CPU,		/* ciphertext from the kernel's cipher */
	GC_W_GPU,		/* ciphertext from the helper, region pages */
	GC_R_CPU,		/* read into the caller's pages */
	GC_R_GPU,		/* read into the region (or bounce pages) */
};

/* Per-bio data: dm allocates it with the bio, so mapping never allocates. */
struct gc_io {
	struct gc_ctx *cc;
	struct bio *base;
	struct bvec_iter iter;	/* the part of base this io covers */
	sector_t sector;	/* target-relative, 512-byte units */
	struct kgpu_request *req;
	struct bio *clone;	/* a finished read clone, for the io queue */
	struct work_struct work;
	blk_status_t error;
	u8 stage;		/* enum gc_stage */
	bool own_pages;		/* the clone carries pages of our pool */
	u8 iv[16];
	/* struct skcipher_request and its context follow, aligned */
};

static struct skcipher_request *gc_skreq(struct gc_io *io)
{
	return (void *)PTR_ALIGN((u8 *)(io + 1),
				 crypto_tfm_ctx_alignment());
}

static size_t gc_iosize(struct gc_ctx *cc)
{
	return ALIGN(sizeof(struct gc_io) + crypto_tfm_ctx_alignment() +
		     sizeof(struct skcipher_request) +
		     crypto_skcipher_reqsize(cc->tfm), ARCH_DMA_MINALIGN);
}

static void gc_cpu_read(struct gc_io *io);
static void gc_write_cpu(struct gc_io *io);

/* ---- keys ------------------------------------------------------------- */

static int gc_hex_key(u8 *key, unsigned int size, const char *hex)
{
	if (strlen(hex) != size * 2 || hex2bin(key, hex, size))
		return -EINVAL;
	return 0;
}

/*
 * ":<size>:<logon|user>:<description>", as dm-crypt takes it. The key
 * material is copied out under the key's semaphore and the key dropped.
 */
static int gc_keyring_key(struct gc_ctx *cc, const char *spec, u8 *key,
			  unsigned int *key_size, char **error)
{
	const struct user_key_payload *ukp;
	struct key_type *type;
	const char *desc;
	unsigned int size;
	struct key *k;
	char dummy;
	int ret;

	if (sscanf(spec, ":%u:%c", &size, &dummy) != 2 ||
	    (size != 32 && size != 64)) {
		*error = "Invalid keyring key size (32 or 64 bytes)";
		return -EINVAL;
	}
	desc = strchr(spec + 1, ':') + 1;
	if (!strncmp(desc, "logon:", 6)) {
		type = &key_type_logon;
		desc += 6;
	} else if (!strncmp(desc, "user:", 5)) {
		type = &key_type_user;
		desc += 5;
	} else {
		*error = "Invalid keyring key type (logon or user)";
		return -EINVAL;
	}
	if (!*desc) {
		*error = "Empty keyring key description";
		return -EINVAL;
	}
	if (cc->key_size && size != cc->key_size) {
		*error = "Key size cannot change";
		return -EINVAL;
	}
	k = request_key(type, desc, NULL);
	if (IS_ERR(k)) {
		*error = "Keyring key not found";
		return -ENOKEY;
	}
	down_read(&k->sem);
	ukp = user_key_payload_locked(k);
	if (!ukp) {
		*error = "Keyring key was revoked";
		ret = -EKEYREVOKED;
	} else if (ukp->datalen != size) {
		*error = "Keyring key has the wrong size";
		ret = -EINVAL;
	} else {
		memcpy(key, ukp->data, size);
		ret = 0;
	}
	up_read(&k->sem);
	key_put(k);
	*key_size = size;
	return ret;
}

/*
 * Takes a hex or keyring key into the cipher and the key slot. Only a hex
 * key is kept in cc->key as well (the table line shows it, as dm-crypt's);
 * of a keyring key no raw copy stays behind here, as in dm-crypt: the
 * table shows its description, and the stack copy is wiped.
 */
static int gc_set_key(struct gc_ctx *cc, const char *spec, char **error)
{
	char *key_string = NULL;
	unsigned int size;
	u8 key[64];
	int ret;

	if (spec[0] == ':') {
		ret = gc_keyring_key(cc, spec, key, &size, error);
		if (ret)
			goto out;
		key_string = kstrdup(strchr(spec + 1, ':') + 1, GFP_KERNEL);
		if (!key_string) {
			*error = "Cannot allocate key description";
			ret = -ENOMEM;
			goto out;
		}
	} else {
		size = strlen(spec) / 2;
		if ((size != 32 && size != 64) || (cc->key_size &&
						  size != cc->key_size)) {
			*error = cc->key_size ? "Key size cannot change" :
				 "Invalid key size (64 or 128 hex digits)";
			ret = -EINVAL;
			goto out;
		}
		if (gc_hex_key(key, size, spec)) {
			*error = "Key is not hex";
			ret = -EINVAL;
			goto out;
		}
	}
	ret = crypto_skcipher_setkey(cc->tfm, key, size);
	if (ret) {
		*error = "Cipher refused the key";
		kfree_sensitive(key_string);
		goto out;
	}
	kfree_sensitive(cc->key_string);
	cc->key_string = key_string;
	cc->key_size = size;
	memzero_explicit(cc->key, 64);
	if (!key_string)
		memcpy(cc->key, key, size);
	if (cc->key_slot < 0)
		cc->key_slot = kgpu_key_get();	/* none free: CPU only */
	if (cc->key_slot >= 0 && kgpu_key_set(cc->key_slot, key, size)) {
		kgpu_key_put(cc->key_slot);
		cc->key_slot = -1;
	}
	set_bit(GC_KEY_VALID, &cc->flags);
out:
	memzero_explicit(key, sizeof(key));
	return ret;
}

static void gc_wipe_key(struct gc_ctx *cc)
{
	clear_bit(GC_KEY_VALID, &cc->flags);
	if (cc->key_slot >= 0)
		kgpu_key_put(cc->key_slot);	/* wipes the slot */
	cc->key_slot = -1;
	if (cc->key)
		memzero_explicit(cc->key, 64);
	kfree_sensitive(cc->key_string);	/* the table shows zeros, as dm-crypt's */
	cc->key_string = NULL;
	if (cc->tfm && cc->key_size) {
		u8 junk[64];

		/* Replace the expanded key inside the cipher as well. */
		get_random_bytes(junk, sizeof(junk));
		crypto_skcipher_setkey(cc->tfm, junk, cc->key_size);
		memzero_explicit(junk, sizeof(junk));
	}
}

/* ---- pages, clones ------------------------------------------------------ */

static void gc_free_clone_pages(struct gc_ctx *cc, struct bio *clone)
{
	struct bio_vec *bv;
	struct bvec_iter_all iall;

	bio_for_each_segment_all(bv, clone, iall)
		mempool_free(bv->bv_page, &cc->page_pool);
}

/*
 * A clone of @len bytes with pages of our pool. Taking many pages from a
 * mempool can deadlock when two takers each hold half of its reserve, so
 * the blocking attempt is made by one taker at a time (dm-crypt's scheme).
 */
static struct bio *gc_alloc_own(struct gc_io *io, blk_opf_t opf,
				unsigned int len)
{
	struct gc_ctx *cc = io->cc;
	unsigned int nr = DIV_ROUND_UP(len, PAGE_SIZE), i;
	gfp_t gfp = GFP_NOWAIT | __GFP_NOWARN;
	bool locked = false;
	struct bio *clone;

again:
	clone = bio_alloc_bioset(cc->dev->bdev, nr, opf, GFP_NOIO, &cc->bs);
	for (i = 0; i < nr; i++) {
		unsigned int n = min_t(unsigned int, len - i * PAGE_SIZE,
				       PAGE_SIZE);
		struct page *page = mempool_alloc(&cc->page_pool, gfp);

		if (!page) {
			gc_free_clone_pages(cc, clone);
			bio_put(clone);
			mutex_lock(&cc->page_lock);
			locked = true;
			gfp = GFP_NOIO;
			goto again;
		}
		__bio_add_page(clone, page, n, 0);
	}
	if (locked)
		mutex_unlock(&cc->page_lock);
	return clone;
}

static void gc_endio_clone(struct bio *clone);

/* Send a clone of @io down; @stage tells gc_endio_clone() what it was. */
static void gc_submit_clone(struct gc_io *io, struct bio *clone,
			    enum gc_stage stage)
{
	io->stage = stage;
	clone->bi_iter.bi_sector = io->cc->start + io->sector;
	clone->bi_ioprio = io->base->bi_ioprio;
	clone->bi_private = io;
	clone->bi_end_io = gc_endio_clone;
	submit_bio_noacct(clone);
}

/* ---- the CPU cipher ----------------------------------------------------- */

static void gc_iv(struct gc_ctx *cc, u8 *iv, u64 sector)
{
	__le64 v = cpu_to_le64(cc->iv_mode == KGPU_IV_PLAIN ?
			       (u32)sector : sector);

	memset(iv, 0, 16);
	memcpy(iv, &v, sizeof(v));
}

/* The IV sector of the first data unit of @io, as dm-crypt counts. */
static u64 gc_iv_sector(struct gc_io *io)
{
	struct gc_ctx *cc = io->cc;
	u64 s = io->sector + cc->iv_offset;

	if (test_bit(GC_IV_LARGE_SECTORS, &cc->flags))
		s >>= cc->sector_shift;
	return s;
}

/* Gather @len bytes of @bio at @it into @sg; false if it takes too many. */
static bool gc_sg_from_bio(struct scatterlist *sg, struct bio *bio,
			   struct bvec_iter *it, unsigned int len)
{
	unsigned int n = 0;

	sg_init_table(sg, GC_UNIT_SEGS);
	while (len) {
		struct bio_vec bv = bio_iter_iovec(bio, *it);
		unsigned int take = min(len, bv.bv_len);

		if (n == GC_UNIT_SEGS)
			return false;
		sg_set_page(&sg[n++], bv.bv_page, take, bv.bv_offset);
		bio_advance_iter_single(bio, it, take);
		len -= take;
	}
	sg_mark_end(&sg[n - 1]);
	return true;
}

/*
 * Encrypt (src -> the pages of @dst) or decrypt (src in place) every data
 * unit of @io with the kernel's xts(aes). Runs in our workqueue: it may
 * sleep, and waits for an asynchronous implementation.
 */
static int gc_cpu_crypt(struct gc_io *io, struct bio *src, struct bio *dst,
			bool encrypt)
{
	struct gc_ctx *cc = io->cc;
	struct skcipher_request *r = gc_skreq(io);
	struct scatterlist sg_in[GC_UNIT_SEGS], sg_out[GC_UNIT_SEGS];
	struct bvec_iter in = io->iter, out;
	unsigned int step = test_bit(GC_IV_LARGE_SECTORS, &cc->flags) ?
			    1 : cc->sector_size >> SECTOR_SHIFT;
	u64 sector = gc_iv_sector(io);
	DECLARE_CRYPTO_WAIT(wait);
	int ret = 0;

	if (dst)
		out = dst->bi_iter;
	skcipher_request_set_tfm(r, cc->tfm);
	while (in.bi_size && !ret) {
		if (!gc_sg_from_bio(sg_in, src, &in, cc->sector_size) ||
		    (dst && !gc_sg_from_bio(sg_out, dst, &out,
					    cc->sector_size)))
			return -EIO;
		gc_iv(cc, io->iv, sector);
		skcipher_request_set_callback(r, CRYPTO_TFM_REQ_MAY_SLEEP |
					      CRYPTO_TFM_REQ_MAY_BACKLOG,
					      crypto_req_done, &wait);
		skcipher_request_set_crypt(r, sg_in, dst ? sg_out : sg_in,
					   cc->sector_size, io->iv);
		ret = crypto_wait_req(encrypt ? crypto_skcipher_encrypt(r) :
				      crypto_skcipher_decrypt(r), &wait);
		sector += step;
	}
	return ret;
}

/* ---- completion ---------------------------------------------------------- */

static void gc_finish(struct gc_io *io)
{
	if (io->req) {
		kgpu_request_put(io->req);
		io->req = NULL;
	}
	io->base->bi_status = io->error;
	bio_endio(io->base);
}

static void gc_finish_work(struct work_struct *work)
{
	gc_finish(container_of(work, struct gc_io, work));
}

static void gc_queue(struct gc_io *io, struct workqueue_struct *wq,
		     work_func_t fn)
{
	INIT_WORK(&io->work, fn);
	queue_work(wq, &io->work);
}

/* A read finished on the CPU path: decrypt the caller's pages in place. */
static void gc_read_decrypt_work(struct work_struct *work)
{
	struct gc_io *io = container_of(work, struct gc_io, work);

	if (gc_cpu_crypt(io, io->base, NULL, false))
		io->error = BLK_STS_IOERR;
	atomic64_inc(&io->cc->n_kernel);
	gc_finish(io);
}

/* The helper decrypted the region buffer: copy it out, end the bio. */
static void gc_read_copyout_work(struct work_struct *work)
{
	struct gc_io *io = container_of(work, struct gc_io, work);
	const u8 *p = io->req->data;
	struct bvec_iter it;
	struct bio_vec bv;

	__bio_for_each_segment(bv, io->base, it, io->iter) {
		memcpy_to_bvec(&bv, p);
		p += bv.bv_len;
	}
	gc_finish(io);
}

/*
 * The helper could not do @io (its request is already given back): redo
 * the work on the CPU from what we still hold: the caller's plaintext for
 * a write, the disk for a read.
 */
static void gc_fallback_work(struct work_struct *work)
{
	struct gc_io *io = container_of(work, struct gc_io, work);

	atomic64_inc(&io->cc->n_fallback);
	if (bio_data_dir(io->base) == WRITE)
		gc_write_cpu(io);
	else
		gc_cpu_read(io);
}

static void gc_write_region_work(struct work_struct *work);

/* kgpu's callback, in the helper's completion ioctl: count and queue. */
static void gc_kgpu_done(struct kgpu_request *req, int status)
{
	struct gc_io *io = req->private;
	struct gc_ctx *cc = io->cc;

	if (status) {
		/*
		 * Everything the io holds goes back here, before the fallback
		 * is queued: its region space (the core keeps the buffer while
		 * the helper may still write it), and a write's clone, its bio
		 * from our bio_set and, bounced, its pages from our page pool
		 * (bio_put and mempool_free do not sleep). Crypt queue workers
		 * may be waiting in kgpu_request_get() or mempool_alloc() for
		 * exactly these. The fallback then holds nothing but the io,
		 * and runs on a queue of its own (WQ_MEM_RECLAIM: a rescuer),
		 * never behind workers that wait for pool space: whatever it
		 * waits for is given back by I/O already submitted or by
		 * another done(), never by a fallback. So it cannot deadlock.
		 */
		kgpu_request_put(req);
		io->req = NULL;
		if (io->clone) {
			if (io->own_pages)
				gc_free_clone_pages(cc, io->clone);
			bio_put(io->clone);
			io->clone = NULL;
		}
		gc_queue(io, cc->fb_wq, gc_fallback_work);
		return;
	}
	if (req->cqe_flags & KGPU_CQE_CPU)
		atomic64_inc(&cc->n_helper_cpu);
	else
		atomic64_inc(&cc->n_gpu);
	gc_queue(io, cc->io_wq, bio_data_dir(io->base) == WRITE ?
		 gc_write_region_work : gc_read_copyout_work);
}

static void gc_submit_req(struct gc_io *io, unsigned int service)
{
	struct gc_ctx *cc = io->cc;
	struct kgpu_request *req = io->req;

	req->params.service = service;
	req->params.in_off = 0;
	req->params.out_off = 0;
	req->params.in_len = io->iter.bi_size;
	req->params.out_len = io->iter.bi_size;
	req->params.unit_size = cc->sector_size;
	req->params.sector_step = test_bit(GC_IV_LARGE_SECTORS, &cc->flags) ?
				  1 : cc->sector_size >> SECTOR_SHIFT;
	req->params.sector = gc_iv_sector(io);
	req->params.key_slot = cc->key_slot;
	req->params.iv_mode = cc->iv_mode;
	req->done = gc_kgpu_done;
	req->private = io;
	kgpu_submit(req);
}

/*
 * A region request for @io when the helper should do it: attached, the
 * key in a slot, the size at least its crossover. May wait for region
 * space (back-pressure); NULL means do it on the CPU (counted by kgpu).
 */
static struct kgpu_request *gc_get_req(struct gc_io *io, unsigned int svc)
{
	struct kgpu_request *req;

	if (io->cc->key_slot >= 0 && kgpu_offload(svc, io->iter.bi_size)) {
		req = kgpu_request_get(io->iter.bi_size, 0);
		if (!IS_ERR(req))
			return req;
	}
	kgpu_account_cpu(svc);
	return NULL;
}

/*
 * A clone over the region buffer of io->req, or over bounce pages when
 * the region has no struct pages (then io->own_pages is set).
 */
static struct bio *gc_region_clone(struct gc_io *io, blk_opf_t opf)
{
	struct gc_ctx *cc = io->cc;
	unsigned int len = io->iter.bi_size, off, n;
	struct bio *clone;

	if (READ_ONCE(bounce) || !kgpu_data_page(io->req, 0)) {
		io->own_pages = true;
		return gc_alloc_own(io, opf, len);
	}
	io->own_pages = false;
	clone = bio_alloc_bioset(cc->dev->bdev,
				 DIV_ROUND_UP(offset_in_page(io->req->data) +
					      len, PAGE_SIZE),
				 opf, GFP_NOIO, &cc->bs);
	for (off = 0; off < len; off += n) {
		unsigned int pofs = offset_in_page(io->req->data + off);

		n = min_t(unsigned int, len - off, PAGE_SIZE - pofs);
		__bio_add_page(clone, kgpu_data_page(io->req, off), n, pofs);
	}
	return clone;
}

/* Copy between the region buffer and the pages of an own-pages clone. */
static void gc_bounce(struct gc_io *io, struct bio *clone, bool to_region)
{
	struct bvec_iter_all iall;
	struct bio_vec *bv;
	u8 *p = io->req->data;

	bio_for_each_segment_all(bv, clone, iall) {
		if (to_region)
			memcpy_from_page(p, bv->bv_page, bv->bv_offset,
					 bv->bv_len);
		else
			memcpy_to_page(bv->bv_page, bv->bv_offset, p,
				       bv->bv_len);
		p += bv->bv_len;
	}
}

/*
 * The helper encrypted the region buffer: write it out. The clone was
 * made ready on the crypt queue: the io queue never allocates, so it
 * always drains.
 */
static void gc_write_region_work(struct work_struct *work)
{
	struct gc_io *io = container_of(work, struct gc_io, work);
	struct bio *clone = io->clone;

	io->clone = NULL;
	if (io->own_pages) {
		gc_bounce(io, clone, false);
		kgpu_request_put(io->req);
		io->req = NULL;
	}
	gc_submit_clone(io, clone, GC_W_GPU);
}

/* A read into the region finished: hand the ciphertext to the helper. */
static void gc_read_region_work(struct work_struct *work)
{
	struct gc_io *io = container_of(work, struct gc_io, work);
	struct bio *clone = io->clone;

	io->clone = NULL;
	if (io->own_pages) {
		if (!io->error)
			gc_bounce(io, clone, true);
		gc_free_clone_pages(io->cc, clone);
	}
	bio_put(clone);
	if (io->error) {
		gc_finish(io);
		return;
	}
	gc_submit_req(io, KGPU_SVC_XTS_DEC);
}

static void gc_endio_clone(struct bio *clone)
{
	struct gc_io *io = clone->bi_private;
	struct gc_ctx *cc = io->cc;

	if (clone->bi_status && !io->error)
		io->error = clone->bi_status;
	switch (io->stage) {
	case GC_W_CPU:
	case GC_W_GPU:
		if (io->own_pages)
			gc_free_clone_pages(cc, clone);
		bio_put(clone);
		if (io->req)	/* region pages: put it in process context */
			gc_queue(io, cc->io_wq, gc_finish_work);
		else
			gc_finish(io);
		break;
	case GC_R_CPU:
		bio_put(clone);
		if (io->error)
			gc_finish(io);
		else
			gc_queue(io, cc->crypt_wq, gc_read_decrypt_work);
		break;
	case GC_R_GPU:
		io->clone = clone;
		gc_queue(io, cc->io_wq, gc_read_region_work);
		break;
	}
}

/* ---- starting I/O (the crypt queue) ---------------------------------------- */

static void gc_write_cpu(struct gc_io *io)
{
	struct bio *clone = gc_alloc_own(io, io->base->bi_opf,
					 io->iter.bi_size);

	io->own_pages = true;
	if (gc_cpu_crypt(io, io->base, clone, true)) {
		gc_free_clone_pages(io->cc, clone);
		bio_put(clone);
		io->error = BLK_STS_IOERR;
		gc_finish(io);
		return;
	}
	atomic64_inc(&io->cc->n_kernel);
	gc_submit_clone(io, clone, GC_W_CPU);
}

static void gc_write_work(struct work_struct *work)
{
	struct gc_io *io = container_of(work, struct gc_io, work);
	struct bvec_iter it;
	struct bio_vec bv;
	u8 *p;

	io->req = gc_get_req(io, KGPU_SVC_XTS_ENC);
	if (!io->req) {
		gc_write_cpu(io);
		return;
	}
	p = io->req->data;
	__bio_for_each_segment(bv, io->base, it, io->iter) {
		memcpy_from_bvec(p, &bv);
		p += bv.bv_len;
	}
	io->clone = gc_region_clone(io, io->base->bi_opf);
	gc_submit_req(io, KGPU_SVC_XTS_ENC);
}

/* Read into the caller's pages; decrypted on the CPU when it completes. */
static void gc_cpu_read(struct gc_io *io)
{
	struct gc_ctx *cc = io->cc;
	struct bio *clone;

	clone = bio_alloc_clone(cc->dev->bdev, io->base, GFP_NOIO, &cc->bs);
	clone->bi_iter = io->iter;
	io->own_pages = false;
	gc_submit_clone(io, clone, GC_R_CPU);
}

static void gc_read_work(struct work_struct *work)
{
	struct gc_io *io = container_of(work, struct gc_io, work);
	struct bio *clone;

	io->req = gc_get_req(io, KGPU_SVC_XTS_DEC);
	if (!io->req) {
		gc_cpu_read(io);
		return;
	}
	clone = gc_region_clone(io, io->base->bi_opf);
	gc_submit_clone(io, clone, GC_R_GPU);
}

/* ---- the target ------------------------------------------------------------ */

static void gc_dtr(struct dm_target *ti)
{
	struct gc_ctx *cc = ti->private;

	ti->private = NULL;
	if (!cc)
		return;
	if (cc->crypt_wq)
		destroy_workqueue(cc->crypt_wq);
	if (cc->fb_wq)
		destroy_workqueue(cc->fb_wq);
	if (cc->io_wq)
		destroy_workqueue(cc->io_wq);
	bioset_exit(&cc->bs);
	mempool_exit(&cc->page_pool);
	gc_wipe_key(cc);
	kfree_sensitive(cc->key);
	if (cc->tfm)
		crypto_free_skcipher(cc->tfm);
	if (cc->dev)
		dm_put_device(ti, cc->dev);
	kfree_sensitive(cc->key_string);
	kfree(cc->cipher_string);
	kfree_sensitive(cc);
}

/* aes-xts-plain64 and aes-xts-plain, also in dm-crypt's capi: form. */
static int gc_parse_cipher(struct gc_ctx *cc, const char *s)
{
	static const struct {
		const char *name;
		u8 iv_mode;
	} ciphers[] = {
		{ "aes-xts-plain64", KGPU_IV_PLAIN64 },
		{ "aes-xts-plain", KGPU_IV_PLAIN },
		{ "capi:xts(aes)-plain64", KGPU_IV_PLAIN64 },
		{ "capi:xts(aes)-plain", KGPU_IV_PLAIN },
	};
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(ciphers); i++) {
		if (!strcmp(s, ciphers[i].name)) {
			cc->iv_mode = ciphers[i].iv_mode;
			return 0;
		}
	}
	return -EINVAL;
}

static int gc_parse_opts(struct dm_target *ti, struct gc_ctx *cc,
			 unsigned int argc, char **argv)
{
	static const struct dm_arg group = {
		0, 8, "Invalid number of optional parameters"
	};
	static const struct {
		const char *name;
		unsigned int bit;
	} flags[] = {
		{ "allow_discards", GC_ALLOW_DISCARDS },
		{ "same_cpu_crypt", GC_SAME_CPU },
		{ "submit_from_crypt_cpus", GC_SUBMIT_FROM_CRYPT },
		{ "no_read_workqueue", GC_NO_READ_WQ },
		{ "no_write_workqueue", GC_NO_WRITE_WQ },
		{ "iv_large_sectors", GC_IV_LARGE_SECTORS },
	};
	struct dm_arg_set as = { .argc = argc, .argv = argv };
	unsigned int n, i, v;
	const char *opt;
	char dummy;
	int ret;

	cc->sector_size = SECTOR_SIZE;
	if (!argc)
		return 0;
	ret = dm_read_arg_group(&group, &as, &n, &ti->error);
	if (ret)
		return ret;
	if (as.argc != n) {
		ti->error = "Unexpected arguments after the optional parameters";
		return -EINVAL;
	}
	while (n--) {
		opt = dm_shift_arg(&as);
		for (i = 0; i < ARRAY_SIZE(flags); i++)
			if (!strcasecmp(opt, flags[i].name))
				break;
		if (i < ARRAY_SIZE(flags)) {
			__set_bit(flags[i].bit, &cc->flags);
		} else if (sscanf(opt, "sector_size:%u%c", &v, &dummy) == 1) {
			if (v < SECTOR_SIZE || v > 4096 || !is_power_of_2(v)) {
				ti->error = "Invalid sector_size (512, 1024, 2048 or 4096)";
				return -EINVAL;
			}
			cc->sector_size = v;
		} else {
			ti->error = "Unknown or malformed optional parameter";
			return -EINVAL;
		}
	}
	return 0;
}

/*
 * Construct a gpu-crypt mapping (dm-crypt's grammar):
 *
 *	<cipher> <key> <iv_offset> <dev_path> <start>
 *	[<#opt_params> <opt_params>...]
 *
 * cipher:	aes-xts-plain64 | aes-xts-plain (or capi:xts(aes)-plain64...)
 * key:		64 or 128 hex digits (K1 || K2), or
 *		:<32|64>:<logon|user>:<key description> (kernel keyring)
 * iv_offset:	added to every IV sector, a multiple of sector_size / 512
 * start:	first sector of the data on <dev_path>
 * opt_params:	sector_size:<512..4096>, iv_large_sectors, allow_discards,
 *		and dm-crypt's same_cpu_crypt, submit_from_crypt_cpus,
 *		no_read_workqueue, no_write_workqueue (accepted, shown back,
 *		no effect: gpu-crypt always queues its work)
 */
static int gc_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	struct gc_ctx *cc;
	unsigned long long v;
	char dummy;
	int ret = -EINVAL;

	if (argc < 5) {
		ti->error = "Not enough arguments";
		return -EINVAL;
	}
	cc = kzalloc(sizeof(*cc), GFP_KERNEL);
	if (!cc) {
		ti->error = "Cannot allocate the context";
		return -ENOMEM;
	}
	ti->private = cc;
	cc->key_slot = -1;
	mutex_init(&cc->page_lock);
	atomic64_set(&cc->n_gpu, 0);
	atomic64_set(&cc->n_helper_cpu, 0);
	atomic64_set(&cc->n_kernel, 0);
	atomic64_set(&cc->n_fallback, 0);

	if (gc_parse_cipher(cc, argv[0])) {
		ti->error = "Unsupported cipher (gpu-crypt does aes-xts-plain64 and aes-xts-plain)";
		goto bad;
	}
	cc->cipher_string = kstrdup(argv[0], GFP_KERNEL);
	cc->key = kzalloc(64, GFP_KERNEL);
	if (!cc->cipher_string || !cc->key) {
		ti->error = "Cannot allocate the context";
		ret = -ENOMEM;
		goto bad;
	}
	ret = gc_parse_opts(ti, cc, argc - 5, argv + 5);
	if (ret)
		goto bad;
	cc->sector_shift = __ffs(cc->sector_size) - SECTOR_SHIFT;

	cc->tfm = crypto_alloc_skcipher("xts(aes)", 0, 0);
	if (IS_ERR(cc->tfm)) {
		ret = PTR_ERR(cc->tfm);
		cc->tfm = NULL;
		ti->error = "Cannot allocate xts(aes)";
		goto bad;
	}
	ret = gc_set_key(cc, argv[1], &ti->error);
	/* dm-crypt's habit: no copy of the key stays in the table string. */
	memset(argv[1], '0', strlen(argv[1]));
	if (ret)
		goto bad;

	ret = -EINVAL;
	if (sscanf(argv[2], "%llu%c", &v, &dummy) != 1 ||
	    (v & ((cc->sector_size >> SECTOR_SHIFT) - 1))) {
		ti->error = "Invalid iv_offset sector";
		goto bad;
	}
	cc->iv_offset = v;
	if (sscanf(argv[4], "%llu%c", &v, &dummy) != 1 ||
	    v != (sector_t)v) {
		ti->error = "Invalid device sector";
		goto bad;
	}
	cc->start = v;
	if (ti->len & ((cc->sector_size >> SECTOR_SHIFT) - 1)) {
		ti->error = "Device size is not a multiple of sector_size";
		goto bad;
	}
	ret = dm_get_device(ti, argv[3], dm_table_get_mode(ti->table),
			    &cc->dev);
	if (ret) {
		ti->error = "Device lookup failed";
		goto bad;
	}

	ret = bioset_init(&cc->bs, GC_MIN_IOS, 0, BIOSET_NEED_BVECS);
	if (!ret)
		ret = mempool_init_page_pool(&cc->page_pool, GC_MAX_PAGES, 0);
	if (ret) {
		ti->error = "Cannot allocate the I/O pools";
		goto bad;
	}
	ret = -ENOMEM;
	cc->crypt_wq = alloc_workqueue("kgpucryptd", WQ_MEM_RECLAIM |
				       WQ_UNBOUND | WQ_CPU_INTENSIVE,
				       num_online_cpus());
	cc->io_wq = alloc_workqueue("kgpucrypt_io", WQ_MEM_RECLAIM |
				    WQ_UNBOUND, num_online_cpus());
	cc->fb_wq = alloc_workqueue("kgpucrypt_fb", WQ_MEM_RECLAIM |
				   WQ_UNBOUND | WQ_CPU_INTENSIVE,
				   num_online_cpus());
	if (!cc->crypt_wq || !cc->io_wq || !cc->fb_wq) {
		ti->error = "Cannot allocate the workqueues";
		goto bad;
	}

	ti->per_io_data_size = gc_iosize(cc);
	ti->num_flush_bios = 1;
	ti->limit_swap_bios = true;	/* swap must not drain our pools */
	if (test_bit(GC_ALLOW_DISCARDS, &cc->flags))
		ti->num_discard_bios = 1;
	return 0;

bad:
	gc_dtr(ti);
	return ret;
}

static int gc_map(struct dm_target *ti, struct bio *bio)
{
	struct gc_ctx *cc = ti->private;
	unsigned int mask = (cc->sector_size >> SECTOR_SHIFT) - 1;
	struct gc_io *io;
	size_t max;

	/*
	 * Flushes (dm core sends them empty) and discards (only with
	 * allow_discards) go straight down; so does anything without data.
	 */
	if (unlikely(bio_op(bio) == REQ_OP_DISCARD || !bio_sectors(bio))) {
		bio_set_dev(bio, cc->dev->bdev);
		if (bio_sectors(bio))
			bio->bi_iter.bi_sector = cc->start +
				dm_target_offset(ti, bio->bi_iter.bi_sector);
		return DM_MAPIO_REMAPPED;
	}
	if (unlikely(bio_op(bio) != REQ_OP_READ &&
		     bio_op(bio) != REQ_OP_WRITE))
		return DM_MAPIO_KILL;
	if (unlikely((bio->bi_iter.bi_sector & mask) ||
		     (bio->bi_iter.bi_size & (cc->sector_size - 1))))
		return DM_MAPIO_KILL;
	if (unlikely(!test_bit(GC_KEY_VALID, &cc->flags)))
		return DM_MAPIO_KILL;
	max = min_t(size_t, GC_MAX_IO, kgpu_max_request()) &
	      ~(size_t)(cc->sector_size - 1);
	if (bio->bi_iter.bi_size > max)
		dm_accept_partial_bio(bio, max >> SECTOR_SHIFT);

	io = dm_per_bio_data(bio, ti->per_io_data_size);
	io->cc = cc;
	io->base = bio;
	io->iter = bio->bi_iter;
	io->sector = dm_target_offset(ti, bio->bi_iter.bi_sector);
	io->req = NULL;
	io->clone = NULL;
	io->error = BLK_STS_OK;
	io->own_pages = false;
	gc_queue(io, cc->crypt_wq, bio_data_dir(bio) == WRITE ?
		 gc_write_work : gc_read_work);
	return DM_MAPIO_SUBMITTED;
}

static void gc_status(struct dm_target *ti, status_type_t type,
		      unsigned int status_flags, char *result,
		      unsigned int maxlen)
{
	struct gc_ctx *cc = ti->private;
	unsigned int sz = 0, nopts, i;

	switch (type) {
	case STATUSTYPE_INFO:
		DMEMIT("gpu:%lld helper_cpu:%lld kernel:%lld fallback:%lld",
		       (long long)atomic64_read(&cc->n_gpu),
		       (long long)atomic64_read(&cc->n_helper_cpu),
		       (long long)atomic64_read(&cc->n_kernel),
		       (long long)atomic64_read(&cc->n_fallback));
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%s ", cc->cipher_string);
		if (cc->key_string) {
			DMEMIT(":%u:%s", cc->key_size, cc->key_string);
		} else {
			for (i = 0; i < cc->key_size; i++)
				DMEMIT("%02x", cc->key[i]);
		}
		DMEMIT(" %llu %s %llu", (unsigned long long)cc->iv_offset,
		       cc->dev->name, (unsigned long long)cc->start);
		nopts = hweight_long(cc->flags & (BIT(GC_ALLOW_DISCARDS) |
			BIT(GC_SAME_CPU) | BIT(GC_SUBMIT_FROM_CRYPT) |
			BIT(GC_NO_READ_WQ) | BIT(GC_NO_WRITE_WQ) |
			BIT(GC_IV_LARGE_SECTORS)));
		nopts += cc->sector_size != SECTOR_SIZE;
		if (!nopts)
			break;
		DMEMIT(" %u", nopts);
		if (test_bit(GC_ALLOW_DISCARDS, &cc->flags))
			DMEMIT(" allow_discards");
		if (test_bit(GC_SAME_CPU, &cc->flags))
			DMEMIT(" same_cpu_crypt");
		if (test_bit(GC_SUBMIT_FROM_CRYPT, &cc->flags))
			DMEMIT(" submit_from_crypt_cpus");
		if (test_bit(GC_NO_READ_WQ, &cc->flags))
			DMEMIT(" no_read_workqueue");
		if (test_bit(GC_NO_WRITE_WQ, &cc->flags))
			DMEMIT(" no_write_workqueue");
		if (cc->sector_size != SECTOR_SIZE)
			DMEMIT(" sector_size:%u", cc->sector_size);
		if (test_bit(GC_IV_LARGE_SECTORS, &cc->flags))
			DMEMIT(" iv_large_sectors");
		break;
	case STATUSTYPE_IMA:
		DMEMIT("cipher=%s,key_size=%u,sector_size=%u;",
		       cc->cipher_string, cc->key_size, cc->sector_size);
		break;
	}
}

/*
 * Messages, as dm-crypt takes them, only while suspended:
 *	key set <hex key | :<size>:<logon|user>:<description>>
 *	key wipe
 */
static int gc_message(struct dm_target *ti, unsigned int argc, char **argv,
		      char *result, unsigned int maxlen)
{
	struct gc_ctx *cc = ti->private;
	char *error = NULL;
	int ret;

	if (argc >= 2 && !strcasecmp(argv[0], "key")) {
		if (!dm_suspended(ti)) {
			DMWARN("not suspended during key manipulation.");
			return -EINVAL;
		}
		if (argc == 3 && !strcasecmp(argv[1], "set")) {
			ret = gc_set_key(cc, argv[2], &error);
			memset(argv[2], '0', strlen(argv[2]));
			if (ret)
				DMWARN("key set refused: %s", error);
			return ret;
		}
		if (argc == 2 && !strcasecmp(argv[1], "wipe")) {
			gc_wipe_key(cc);
			return 0;
		}
	}
	DMWARN("unrecognised message received.");
	return -EINVAL;
}

static int gc_preresume(struct dm_target *ti)
{
	struct gc_ctx *cc = ti->private;

	if (!test_bit(GC_KEY_VALID, &cc->flags)) {
		DMERR("aborting resume - crypt key is not set.");
		return -EAGAIN;
	}
	return 0;
}

static int gc_iterate_devices(struct dm_target *ti,
			      iterate_devices_callout_fn fn, void *data)
{
	struct gc_ctx *cc = ti->private;

	return fn(ti, cc->dev, cc->start, ti->len, data);
}

static void gc_io_hints(struct dm_target *ti, struct queue_limits *limits)
{
	struct gc_ctx *cc = ti->private;

	limits->logical_block_size = max_t(unsigned int,
					   limits->logical_block_size,
					   cc->sector_size);
	limits->physical_block_size = max_t(unsigned int,
					    limits->physical_block_size,
					    cc->sector_size);
	limits->io_min = max_t(unsigned int, limits->io_min, cc->sector_size);
	/* Every bvec holds whole data units (no unit across two bvecs). */
	limits->dma_alignment = limits->logical_block_size - 1;
}

static struct target_type gc_target = {
	.name		= "gpu-crypt",
	.version	= {1, 0, 0},
	.module		= THIS_MODULE,
	.ctr		= gc_ctr,
	.dtr		= gc_dtr,
	.map		= gc_map,
	.status		= gc_status,
	.message	= gc_message,
	.preresume	= gc_preresume,
	.iterate_devices = gc_iterate_devices,
	.io_hints	= gc_io_hints,
};

static int __init dm_gpu_crypt_init(void)
{
	return dm_register_target(&gc_target);
}

static void __exit dm_gpu_crypt_exit(void)
{
	dm_unregister_target(&gc_target);
}

module_init(dm_gpu_crypt_init);
module_exit(dm_gpu_crypt_exit);

MODULE_AUTHOR("kgpu developers");
MODULE_DESCRIPTION("gpu-crypt: dm-crypt's aes-xts target, offloaded to a GPU through kgpu");
MODULE_LICENSE("GPL");
