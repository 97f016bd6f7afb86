// The GPU-resident XTS service (issue 11 part 4): a persistent kernel that
// serves small XTS requests straight from the ring, with no launch and no
// Python per request.
//
// Compiled as one unit after xts.cu (kgpu_helper/resident.py puts
// "#define XTS_RK_LOAD(p) (*(p))" first: the key cache below changes while
// the kernel runs, so round keys are plain loads, not __ldg).
//
// Memory. The ring region is cudaHostRegister'ed (mapped): the kernel
// reads sq_tail, the SQEs and the data, and writes the data, the CQEs and
// cq_tail, over PCIe with system-scope loads and stores. The key slots
// (the region's read-only part) are registered read-only. `ctl` is a small
// mapped pinned buffer shared with the helper process (resident.py: CTL_*
// words, the spill rings); `dst` is device memory (D_* words).
//
// Work. Each block (RES_THREADS threads, its own copy of the AES tables
// in shared memory and of the expanded keys in global memory) loops:
// thread 0 claims the next SQ index with atomicAdd on D_CLAIM, waits until
// sq_tail passes it (polling with nanosleep backoff), copies the SQE and
// decides. A request it may take (res_check == 0: XTS, in place, at most
// max_bytes, 16-byte aligned inside the data area, a valid slot) is
// computed by the whole block, one AES block per thread per pass; its
// CQE goes to the CQ. Anything else is copied to the spill SQ, which the
// helper's Python loop serves as it serves the ring today; its answers
// come back on the spill CQ and block 0 moves them to the CQ. The kernel
// is the CQ's only producer. CQ (and spill SQ) positions are taken with
// atomicAdd and published in that order (D_CQ_PUB): one release store of
// cq_tail per completion.
//
// Keys. Before each request the block reads the slot's generation (system
// scope): an odd one, or one that changes while the key is read, sends the
// request to the spill path; a new even one makes thread 0 read the key
// (seqlock, as uapi/kgpu.h says) and expand it into the block's cache. So
// a key change is seen by the first request submitted after it.
//
// Stop. The helper sets CTL_STOP. The first block that sees it records the
// SQ tail (D_STOP_AT, also CTL_STOP_AT): requests before it are served
// (their claimers keep going), none after. Blocks exit once their claimed
// index reaches it; block 0 last, after every spilled request was
// answered and forwarded.

#ifdef RES_HOST_TEST
// gcc builds the part above the kernel alone (tests/test_resident.py)
#include <stdint.h>
typedef uint32_t u32;
typedef uint64_t u64;
typedef uint8_t u8;
#define __device__
#define __forceinline__ static inline
#endif

#define RES_THREADS 256

// ring index words (struct kgpu_ring_idx)
#define IDX_SQ_TAIL 0
#define IDX_SQ_HEAD 16
#define IDX_CQ_TAIL 32

// ctl words (mapped host memory), one 64-byte line each; resident.py
#define CTL_STOP 0           // host: 1 = stop
#define CTL_SPILL_TAIL 16    // GPU: spill SQ entries published
#define CTL_SPILL_HEAD 32    // host: spill SQ entries taken
#define CTL_SPILL_CQ_TAIL 48 // host: spill CQ entries published
#define CTL_STOP_AT 64       // GPU: the SQ index the kernel stopped at
#define CTL_STOPPED 80       // GPU: 1 once block 0 leaves
#define CTL_RUNNING 96       // GPU: 1 once block 0 started
#define CTL_SPILL_SQ_BYTE 8192

// device state words
#define D_CLAIM 0
#define D_CQ_ALLOC 1
#define D_CQ_PUB 2
#define D_SPILL_ALLOC 3
#define D_SPILL_PUB 4
#define D_SQ_READ 5
#define D_STOP_AT 6
#define D_STOP_SET 7
#define D_STOP_LOCK 8
#define D_EXITED 9
#define D_STATS 16           // per block: served, spilled, expansions, enc
#define D_STATS_PER 4

// the 64-byte SQE and 16-byte CQE of uapi/kgpu.h
struct ResSqe {
    u64 seq;
    u32 tag;
    unsigned short service, flags;
    u64 in_off;
    u32 in_len, out_len;
    u64 out_off;
    u32 unit_size, sector_step;
    u64 sector;
    unsigned short key_slot;
    u8 iv_mode, ndisks, fail_a, fail_b;
    unsigned short reserved;
};

