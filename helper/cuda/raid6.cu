// md-compatible RAID6 over GF(2^8) (polynomial 0x11d, generator g = 2).
//
// Layout: k data rows (then P and Q for recovery), each n bytes, one after
// another with a stride of `stride` uint4 (16 bytes). Byte position x of
// every row belongs to the same stripe, so one thread takes a 16-byte
// column of all rows at a time; RAID6_V columns per thread, each a
// coalesced 16-byte load per row.
//
// Q is computed by Horner's rule from the highest data index down,
// Q = (((D_{k-1}) g + D_{k-2}) g + ...) g + D_0, with multiply-by-g done on
// four bytes at once by shift and mask (no tables). Recovery multiplies by
// per-call constants through 256-byte product tables in shared memory.
// The number of data rows K is a template parameter (one entry point per
// K, from 2 to 30), so the row loop unrolls and all loads of a column can
// be in flight together.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned char u8;

#define RAID6_THREADS 256
#define RAID6_V 2

__device__ __forceinline__ u32 mul2w(u32 v) {
    const u32 hi = v & 0x80808080u;
    return ((v & 0x7f7f7f7fu) << 1) ^ ((hi >> 7) * 0x1du);
}

__device__ __forceinline__ uint4 mul2(uint4 v) {
    return make_uint4(mul2w(v.x), mul2w(v.y), mul2w(v.z), mul2w(v.w));
}

__device__ __forceinline__ uint4 xor4(uint4 a, uint4 b) {
    return make_uint4(a.x ^ b.x, a.y ^ b.y, a.z ^ b.z, a.w ^ b.w);
}

__device__ __forceinline__ u32 mulc_w(const u8* t, u32 v) {
    return (u32)t[v & 0xffu] | ((u32)t[(v >> 8) & 0xffu] << 8) |
           ((u32)t[(v >> 16) & 0xffu] << 16) | ((u32)t[v >> 24] << 24);
}

__device__ __forceinline__ uint4 mulc(const u8* t, uint4 v) {
    return make_uint4(mulc_w(t, v.x), mulc_w(t, v.y), mulc_w(t, v.z), mulc_w(t, v.w));
}

__device__ __forceinline__ u8 gf_mul(u32 a, u32 b) {
    u32 r = 0;
    for (int i = 0; i < 8; ++i) {
        if (b & 1) r ^= a;
        a <<= 1;
        if (a & 0x100) a ^= 0x11d;
        b >>= 1;
    }
    return (u8)r;
}

// P and Q of data rows 0..K-1 (rows equal to skip0 or skip1 count as
// zero) at column c.
template <int K>
__device__ __forceinline__ void syndromes(const uint4* __restrict__ rows, u64 stride, u64 c,
                                          int skip0, int skip1, uint4& p, uint4& q) {
    uint4 d[K];
#pragma unroll
    for (int i = 0; i < K; ++i)
        d[i] = (i == skip0 || i == skip1) ? make_uint4(0, 0, 0, 0) : rows[i * stride + c];
    p = d[K - 1];
    q = d[K - 1];
#pragma unroll
    for (int i = K - 2; i >= 0; --i) {
        p = xor4(p, d[i]);
        q = xor4(mul2(q), d[i]);
    }
}

template <int K>
__device__ __forceinline__ void gen_impl(const uint4* __restrict__ data, uint4* __restrict__ p,
                                         uint4* __restrict__ q, u64 stride, u64 ncols) {
    const u64 step = (u64)gridDim.x * blockDim.x * RAID6_V;
    for (u64 base = (u64)blockIdx.x * blockDim.x * RAID6_V + threadIdx.x; base < ncols;
         base += step) {
        uint4 pp[RAID6_V], qq[RAID6_V];
#pragma unroll
        for (int v = 0; v < RAID6_V; ++v) {
            const u64 c = base + (u64)v * blockDim.x;
            if (c < ncols) syndromes<K>(data, stride, c, -1, -1, pp[v], qq[v]);
        }
#pragma unroll
        for (int v = 0; v < RAID6_V; ++v) {
            const u64 c = base + (u64)v * blockDim.x;
            if (c < ncols) {
                p[c] = pp[v];
                q[c] = qq[v];
            }
        }
    }
}

// Recovery modes (chosen on the host from the failed rows x < y):
#define REC_2DATA 0   // data x and y: Dx = c1*(P+Pxy) + c2*(Q+Qxy), Dy = P+Pxy+Dx
#define REC_DATA_P 1  // data x and P: Dx = c1*(Q+Qx) (c1 = g^-x), P = Px + Dx
#define REC_DATA 2    // data x (and Q if y = K+1): Dx = P+Px; Q = Qx + c1*Dx (c1 = g^x)
#define REC_PQ 3      // P and/or Q only: regenerate the missing ones

