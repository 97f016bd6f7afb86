// SPDX-License-Identifier: GPL-2.0
/*
 * kgpu core: the CPU path of the RAID6 services, with raid6_pq. One
 * function for every user: the self-test's oracle and the targets'
 * fallback (dm-gpu-raid6), so that "what the helper must compute" is
 * written once on the kernel side.
 */
#include <linux/export.h>
#include <linux/minmax.h>
#include <linux/raid/pq.h>
#include <linux/string.h>

#include "kgpu.h"

static void kgpu_xor(u8 *dst, const u8 *src, size_t len)
{
	size_t i;

	for (i = 0; i + 8 <= len; i += 8)
		*(u64 *)(dst + i) ^= *(const u64 *)(src + i);
	for (; i < len; i++)
		dst[i] ^= src[i];
}

/* xor_syndrome for raid6_pq algorithms that have none: table multiply. */
static void kgpu_pqd_slow(unsigned int nslots, unsigned int a,
			  unsigned int b, size_t len, void **ptrs)
{
	u8 *p = ptrs[nslots - 2], *q = ptrs[nslots - 1];
	unsigned int i;
	size_t x;

	for (i = a; i <= b; i++) {
		const u8 *d = ptrs[i], *mul = raid6_gfmul[raid6_gfexp[i]];

		for (x = 0; x < len; x++) {
			p[x] ^= d[x];
			q[x] ^= mul[d[x]];
		}
	}
}

/**
 * kgpu_raid6_cpu - a RAID6 service on the kernel's CPU
 * @svc: KGPU_SVC_RAID6_GEN, _REC or _PQD
 * @nslots: syndrome slots: data blocks in syndrome order, then P, then Q
 * @ptrs: the nslots blocks, @len bytes each (a multiple of 512)
 * @len: bytes per block
 * @a: REC: a lost block; PQD: the first changed data slot
 * @b: REC: the other lost block or KGPU_RAID6_NONE; PQD: the last changed
 *     data slot
 *
 * GEN writes P and Q; REC rebuilds blocks @a and @b from the others; PQD
 * (ptrs[a..b] hold old ^ new data, see uapi/kgpu.h) updates P and Q in
 * place. Works a page at a time: raid6_pq's recovery stands in its zero
 * page for the lost blocks.
 */
void kgpu_raid6_cpu(unsigned int svc, unsigned int nslots, void **ptrs,
		    size_t len, unsigned int a, unsigned int b)
{
	unsigned int k = nslots - 2, i;
	void *p[KGPU_RAID6_MAX_SLOTS];
	size_t off, n;

	if (WARN_ON_ONCE(nslots < 4 || nslots > KGPU_RAID6_MAX_SLOTS))
		return;
	if (svc == KGPU_SVC_RAID6_REC) {
		if (b == KGPU_RAID6_NONE || a > b)
			swap(a, b);	/* a < b; KGPU_RAID6_NONE only in b */
		if (a == KGPU_RAID6_NONE) {
			a = b;
			b = KGPU_RAID6_NONE;
		}
	}
	for (off = 0; off < len; off += n) {
		n = min_t(size_t, len - off, PAGE_SIZE);
		for (i = 0; i < nslots; i++)
			p[i] = ptrs[i] + off;
		if (svc == KGPU_SVC_RAID6_PQD) {
			if (raid6_call.xor_syndrome)
				raid6_call.xor_syndrome(nslots, a, b, n, p);
			else
				kgpu_pqd_slow(nslots, a, b, n, p);
		} else if (svc == KGPU_SVC_RAID6_GEN || a >= k) {
			/* GEN, or only P and/or Q lost */
			raid6_call.gen_syndrome(nslots, n, p);
		} else if (b < k) {
			raid6_2data_recov(nslots, n, a, b, p);
		} else if (b == k) {
			raid6_datap_recov(nslots, n, a, p);
		} else {
			/* one data block (and perhaps Q): from P, then Q */
			memcpy(p[a], p[k], n);
			for (i = 0; i < k; i++)
				if (i != a)
					kgpu_xor(p[a], p[i], n);
			if (b == k + 1)
				raid6_call.gen_syndrome(nslots, n, p);
		}
	}
}
EXPORT_SYMBOL_GPL(kgpu_raid6_cpu);
