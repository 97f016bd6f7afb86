// AES-XTS (IEEE 1619, as Linux's xts(aes)) over many data units per launch.
//
// Work split: one thread per 16-byte AES block, XTS_BPT blocks per thread,
// so a block of XTS_THREADS threads owns a "tile" of XTS_TILE consecutive
// AES blocks (16 KiB). Thread t handles blocks t, t+256, t+512, t+768 of
// its tile: every load and store of a warp is 512 contiguous bytes.
// The grid is persistent (about one wave of resident blocks looping over
// tiles), so the shared-memory tables are built once per block.
//
// A block takes its tiles in groups (8 tiles for 512-byte units), in two
// phases per group:
//  1. tweaks: T_0(u) = AES-enc(K2 of u's slot, IV(u)) for every data unit u
//     of the group's tiles, one unit per thread, all threads in parallel,
//     into shared memory (256 units for 512-byte units: one AES per thread,
//     about 3% of the work). A single barrier per group: computing them
//     per tile left one warp working and seven waiting at each tile.
//  2. data: block j of unit u gets T_j = T_0(u) * alpha^j in GF(2^128)
//     (a shift by j with one reduction, no loop over j), then
//     C = AES(K1, P ^ T_j) ^ T_j.
//
// AES is table-driven (T-tables, see kgpu_helper/services/aes_tables.py for
// the word convention). The 1 KiB table T0 is replicated once per
// shared-memory bank (32 copies, 32 KiB): lane l reads only copy l, whose
// entry e sits at word e*32 + l, i.e. always in bank l, so the 16 lookups
// per round never conflict whatever the data. T1..T3 are rotations of T0,
// and the last round reads the S-box out of T0's bytes. Decryption uses
// Td0 the same way plus a replicated inverse S-box of bytes (8 KiB), and
// also needs T0 for the tweaks (which XTS always encrypts).

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned char u8;

#define XTS_THREADS 256
#define XTS_BPT 4
#define XTS_TILE (XTS_THREADS * XTS_BPT)
#define SLOT_U4 48          // uint4 per key slot (SLOT_WORDS = 192 words)
#define RK_ENC1 0           // uint4 offset of K1's encryption round keys
#define RK_ENC2 15          // K2's encryption round keys (tweaks)
#define RK_DEC1 30          // K1's decryption round keys
#define NR_WORD 180         // word holding the number of rounds

// Round-key loads: read-only cache by default; resident.cu, whose key
// cache changes while its kernel runs, reads them as plain loads.
#ifndef XTS_RK_LOAD
#define XTS_RK_LOAD(p) __ldg(p)
#endif

#define TAB_WORDS (256 * 32)          // one replicated 32-bit table
#define ISB_BYTES (256 * 32)          // replicated inverse S-box

__device__ __forceinline__ u32 rotl8(u32 x) { return __funnelshift_l(x, x, 8); }
__device__ __forceinline__ u32 rotl16(u32 x) { return __funnelshift_l(x, x, 16); }
__device__ __forceinline__ u32 rotl24(u32 x) { return __funnelshift_l(x, x, 24); }

// Lookups in a replicated table. `tl` is the shared-window address of this
// lane's column (table + lane * 4); entry e of the lane's copy is at
// tl + e * 128. The byte is pulled out with one PRMT and scaled into the
// address with one LEA; the load is an explicit ld.shared so that the
// compiler does not rebuild the address from a generic pointer.
__device__ __forceinline__ u32 lds32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}
__device__ __forceinline__ u32 tab(u32 tl, u32 x, int n) {
    return lds32(tl + (__byte_perm(x, 0, 0x4440 | n) << 7));
}
__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}
#define B0(x, l) (x), 0
#define B1(x, l) (x), 1
#define B2(x, l) (x), 2
#define B3(x, l) (x), 3

// Replicated inverse S-box of bytes: entry e of lane l at byte
// (e >> 2) * 128 + l * 4 + (e & 3), i.e. in word (e >> 2) * 32 + l.
// Lookup of byte n of x: the byte by PRMT, its row into the address by
// LEA, its place in the word by LOP3, then an explicit ld.shared.u8
// (ibl: the table's shared address + lane * 4). Through a generic u8
// pointer this took about twice the instructions; AES-256-dec went from
// 294 to 301 GB/s at 64 MiB (H200).
__device__ __forceinline__ u32 isb_at(u32 ibl, u32 x, int n) {
    const u32 e = __byte_perm(x, 0, 0x4440 | n);
    u32 v;
    asm volatile("ld.shared.u8 %0, [%1];" : "=r"(v) : "r"((((e >> 2) << 7) + ibl) | (e & 3)));
    return v;
}

