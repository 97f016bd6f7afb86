// SPDX-License-Identifier: GPL-2.0
/*
 * kgpu core: self-test of the channel, reachable from user space.
 *
 *	echo N > /sys/kernel/debug/kgpu/selftest	run N rounds
 *	cat /sys/kernel/debug/kgpu/selftest		the last report
 *
 * Each round submits a batch of random requests from inside the kernel
 * (AES-XTS encrypt and decrypt with random unit sizes, sectors and keys;
 * RAID6 syndrome generation and recovery of every kind of one or two lost
 * blocks, 4 to 16 disks) and checks every result against the kernel's own
 * "xts(aes)" and raid6_pq library. Requests the helper does not complete
 * come back as KGPU_FALLBACK and are done here on the CPU, as a target
 * would; with no helper attached everything is done on the CPU. The write
 * fails with -EIO on the first wrong byte, so `echo` reports it.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <crypto/algapi.h>
#include <crypto/skcipher.h>
#include <linux/atomic.h>
#include <linux/completion.h>
#include <linux/debugfs.h>
#include <linux/fs.h>
#include <linux/mutex.h>
#include <linux/random.h>
#include <linux/raid/pq.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "kgpu_internal.h"

#define ST_BATCH	16
#define ST_MAX_BYTES	(64 * 1024)	/* per request, kmalloc-able */
#define ST_NKEYS	2

struct st_req {
	struct kgpu_sqe p;	/* what was asked; offsets relative, 0 */
	u8 *input;		/* the request's input (kmalloc) */
	u8 *expect;		/* the right output (kmalloc) */
	size_t len;
	int status;		/* from done() */
	bool via_helper;	/* submitted (else CPU from the start) */
	struct kgpu_request *req;
	struct st_batch *batch;
};

struct st_batch {
	atomic_t pending;
	struct completion all_done;
};

struct st_ctx {
	struct crypto_skcipher *tfm[ST_NKEYS];
	u8 key[ST_NKEYS][64];
	unsigned int keylen[ST_NKEYS];
	int slot[ST_NKEYS];
	/* Counts for the report. */
	u64 rounds, requests, bytes, helper, fallback, cpu_only;
};

static DEFINE_MUTEX(st_lock);
static char st_report[512];

static u32 st_rand(u32 n)
{
	return get_random_u32() % n;
}

/* ---- CPU references ---------------------------------------------------- */

