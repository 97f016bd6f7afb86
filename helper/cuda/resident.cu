// The GPU-resident XTS service (issue 11 part 4): a persistent kernel that
// serves small XTS requests straight from the ring, with no launch and no
// Python per request.
//
// Compiled as one unit after xts.cu (kgpu_helper.serve.resident puts
// "#define XTS_RK_LOAD(p) (*(p))" first: the key cache below changes while
// the kernel runs, so round keys are plain loads, not __ldg).
//
// Memory. The ring region is cudaHostRegister'ed (mapped): the kernel
// reads sq_tail, the SQEs and the data, and writes the data, the CQEs and
// cq_tail, over PCIe with system-scope loads and stores. The key slots
// (the region's read-only part) are registered read-only. `ctl` is a small
// mapped pinned buffer shared with the helper process
// (serve/resident/layout.py: CTL_* words, the spill rings); `dst` is
// device memory (D_* words).
//
// Work. Each block (RES_THREADS threads, its own copy of the AES tables
// in shared memory) holds RES_SERVERS servers of RES_SRV_THREADS threads;
// each server (its own expanded keys in global memory, its own named
// barrier) serves one request at a time and loops: its thread 0 claims
// the next SQ index with atomicAdd on D_CLAIM and waits until sq_tail
// passes it. Only one server reads sq_tail over PCIe: the one whose claim
// is the next index to arrive (claim == D_SQ_SEEN, the last sq_tail read,
// kept in device memory); it moves D_SQ_SEEN when the tail moves, and
// every other waiter watches D_SQ_SEEN in L2. (Sixteen blocks polling the
// region each cost the working block's PCIe reads: 4K depth 1 p50 122 us
// with 16 pollers, 27.5 with 2, H200.) The stop flag is read by that
// server too. Thread 0 then copies the SQE and decides. A request it may
// take (res_check == 0: XTS, in place, at most max_bytes, 16-byte aligned
// inside the data area, a valid slot) is computed by the whole server, two
// AES blocks per thread per pass, the first pass's data loaded while
// thread 0 reads the key slot's generation (the round trips over PCIe, not
// the AES, are most of a small request's time); its CQE goes to the CQ.
// Anything else is copied to the spill SQ, which the helper's Python loop
// serves as it serves the ring today; its answers come back on the spill
// CQ and server 0 moves them to the CQ. The kernel is the CQ's only
// producer. CQ (and spill SQ) positions are taken with atomicAdd and
// published in that order (D_CQ_PUB): one store of cq_tail per completion.
//
// Keys. Before each request the server reads the slot's generation (system
// scope): an odd one, or one that changes while the key is read, sends the
// request to the spill path; a new even one makes thread 0 read the key
// (seqlock, as uapi/kgpu.h says) and expand it into the server's cache. So
// a key change is seen by the first request submitted after it.
//
// Stop. The helper sets CTL_STOP. The polling server records the SQ tail
// (D_STOP_AT, also CTL_STOP_AT): requests before it are served (their
// claimers keep going), none after. Servers exit once their claimed index
// reaches it; server 0 last, after every spilled request was answered and
// forwarded.
//
// Faults. A fault ends the kernel and, on most GPUs, the CUDA context, so
// device memory cannot be read afterwards. What the helper needs to take
// over is kept in host memory as it happens, with plain posted stores (no
// fence: they cost nothing on the request's path): per server, the SQ
// index it holds and what it is doing with it (CTL_BLK_*), and how many
// spill answers server 0 has forwarded (CTL_FWD). failover_plan
// (serve/resident/failover.py) reads them; a request a server held is
// answered -EIO unless its CQE is in the CQ (its data may be half written:
// the kernel module then computes it on its CPU from its own copy).
// `fault_at` (tests only) makes the server that takes the fault_at-th
// request (counted from 1) trap in the middle of it.

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
// servers per block: each serves its own request with RES_SRV_THREADS
// threads, sharing the block's tables (serve/resident/layout.py defines it)
#ifndef RES_SERVERS
#define RES_SERVERS 2
#endif
#define RES_SRV_THREADS (RES_THREADS / RES_SERVERS)

// ring index words (struct kgpu_ring_idx)
#define IDX_SQ_TAIL 0
#define IDX_SQ_HEAD 16
#define IDX_CQ_TAIL 32