__device__ __forceinline__ uint4 xor4(uint4 a, uint4 b) {
    return make_uint4(a.x ^ b.x, a.y ^ b.y, a.z ^ b.z, a.w ^ b.w);
}

// B blocks through AES encryption with one key schedule (round keys read
// once per round for all B blocks: instruction-level parallelism).
template <int NR, int B>
__device__ __forceinline__ void aes_enc(uint4 (&s)[B], const uint4* __restrict__ rk,
                                        const u32* te_, u32 l4) {
    const u32 te = smem_addr(te_) + l4;
    uint4 k = XTS_RK_LOAD(rk);
#pragma unroll
    for (int i = 0; i < B; ++i) s[i] = xor4(s[i], k);
#pragma unroll
    for (int r = 1; r < NR; ++r) {
        k = XTS_RK_LOAD(rk + r);
#pragma unroll
        for (int i = 0; i < B; ++i) {
            const uint4 a = s[i];
            uint4 t;
            t.x = tab(te, B0(a.x, l4)) ^ rotl8(tab(te, B1(a.y, l4))) ^
                  rotl16(tab(te, B2(a.z, l4))) ^ rotl24(tab(te, B3(a.w, l4))) ^ k.x;
            t.y = tab(te, B0(a.y, l4)) ^ rotl8(tab(te, B1(a.z, l4))) ^
                  rotl16(tab(te, B2(a.w, l4))) ^ rotl24(tab(te, B3(a.x, l4))) ^ k.y;
            t.z = tab(te, B0(a.z, l4)) ^ rotl8(tab(te, B1(a.w, l4))) ^
                  rotl16(tab(te, B2(a.x, l4))) ^ rotl24(tab(te, B3(a.y, l4))) ^ k.z;
            t.w = tab(te, B0(a.w, l4)) ^ rotl8(tab(te, B1(a.x, l4))) ^
                  rotl16(tab(te, B2(a.y, l4))) ^ rotl24(tab(te, B3(a.z, l4))) ^ k.w;
            s[i] = t;
        }
    }
    k = XTS_RK_LOAD(rk + NR);
#pragma unroll
    for (int i = 0; i < B; ++i) {
        const uint4 a = s[i];
        uint4 t;
        // S(x) is byte 1 of T0[x] (and byte 2); move it into place.
#define LAST(c0, c1, c2, c3)                                             \
        (((tab(te, B0(c0, l4)) >> 8) & 0xffu) |                          \
         (tab(te, B1(c1, l4)) & 0xff00u) |                               \
         (tab(te, B2(c2, l4)) & 0xff0000u) |                             \
         ((tab(te, B3(c3, l4)) << 16) & 0xff000000u))
        t.x = LAST(a.x, a.y, a.z, a.w) ^ k.x;
        t.y = LAST(a.y, a.z, a.w, a.x) ^ k.y;
        t.z = LAST(a.z, a.w, a.x, a.y) ^ k.z;
        t.w = LAST(a.w, a.x, a.y, a.z) ^ k.w;
#undef LAST
        s[i] = t;
    }
}

