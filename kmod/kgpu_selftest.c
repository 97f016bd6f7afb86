// SPDX-License-Identifier: GPL-2.0
/*
 * kgpu core: self-test of the channel, reachable from user space.
 *
 *	echo N > /sys/kernel/debug/kgpu/selftest	run N rounds
 *	echo 0 > /sys/kernel/debug/kgpu/selftest	release its key slots
 *	cat /sys/kernel/debug/kgpu/selftest		the last report
 *
 * Each round submits a batch of random requests from inside the kernel
 * (AES-XTS encrypt and decrypt with random unit sizes, sectors and keys;
 * RAID6 syndrome generation, P/Q delta updates, and recovery of every kind
 * of one or two lost blocks, 4 to 16 disks) and checks every result against the kernel's own
 * "xts(aes)" and raid6_pq library. Requests the helper does not complete
 * come back as KGPU_FALLBACK and are done here on the CPU, as a target
 * would; with no helper attached everything is done on the CPU. The write
 * fails with -EIO on the first wrong byte, so `echo` reports it.
 *
 * Keys are used the way a target uses them: set once, at the first run,
 * into up to ST_NKEYS key slots (fewer if fewer are free; with none, no
 * XTS), and kept across runs and helpers until `echo 0` or unload. A
 * writer killed while waiting gives up at once: the batch is freed by
 * whichever completion comes last.
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

/*
 * One round's requests. pending: requests not done yet, plus one while
 * submitting; refs: the round's writer and whoever ends pending, so that
 * a writer killed while waiting can leave the batch to the last done().
 */
struct st_batch {
	atomic_t pending;
	atomic_t refs;
	struct completion all_done;
	struct st_req reqs[ST_BATCH];
};

/* The self-test's keys: set at the first run, kept until released. */
struct st_keys {
	struct crypto_skcipher *tfm[ST_NKEYS];
	u8 key[ST_NKEYS][64];
	unsigned int keylen[ST_NKEYS];
	int slot[ST_NKEYS];
	unsigned int n;		/* keys in slots */
	bool ready;
};

struct st_ctx {
	struct st_keys *k;
	/* Counts for the report. */
	u64 rounds, requests, bytes, helper, fallback, cpu_only;
	/* of helper: by the GPU-resident kernel, by launches, by its CPU */
	u64 resident, batched, helper_cpu;
};

static DEFINE_MUTEX(st_lock);	/* protects st_keys and st_report */
static struct st_keys st_keys = { .slot = { [0 ... ST_NKEYS - 1] = -1 } };
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
 * RAID6 on the CPU: buf holds the request's blocks as uapi/kgpu.h lays
 * them out (GEN, REC: ndisks blocks; PQD: the deltas of slots
 * fail_a..fail_b, then P, then Q).
 */
static void st_raid6(const struct kgpu_sqe *p, u8 *buf)
{
	void *ptrs[KGPU_RAID6_MAX_SLOTS];
	unsigned int n = p->ndisks, nd = p->fail_b - p->fail_a + 1, i;
	size_t bs = p->unit_size;

	if (p->service != KGPU_SVC_RAID6_PQD) {
		for (i = 0; i < n; i++)
			ptrs[i] = buf + i * bs;
	} else {
		/* data slots outside fail_a..fail_b are never read */
		for (i = 0; i < n - 2; i++)
			ptrs[i] = buf + (i >= p->fail_a && i <= p->fail_b ?
					 i - p->fail_a : 0) * bs;
		ptrs[n - 2] = buf + nd * bs;
		ptrs[n - 1] = buf + (nd + 1) * bs;
	}
	kgpu_raid6_cpu(p->service, n, ptrs, bs, p->fail_a, p->fail_b);
}

/* ---- one batch ----------------------------------------------------------- */

static void st_batch_put(struct st_batch *b)
{
	int i;

	if (!atomic_dec_and_test(&b->refs))
		return;
	for (i = 0; i < ST_BATCH; i++) {
		if (b->reqs[i].req)
			kgpu_request_put(b->reqs[i].req);
		kfree(b->reqs[i].input);
		kfree(b->reqs[i].expect);
	}
	kfree(b);
}