// ctl words (mapped host memory), one 64-byte line each; mirrored in
// serve/resident/layout.py
#define CTL_STOP 0           // host: 1 = stop
#define CTL_SPILL_TAIL 16    // GPU: spill SQ entries published
#define CTL_SPILL_HEAD 32    // host: spill SQ entries taken
#define CTL_SPILL_CQ_TAIL 48 // host: spill CQ entries published
#define CTL_STOP_AT 64       // GPU: the SQ index the kernel stopped at
#define CTL_STOPPED 80       // GPU: 1 once server 0 leaves
#define CTL_RUNNING 96       // GPU: 1 once server 0 started
#define CTL_FWD 112          // GPU: spill answers forwarded to the CQ
#define CTL_BLK_BYTE 4096    // per server, 16 bytes: RES_BLK_* words
#define CTL_SPILL_SQ_BYTE 8192
#define RES_MAX_SERVERS 256  // (CTL_SPILL_SQ_BYTE - CTL_BLK_BYTE) / 16

// a server's words at CTL_BLK_BYTE + 16 * server: the SQ index it claimed,
// then its state (RES_ST_*); the SQE's tag and low seq are in the SQ slot
#define RES_BLK_CLAIM 0
#define RES_BLK_STATE 1
#define RES_ST_IDLE 0        // nothing held (before the first claim)
#define RES_ST_WAIT 1        // claimed, waiting for sq_tail to pass it
#define RES_ST_SERVE 2       // took the request: computing it in place
#define RES_ST_SPILL 3       // handing it to the spill SQ
#define RES_ST_DONE 4        // its CQE (or spill entry) is published

// device state words
#define D_CLAIM 0
#define D_CQ_ALLOC 1
#define D_CQ_PUB 2
#define D_SPILL_ALLOC 3
#define D_SPILL_PUB 4
#define D_SQ_READ 5
#define D_STOP_AT 6
#define D_STOP_SET 7
#define D_EXITED 9
#define D_SQ_SEEN 10         // sq_tail as last read from the region
#define D_TAKEN 11           // requests taken (fault_at counts these)
#define D_STATS 16           // per server: served, spilled, expansions, enc
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

