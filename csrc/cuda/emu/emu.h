/*
 * emu.h - just enough of the CUDA device vocabulary, on the host, to run the row kernels of
 * csrc/cuda one block at a time: every thread of the block is a fiber (ucontext) of one OS
 * thread, switched round-robin whenever it waits; __syncthreads is a barrier over the block,
 * warp shuffles and ballots exchange through a per-warp buffer between two barriers over the
 * warp, and __shared__ variables are statics (one block runs at a time, so they are exactly
 * that block's shared memory). A barrier that some thread never reaches aborts the run.
 *
 * This checks the kernels' logic (index arithmetic, selection, tie rules, synchronisation
 * points) on machines without a GPU. It is not a GPU: memory model, timing and the
 * hardware's float units are not reproduced.
 */
#ifndef TKA_CUDA_EMU_H
#define TKA_CUDA_EMU_H

#define TKC_HOST_EMULATION 1

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(x) alignas(x)

struct emu_dim3 { unsigned x, y, z; };
extern emu_dim3 threadIdx;
extern emu_dim3 blockIdx;

/* half and bfloat16 are not instantiated in the emulation; these only declare the names. */
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
float __half2float(__half);
float __bfloat162float(__nv_bfloat16);
__half __float2half_rn(float);
__nv_bfloat16 __float2bfloat16_rn(float);

inline uint32_t __float_as_uint(float x) { uint32_t b; std::memcpy(&b, &x, 4); return b; }
inline float __uint_as_float(uint32_t b) { float x; std::memcpy(&x, &b, 4); return x; }
inline long long __double_as_longlong(double x) { long long b; std::memcpy(&b, &x, 8); return b; }
inline double __longlong_as_double(long long b) { double x; std::memcpy(&x, &b, 8); return x; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

/* A barrier over `size` fibers: the last to arrive opens it, the others yield until it opens. */
struct EmuBarrier {
    int size, count;
    unsigned gen;
};
void emu_wait(EmuBarrier *b);

/* the block being run */
struct EmuBlock {
    int nt;
    EmuBarrier block;
    EmuBarrier warp[64];
    uint64_t xch[64][32];
};
extern EmuBlock *emu_block;

inline void __syncthreads() { emu_wait(&emu_block->block); }

template <class T> inline T emu_exchange(T v, int src_of_lane_fn_kind, int arg)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    uint64_t slot = 0;
    std::memcpy(&slot, &v, sizeof(T));
    emu_block->xch[w][lane] = slot;
    emu_wait(&emu_block->warp[w]);
    int src = src_of_lane_fn_kind == 0 ? (lane ^ arg) : lane - arg;
    T r = v;
    if (src >= 0 && src < 32) std::memcpy(&r, &emu_block->xch[w][src], sizeof(T));
    emu_wait(&emu_block->warp[w]);
    return r;
}

template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_exchange(v, 0, o); }
template <class T> inline T __shfl_up_sync(unsigned, T v, int o) { return emu_exchange(v, 1, o); }

inline unsigned __ballot_sync(unsigned, int pred)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    emu_block->xch[w][lane] = pred ? 1 : 0;
    emu_wait(&emu_block->warp[w]);
    unsigned bits = 0;
    for (int i = 0; i < 32; i++) bits |= (unsigned)(emu_block->xch[w][i] != 0) << i;
    emu_wait(&emu_block->warp[w]);
    return bits;
}

inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

inline unsigned long long atomicMin(unsigned long long *p, unsigned long long v)
{
    unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST,
                                                   __ATOMIC_SEQ_CST)) {
    }
    return old;
}

/* Run body() as block `b` of `nt` threads (nt a multiple of 32). */
void emu_run_block(unsigned b, int nt, const std::function<void()> &body);

#endif /* TKA_CUDA_EMU_H */