#define SVC_XTS_ENC 1
#define SVC_XTS_DEC 2
// struct kgpu_cqe flags of the requests served here (KGPU_CQE_RESIDENT):
// the kernel module counts them apart from the batched launches' answers
#define CQE_RESIDENT 0x2u

// Why a request does not go through the GPU itself (0: it does). The
// spilled ones are validated in full by the helper (batch.validate).
#define RES_OK 0
#define RES_NOT_XTS 1
#define RES_FLAGS 2
#define RES_NOT_IN_PLACE 3
#define RES_TOO_BIG 4
#define RES_UNIT 5
#define RES_RANGE 6
#define RES_SLOT 7
#define RES_IV_MODE 8

__device__ __forceinline__ int res_check(const struct ResSqe* q, u64 data_off, u64 data_size,
                                         u32 max_bytes, u32 nslots) {
    const u32 u = q->unit_size;
    if (q->service != SVC_XTS_ENC && q->service != SVC_XTS_DEC) return RES_NOT_XTS;
    if (q->flags) return RES_FLAGS;
    if (q->in_off != q->out_off || q->in_len != q->out_len) return RES_NOT_IN_PLACE;
    if (q->in_len == 0 || q->in_len > max_bytes) return RES_TOO_BIG;
    if ((u != 512 && u != 1024 && u != 2048 && u != 4096) || q->in_len % u) return RES_UNIT;
    if (q->in_off % 16 || q->in_off < data_off || q->in_off - data_off > data_size ||
        q->in_len > data_off + data_size - q->in_off)
        return RES_RANGE;
    if (q->key_slot >= nslots) return RES_SLOT;
    if (q->iv_mode > 1) return RES_IV_MODE;
    return RES_OK;
}

// AES key expansion of a raw XTS key (K1 || K2, key_len 32 or 64 bytes,
// as little-endian words) into xts.cu's slot layout: K1's encryption
// round keys at word 0, K2's at 60, K1's decryption round keys (the
// equivalent inverse cipher's) at 120, the number of rounds at 180. The
// S-box is read out of T0 (byte 1), InvMixColumns out of Td0 (Td0[S(b)]
// is b's column times {14, 9, 13, 11}). One thread; kgpu_helper's
// aes_tables.expand_key / decryption_key is the reference.
__device__ __forceinline__ u32 res_rotl(u32 x, int n) { return (x << n) | (x >> (32 - n)); }

__device__ __forceinline__ u32 res_sub(u32 w, const u32* te0) {
    return ((te0[w & 0xff] >> 8) & 0xff) | (te0[(w >> 8) & 0xff] & 0xff00) |
           ((te0[(w >> 16) & 0xff] << 8) & 0xff0000) | ((te0[w >> 24] << 16) & 0xff000000u);
}

__device__ __forceinline__ u32 res_sbox(u32 b, const u32* te0) { return (te0[b] >> 8) & 0xff; }

__device__ __forceinline__ u32 res_inv_mix(u32 w, const u32* te0, const u32* td0) {
    return td0[res_sbox(w & 0xff, te0)] ^ res_rotl(td0[res_sbox((w >> 8) & 0xff, te0)], 8) ^
           res_rotl(td0[res_sbox((w >> 16) & 0xff, te0)], 16) ^
           res_rotl(td0[res_sbox(w >> 24, te0)], 24);
}

__device__ __forceinline__ void res_expand_one(u32* e, const u32* k, u32 nk, u32 nw,
                                               const u32* te0) {
    u32 rcon = 1;
    for (u32 i = 0; i < nk; ++i) e[i] = k[i];
    for (u32 i = nk; i < nw; ++i) {
        u32 t = e[i - 1];
        if (i % nk == 0) {
            t = res_sub((t >> 8) | (t << 24), te0) ^ rcon;  // RotWord, SubWord, Rcon
            rcon = (rcon << 1) ^ ((rcon & 0x80) ? 0x11b : 0);
        } else if (nk > 6 && i % nk == 4) {
            t = res_sub(t, te0);
        }
        e[i] = e[i - nk] ^ t;
    }
}