struct ResArgs {           // serve/resident/launch.py's _ResArgs
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
    u32 write_sq_head;     // 0 on kgpu.ko's ring: the host thread writes it
    u32 fault_at;          // tests: fault in the fault_at-th request (0: never)
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

// Server 0: move the helper's answers to spilled requests into the CQ.
__device__ __forceinline__ void res_forward(const ResArgs& a, u32& fwd) {
    if (ld_acq_gpu(&a.dst[D_SPILL_PUB]) == fwd) return;  // nothing to wait for
    const u32 t = ld_acq_sys(a.ctl + CTL_SPILL_CQ_TAIL);
    const unsigned char* scq = (const unsigned char*)a.ctl + CTL_SPILL_SQ_BYTE +
                               64 * (u64)(a.mask + 1);
    if (fwd == t) return;
    while (fwd != t) {
        res_post_cqe(a, ld_vol4(scq + 16 * (u64)(fwd & a.mask)));
        ++fwd;
    }
    st_vol(a.ctl + CTL_FWD, fwd);
}

// Thread 0: wait for SQ index i. Returns 1 when the request is there, 0
// when the kernel stops before it. The waiter whose claim is the next
// index to arrive polls the region; the others watch D_SQ_SEEN.
__device__ __forceinline__ int res_wait(const ResArgs& a, u32 i, u32& fwd, bool first) {
    const unsigned int* idx = (const unsigned int*)(a.region + a.idx_off);
    u32 backoff = 32;
    for (;;) {
        const u32 seen = ld_acq_gpu(&a.dst[D_SQ_SEEN]);
        if ((int)(seen - i) > 0) return 1;
        const u32 stopping = ld_acq_gpu(&a.dst[D_STOP_SET]);
        if (stopping && (int)(i - ld_vol(&a.dst[D_STOP_AT])) >= 0) return 0;
        if (first) res_forward(a, fwd);
        if (seen != i || stopping) {
            res_sleep(64);  // an L2 read per look
            continue;
        }
        const u32 tail = ld_acq_sys(idx + IDX_SQ_TAIL);
        if ((int)(tail - seen) > 0) {
            st_rel_gpu(&a.dst[D_SQ_SEEN], tail);
            return 1;
        }
        if (ld_vol(a.ctl + CTL_STOP)) {
            // the tail read after the flag: every request published before
            // the helper asked to stop is served
            const u32 at = ld_acq_sys(idx + IDX_SQ_TAIL);
            a.dst[D_STOP_AT] = at;
            a.ctl[CTL_STOP_AT] = at;
            if ((int)(at - seen) > 0) st_rel_gpu(&a.dst[D_SQ_SEEN], at);
            __threadfence_system();
            st_rel_gpu(&a.dst[D_STOP_SET], 1u);
            continue;
        }
        res_sleep(backoff);
        backoff = min(backoff * 2, a.poll_ns);
    }
}

// A server's barrier: its RES_SRV_THREADS threads only (named barrier
// 1 + sid; 0 is __syncthreads).
__device__ __forceinline__ void res_bar(u32 sid) {
    asm volatile("bar.sync %0, %1;" :: "r"(1 + sid), "r"(RES_SRV_THREADS) : "memory");
}

// One AES block of a request: the tweak of its unit (K2), then the data.
__device__ __forceinline__ uint4 res_xts_block(const ResSqe* q, const uint4* rk, int nr, u32 b,
                                               u32 sh, u32 bpu, uint4 x, bool dec,
                                               const u32* te, const u32* td, const u8* ib,
                                               u32 l4) {
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
    return xor4(s[0], tw);
}

// Thread 0 of a server: the key slot of the request in raw. 1: the cache
// holds this generation (expanded now if it moved); 2: spill it (being
// changed, torn, empty or malformed: the helper re-reads and answers).
__device__ __forceinline__ int res_key(const ResArgs& a, const ResSqe* q, uint4* kc,
                                       unsigned int* kg, u32* rawkey, unsigned int* stats,
                                       u32 g) {
    const unsigned char* ks = a.keys + 128 * (u64)q->key_slot;
    if (g & 1) return 2;
    if (g == kg[q->key_slot]) return 1;
    const u32 klen = ld_vol(ks);
    for (int k = 0; k < 16; ++k) rawkey[k] = ld_vol(ks + 16 + 4 * k);
    __threadfence_system();
    if (ld_acq_sys(ks + 4) != g || (klen != 32 && klen != 64)) return 2;
    res_expand_key((u32*)(kc + (size_t)q->key_slot * SLOT_U4), rawkey, klen, a.te0, a.td0);
    kg[q->key_slot] = g;
    __threadfence_block();
    stats[2] += 1;
    return 1;
}

extern "C" __global__ void __launch_bounds__(RES_THREADS, 1)
resident_xts(const __grid_constant__ ResArgs a) {
    extern __shared__ uint4 res_smem[];
    u32* te = (u32*)res_smem;
    u32* td = te + TAB_WORDS;
    u8* ib = (u8*)(td + TAB_WORDS);
    __shared__ uint4 raw_s[RES_SERVERS][4];   // each server's SQE
    __shared__ u32 rawkey_s[RES_SERVERS][16];
    __shared__ int cmd_s[RES_SERVERS];        // 0 exit, 1 compute, 2 spill, 3 done
    __shared__ int fault_s[RES_SERVERS];      // fault_at reached: trap half-way

    replicate<256>(te, a.te0);
    replicate<256>(td, a.td0);
    replicate<ISB_BYTES / 4 / 32>((u32*)ib, (const u32*)a.isbox);
    const u32 l4 = (threadIdx.x & 31) << 2;
    const u32 sid = threadIdx.x / RES_SRV_THREADS, lt = threadIdx.x % RES_SRV_THREADS;
    const u32 srv = blockIdx.x * RES_SERVERS + sid, nsrv = gridDim.x * RES_SERVERS;
    uint4 (&raw)[4] = raw_s[sid];
    int& cmd = cmd_s[sid];
    int& fault = fault_s[sid];
    unsigned int* idx = (unsigned int*)(a.region + a.idx_off);
    uint4* kc = a.kcache + (size_t)srv * a.nslots * SLOT_U4;
    unsigned int* kg = a.kgen + (size_t)srv * a.nslots;
    unsigned int* stats = a.dst + D_STATS + D_STATS_PER * srv;
    unsigned int* blk = a.ctl + CTL_BLK_BYTE / 4 + 4 * srv;
    const bool first = srv == 0;  // forwards spill answers, leaves last
    u32 fwd = 0;  // server 0, thread 0: spill CQEs forwarded
    if (first && lt == 0) {
        a.ctl[CTL_RUNNING] = 1;
        __threadfence_system();
    }
    if (lt == 0) fault = 0;
    __syncthreads();

    for (;;) {
        if (lt == 0) {
            if (first) res_forward(a, fwd);
            const u32 i = atomicAdd(&a.dst[D_CLAIM], 1u);
            st_vol(blk + RES_BLK_CLAIM, i);
            st_vol(blk + RES_BLK_STATE, RES_ST_WAIT);
            int c = res_wait(a, i, fwd, first);
            if (c) {
                st_vol(blk + RES_BLK_STATE, RES_ST_SERVE);
                const unsigned char* e = a.region + a.sq_off + 64 * (u64)(i & a.mask);
#pragma unroll
                for (int k = 0; k < 4; ++k) raw[k] = ld_vol4(e + 16 * k);
                const u32 seen = atomicMax(&a.dst[D_SQ_READ], i + 1);
                if (a.write_sq_head && (int)(i + 1 - seen) > 0)
                    st_vol(idx + IDX_SQ_HEAD, i + 1);  // informative
                if (res_check((const ResSqe*)raw, a.data_off, a.data_size, a.max_bytes,
                              a.nslots))
                    c = 2;
            }
            cmd = c;
        }
        res_bar(sid);
        int c = cmd;
        if (c == 0) break;
        const ResSqe* q = (const ResSqe*)raw;
        if (c == 1) {
            // the first pass's data loads and the slot's generation at once
            uint4* data = (uint4*)(a.region + q->in_off);
            const u32 nblk = q->in_len / 16;
            uint4 x0 = make_uint4(0, 0, 0, 0), x1 = x0;
            if (lt < nblk) x0 = ld_vol4(data + lt);
            if (lt + RES_SRV_THREADS < nblk) x1 = ld_vol4(data + lt + RES_SRV_THREADS);
            if (lt == 0) {
                const u32 g = ld_acq_sys(a.keys + 128 * (u64)q->key_slot + 4);
                cmd = res_key(a, q, kc, kg, rawkey_s[sid], stats, g);
                if (cmd == 1 && a.fault_at)
                    fault = atomicAdd(&a.dst[D_TAKEN], 1u) + 1 == a.fault_at;
            }
            res_bar(sid);
            c = cmd;
            if (c == 1) {
                const bool dec = q->service == SVC_XTS_DEC;
                const uint4* rk = kc + (size_t)q->key_slot * SLOT_U4;
                const int nr = ((const u32*)rk)[NR_WORD];
                const u32 bpu = q->unit_size / 16;
                const u32 sh = __ffs(bpu) - 1;
                for (u32 b = lt; b < nblk; b += 2 * RES_SRV_THREADS) {
                    const u32 b1 = b + RES_SRV_THREADS;
                    if (b != lt) {
                        x0 = ld_vol4(data + b);
                        if (b1 < nblk) x1 = ld_vol4(data + b1);
                    }
                    st_vol4(data + b, res_xts_block(q, rk, nr, b, sh, bpu, x0, dec, te, td, ib, l4));
                    if (b1 < nblk)
                        st_vol4(data + b1,
                                res_xts_block(q, rk, nr, b1, sh, bpu, x1, dec, te, td, ib, l4));
                }
                // tests (fault_at): the data written, the CQE not, every
                // thread of the server makes an illegal access (a memory
                // fault ends the whole kernel at once; __trap() in some
                // warps left the others waiting at the barrier, H200)
                if (fault) *(volatile u32*)(unsigned long long)16 = lt;
                __threadfence_system();
                res_bar(sid);
                if (lt == 0) {
                    uint4 cq;  // seq, tag, status 0, flags CQE_RESIDENT
                    cq.x = raw[0].x;
                    cq.y = raw[0].y;
                    cq.z = raw[0].z;
                    cq.w = CQE_RESIDENT << 16;
                    res_post_cqe(a, cq);
                    st_vol(blk + RES_BLK_STATE, RES_ST_DONE);
                    stats[0] += 1;
                    if (!dec) stats[3] += 1;
                }
            }
        }
        if (c == 2 && lt == 0) {
            st_vol(blk + RES_BLK_STATE, RES_ST_SPILL);
            res_spill(a, raw);
            st_vol(blk + RES_BLK_STATE, RES_ST_DONE);
            stats[1] += 1;
        }
        res_bar(sid);  // raw and cmd are reused
    }
    if (lt == 0) {
        if (first) {
            // last out: every other server gone, every spilled request
            // answered (the helper keeps serving until CTL_STOPPED)
            while (ld_acq_gpu(&a.dst[D_EXITED]) != nsrv - 1 ||
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
