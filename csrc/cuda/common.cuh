/*
 * common.cuh - device vocabulary shared by the CUDA kernels: element loads, order-preserving
 * keys, deterministic block reductions and scans, and the per-row algorithms (scan, rank
 * selection, tail mass, k_eps walk, gathering and sorting of the kept set).
 *
 * Every row is processed by one block of TKC_NT threads. Reductions combine per-thread
 * partials in a fixed order (warp shuffles, then warps in index order), so results do not
 * depend on scheduling: a kernel run twice gives the same bits. Block-wide helpers must be
 * called by every thread of the block (they synchronise).
 */
#ifndef TKA_CUDA_COMMON_CUH
#define TKA_CUDA_COMMON_CUH

#ifndef TKC_HOST_EMULATION  /* emu/emu.h supplies the CUDA vocabulary on the host */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <math.h>
#include <stdint.h>

#include "tka_cuda.h"

#ifndef TKC_NT
#define TKC_NT 512
#endif
#define TKC_NW (TKC_NT / 32)
#define TKC_FULL 0xffffffffu

typedef int64_t i64;             /* the type of the int64 arrays we are given */
typedef unsigned long long u64;  /* for atomicMin */

/* ------------------------------------------------------------------ values and keys */

/* Values are computed in float for float/half/bfloat16 storage, in double for double. */
template <class T> struct real_of { typedef float type; };
template <> struct real_of<double> { typedef double type; };