template <int NR, int B>
__device__ __forceinline__ void aes_dec(uint4 (&s)[B], const uint4* __restrict__ rk,
                                        const u32* td_, const u8* ib, u32 l4) {
    const u32 td = smem_addr(td_) + l4, ibl = smem_addr(ib) + l4;
    uint4 k = XTS_RK_LOAD(rk);
#pragma unroll
    for (int i = 0; i < B; ++i) s[i] = xor4(s[i], k);
#pragma unroll
    for (int r = 1; r < NR; ++r) {
        k = XTS_RK_LOAD(rk + r);
#pragma unroll
        for (int i = 0; i < B; ++i) {
            const uint4 a = s[i];
            uint4 t;
            t.x = tab(td, B0(a.x, l4)) ^ rotl8(tab(td, B1(a.w, l4))) ^
                  rotl16(tab(td, B2(a.z, l4))) ^ rotl24(tab(td, B3(a.y, l4))) ^ k.x;
            t.y = tab(td, B0(a.y, l4)) ^ rotl8(tab(td, B1(a.x, l4))) ^
                  rotl16(tab(td, B2(a.w, l4))) ^ rotl24(tab(td, B3(a.z, l4))) ^ k.y;
            t.z = tab(td, B0(a.z, l4)) ^ rotl8(tab(td, B1(a.y, l4))) ^
                  rotl16(tab(td, B2(a.x, l4))) ^ rotl24(tab(td, B3(a.w, l4))) ^ k.z;
            t.w = tab(td, B0(a.w, l4)) ^ rotl8(tab(td, B1(a.z, l4))) ^
                  rotl16(tab(td, B2(a.y, l4))) ^ rotl24(tab(td, B3(a.x, l4))) ^ k.w;
            s[i] = t;
        }
    }
    k = XTS_RK_LOAD(rk + NR);
#pragma unroll
    for (int i = 0; i < B; ++i) {
        const uint4 a = s[i];
        uint4 t;
#define LASTD(c0, c1, c2, c3)                                                     \
        (isb_at(ibl, c0, 0) | (isb_at(ibl, c1, 1) << 8) | (isb_at(ibl, c2, 2) << 16) | \
         (isb_at(ibl, c3, 3) << 24))
        t.x = LASTD(a.x, a.w, a.z, a.y) ^ k.x;
        t.y = LASTD(a.y, a.x, a.w, a.z) ^ k.y;
        t.z = LASTD(a.z, a.y, a.x, a.w) ^ k.z;
        t.w = LASTD(a.w, a.z, a.y, a.x) ^ k.w;
#undef LASTD
        s[i] = t;
    }
}

// x * alpha^j in GF(2^128), XTS's little-endian convention (x = lo + hi*2^64,
// alpha = the polynomial x, reduction by x^128 + x^7 + x^2 + x + 1).
__device__ __forceinline__ void reduce_into(u64& lo, u64& hi, u64 ov) {
    // add ov * x^128 = ov * (x^7 + x^2 + x + 1); ov has at most 64 bits
    lo ^= ov ^ (ov << 1) ^ (ov << 2) ^ (ov << 7);
    hi ^= (ov >> 63) ^ (ov >> 62) ^ (ov >> 57);
}

__device__ __forceinline__ uint4 mul_alpha_pow(uint4 t, u32 j) {
    u64 lo = ((u64)t.y << 32) | t.x;
    u64 hi = ((u64)t.w << 32) | t.z;
    while (j >= 64) {  // only for units of more than 1 KiB
        u64 ov = hi;
        hi = lo;
        lo = 0;
        reduce_into(lo, hi, ov);
        j -= 64;
    }
    if (j) {
        u64 ov = hi >> (64 - j);
        hi = (hi << j) | (lo >> (64 - j));
        lo <<= j;
        reduce_into(lo, hi, ov);
    }
    return make_uint4((u32)lo, (u32)(lo >> 32), (u32)hi, (u32)(hi >> 32));
}

__device__ __forceinline__ int slot_of(const int* slots, u64 u, int nslots) {
    if (!slots) return 0;
    int s = slots[u];
    return (s < 0 || s >= nslots) ? 0 : s;  // the caller validates; never fault
}

__device__ __forceinline__ int nrounds(const uint4* sched, int slot) {
    return ((const u32*)(sched + (size_t)slot * SLOT_U4))[NR_WORD];
}

__device__ __forceinline__ void fill_tables(u32* dst, const u32* __restrict__ src) {
    for (u32 i = threadIdx.x; i < TAB_WORDS; i += blockDim.x) dst[i] = src[i >> 5];
}

// One block through AES encryption with the slot's number of rounds.
__device__ __forceinline__ void aes_enc_any(uint4 (&s)[1], const uint4* __restrict__ rk, int nr,
                                            const u32* te, u32 l4) {
    if (nr == 14)
        aes_enc<14, 1>(s, rk, te, l4);
    else
        aes_enc<10, 1>(s, rk, te, l4);
}