template <int K>
__device__ __forceinline__ void rec_impl(uint4* blocks, u64 stride, u64 ncols, int mode, int x,
                                         int y, u32 c1, u32 c2) {
    __shared__ u8 t1[256], t2[256];
    for (u32 i = threadIdx.x; i < 256; i += blockDim.x) {
        t1[i] = gf_mul(c1, i);
        t2[i] = gf_mul(c2, i);
    }
    __syncthreads();
    uint4* P = blocks + (u64)K * stride;
    uint4* Q = blocks + (u64)(K + 1) * stride;
    const u64 step = (u64)gridDim.x * blockDim.x * RAID6_V;
    for (u64 base = (u64)blockIdx.x * blockDim.x * RAID6_V + threadIdx.x; base < ncols;
         base += step) {
#pragma unroll
        for (int v = 0; v < RAID6_V; ++v) {
            const u64 c = base + (u64)v * blockDim.x;
            if (c >= ncols) continue;
            uint4 ps, qs;
            if (mode == REC_2DATA) {
                syndromes<K>(blocks, stride, c, x, y, ps, qs);
                const uint4 pd = xor4(P[c], ps);
                const uint4 qd = xor4(Q[c], qs);
                const uint4 dx = xor4(mulc(t1, pd), mulc(t2, qd));
                blocks[(u64)x * stride + c] = dx;
                blocks[(u64)y * stride + c] = xor4(pd, dx);
            } else if (mode == REC_DATA_P) {
                syndromes<K>(blocks, stride, c, x, -1, ps, qs);
                const uint4 dx = mulc(t1, xor4(Q[c], qs));
                blocks[(u64)x * stride + c] = dx;
                P[c] = xor4(ps, dx);
            } else if (mode == REC_DATA) {
                syndromes<K>(blocks, stride, c, x, -1, ps, qs);
                const uint4 dx = xor4(P[c], ps);
                blocks[(u64)x * stride + c] = dx;
                if (y == K + 1) Q[c] = xor4(qs, mulc(t1, dx));
            } else {
                syndromes<K>(blocks, stride, c, -1, -1, ps, qs);
                if (x == K || y == K) P[c] = ps;
                if (x == K + 1 || y == K + 1) Q[c] = qs;
            }
        }
    }
}

// P/Q delta update for read-modify-write (the ring's RAID6_PQD): `nrows`
// rows at `delta` (stride uint4 apart) hold old ^ new of data slots
// start..start+nrows-1; P and Q (ncols uint4 each) are updated in place:
// P ^= sum d_i, Q ^= g^start * sum g^i d_(start+i), the sum by Horner's
// rule from the top row down and g^start as `start` multiplies by g (at
// most 29). Not templated: the row count is small and varies per request.
// One copy in every module (outside the per-K entries below).
extern "C" __global__ void __launch_bounds__(RAID6_THREADS)
    raid6_pqd(const uint4* __restrict__ delta, uint4* __restrict__ p, uint4* __restrict__ q,
              u64 stride, u64 ncols, int nrows, int start) {
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; c < ncols; c += step) {
        uint4 dp = delta[(u64)(nrows - 1) * stride + c];
        uint4 dq = dp;
        for (int i = nrows - 2; i >= 0; --i) {
            const uint4 d = delta[(u64)i * stride + c];
            dp = xor4(dp, d);
            dq = xor4(mul2(dq), d);
        }
        for (int i = 0; i < start; ++i) dq = mul2(dq);
        p[c] = xor4(p[c], dp);
        q[c] = xor4(q[c], dq);
    }
}

// Entry points raid6_gen_k<K> and raid6_rec_k<K>, K = 2..30.
// gen: data = K rows of `stride` uint4; p, q: ncols uint4 each.
// rec: blocks = K+2 rows (data, P, Q) of `stride` uint4, rebuilt in place.
#define RAID6_ENTRIES(K)                                                               \
    extern "C" __global__ void __launch_bounds__(RAID6_THREADS)                        \
        raid6_gen_k##K(const uint4* data, uint4* p, uint4* q, u64 stride, u64 ncols) { \
        gen_impl<K>(data, p, q, stride, ncols);                                        \
    }                                                                                  \
    extern "C" __global__ void __launch_bounds__(RAID6_THREADS)                        \
        raid6_rec_k##K(uint4* blocks, u64 stride, u64 ncols, int mode, int x, int y,   \
                       u32 c1, u32 c2) {                                               \
        rec_impl<K>(blocks, stride, ncols, mode, x, y, c1, c2);                        \
    }

// The loader compiles one K per module (-DRAID6_K=<K>): a few hundred ms
// each instead of all 29 at once.
#define RAID6_ENTRIES_OF(K) RAID6_ENTRIES(K)  // expands RAID6_K first
#ifdef RAID6_K
RAID6_ENTRIES_OF(RAID6_K)
#else
RAID6_ENTRIES(2)
RAID6_ENTRIES(3)
RAID6_ENTRIES(4)
RAID6_ENTRIES(5)
RAID6_ENTRIES(6)
RAID6_ENTRIES(7)
RAID6_ENTRIES(8)
RAID6_ENTRIES(9)
RAID6_ENTRIES(10)
RAID6_ENTRIES(11)
RAID6_ENTRIES(12)
RAID6_ENTRIES(13)
RAID6_ENTRIES(14)
RAID6_ENTRIES(15)
RAID6_ENTRIES(16)
RAID6_ENTRIES(17)
RAID6_ENTRIES(18)
RAID6_ENTRIES(19)
RAID6_ENTRIES(20)
RAID6_ENTRIES(21)
RAID6_ENTRIES(22)
RAID6_ENTRIES(23)
RAID6_ENTRIES(24)
RAID6_ENTRIES(25)
RAID6_ENTRIES(26)
RAID6_ENTRIES(27)
RAID6_ENTRIES(28)
RAID6_ENTRIES(29)
RAID6_ENTRIES(30)
#endif
