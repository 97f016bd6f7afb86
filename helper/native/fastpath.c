// SPDX-License-Identifier: GPL-2.0
/*
 * fastpath: the helper's per-batch bookkeeping in one pass over the SQE
 * array, called through ctypes (helper/serve/fastpath.py).
 *
 * kgpu_classify() validates every request of a drained batch exactly as
 * daemon.validate() does (region bounds, XTS shape and key slot, RAID6
 * shape), writes the CQEs of the requests that need no compute (invalid
 * ones and nops) and sorts the rest into groups of one service and shape
 * (XTS: unit size; RAID6 GEN: disks; REC: disks and lost blocks), keeping
 * arrival order inside a group. Services absent from a batch cost nothing:
 * there is no per-service pass. kgpu_cqes() and kgpu_xts_descs() build a
 * group's completions and its XTS descriptor table (xts.cu's XtsDesc).
 *
 * The layouts are those of kmod/uapi/kgpu.h and of cupy_backend.XTS_DESC;
 * tests/test_fastpath.py checks them and compares every output with the
 * numpy implementation on random batches.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>

struct sqe {
	uint64_t seq;
	uint32_t tag;
	uint16_t service, flags;
	uint64_t in_off;
	uint32_t in_len, out_len;
	uint64_t out_off;
	uint32_t unit_size, sector_step;
	uint64_t sector;
	uint16_t key_slot;
	uint8_t iv_mode, ndisks, fail_a, fail_b;
	uint16_t reserved;
};

struct cqe {
	uint64_t seq;
	uint32_t tag;
	int16_t status;
	uint16_t flags;
};

struct xts_desc {
	uint64_t in_off, out_off, sector, unit0;
	uint32_t step;
	int32_t slot;
	uint32_t plain, pad;
};

_Static_assert(sizeof(struct sqe) == 64, "sqe");
_Static_assert(sizeof(struct cqe) == 16, "cqe");
_Static_assert(sizeof(struct xts_desc) == 48, "xts_desc");

enum { NOP, XTS_ENC, XTS_DEC, R6_GEN, R6_REC, R6_PQD, SVC_COUNT };
#define RAID6_NONE 0xff
#define IV_PLAIN 1

static int inside(uint64_t off, uint64_t len, uint64_t lo, uint64_t hi)
{
	return off >= lo && off <= hi && len <= hi - off;
}

/* 0, or the errno (negative) that the request is answered with */
static int check(const struct sqe *r, uint64_t lo, uint64_t hi,
		 uint32_t nkeys, const uint8_t *loaded)
{
	uint64_t unit = r->unit_size;

	if (r->flags || r->service >= SVC_COUNT)
		return -EINVAL;
	if (r->service == NOP)
		return 0;
	if (!inside(r->in_off, r->in_len, lo, hi) ||
	    !inside(r->out_off, r->out_len, lo, hi) || !r->in_len ||
	    r->in_len != r->out_len || !unit || unit % 16)
		return -EINVAL;
	if (r->service == XTS_ENC || r->service == XTS_DEC) {
		if (unit > 4096 || r->in_len % unit || r->iv_mode > IV_PLAIN)
			return -EINVAL;
		if (r->out_off != r->in_off &&
		    r->out_off < r->in_off + r->in_len &&
		    r->in_off < r->out_off + r->out_len)
			return -EINVAL;
		if (r->key_slot >= nkeys)
			return -EINVAL;
		return loaded[r->key_slot] ? 0 : -ENOKEY;
	}
	if (r->service == R6_PQD) {
		/* deltas of data slots fail_a..fail_b, then P and Q */
		if (r->ndisks < 4 || r->ndisks > 32 ||
		    r->in_off != r->out_off || r->fail_a > r->fail_b ||
		    r->fail_b + 2 >= r->ndisks ||
		    r->in_len != (uint64_t)(r->fail_b - r->fail_a + 3) * unit)
			return -EINVAL;
		return 0;
	}
	if (r->ndisks < 4 || r->ndisks > 32 || r->in_off != r->out_off ||
	    r->in_len != (uint64_t)r->ndisks * unit)
		return -EINVAL;
	if (r->service == R6_REC &&
	    !(r->fail_a < r->ndisks &&
	      (r->fail_b == RAID6_NONE ||
	       (r->fail_b < r->ndisks && r->fail_b != r->fail_a))))
		return -EINVAL;
	return 0;
}

static uint64_t group_key(const struct sqe *r)
{
	uint64_t k = (uint64_t)r->service << 40;

	if (r->service == XTS_ENC || r->service == XTS_DEC)
		return k | r->unit_size;
	if (r->service == R6_GEN)
		return k | r->ndisks;
	return k | (uint64_t)r->ndisks << 16 | r->fail_a << 8 | r->fail_b;
}

/*
 * struct classify_ctx: what kgpu_classify() reads and writes besides the
 * batch, set up once per helper (fastpath.FastPath mirrors it).
 */
struct classify_ctx {
	uint64_t lo, hi;		/* the data area: [lo, hi) */
	const uint8_t *keys;		/* the key slots in the region */
	uint32_t nkeys, key_size;
	const int64_t *gen_seen;	/* per slot: generation read, or -1 */
	const uint8_t *loaded;		/* per slot: holds a key */
	uint8_t *need;			/* out: slots to read again */
	int16_t *status;		/* out, per request */
	struct cqe *ready;		/* out: CQEs of invalid requests, nops */
	uint32_t *order;		/* out: grouped requests' indexes */
	uint64_t *gkey;			/* out, per group */
	uint32_t *gstart, *gcount, *gsvc;
	uint32_t *svc_err;		/* out: invalid requests per service */
	uint32_t *scratch;		/* n words */
	uint32_t nready, nnop;		/* out */
};