__device__ __forceinline__ void res_expand_key(u32* w, const u32* key, u32 key_len,
                                               const u32* te0, const u32* td0) {
    const u32 nk = key_len / 8, nr = nk + 6, nw = 4 * (nr + 1);
    for (u32 i = 0; i < 192; ++i) w[i] = 0;
    res_expand_one(w, key, nk, nw, te0);
    res_expand_one(w + 60, key + nk, nk, nw, te0);
    u32* d = w + 120;
    for (u32 c = 0; c < 4; ++c) d[c] = w[4 * nr + c];
    for (u32 r = nr - 1; r >= 1; --r)
        for (u32 c = 0; c < 4; ++c) d[4 * (nr - r) + c] = res_inv_mix(w[4 * r + c], te0, td0);
    for (u32 c = 0; c < 4; ++c) d[4 * nr + c] = w[c];
    w[180] = nr;
}

#ifndef RES_HOST_TEST

struct ResArgs {           // resident.py's _ResArgs
    unsigned char* region; // the region's device pointer (its host address)
    const unsigned char* keys;  // struct kgpu_key_slot array
    unsigned int* ctl;     // mapped host control block
    unsigned int* dst;     // device state
    uint4* kcache;         // gridDim.x * nslots * SLOT_U4
    unsigned int* kgen;    // gridDim.x * nslots: generation cached (1: none)
    const u32* te0;
    const u32* td0;
    const u8* isbox;
    u64 sq_off, cq_off, idx_off, data_off, data_size;
    u32 mask, nslots, max_bytes, poll_ns;
};

// 32-bit loads with the given PTX qualifiers (generic addresses: the
// region's host-mapped memory or device memory)
#define RES_LOAD32(name, op)                                                 \
    __device__ __forceinline__ u32 name(const void* p) {                     \
        u32 v;                                                               \
        asm volatile(op " %0, [%1];" : "=r"(v) : "l"(p) : "memory");         \
        return v;                                                            \
    }