// T_0 of unit u: its IV encrypted with the tweak key K2 of its slot.
__device__ __forceinline__ uint4 unit_tweak(u64 u, const u64* __restrict__ ivs, int iv_stride,
                                            const int* __restrict__ slots, int nslots,
                                            const uint4* __restrict__ sched, const u32* te,
                                            u32 l4) {
    uint4 s[1];
    u64 lo, hi = 0;
    if (iv_stride == 2) {
        lo = ivs[2 * u];
        hi = ivs[2 * u + 1];
    } else {
        lo = ivs[u];
    }
    s[0] = make_uint4((u32)lo, (u32)(lo >> 32), (u32)hi, (u32)(hi >> 32));
    const int slot = slot_of(slots, u, nslots);
    const uint4* rk = sched + (size_t)slot * SLOT_U4 + RK_ENC2;
    if (nrounds(sched, slot) == 14)
        aes_enc<14, 1>(s, rk, te, l4);
    else
        aes_enc<10, 1>(s, rk, te, l4);
    return s[0];
}

// The XTS_BPT blocks of a thread through AES with K1 of their slots: all
// at once when they share a slot, else one at a time.
template <bool DECRYPT>
__device__ __forceinline__ void aes_blocks(uint4 (&s)[XTS_BPT], const int (&slot)[XTS_BPT],
                                           bool same, const uint4* __restrict__ sched,
                                           const u32* te, const u32* td, const u8* ib, u32 l4) {
    if (same) {
        const uint4* rk = sched + (size_t)slot[0] * SLOT_U4 + (DECRYPT ? RK_DEC1 : RK_ENC1);
        const int nr = nrounds(sched, slot[0]);
        if (DECRYPT) {
            if (nr == 14) aes_dec<14, XTS_BPT>(s, rk, td, ib, l4);
            else aes_dec<10, XTS_BPT>(s, rk, td, ib, l4);
        } else {
            if (nr == 14) aes_enc<14, XTS_BPT>(s, rk, te, l4);
            else aes_enc<10, XTS_BPT>(s, rk, te, l4);
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < XTS_BPT; ++i) {
        uint4 one[1] = {s[i]};
        const uint4* rk = sched + (size_t)slot[i] * SLOT_U4 + (DECRYPT ? RK_DEC1 : RK_ENC1);
        const int nr = nrounds(sched, slot[i]);
        if (DECRYPT) {
            if (nr == 14) aes_dec<14, 1>(one, rk, td, ib, l4);
            else aes_dec<10, 1>(one, rk, td, ib, l4);
        } else {
            if (nr == 14) aes_enc<14, 1>(one, rk, te, l4);
            else aes_enc<10, 1>(one, rk, te, l4);
        }
        s[i] = one[0];
    }
}

// The data of one tile, blocks [b0, bend); twt[u - u0] = T_0 of unit u.
// Decryption finds each block's unit and place in it from b0 / bpu once
// per tile and 32-bit offsets, with a shift where bpu is a power of two
// (sh = log2(bpu); 32: divide), not a 64-bit division per block (measured
// there only, together with isb_at).
template <bool DECRYPT>
__device__ __forceinline__ void xts_tile(const uint4* in, uint4* out, u64 b0, u64 bend, u64 u0,
                                         u32 bpu, const uint4* twt,
                                         const int* __restrict__ slots, int nslots,
                                         const uint4* __restrict__ sched, const u32* te,
                                         const u32* td, const u8* ib, u32 l4, u32 sh = 32) {
    uint4 s[XTS_BPT], t[XTS_BPT];
    int slot[XTS_BPT];
    bool same = true;
    const u64 ub = !DECRYPT ? 0 : sh < 32 ? b0 >> sh : b0 / bpu;  // unit of block b0
    const u32 r0 = (u32)(b0 - ub * bpu), last = (u32)(bend - 1 - b0);
#pragma unroll
    for (int i = 0; i < XTS_BPT; ++i) {
        u64 u, bb;
        u32 j;
        if (DECRYPT) {
            const u32 o = min((u32)(i * XTS_THREADS) + threadIdx.x, last);  // tail: compute
            const u32 off = r0 + o;
            const u32 q = sh < 32 ? off >> sh : off / bpu;
            j = off - q * bpu;
            u = ub + q;
            bb = b0 + o;
        } else {
            const u64 b = b0 + i * XTS_THREADS + threadIdx.x;
            bb = b < bend ? b : bend - 1;  // tail: compute, don't store
            u = bb / bpu;
            j = (u32)(bb - u * bpu);
        }
        t[i] = mul_alpha_pow(twt[u - u0], j);
        s[i] = xor4(in[bb], t[i]);
        slot[i] = slot_of(slots, u, nslots);
        same = same && slot[i] == slot[0];
    }
    aes_blocks<DECRYPT>(s, slot, same, sched, te, td, ib, l4);
#pragma unroll
    for (int i = 0; i < XTS_BPT; ++i) {
        const u64 b = b0 + i * XTS_THREADS + threadIdx.x;
        if (b < bend) out[b] = xor4(s[i], t[i]);
    }
}

template <bool DECRYPT>
__device__ __forceinline__ void xts_impl(const uint4* in, uint4* out, const u64* __restrict__ ivs,
                                         int iv_stride, const int* __restrict__ slots, int nslots,
                                         const uint4* __restrict__ sched,
                                         const u32* __restrict__ te_g,
                                         const u32* __restrict__ td_g,
                                         const u8* __restrict__ isb_g, u64 total_blocks,
                                         u32 bpu, u32 group) {
    extern __shared__ uint4 smem[];
    u32* te = (u32*)smem;
    u32* td = te + TAB_WORDS;
    u8* ib = (u8*)(td + (DECRYPT ? TAB_WORDS : 0));
    uint4* tw = (uint4*)(ib + (DECRYPT ? ISB_BYTES : 0));

    fill_tables(te, te_g);
    if (DECRYPT) {
        fill_tables(td, td_g);
        for (u32 i = threadIdx.x; i < ISB_BYTES / 4; i += blockDim.x) {
            // word (e>>2)*32 + l holds entries 4(e>>2) .. 4(e>>2)+3
            const u32 e = (i >> 5) << 2;
            ((u32*)ib)[i] = isb_g[e] | (isb_g[e + 1] << 8) | (isb_g[e + 2] << 16) |
                            ((u32)isb_g[e + 3] << 24);
        }
    }
    const u32 l4 = (threadIdx.x & 31) << 2;
    const u64 ntiles = (total_blocks + XTS_TILE - 1) / XTS_TILE;
    const u32 per_tile = XTS_TILE / bpu + 2;  // tweak slots per tile

    // This block's tiles are blockIdx.x, +gridDim.x, ...; take them in
    // groups of `group`: first the tweaks of every unit of the group's
    // tiles, all threads in parallel (one barrier per group rather than a
    // lone warp computing tweaks before each tile), then each tile's data.
    for (u64 g0 = blockIdx.x; g0 < ntiles; g0 += (u64)gridDim.x * group) {
        __syncthreads();  // tables built / previous group's tweaks consumed
        for (u32 w = threadIdx.x; w < group * per_tile; w += blockDim.x) {
            const u32 gi = w / per_tile;
            const u64 tile = g0 + (u64)gi * gridDim.x;
            if (tile >= ntiles) continue;
            const u64 b0 = tile * XTS_TILE;
            const u64 bend = min(b0 + XTS_TILE, total_blocks);
            const u64 u = b0 / bpu + (w - gi * per_tile);
            if (u > (bend - 1) / bpu) continue;
            tw[w] = unit_tweak(u, ivs, iv_stride, slots, nslots, sched, te, l4);
        }
        __syncthreads();
        for (u32 gi = 0; gi < group; ++gi) {
            const u64 tile = g0 + (u64)gi * gridDim.x;
            if (tile >= ntiles) break;
            const u64 b0 = tile * XTS_TILE;
            xts_tile<DECRYPT>(in, out, b0, min(b0 + XTS_TILE, total_blocks), b0 / bpu, bpu,
                              tw + gi * per_tile, slots, nslots, sched, te, td, ib, l4);
        }
    }
}

// Entry points. in/out: total_blocks * 16 bytes (out may equal in);
// ivs: one uint64 per unit (iv_stride 1: sector number, already masked
// for "plain") or two (iv_stride 2: raw 16-byte IV, low word first);
// slots: one int per unit, or NULL for slot 0; sched: nslots * 192 words;
// bpu: AES blocks per data unit; group: tiles per tweak phase. Dynamic shared memory: see xts_smem_bytes
// in cupy_backend.py.
extern "C" __global__ void __launch_bounds__(XTS_THREADS)
xts_encrypt(const uint4* in, uint4* out, const u64* ivs, int iv_stride, const int* slots,
            int nslots, const uint4* sched, const u32* te0, const u32* td0, const u8* isbox,
            u64 total_blocks, u32 bpu, u32 group) {
    xts_impl<false>(in, out, ivs, iv_stride, slots, nslots, sched, te0, td0, isbox,
                    total_blocks, bpu, group);
}

// Decryption needs Td0 and the inverse S-box for the data but T0 for the
// tweaks (XTS encrypts them): holding all three (72 KiB) left room for
// only 2 blocks per SM. So a block first computes the tweaks of every unit
// of all its tiles with T0, into tw (one uint4 per unit, device memory:
// about 3% of the data's size), then overwrites T0 with Td0 and runs its
// tiles with no further barrier. 40 KiB of tables: 4 blocks per SM, as
// for encryption. A unit straddling two blocks' tiles gets its tweak
// written twice, with the same bytes; each block reads only those it
// wrote itself (visible to it after __syncthreads). 64 registers (4 blocks
// per SM); 3 blocks of 80 registers and 5 of 48 (with spills) were slower.
__device__ __forceinline__ void xts_dec_impl(const uint4* in, uint4* out,
                                             const u64* __restrict__ ivs, int iv_stride,
                                             const int* __restrict__ slots, int nslots,
                                             const uint4* __restrict__ sched,
                                             const u32* __restrict__ te0,
                                             const u32* __restrict__ td0,
                                             const u8* __restrict__ isbox, u64 total_blocks,
                                             u32 bpu, uint4* tw) {
    extern __shared__ uint4 smem[];
    u32* tab = (u32*)smem;  // T0 for the tweaks, then Td0
    u8* ib = (u8*)(tab + TAB_WORDS);

    fill_tables(tab, te0);
    for (u32 i = threadIdx.x; i < ISB_BYTES / 4; i += blockDim.x) {
        const u32 e = (i >> 5) << 2;  // as in xts_impl
        ((u32*)ib)[i] = isbox[e] | (isbox[e + 1] << 8) | (isbox[e + 2] << 16) |
                        ((u32)isbox[e + 3] << 24);
    }
    const u32 l4 = (threadIdx.x & 31) << 2;
    const u64 ntiles = (total_blocks + XTS_TILE - 1) / XTS_TILE;
    const u64 mine = blockIdx.x < ntiles ? (ntiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    // units a tile can touch: all 1024 / bpu of its own when bpu divides a
    // tile, else at most 2 + 1022 / bpu
    const u32 per_tile = XTS_TILE % bpu == 0 ? XTS_TILE / bpu : 2 + (XTS_TILE - 2) / bpu;
    __syncthreads();
    for (u64 w = threadIdx.x; w < mine * per_tile; w += blockDim.x) {
        const u64 gi = w / per_tile;
        const u64 b0 = (blockIdx.x + gi * gridDim.x) * XTS_TILE;
        const u64 bend = min(b0 + XTS_TILE, total_blocks);
        const u64 u = b0 / bpu + (w - gi * per_tile);
        if (u > (bend - 1) / bpu) continue;
        tw[u] = unit_tweak(u, ivs, iv_stride, slots, nslots, sched, tab, l4);
    }
    __syncthreads();  // tweaks written, T0 no longer read
    fill_tables(tab, td0);
    __syncthreads();
    const u32 sh = (bpu & (bpu - 1)) == 0 ? __ffs(bpu) - 1 : 32;
    for (u64 tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const u64 b0 = tile * XTS_TILE;
        xts_tile<true>(in, out, b0, min(b0 + XTS_TILE, total_blocks), 0, bpu, tw, slots, nslots,
                       sched, nullptr, tab, ib, l4, sh);
    }
}

// tw: one uint4 per data unit, device memory the kernel may overwrite;
// group is not used (the tweaks are computed before any tile).
extern "C" __global__ void __launch_bounds__(XTS_THREADS, 4)
xts_decrypt(const uint4* in, uint4* out, const u64* ivs, int iv_stride, const int* slots,
            int nslots, const uint4* sched, const u32* te0, const u32* td0, const u8* isbox,
            u64 total_blocks, u32 bpu, u32 group, uint4* tw) {
    (void)group;
    xts_dec_impl(in, out, ivs, iv_stride, slots, nslots, sched, te0, td0, isbox, total_blocks,
                 bpu, tw);
}

// ---------------------------------------------------------------------------
// Batched XTS over whole requests: the helper's path.
//
// One launch computes a batch of requests described by a table, each with
// its own input and output offsets, first IV, IV step and key slot, so the
// host builds no per-unit arrays: a batch is one launch (plus, above
// XTS_INLINE requests, one copy of the table). The data are read and
// written at in_base + offset / out_base + offset: either device staging
// buffers or, zero-copy, the helper's cudaHostRegister'ed region itself
// (its device pointer), so the loads and stores of the tiles go over PCIe
// with no cudaMemcpy at all. Work split, tables and tweak groups as above;
// the units of a launch are numbered across its requests, and the tweak
// phase also finds each unit's request (binary search on unit0) and keeps
// the unit's input/output offsets and slot in shared memory next to its
// tweak.
// ---------------------------------------------------------------------------

#define XTS_INLINE 32

struct XtsDesc {           // 48 bytes; cupy_backend.XTS_DESC mirrors it
    u64 in_off;            // byte offset of the input from in_base
    u64 out_off;           // byte offset of the output from out_base
    u64 sector;            // IV (sector number) of the request's first unit
    u64 unit0;             // index of its first unit among the launch's units
    u32 step;              // IV step from one unit to the next
    int slot;              // key slot
    u32 plain;             // 1: IV masked to 32 bits (iv_mode "plain")
    u32 pad;
};

struct XtsBatchArgs {      // passed by value; cupy_backend._BatchArgs
    const unsigned char* in_base;
    unsigned char* out_base;
    const XtsDesc* descs;  // ndesc entries in device memory, or NULL: inl
    const uint4* sched;
    const u32* te0;
    const u32* td0;
    const u8* isbox;
    u64 total_blocks;      // AES blocks of all requests together
    u32 ndesc;
    u32 bpu;
    u32 group;
    int nslots;
    XtsDesc inl[XTS_INLINE];
};

struct UnitIo {            // per unit, in shared memory
    u64 in, out;           // byte offsets of the unit's first block
};

// dst[j * 32 + lane] = src[j] for j < N (a table replicated once per bank,
// as fill_tables builds it) with one global load per thread and warp
// shuffles: a launch of a single block (a 4 KiB request) otherwise waits
// out 32 dependent L2 round trips per table. Needs XTS_THREADS threads.
template <u32 N>
__device__ __forceinline__ void replicate(u32* dst, const u32* __restrict__ src) {
    constexpr u32 PER = N / (XTS_THREADS / 32);  // source words per warp
    static_assert(PER >= 1 && PER <= 32 && N % (XTS_THREADS / 32) == 0, "table shape");
    const u32 lane = threadIdx.x & 31, j0 = (threadIdx.x >> 5) * PER;
    const u32 v = lane < PER ? __ldg(src + j0 + lane) : 0u;
#pragma unroll
    for (u32 k = 0; k < PER; ++k) dst[(j0 + k) * 32 + lane] = __shfl_sync(0xffffffffu, v, k);
}

template <bool DECRYPT>
__device__ __forceinline__ void xts_batch_tile(const XtsBatchArgs& a, u64 b0, u64 bend, u64 u0,
                                               const uint4* twt, const UnitIo* io,
                                               const int* sl, const u32* te, const u32* td,
                                               const u8* ib, u32 l4) {
    uint4 s[XTS_BPT], t[XTS_BPT];
    int slot[XTS_BPT];
    bool same = true;
    const u32 bpu = a.bpu;
#pragma unroll
    for (int i = 0; i < XTS_BPT; ++i) {
        const u64 b = b0 + i * XTS_THREADS + threadIdx.x;
        const u64 bb = b < bend ? b : bend - 1;  // tail: compute, don't store
        const u64 u = bb / bpu;
        const u32 j = (u32)(bb - u * bpu);
        const u32 k = (u32)(u - u0);
        t[i] = mul_alpha_pow(twt[k], j);
        s[i] = xor4(*(const uint4*)(a.in_base + io[k].in + 16 * (u64)j), t[i]);
        slot[i] = sl[k];
        same = same && slot[i] == slot[0];
    }
    aes_blocks<DECRYPT>(s, slot, same, a.sched, te, td, ib, l4);
#pragma unroll
    for (int i = 0; i < XTS_BPT; ++i) {
        const u64 b = b0 + i * XTS_THREADS + threadIdx.x;
        if (b < bend) {  // the address again: fewer live registers over the rounds
            const u64 u = b / bpu;
            const u64 o = io[(u32)(u - u0)].out + 16 * (b - u * bpu);
            *(uint4*)(a.out_base + o) = xor4(s[i], t[i]);
        }
    }
}

template <bool DECRYPT>
__device__ __forceinline__ void xts_batch_impl(const XtsBatchArgs& a) {
    extern __shared__ uint4 smem[];
    u32* te = (u32*)smem;
    u32* td = te + TAB_WORDS;
    u8* ib = (u8*)(td + (DECRYPT ? TAB_WORDS : 0));
    const u32 bpu = a.bpu;
    const u32 per_tile = XTS_TILE / bpu + 2;  // unit slots per tile
    const u32 nw = a.group * per_tile;
    uint4* tw = (uint4*)(ib + (DECRYPT ? ISB_BYTES : 0));
    UnitIo* io = (UnitIo*)(tw + nw);
    int* sl = (int*)(io + nw);
    const XtsDesc* D = a.descs ? a.descs : a.inl;
    const u32 nd = a.ndesc;
    const u64 total_blocks = a.total_blocks;

    replicate<256>(te, a.te0);
    if (DECRYPT) {
        replicate<256>(td, a.td0);
        // word j of the byte table holds entries 4j..4j+3, little-endian
        replicate<ISB_BYTES / 4 / 32>((u32*)ib, (const u32*)a.isbox);
    }
    const u32 l4 = (threadIdx.x & 31) << 2;
    const u64 ntiles = (total_blocks + XTS_TILE - 1) / XTS_TILE;
    const u64 unit_bytes = 16 * (u64)bpu;

    for (u64 g0 = blockIdx.x; g0 < ntiles; g0 += (u64)gridDim.x * a.group) {
        __syncthreads();
        for (u32 w = threadIdx.x; w < nw; w += blockDim.x) {
            const u32 gi = w / per_tile;
            const u64 tile = g0 + (u64)gi * gridDim.x;
            if (tile >= ntiles) continue;
            const u64 b0 = tile * XTS_TILE;
            const u64 bend = min(b0 + XTS_TILE, total_blocks);
            const u64 u = b0 / bpu + (w - gi * per_tile);
            if (u > (bend - 1) / bpu) continue;
            // the unit's request: the last one with unit0 <= u
            u32 lo = 0, hi = nd - 1;
            while (lo < hi) {
                const u32 mid = (lo + hi + 1) >> 1;
                if (D[mid].unit0 <= u) lo = mid;
                else hi = mid - 1;
            }
            const u64 k = u - D[lo].unit0;
            u64 iv = D[lo].sector + k * D[lo].step;
            if (D[lo].plain) iv &= 0xffffffffull;
            int slot = D[lo].slot;
            slot = (slot < 0 || slot >= a.nslots) ? 0 : slot;  // validated by the host
            UnitIo x;
            x.in = D[lo].in_off + k * unit_bytes;
            x.out = D[lo].out_off + k * unit_bytes;
            io[w] = x;
            sl[w] = slot;
            uint4 st[1] = {make_uint4((u32)iv, (u32)(iv >> 32), 0u, 0u)};
            aes_enc_any(st, a.sched + (size_t)slot * SLOT_U4 + RK_ENC2,
                        nrounds(a.sched, slot), te, l4);
            tw[w] = st[0];
        }
        __syncthreads();
        for (u32 gi = 0; gi < a.group; ++gi) {
            const u64 tile = g0 + (u64)gi * gridDim.x;
            if (tile >= ntiles) break;
            const u64 b0 = tile * XTS_TILE;
            xts_batch_tile<DECRYPT>(a, b0, min(b0 + XTS_TILE, total_blocks), b0 / bpu,
                                    tw + gi * per_tile, io + gi * per_tile, sl + gi * per_tile,
                                    te, td, ib, l4);
        }
    }
}

// Entry points of the batched path. Dynamic shared memory: see
// xts_batch_smem_bytes in cupy_backend.py. Encryption is held to 64
// registers (4 blocks per SM; ptxas spills 8 bytes for it); decryption's
// 72 KiB of tables allow only 2 blocks per SM anyway.
extern "C" __global__ void __launch_bounds__(XTS_THREADS, 4)
xts_batch_encrypt(const __grid_constant__ XtsBatchArgs a) {
    xts_batch_impl<false>(a);
}

extern "C" __global__ void __launch_bounds__(XTS_THREADS)
xts_batch_decrypt(const __grid_constant__ XtsBatchArgs a) {
    xts_batch_impl<true>(a);
}