__device__ __forceinline__ float to_real(float x) { return x; }
__device__ __forceinline__ double to_real(double x) { return x; }
__device__ __forceinline__ float to_real(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_real(__nv_bfloat16 x) { return __bfloat162float(x); }


/* Store an accumulated value in the output's storage type. */
__device__ __forceinline__ void put(float *p, float v) { *p = v; }
__device__ __forceinline__ void put(double *p, double v) { *p = v; }
__device__ __forceinline__ void put(__half *p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void put(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

/* exp in the accumulation precision */
__device__ __forceinline__ float aexp(float x) { return expf(x); }
__device__ __forceinline__ double aexp(double x) { return exp(x); }

/* One row: element j of storage type T at p + j * es bytes. */
template <class T> struct Row {
    typedef typename real_of<T>::type V;
    const char *p;
    i64 n, es;
    __device__ __forceinline__ V operator[](i64 j) const { return to_real(*(const T *)(p + j * es)); }
};

/*
 * Order-preserving unsigned keys: a < b as values <=> akey(a) < akey(b). -0 is mapped to
 * +0 first, so equal values have equal keys (the tie rule compares values).
 */
template <class V> struct key_of;
template <> struct key_of<float> { typedef uint32_t type; enum { bits = 32 }; };
template <> struct key_of<double> { typedef u64 type; enum { bits = 64 }; };

__device__ __forceinline__ uint32_t akey(float x)
{
    if (x == 0.0f) x = 0.0f;
    uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ u64 akey(double x)
{
    if (x == 0.0) x = 0.0;
    u64 b = (u64)__double_as_longlong(x);
    return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}

__device__ __forceinline__ float from_akey(uint32_t k)
{
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ double from_akey(u64 k)
{
    return __longlong_as_double((long long)((k >> 63) ? (k & 0x7fffffffffffffffull) : ~k));
}

__device__ __forceinline__ double softplus(double z)
{
    return z > 0 ? z + log1p(exp(-z)) : log1p(exp(z));
}

/* Below this eps the masses are taken relative to max + log(eps)/2 instead of the maximum,
 * so that a tail of order eps * Z stays far above the float64 underflow (as the CPU core
 * switches to log space there). */
#define EPS_LINEAR_MIN 1e-280

/* ------------------------------------------------------------ block reductions, scan */

struct OpSum { template <class T> __device__ T operator()(T a, T b) const { return a + b; } };
struct OpMax { template <class T> __device__ T operator()(T a, T b) const { return b > a ? b : a; } };
struct OpMin { template <class T> __device__ T operator()(T a, T b) const { return b < a ? b : a; } };

/* The reduction of v over the block, returned to every thread. Deterministic: lane 0 of each
 * warp holds its warp's butterfly result, and every thread combines the warps in order. */
template <class T, class Op> __device__ T block_reduce(T v, Op op)
{
    __shared__ T part[TKC_NW];
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(TKC_FULL, v, o));
    __syncthreads();  /* the previous call's readers are done with part[] */
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    T r = part[0];
    for (int w = 1; w < TKC_NW; w++) r = op(r, part[w]);
    return r;
}

/* Exclusive prefix sum of v in thread order; *total receives the block's sum. */
__device__ __forceinline__ i64 block_excl_scan(i64 v, i64 *total)
{
    __shared__ i64 wsum[TKC_NW];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    i64 x = v;
    for (int o = 1; o < 32; o <<= 1) {
        i64 y = __shfl_up_sync(TKC_FULL, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) wsum[w] = x;
    __syncthreads();
    i64 off = 0, tot = 0;
    for (int i = 0; i < TKC_NW; i++) {
        if (i < w) off += wsum[i];
        tot += wsum[i];
    }
    *total = tot;
    return off + x - v;
}

/* ------------------------------------------------------------------------ row scan */

/* Packs (row, code) so that atomicMin keeps the lowest failing row. */
__device__ __forceinline__ void report(u64 *status, i64 row, int code)
{
    atomicMin(status, ((u64)row << 4) | (u64)code);
}

template <class V> struct ScanOut {
    V max;
    i64 n_live;
    int bad;  /* TKA_ERR_* or 0 */
};

/* Maximum, unmasked count and validity (NaN, +inf, all masked) of a row. The error code
 * is that of the first bad element by index, as in the CPU core. */
template <class R> __device__ ScanOut<typename R::V> row_scan(const R &x)
{
    typedef typename R::V V;
    V mx = -INFINITY;
    i64 masked = 0, first_bad = x.n;
    for (i64 j = threadIdx.x; j < x.n; j += TKC_NT) {
        V v = x[j];
        if (v != v || v == (V)INFINITY) {
            if (j < first_bad) first_bad = j;
        } else {
            mx = v > mx ? v : mx;
            masked += v == -(V)INFINITY;
        }
    }
    ScanOut<V> s;
    s.max = block_reduce(mx, OpMax());
    masked = block_reduce(masked, OpSum());
    first_bad = block_reduce(first_bad, OpMin());
    s.n_live = x.n - masked;
    s.bad = 0;
    if (first_bad < x.n) {
        V v = x[first_bad];
        s.bad = v != v ? TKA_ERR_NAN : TKA_ERR_POSINF;
    } else if (s.n_live == 0) {
        s.bad = TKA_ERR_ALL_MASKED;
    }
    return s;
}

/* -------------------------------------------------------------------- rank selection */

template <class KT> struct Rank {
    KT t;      /* key of the selected value */
    i64 less;  /* elements with a smaller key */
    i64 eq;    /* elements with this key */
};

/*
 * The element of ascending rank `rank` (0-based, 0 <= rank < n) by radix selection on the
 * keys, 8 bits per pass from the top: each pass counts, among the elements that share the
 * digits chosen so far, how many fall on each value of the next digit, and descends into
 * the digit holding the rank. Counts are integers, so the result is exact.
 */
template <class R> __device__ Rank<typename key_of<typename R::V>::type> rank_select(const R &x, i64 rank)
{
    typedef typename key_of<typename R::V>::type KT;
    const int bits = key_of<typename R::V>::bits;
    __shared__ unsigned int hist[256];
    __shared__ int sel;
    __shared__ i64 sel_below, sel_cnt;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    KT prefix = 0, mask = 0;
    i64 want = rank, below = 0, cnt = 0;
    for (int shift = bits - 8; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += TKC_NT) hist[i] = 0;
        __syncthreads();
        for (i64 j = threadIdx.x; j < x.n; j += TKC_NT) {
            KT k = akey(x[j]);
            if ((k & mask) == prefix) atomicAdd(&hist[(int)((k >> shift) & 255)], 1u);
        }
        __syncthreads();
        if (warp == 0) {
            /* lane l owns digits 8l .. 8l+7; find the digit whose cumulative count passes want */
            i64 s = 0;
            for (int i = 0; i < 8; i++) s += hist[lane * 8 + i];
            i64 incl = s;
            for (int o = 1; o < 32; o <<= 1) {
                i64 y = __shfl_up_sync(TKC_FULL, incl, o);
                if (lane >= o) incl += y;
            }
            const i64 excl = incl - s;
            unsigned hit = __ballot_sync(TKC_FULL, excl <= want && want < incl);
            int owner = hit ? __ffs(hit) - 1 : 31;  /* always hit: want < matching count */
            if (lane == owner) {
                i64 c = excl;
                int d = lane * 8;
                while (d < lane * 8 + 7 && c + hist[d] <= want) c += hist[d++];
                sel = d;
                sel_below = c;
                sel_cnt = hist[d];
            }
        }
        __syncthreads();
        want -= sel_below;
        below += sel_below;
        cnt = sel_cnt;
        prefix |= (KT)sel << shift;
        mask |= (KT)255 << shift;
    }
    Rank<KT> r;
    r.t = prefix;
    r.less = below;
    r.eq = cnt;
    return r;
}

/* ------------------------------------------------------------------------ tail mass */

/*
 * For the top-k set with 1 <= k < n_live and the k-th largest value given by rk:
 * lr = log(head mass / tail mass), the head summed relative to the maximum and the tail
 * relative to its largest value `next` (docs/design.md §2: log space), as in the CPU core. Values
 * equal to the threshold: the first k - n_gt are kept, the rest discarded.
 */
template <class R>
__device__ double head_tail_ratio(const R &x, i64 k, typename R::V mx,
                                  const Rank<typename key_of<typename R::V>::type> &rk)
{
    typedef typename R::V V;
    const i64 n_gt = x.n - rk.less - rk.eq;
    const V t = from_akey(rk.t);
    V next = t;
    if (n_gt + rk.eq <= k) {  /* every value equal to t is kept: next is the largest below */
        V m = -INFINITY;
        for (i64 j = threadIdx.x; j < x.n; j += TKC_NT) {
            V v = x[j];
            if (v < t && v > m) m = v;
        }
        next = block_reduce(m, OpMax());
    }
    double hi = 0.0, lo = 0.0;
    const double dmx = (double)mx, dnext = (double)next;
    for (i64 j = threadIdx.x; j < x.n; j += TKC_NT) {
        V v = x[j];
        if (v > t) hi += exp((double)v - dmx);
        else if (v < t) lo += exp((double)v - dnext);
    }
    hi = block_reduce(hi, OpSum());
    lo = block_reduce(lo, OpSum());
    if (k > n_gt) hi += (double)(k - n_gt) * exp((double)t - dmx);
    if (n_gt + rk.eq > k) lo += (double)(n_gt + rk.eq - k);  /* next == t: mass 1 each */
    return log(hi) - log(lo) + (dmx - dnext);
}

/* ------------------------------------------------------------------------ k_eps walk */

/*
 * k_eps by a mass-weighted radix walk from the bottom, 4 bits per pass: per pass, every
 * thread sums the masses e^{x - ref} and counts of its elements inside the current key
 * range into 16 digit bins (registers), the bins are reduced in a fixed order, and the walk
 * drops whole bins from the smallest digit up while the dropped mass stays <= eps Z. The bin
 * where it stops is refined in the next pass; at the last digit it holds one value, of
 * which as many copies are dropped as fit. Z is the sum of the first pass's bins, added in
 * the same order as the walk, so the walk always stops inside the row.
 * Returns the number of dropped (smallest) elements; k_eps = n - dropped.
 */
template <class R>
__device__ i64 keps_walk(const R &x, double ref, double eps, double *dropped_mass, double *z_out)
{
    typedef typename R::V V;
    typedef typename key_of<V>::type KT;
    const int bits = key_of<V>::bits;
    __shared__ double smass[TKC_NW][16];
    __shared__ i64 scnt[TKC_NW][16];
    __shared__ double tmass[16];
    __shared__ i64 tcnt[16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    KT prefix = 0, mask = 0;
    double acc = 0.0, z = 0.0, budget = 0.0;
    i64 dropped = 0;
    for (int shift = bits - 4; shift >= 0; shift -= 4) {
        double m[16];
        i64 c[16];
#pragma unroll
        for (int q = 0; q < 16; q++) { m[q] = 0.0; c[q] = 0; }
        for (i64 j = threadIdx.x; j < x.n; j += TKC_NT) {
            V v = x[j];
            KT k = akey(v);
            if ((k & mask) == prefix) {
                const int d = (int)((k >> shift) & 15);
                const double w = exp((double)v - ref);
#pragma unroll
                for (int q = 0; q < 16; q++) {
                    m[q] += d == q ? w : 0.0;
                    c[q] += d == q;
                }
            }
        }
#pragma unroll
        for (int q = 0; q < 16; q++) {
            for (int o = 16; o > 0; o >>= 1) {
                m[q] += __shfl_xor_sync(TKC_FULL, m[q], o);
                c[q] += __shfl_xor_sync(TKC_FULL, c[q], o);
            }
        }
        __syncthreads();  /* the previous pass's walk has finished reading tmass/tcnt */
        if (lane == 0) {
#pragma unroll
            for (int q = 0; q < 16; q++) { smass[warp][q] = m[q]; scnt[warp][q] = c[q]; }
        }
        __syncthreads();
        if (threadIdx.x < 16) {
            double s = 0.0;
            i64 n = 0;
            for (int w = 0; w < TKC_NW; w++) { s += smass[w][threadIdx.x]; n += scnt[w][threadIdx.x]; }
            tmass[threadIdx.x] = s;
            tcnt[threadIdx.x] = n;
        }
        __syncthreads();
        /* every thread walks the same bins the same way */
        if (shift == bits - 4) {
            for (int q = 0; q < 16; q++) z += tmass[q];
            budget = eps * z;
        }
        int d = 0;
        while (d < 16 && acc + tmass[d] <= budget) {
            acc += tmass[d];
            dropped += tcnt[d];
            d++;
        }
        if (d == 16) break;        /* rounding: the whole range fits, all of it is dropped */
        if (tcnt[d] == 1) break;   /* the crossing bin is one element that does not fit */
        prefix |= (KT)d << shift;
        mask |= (KT)15 << shift;
        if (shift == 0) {          /* one value, equal masses: drop as many copies as fit */
            const double mv = exp((double)from_akey(prefix) - ref);
            const i64 cnt = tcnt[d];
            i64 take = mv > 0.0 ? (i64)floor((budget - acc) / mv) : cnt;
            if (take > cnt) take = cnt;
            if (take < 0) take = 0;
            while (take > 0 && acc + (double)take * mv > budget) take--;
            acc += (double)take * mv;
            dropped += take;
        }
    }
    *dropped_mass = acc;
    *z_out = z;
    return dropped;
}

/* --------------------------------------------------------- gathering and sorting */

/*
 * Visit, in index order, the elements with key > t and the first `ties` elements with key
 * == t: emit(position in the kept list, index, key). Positions follow index order.
 */
template <class R, class KT, class F>
__device__ void gather_kept(const R &x, KT t, i64 ties, F emit)
{
    i64 out_base = 0, eq_seen = 0;
    for (i64 base = 0; base < x.n; base += TKC_NT) {  /* uniform trip count: scans inside */
        const i64 j = base + threadIdx.x;
        i64 gt = 0, eq = 0;
        KT k = 0;
        if (j < x.n) {
            k = akey(x[j]);
            gt = k > t;
            eq = k == t;
        }
        i64 eq_tot, sel_tot;
        const i64 eq_before = block_excl_scan(eq, &eq_tot);
        const i64 sel = gt || (eq && eq_seen + eq_before < ties);
        const i64 pos = block_excl_scan(sel, &sel_tot);
        if (sel) emit(out_base + pos, j, k);
        out_base += sel_tot;
        eq_seen += eq_tot;
    }
}

/*
 * Stable sort of m (key, index) pairs by ascending key: LSD radix, 4 bits per pass, an
 * even number of passes, so the result ends in (ka, ia); (kb, ib) is scratch. Thread t owns
 * the contiguous chunk t of the arrays; per pass it counts its digits, the counts are
 * scanned digit-major (digit, then thread), and each thread scatters its chunk in order,
 * which keeps equal keys in their previous order.
 */
template <class KT> __device__ void block_sort_pairs(KT *ka, i64 *ia, KT *kb, i64 *ib, i64 m)
{
    const int bits = sizeof(KT) * 8;
    __shared__ unsigned int cnt[16 * TKC_NT];
    const i64 chunk = (m + TKC_NT - 1) / TKC_NT;
    const i64 lo = min(m, (i64)threadIdx.x * chunk), hi = min(m, lo + chunk);
    KT *sk = ka, *dk = kb;
    i64 *si = ia, *di = ib;
    for (int shift = 0; shift < bits; shift += 4) {
        unsigned int c[16];
#pragma unroll
        for (int q = 0; q < 16; q++) c[q] = 0;
        for (i64 i = lo; i < hi; i++) {
            const int d = (int)((sk[i] >> shift) & 15);
#pragma unroll
            for (int q = 0; q < 16; q++) c[q] += d == q;
        }
#pragma unroll
        for (int q = 0; q < 16; q++) cnt[q * TKC_NT + threadIdx.x] = c[q];
        __syncthreads();
        /* exclusive scan of cnt[] in place; thread t owns entries 16t .. 16t+15 */
        unsigned int own[16], s = 0;
#pragma unroll
        for (int q = 0; q < 16; q++) { own[q] = cnt[16 * threadIdx.x + q]; s += own[q]; }
        i64 total;
        unsigned int run = (unsigned int)block_excl_scan((i64)s, &total);
#pragma unroll
        for (int q = 0; q < 16; q++) { cnt[16 * threadIdx.x + q] = run; run += own[q]; }
        __syncthreads();
        unsigned int off[16];
#pragma unroll
        for (int q = 0; q < 16; q++) off[q] = cnt[q * TKC_NT + threadIdx.x];
        for (i64 i = lo; i < hi; i++) {
            const KT key = sk[i];
            const int d = (int)((key >> shift) & 15);
            unsigned int p = 0;
#pragma unroll
            for (int q = 0; q < 16; q++) {
                if (d == q) p = off[q]++;
            }
            dk[p] = key;
            di[p] = si[i];
        }
        __syncthreads();  /* the scatter (global memory) is visible to the block */
        KT *tk = sk; sk = dk; dk = tk;
        i64 *ti = si; si = di; di = ti;
    }
}

#endif /* TKA_CUDA_COMMON_CUH */