static int st_xts(struct crypto_skcipher *tfm, const struct kgpu_sqe *p,
		  u8 *buf, size_t len)
{
	struct skcipher_request *r;
	DECLARE_CRYPTO_WAIT(wait);
	struct scatterlist sg;
	size_t off;
	int ret = 0;
	u64 sector = p->sector;

	r = skcipher_request_alloc(tfm, GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	for (off = 0; off < len && !ret; off += p->unit_size) {
		__le64 iv[2] = { 0, 0 };

		iv[0] = cpu_to_le64(p->iv_mode == KGPU_IV_PLAIN ?
				    (u32)sector : sector);
		sg_init_one(&sg, buf + off, p->unit_size);
		skcipher_request_set_callback(r, CRYPTO_TFM_REQ_MAY_SLEEP,
					      crypto_req_done, &wait);
		skcipher_request_set_crypt(r, &sg, &sg, p->unit_size, iv);
		ret = crypto_wait_req(p->service == KGPU_SVC_XTS_ENC ?
				      crypto_skcipher_encrypt(r) :
				      crypto_skcipher_decrypt(r), &wait);
		sector += p->sector_step;
	}
	skcipher_request_free(r);
	return ret;
}

/*
 * RAID6 on the CPU with raid6_pq. buf holds ndisks blocks of unit_size:
 * data, P, Q. GEN fills P and Q; REC rebuilds fail_a and fail_b.
 */
static void st_raid6(const struct kgpu_sqe *p, u8 *buf)
{
	void *ptrs[32];
	unsigned int n = p->ndisks, k = n - 2, i;
	size_t bs = p->unit_size;
	unsigned int a = p->fail_a, b = p->fail_b;

	for (i = 0; i < n; i++)
		ptrs[i] = buf + i * bs;
	if (p->service == KGPU_SVC_RAID6_GEN) {
		raid6_call.gen_syndrome(n, bs, ptrs);
		return;
	}
	if (b == KGPU_RAID6_NONE || a > b)
		swap(a, b);	/* a: the lower index, or NONE only in b */
	if (a == KGPU_RAID6_NONE) {
		a = b;
		b = KGPU_RAID6_NONE;
	}
	if (a < k && b < k) {
		raid6_2data_recov(n, bs, a, b, ptrs);
	} else if (a < k && b == k) {
		raid6_datap_recov(n, bs, a, ptrs);
	} else if (a < k) {
		/* One data block (and perhaps Q): P rebuilds it, then Q. */
		memcpy(ptrs[a], ptrs[k], bs);
		for (i = 0; i < k; i++)
			if (i != a)
				crypto_xor(ptrs[a], ptrs[i], bs);
		if (b == k + 1)
			raid6_call.gen_syndrome(n, bs, ptrs);
	} else {
		/* Only P and/or Q lost. */
		raid6_call.gen_syndrome(n, bs, ptrs);
	}
}

/* ---- one batch ----------------------------------------------------------- */

static void st_done(struct kgpu_request *req, int status)
{
	struct st_req *s = req->private;

	s->status = status;
	if (atomic_dec_and_test(&s->batch->pending))
		complete(&s->batch->all_done);
}

static void st_pick(struct st_ctx *c, struct st_req *s)
{
	static const unsigned int units[] = { 512, 1024, 2048, 4096 };
	struct kgpu_sqe *p = &s->p;
	unsigned int kind = st_rand(4);

	memset(p, 0, sizeof(*p));
	if (kind < 2) {
		unsigned int key = st_rand(ST_NKEYS);

		p->service = kind ? KGPU_SVC_XTS_DEC : KGPU_SVC_XTS_ENC;
		p->unit_size = units[st_rand(4)];
		s->len = p->unit_size * (1 + st_rand(ST_MAX_BYTES / p->unit_size));
		p->sector = get_random_u64();
		p->sector_step = st_rand(2) ? 1 : p->unit_size >> 9;
		p->iv_mode = st_rand(4) ? KGPU_IV_PLAIN64 : KGPU_IV_PLAIN;
		p->key_slot = c->slot[key];
		p->reserved = key;	/* which tfm: the self-test's own note */
	} else {
		unsigned int n = 4 + st_rand(13);

		p->service = kind == 2 ? KGPU_SVC_RAID6_GEN : KGPU_SVC_RAID6_REC;
		p->ndisks = n;
		p->unit_size = 512 << st_rand(4);
		s->len = (size_t)n * p->unit_size;
		p->fail_a = st_rand(n);
		p->fail_b = st_rand(3) ? st_rand(n) : KGPU_RAID6_NONE;
		if (p->fail_b == p->fail_a)
			p->fail_b = KGPU_RAID6_NONE;
		if (p->service == KGPU_SVC_RAID6_GEN)
			p->fail_a = p->fail_b = KGPU_RAID6_NONE;
	}
	p->in_len = s->len;
	p->out_len = s->len;
}

/* Fill input and expected output of @s; 0 or -errno. */
static int st_prepare(struct st_ctx *c, struct st_req *s)
{
	struct kgpu_sqe *p = &s->p;
	size_t bs = p->unit_size;
	int ret = 0;

	s->input = kmalloc(s->len, GFP_KERNEL);
	s->expect = kmalloc(s->len, GFP_KERNEL);
	if (!s->input || !s->expect)
		return -ENOMEM;
	get_random_bytes(s->input, s->len);

	switch (p->service) {
	case KGPU_SVC_XTS_ENC:
	case KGPU_SVC_XTS_DEC:
		memcpy(s->expect, s->input, s->len);
		ret = st_xts(c->tfm[p->reserved], p, s->expect, s->len);
		break;
	case KGPU_SVC_RAID6_GEN:
		memcpy(s->expect, s->input, s->len);
		st_raid6(p, s->expect);
		break;
	case KGPU_SVC_RAID6_REC:
		/* A consistent stripe is the answer; the input loses blocks. */
		{
			struct kgpu_sqe gen = *p;

			gen.service = KGPU_SVC_RAID6_GEN;
			st_raid6(&gen, s->input);
		}
		memcpy(s->expect, s->input, s->len);
		memset(s->input + p->fail_a * bs, 0x5a, bs);
		if (p->fail_b != KGPU_RAID6_NONE)
			memset(s->input + p->fail_b * bs, 0xa5, bs);
		break;
	}
	return ret;
}

/* The CPU path of a target: compute from our own copy of the input. */
static int st_cpu(struct st_ctx *c, struct st_req *s, u8 *out)
{
	memcpy(out, s->input, s->len);
	if (s->p.service == KGPU_SVC_XTS_ENC || s->p.service == KGPU_SVC_XTS_DEC)
		return st_xts(c->tfm[s->p.reserved], &s->p, out, s->len);
	st_raid6(&s->p, out);
	return 0;
}

static int st_round(struct st_ctx *c)
{
	struct st_req *reqs;
	struct st_batch batch;
	u8 *scratch = NULL;
	int i, held = 0, ret = 0;

	reqs = kcalloc(ST_BATCH, sizeof(*reqs), GFP_KERNEL);
	scratch = kmalloc(32 * 4096, GFP_KERNEL);
	if (!reqs || !scratch) {
		ret = -ENOMEM;
		goto out;
	}
	atomic_set(&batch.pending, 1);
	init_completion(&batch.all_done);

	for (i = 0; i < ST_BATCH && !ret; i++) {
		struct st_req *s = &reqs[i];
		struct kgpu_request *req;

		st_pick(c, s);
		s->batch = &batch;
		ret = st_prepare(c, s);
		if (ret)
			break;
		/*
		 * Wait for room only while holding nothing: the requests
		 * held are released at the end of the round, so waiting
		 * with some in hand could wait for ourselves (tiny ring or
		 * data space). Without room, this one goes to the CPU, as
		 * a target under back-pressure could choose to.
		 */
		req = kgpu_request_get(s->len, held ? KGPU_NOWAIT : 0);
		if (IS_ERR(req)) {
			if (PTR_ERR(req) == -EINTR) {
				ret = -EINTR;
				break;
			}
			continue;	/* no helper or no room: CPU */
		}
		held++;
		s->req = req;
		s->via_helper = true;
		memcpy(req->data, s->input, s->len);
		req->params = s->p;
		req->params.reserved = 0;
		req->done = st_done;
		req->private = s;
		atomic_inc(&batch.pending);
		kgpu_submit(req);
	}
	if (atomic_dec_and_test(&batch.pending))
		complete(&batch.all_done);
	/* Every submitted request completes: helper, timeout or detach. */
	wait_for_completion(&batch.all_done);

	for (i = 0; i < ST_BATCH; i++) {
		struct st_req *s = &reqs[i];
		const u8 *got;

		if (!s->len || !s->input || !s->expect)
			continue;
		if (s->via_helper && s->status == 0) {
			got = s->req->data;
			c->helper++;
		} else {
			int err = st_cpu(c, s, scratch);

			if (err && !ret)
				ret = err;
			got = scratch;
			if (s->via_helper)
				c->fallback++;
			else
				c->cpu_only++;
		}
		if (!ret && memcmp(got, s->expect, s->len)) {
			pr_err("selftest: %s request of %zu bytes (unit %u, sector %llu, disks %u, lost %u/%u) came back wrong from the %s\n",
			       kgpu_svc_names[s->p.service], s->len,
			       s->p.unit_size, s->p.sector, s->p.ndisks,
			       s->p.fail_a, s->p.fail_b,
			       got == scratch ? "CPU" : "helper");
			ret = -EIO;
		}
		c->requests++;
		c->bytes += s->len;
	}
out:
	if (reqs) {
		for (i = 0; i < ST_BATCH; i++) {
			if (reqs[i].req)
				kgpu_request_put(reqs[i].req);
			kfree(reqs[i].input);
			kfree(reqs[i].expect);
		}
	}
	kfree(reqs);
	kfree(scratch);
	return ret;
}

static int st_setup(struct st_ctx *c)
{
	int i, ret;

	/* Before anything can fail: teardown puts only the slots we got. */
	for (i = 0; i < ST_NKEYS; i++)
		c->slot[i] = -1;
	for (i = 0; i < ST_NKEYS; i++) {
		/* Synchronous only: our IVs live on the stack. */
		c->tfm[i] = crypto_alloc_skcipher("xts(aes)", 0,
						  CRYPTO_ALG_ASYNC);
		if (IS_ERR(c->tfm[i])) {
			ret = PTR_ERR(c->tfm[i]);
			c->tfm[i] = NULL;
			return ret;
		}
		c->keylen[i] = i ? 32 : 64;	/* AES-256-XTS and AES-128-XTS */
		do {
			get_random_bytes(c->key[i], c->keylen[i]);
			ret = crypto_skcipher_setkey(c->tfm[i], c->key[i],
						     c->keylen[i]);
		} while (ret == -EINVAL && !memcmp(c->key[i],
				c->key[i] + c->keylen[i] / 2, c->keylen[i] / 2));
		if (ret)
			return ret;
		c->slot[i] = kgpu_key_get();
		if (c->slot[i] < 0)
			return c->slot[i];
		ret = kgpu_key_set(c->slot[i], c->key[i], c->keylen[i]);
		if (ret)
			return ret;
	}
	return 0;
}

static void st_teardown(struct st_ctx *c)
{
	int i;

	for (i = 0; i < ST_NKEYS; i++) {
		if (c->slot[i] >= 0)
			kgpu_key_put(c->slot[i]);
		crypto_free_skcipher(c->tfm[i]);
	}
	memzero_explicit(c->key, sizeof(c->key));
}

static ssize_t st_write(struct file *file, const char __user *ubuf,
			size_t count, loff_t *ppos)
{
	struct st_ctx *c;
	unsigned int rounds, i;
	int ret;

	ret = kstrtouint_from_user(ubuf, count, 0, &rounds);
	if (ret)
		return ret;
	if (rounds < 1 || rounds > 1000000)
		return -EINVAL;
	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c)
		return -ENOMEM;
	if (mutex_lock_killable(&st_lock)) {
		kfree(c);
		return -EINTR;
	}
	ret = st_setup(c);
	for (i = 0; i < rounds && !ret; i++) {
		ret = st_round(c);
		c->rounds++;
		if (fatal_signal_pending(current) && !ret)
			ret = -EINTR;
		cond_resched();
	}
	snprintf(st_report, sizeof(st_report),
		 "%s: %llu rounds, %llu requests, %llu bytes: helper %llu, fallback %llu, cpu-only %llu\n",
		 ret ? "FAIL" : "PASS", c->rounds, c->requests, c->bytes,
		 c->helper, c->fallback, c->cpu_only);
	pr_info("selftest %s", st_report);
	st_teardown(c);
	mutex_unlock(&st_lock);
	kfree(c);
	return ret ? ret : count;
}

static ssize_t st_read(struct file *file, char __user *ubuf, size_t count,
		       loff_t *ppos)
{
	char buf[sizeof(st_report)];
	size_t n;

	mutex_lock(&st_lock);
	n = strscpy(buf, st_report[0] ? st_report : "not run\n", sizeof(buf));
	mutex_unlock(&st_lock);
	return simple_read_from_buffer(ubuf, count, ppos, buf, n);
}

static const struct file_operations st_fops = {
	.owner	= THIS_MODULE,
	.open	= simple_open,
	.read	= st_read,
	.write	= st_write,
	.llseek	= default_llseek,
};

int kgpu_selftest_init(struct dentry *dir)
{
	debugfs_create_file("selftest", 0600, dir, NULL, &st_fops);
	return 0;
}