static void st_pending_dec(struct st_batch *b)
{
	if (atomic_dec_and_test(&b->pending)) {
		complete(&b->all_done);
		st_batch_put(b);
	}
}

static void st_done(struct kgpu_request *req, int status)
{
	struct st_req *s = req->private;

	s->status = status;
	st_pending_dec(s->batch);
}

static void st_pick(struct st_ctx *c, struct st_req *s)
{
	static const unsigned int units[] = { 512, 1024, 2048, 4096 };
	struct kgpu_sqe *p = &s->p;
	/* XTS (kinds 0, 1) only with a key in a slot. */
	unsigned int kind = c->k->n ? st_rand(5) : 2 + st_rand(3);

	memset(p, 0, sizeof(*p));
	if (kind < 2) {
		unsigned int key = st_rand(c->k->n);

		p->service = kind ? KGPU_SVC_XTS_DEC : KGPU_SVC_XTS_ENC;
		p->unit_size = units[st_rand(4)];
		s->len = p->unit_size * (1 + st_rand(ST_MAX_BYTES / p->unit_size));
		p->sector = get_random_u64();
		p->sector_step = st_rand(2) ? 1 : p->unit_size >> 9;
		p->iv_mode = st_rand(4) ? KGPU_IV_PLAIN64 : KGPU_IV_PLAIN;
		p->key_slot = c->k->slot[key];
		p->reserved = key;	/* which tfm: the self-test's own note */
	} else if (kind == 4) {
		unsigned int n = 4 + st_rand(13);

		p->service = KGPU_SVC_RAID6_PQD;
		p->ndisks = n;
		p->unit_size = 512 << st_rand(4);
		p->fail_a = st_rand(n - 2);
		p->fail_b = p->fail_a + st_rand(n - 2 - p->fail_a);
		s->len = (size_t)(p->fail_b - p->fail_a + 3) * p->unit_size;
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
		ret = st_xts(c->k->tfm[p->reserved], p, s->expect, s->len);
		break;
	case KGPU_SVC_RAID6_GEN:
	case KGPU_SVC_RAID6_PQD:
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
		return st_xts(c->k->tfm[s->p.reserved], &s->p, out, s->len);
	st_raid6(&s->p, out);
	return 0;
}

static int st_round(struct st_ctx *c)
{
	struct st_batch *b;
	u8 *scratch;
	int i, held = 0, ret = 0;

	b = kzalloc(sizeof(*b), GFP_KERNEL);
	scratch = kmalloc(32 * 4096, GFP_KERNEL);
	if (!b || !scratch) {
		kfree(b);
		kfree(scratch);
		return -ENOMEM;
	}
	atomic_set(&b->pending, 1);
	atomic_set(&b->refs, 2);
	init_completion(&b->all_done);

	for (i = 0; i < ST_BATCH && !ret; i++) {
		struct st_req *s = &b->reqs[i];
		struct kgpu_request *req;

		st_pick(c, s);
		s->batch = b;
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
			kgpu_account_cpu(s->p.service);
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
		atomic_inc(&b->pending);
		kgpu_submit(req);
	}
	st_pending_dec(b);
	/*
	 * Every submitted request completes: helper, timeout or detach. A
	 * fatal signal need not wait for that: the last done() frees the
	 * batch, and nothing else of ours is left in the helper's hands.
	 */
	if (wait_for_completion_killable(&b->all_done)) {
		st_batch_put(b);
		kfree(scratch);
		return -EINTR;
	}

	for (i = 0; i < ST_BATCH; i++) {
		struct st_req *s = &b->reqs[i];
		const u8 *got;

		if (!s->len || !s->input || !s->expect)
			continue;
		if (s->via_helper && s->status == 0) {
			got = s->req->data;
			c->helper++;
			if (s->req->cqe_flags & KGPU_CQE_RESIDENT)
				c->resident++;
			else if (s->req->cqe_flags & KGPU_CQE_CPU)
				c->helper_cpu++;
			else
				c->batched++;
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
	st_batch_put(b);
	kfree(scratch);
	return ret;
}

/* Release the keys' slots and transforms (under st_lock). */
static void st_keys_release(struct st_keys *k)
{
	int i;

	for (i = 0; i < ST_NKEYS; i++) {
		if (k->slot[i] >= 0)
			kgpu_key_put(k->slot[i]);
		k->slot[i] = -1;
		crypto_free_skcipher(k->tfm[i]);
		k->tfm[i] = NULL;
	}
	memzero_explicit(k->key, sizeof(k->key));
	k->n = 0;
	k->ready = false;
}

/*
 * Set the keys once (under st_lock): as many as there are free slots, up
 * to ST_NKEYS; none is no error, the rounds then skip XTS.
 */
static int st_keys_setup(struct st_keys *k)
{
	int i, ret;

	if (k->ready)
		return 0;
	/* Before anything can fail: release puts only the slots we got. */
	for (i = 0; i < ST_NKEYS; i++)
		k->slot[i] = -1;
	k->n = 0;
	for (i = 0; i < ST_NKEYS; i++) {
		int slot = kgpu_key_get();

		if (slot < 0) {
			pr_info("selftest: %d of %d key slots free; XTS with %d keys\n",
				i, ST_NKEYS, i);
			break;
		}
		k->slot[i] = slot;
		/* Synchronous only: our IVs live on the stack. */
		k->tfm[i] = crypto_alloc_skcipher("xts(aes)", 0,
						  CRYPTO_ALG_ASYNC);
		if (IS_ERR(k->tfm[i])) {
			ret = PTR_ERR(k->tfm[i]);
			k->tfm[i] = NULL;
			goto bad;
		}
		k->keylen[i] = i ? 32 : 64;	/* AES-256-XTS and AES-128-XTS */
		do {
			get_random_bytes(k->key[i], k->keylen[i]);
			ret = crypto_skcipher_setkey(k->tfm[i], k->key[i],
						     k->keylen[i]);
		} while (ret == -EINVAL && !memcmp(k->key[i],
				k->key[i] + k->keylen[i] / 2, k->keylen[i] / 2));
		if (ret)
			goto bad;
		ret = kgpu_key_set(slot, k->key[i], k->keylen[i]);
		if (ret)
			goto bad;
		k->n = i + 1;
	}
	k->ready = true;
	return 0;
bad:
	st_keys_release(k);
	return ret;
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
	if (rounds > 1000000)
		return -EINVAL;
	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c)
		return -ENOMEM;
	if (mutex_lock_killable(&st_lock)) {
		kfree(c);
		return -EINTR;
	}
	if (!rounds) {
		st_keys_release(&st_keys);
		mutex_unlock(&st_lock);
		kfree(c);
		return count;
	}
	c->k = &st_keys;
	ret = st_keys_setup(c->k);
	for (i = 0; i < rounds && !ret; i++) {
		ret = st_round(c);
		c->rounds++;
		if (fatal_signal_pending(current) && !ret)
			ret = -EINTR;
		cond_resched();
	}
	snprintf(st_report, sizeof(st_report),
		 "%s: %llu rounds, %llu requests, %llu bytes: helper %llu, fallback %llu, cpu-only %llu; the helper's: GPU resident %llu, GPU batched %llu, its CPU %llu\n",
		 ret ? "FAIL" : "PASS", c->rounds, c->requests, c->bytes,
		 c->helper, c->fallback, c->cpu_only, c->resident, c->batched,
		 c->helper_cpu);
	pr_info("selftest %s", st_report);
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

/* At unload, once the debugfs file is gone: give the key slots back. */
void kgpu_selftest_exit(void)
{
	mutex_lock(&st_lock);
	st_keys_release(&st_keys);
	mutex_unlock(&st_lock);
}