RES_LOAD32(ld_acq_sys, "ld.acquire.sys.u32")
RES_LOAD32(ld_acq_gpu, "ld.acquire.gpu.u32")
RES_LOAD32(ld_vol, "ld.volatile.u32")
__device__ __forceinline__ uint4 ld_vol4(const void* p) {
    uint4 v;
    asm volatile("ld.volatile.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_vol4(void* p, uint4 v) {
    asm volatile("st.volatile.v4.u32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
__device__ __forceinline__ void st_rel_gpu(void* p, u32 v) {
    asm volatile("st.release.gpu.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void res_sleep(u32 ns) {
    asm volatile("nanosleep.u32 %0;" :: "r"(ns));
}

__device__ __forceinline__ void st_vol(void* p, u32 v) {
    asm volatile("st.volatile.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

// Publish one entry in allocation order: wait for our turn (pub == pos),
// store the tail, hand the turn on. Thread 0 only. The caller wrote the
// entry and fenced it (__threadfence_system) before: the tail's store
// needs no fence of its own, and the turn passed at GPU scope orders the
// tail stores of successive publishers. (First version: a release store
// at system scope here, i.e. a system fence inside this serial section:
// 372K requests/s at most, H200.)
__device__ __forceinline__ void res_publish(unsigned int* pub, u32 pos, unsigned int* tail) {
    while (ld_acq_gpu(pub) != pos) {
    }
    st_vol(tail, pos + 1);
    st_rel_gpu(pub, pos + 1);
    // push the tail out now, after the turn is passed on: without this
    // fence the store lingered (4K depth 1 p50 119 us instead of 40, H200)
    __threadfence_system();
}

__device__ __forceinline__ void res_post_cqe(const ResArgs& a, uint4 c) {
    const u32 pos = atomicAdd(&a.dst[D_CQ_ALLOC], 1u);
    st_vol4(a.region + a.cq_off + 16 * (u64)(pos & a.mask), c);
    __threadfence_system();
    res_publish(&a.dst[D_CQ_PUB], pos, (unsigned int*)(a.region + a.idx_off) + IDX_CQ_TAIL);
}

__device__ __forceinline__ void res_spill(const ResArgs& a, const uint4 (&raw)[4]) {
    const u32 pos = atomicAdd(&a.dst[D_SPILL_ALLOC], 1u);
    unsigned char* e = (unsigned char*)a.ctl + CTL_SPILL_SQ_BYTE + 64 * (u64)(pos & a.mask);
#pragma unroll
    for (int k = 0; k < 4; ++k) st_vol4(e + 16 * k, raw[k]);
    __threadfence_system();
    res_publish(&a.dst[D_SPILL_PUB], pos, a.ctl + CTL_SPILL_TAIL);
}

// Block 0: move the helper's answers to spilled requests into the CQ.
__device__ __forceinline__ void res_forward(const ResArgs& a, u32& fwd) {
    const u32 t = ld_acq_sys(a.ctl + CTL_SPILL_CQ_TAIL);
    const unsigned char* scq = (const unsigned char*)a.ctl + CTL_SPILL_SQ_BYTE +
                               64 * (u64)(a.mask + 1);
    while (fwd != t) {
        res_post_cqe(a, ld_vol4(scq + 16 * (u64)(fwd & a.mask)));
        ++fwd;
    }
}

// Thread 0: wait for SQ index i. Returns 1 when the request is there, 0
// when the kernel stops before it.
__device__ __forceinline__ int res_wait(const ResArgs& a, u32 i, u32& fwd) {
    const unsigned int* idx = (const unsigned int*)(a.region + a.idx_off);
    u32 backoff = 64;
    for (;;) {
        const u32 tail = ld_acq_sys(idx + IDX_SQ_TAIL);
        const u32 stopping = ld_acq_gpu(&a.dst[D_STOP_SET]);
        if (stopping) {
            const u32 at = ld_vol(&a.dst[D_STOP_AT]);
            if ((int)(i - at) >= 0) return 0;
        }
        if ((int)(tail - i) > 0) return 1;
        if (blockIdx.x == 0) res_forward(a, fwd);
        if (!stopping && ld_vol(a.ctl + CTL_STOP)) {
            if (atomicCAS(&a.dst[D_STOP_LOCK], 0u, 1u) == 0u) {
                const u32 at = ld_acq_sys(idx + IDX_SQ_TAIL);
                a.dst[D_STOP_AT] = at;
                a.ctl[CTL_STOP_AT] = at;
                __threadfence_system();
                st_rel_gpu(&a.dst[D_STOP_SET], 1u);
            }
            continue;
        }
        res_sleep(backoff);
        backoff = min(backoff * 2, a.poll_ns);
    }
}

extern "C" __global__ void __launch_bounds__(RES_THREADS, 1)
resident_xts(const __grid_constant__ ResArgs a) {
    extern __shared__ uint4 res_smem[];
    u32* te = (u32*)res_smem;
    u32* td = te + TAB_WORDS;
    u8* ib = (u8*)(td + TAB_WORDS);
    __shared__ uint4 raw[4];      // the SQE
    __shared__ u32 rawkey[16];
    __shared__ int cmd;           // 0 exit, 1 compute, 2 spilled, 3 expand + compute

    replicate<256>(te, a.te0);
    replicate<256>(td, a.td0);
    replicate<ISB_BYTES / 4 / 32>((u32*)ib, (const u32*)a.isbox);
    const u32 l4 = (threadIdx.x & 31) << 2;
    unsigned int* idx = (unsigned int*)(a.region + a.idx_off);
    uint4* kc = a.kcache + (size_t)blockIdx.x * a.nslots * SLOT_U4;
    unsigned int* kg = a.kgen + (size_t)blockIdx.x * a.nslots;
    unsigned int* stats = a.dst + D_STATS + D_STATS_PER * blockIdx.x;
    u32 fwd = 0;  // block 0, thread 0: spill CQEs forwarded
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        a.ctl[CTL_RUNNING] = 1;
        __threadfence_system();
    }
    __syncthreads();

    for (;;) {
        if (threadIdx.x == 0) {
            if (blockIdx.x == 0) res_forward(a, fwd);
            const u32 i = atomicAdd(&a.dst[D_CLAIM], 1u);
            int c = res_wait(a, i, fwd);
            if (c) {
                const unsigned char* e = a.region + a.sq_off + 64 * (u64)(i & a.mask);
#pragma unroll
                for (int k = 0; k < 4; ++k) raw[k] = ld_vol4(e + 16 * k);
                const u32 seen = atomicMax(&a.dst[D_SQ_READ], i + 1);
                if ((int)(i + 1 - seen) > 0) st_vol(idx + IDX_SQ_HEAD, i + 1);  // informative
                const ResSqe* q = (const ResSqe*)raw;
                if (res_check(q, a.data_off, a.data_size, a.max_bytes, a.nslots)) {
                    c = 2;
                } else {
                    const unsigned char* ks = a.keys + 128 * (u64)q->key_slot;
                    const u32 g = ld_acq_sys(ks + 4);
                    if (g & 1) {
                        c = 2;  // being changed: the helper re-reads it
                    } else if (g != kg[q->key_slot]) {
                        const u32 klen = ld_vol(ks);
                        for (int k = 0; k < 16; ++k) rawkey[k] = ld_vol(ks + 16 + 4 * k);
                        __threadfence_system();
                        if (ld_acq_sys(ks + 4) != g || (klen != 32 && klen != 64)) {
                            c = 2;  // torn, empty or malformed: the helper answers
                        } else {
                            res_expand_key((u32*)(kc + (size_t)q->key_slot * SLOT_U4), rawkey,
                                           klen, a.te0, a.td0);
                            kg[q->key_slot] = g;
                            __threadfence_block();
                            stats[2] += 1;
                        }
                    }
                }
                if (c == 2) {
                    res_spill(a, raw);
                    stats[1] += 1;
                }
            }
            cmd = c;
        }
        __syncthreads();
        const int c = cmd;
        if (c == 0) break;
        if (c == 1) {
            const ResSqe* q = (const ResSqe*)raw;
            const bool dec = q->service == SVC_XTS_DEC;
            const uint4* rk = kc + (size_t)q->key_slot * SLOT_U4;
            const int nr = ((const u32*)rk)[NR_WORD];
            const u32 bpu = q->unit_size / 16;
            const u32 sh = __ffs(bpu) - 1;
            const u32 nblk = q->in_len / 16;
            uint4* data = (uint4*)(a.region + q->in_off);
            for (u32 b = threadIdx.x; b < nblk; b += RES_THREADS) {
                const uint4 x = ld_vol4(data + b);  // in flight during the tweak
                const u32 u = b >> sh, j = b & (bpu - 1);
                u64 iv = q->sector + (u64)u * q->sector_step;
                if (q->iv_mode) iv &= 0xffffffffull;
                uint4 t[1] = {make_uint4((u32)iv, (u32)(iv >> 32), 0u, 0u)};
                aes_enc_any(t, rk + RK_ENC2, nr, te, l4);
                const uint4 tw = mul_alpha_pow(t[0], j);
                uint4 s[1] = {xor4(x, tw)};
                if (dec) {
                    if (nr == 14) aes_dec<14, 1>(s, rk + RK_DEC1, td, ib, l4);
                    else aes_dec<10, 1>(s, rk + RK_DEC1, td, ib, l4);
                } else {
                    aes_enc_any(s, rk + RK_ENC1, nr, te, l4);
                }
                st_vol4(data + b, xor4(s[0], tw));
            }
            __threadfence_system();
            __syncthreads();
            if (threadIdx.x == 0) {
                uint4 cq;  // seq, tag, status 0, flags CQE_RESIDENT
                cq.x = raw[0].x;
                cq.y = raw[0].y;
                cq.z = raw[0].z;
                cq.w = CQE_RESIDENT << 16;
                res_post_cqe(a, cq);
                stats[0] += 1;
                if (!dec) stats[3] += 1;
            }
        }
        __syncthreads();  // raw and cmd are reused
    }
    if (threadIdx.x == 0) {
        if (blockIdx.x == 0) {
            // last out: every other block gone, every spilled request
            // answered (the helper keeps serving until CTL_STOPPED)
            while (ld_acq_gpu(&a.dst[D_EXITED]) != gridDim.x - 1 ||
                   fwd != ld_acq_gpu(&a.dst[D_SPILL_PUB])) {
                res_forward(a, fwd);
                res_sleep(1000);
            }
            a.ctl[CTL_STOPPED] = 1;
            __threadfence_system();
        } else {
            __threadfence();
            atomicAdd(&a.dst[D_EXITED], 1u);
        }
    }
}

#endif  // RES_HOST_TEST