/*
 * Returns the number of groups, or -k when k key slots that XTS requests
 * use changed generation since gen_seen (need[slot] = 1 for each; the
 * caller re-reads them and calls again, with stale_ok = 1 the second
 * time). Outputs, in ctx:
 *   status[i]	0 or -errno, per request
 *   ready	CQEs of the invalid and nop requests, in arrival order;
 *		nready of them
 *   order	the grouped requests' indexes, group after group
 *   gkey, gstart, gcount, gsvc  per group (at most n groups)
 *   svc_err[s]	invalid requests per service (s == SVC_COUNT: unknown)
 *   nnop	nops answered
 */
int kgpu_classify(const struct sqe *s, uint32_t n, int stale_ok,
		  struct classify_ctx *c)
{
	uint64_t lo = c->lo, hi = c->hi;
	const uint8_t *keys = c->keys, *loaded = c->loaded;
	uint32_t nkeys = c->nkeys, key_size = c->key_size;
	const int64_t *gen_seen = c->gen_seen;
	uint8_t *need = c->need;
	int16_t *status = c->status;
	struct cqe *ready = c->ready;
	uint32_t *order = c->order, *gstart = c->gstart, *gcount = c->gcount;
	uint32_t *gsvc = c->gsvc, *svc_err = c->svc_err, *scratch = c->scratch;
	uint64_t *gkey = c->gkey;
	uint32_t *nready = &c->nready, *nnop = &c->nnop;
	uint32_t i, g, ng = 0, nr = 0, last = 0;
	int stale = 0;

	if (!stale_ok)
		for (i = 0; i < n; i++) {
			uint16_t k = s[i].key_slot;
			uint32_t gen;

			if ((s[i].service != XTS_ENC &&
			     s[i].service != XTS_DEC) || k >= nkeys)
				continue;
			memcpy(&gen, keys + (size_t)k * key_size + 4, 4);
			if ((int64_t)gen != gen_seen[k] && !need[k]) {
				need[k] = 1;
				stale++;
			}
		}
	if (stale)
		return -stale;
	memset(svc_err, 0, (SVC_COUNT + 1) * sizeof(*svc_err));
	*nnop = 0;
	for (i = 0; i < n; i++) {
		const struct sqe *r = &s[i];
		int st = check(r, lo, hi, nkeys, loaded);
		uint64_t key;

		status[i] = (int16_t)st;
		if (st || r->service == NOP) {
			ready[nr].seq = r->seq;
			ready[nr].tag = r->tag;
			ready[nr].status = (int16_t)st;
			ready[nr].flags = 0;
			nr++;
			if (st)
				svc_err[r->service < SVC_COUNT ? r->service :
					SVC_COUNT]++;
			else
				(*nnop)++;
			scratch[i] = UINT32_MAX;
			continue;
		}
		key = group_key(r);
		/* batches hold few shapes: the last one is the usual hit */
		if (ng && gkey[last] == key) {
			g = last;
		} else {
			for (g = 0; g < ng && gkey[g] != key; g++)
				;
			if (g == ng) {
				gkey[ng] = key;
				gcount[ng] = 0;
				gsvc[ng] = r->service;
				ng++;
			}
			last = g;
		}
		gcount[g]++;
		scratch[i] = g;
	}
	*nready = nr;
	for (g = 0, i = 0; g < ng; g++) {
		gstart[g] = i;
		i += gcount[g];
	}
	if (ng == 1) {
		uint32_t j = 0;

		for (i = 0; i < n; i++)
			if (scratch[i] != UINT32_MAX)
				order[j++] = i;
		return 1;
	}
	{
		uint32_t pos[ng ? ng : 1];

		for (g = 0; g < ng; g++)
			pos[g] = gstart[g];
		for (i = 0; i < n; i++)
			if (scratch[i] != UINT32_MAX)
				order[pos[scratch[i]]++] = i;
	}
	return (int)ng;
}

/* CQEs of n requests (all with one status and flags) */
void kgpu_cqes(const struct sqe *s, uint32_t n, int16_t status,
	       uint16_t flags, struct cqe *out)
{
	uint32_t i;

	for (i = 0; i < n; i++) {
		out[i].seq = s[i].seq;
		out[i].tag = s[i].tag;
		out[i].status = status;
		out[i].flags = flags;
	}
}

/* CQEs of n requests, a status each */
void kgpu_cqes_status(const struct sqe *s, uint32_t n, const int16_t *status,
		      uint16_t flags, struct cqe *out)
{
	uint32_t i;

	for (i = 0; i < n; i++) {
		out[i].seq = s[i].seq;
		out[i].tag = s[i].tag;
		out[i].status = status[i];
		out[i].flags = flags;
	}
}

/* the XtsDesc table of n XTS requests of one unit size; returns units */
uint64_t kgpu_xts_descs(const struct sqe *s, uint32_t n, uint32_t unit,
			struct xts_desc *out)
{
	uint64_t u = 0;
	uint32_t i;

	for (i = 0; i < n; i++) {
		out[i].in_off = s[i].in_off;
		out[i].out_off = s[i].out_off;
		out[i].sector = s[i].sector;
		out[i].unit0 = u;
		out[i].step = s[i].sector_step;
		out[i].slot = s[i].key_slot;
		out[i].plain = s[i].iv_mode == IV_PLAIN;
		out[i].pad = 0;
		u += s[i].in_len / unit;
	}
	return u;
}
