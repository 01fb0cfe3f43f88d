/*
 * emu.cpp - runs the row kernels of csrc/cuda (row_kernels.cuh, attn_row_kernel) on the host,
 * one emulated block per row (emu.h), behind a small C interface for tests/test_cuda.py
 * (loaded with ctypes). float32 and float64 only. Build:
 *   g++ -std=c++20 -O1 -pthread -shared -fPIC -I csrc/cuda csrc/cuda/emu/emu.cpp -o emu.so
 */
#include "emu.h"


#include "../attn_kernels.cuh"
#include "../row_kernels.cuh"

#include <cstdio>
#include <cstdlib>
#include <ucontext.h>

emu_dim3 threadIdx;
emu_dim3 blockIdx;
EmuBlock *emu_block;

namespace {

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done;
};

ucontext_t sched_ctx;
std::vector<Fiber> *fibers;
int current;
const std::function<void()> *current_body;

void yield_to_scheduler() { swapcontext(&(*fibers)[current].ctx, &sched_ctx); }

void fiber_entry()
{
    (*current_body)();
    (*fibers)[current].done = true;  /* then returns to sched_ctx through uc_link */
}

}  // namespace

void emu_wait(EmuBarrier *b)
{
    const unsigned gen = b->gen;
    if (++b->count == b->size) {
        b->count = 0;
        b->gen++;
        return;
    }
    long spins = 0;
    while (b->gen == gen) {
        if (++spins > 10000000L) {
            std::fprintf(stderr, "emu: a barrier never completes (thread %u of block %u)\n",
                         threadIdx.x, blockIdx.x);
            std::abort();
        }
        yield_to_scheduler();
    }
}

void emu_run_block(unsigned b, int nt, const std::function<void()> &body)
{
    EmuBlock blk;
    blk.nt = nt;
    blk.block = {nt, 0, 0};
    for (int w = 0; w < nt / 32; w++) blk.warp[w] = {32, 0, 0};
    emu_block = &blk;
    blockIdx = {b, 0, 0};
    std::vector<Fiber> fs((size_t)nt);
    fibers = &fs;
    current_body = &body;
    for (int t = 0; t < nt; t++) {
        Fiber &f = fs[(size_t)t];
        f.stack.resize(1 << 16);
        f.done = false;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &sched_ctx;
        makecontext(&f.ctx, fiber_entry, 0);
    }
    for (int left = nt; left > 0;) {
        left = 0;
        for (int t = 0; t < nt; t++) {
            if (fs[(size_t)t].done) continue;
            current = t;
            threadIdx = {(unsigned)t, 0, 0};
            swapcontext(&sched_ctx, &fs[(size_t)t].ctx);
            left += !fs[(size_t)t].done;
        }
    }
    emu_block = nullptr;
    fibers = nullptr;
}

extern "C" {

int emu_threads(void) { return TKC_NT; }

void emu_tail(int dtype, const void *data, int64_t rows, int64_t n, int64_t rs, int64_t es,
              const int64_t *k, double *lt, double *kl, unsigned long long *status)
{
    const tkc_rows x = {data, rows, n, rs, es, dtype};
    for (int64_t r = 0; r < rows; r++)
        emu_run_block((unsigned)r, TKC_NT, [&] {
            if (dtype == TKC_F32) tail_kernel<float>(x, 0, k, lt, kl, status);
            else tail_kernel<double>(x, 0, k, lt, kl, status);
        });
}

void emu_keps(int dtype, const void *data, int64_t rows, int64_t n, int64_t rs, int64_t es,
              const double *eps, int64_t *k_out, double *tau, unsigned long long *status)
{
    const tkc_rows x = {data, rows, n, rs, es, dtype};
    for (int64_t r = 0; r < rows; r++)
        emu_run_block((unsigned)r, TKC_NT, [&] {
            if (dtype == TKC_F32) keps_kernel<float>(x, 0, eps, k_out, tau, status);
            else keps_kernel<double>(x, 0, eps, k_out, tau, status);
        });
}

void emu_topk(int dtype, const void *data, int64_t rows, int64_t n, int64_t rs, int64_t es,
              int64_t k, int64_t *idx, unsigned long long *status)
{
    const tkc_rows x = {data, rows, n, rs, es, dtype};
    std::vector<unsigned long long> ka((size_t)(rows * k + 1)), kb((size_t)(rows * k + 1));
    std::vector<int64_t> ib((size_t)(rows * k + 1));
    for (int64_t r = 0; r < rows; r++)
        emu_run_block((unsigned)r, TKC_NT, [&] {
            if (dtype == TKC_F32)
                topk_kernel<float>(x, 0, k, idx, (uint32_t *)ka.data(), (uint32_t *)kb.data(),
                                   ib.data(), status);
            else
                topk_kernel<double>(x, 0, k, idx, ka.data(), kb.data(), ib.data(), status);
        });
}

/* attn_row_kernel on given scores (rows x n, contiguous, float32 or float64 as dtype) with
 * V (batch, n, dv) contiguous of the same dtype; rows = batch * L. */
void emu_attn_rows(int dtype, const void *scores, int64_t batch, int64_t L, int64_t n,
                   const void *v, const int64_t *v_off, int64_t dv, const int64_t *kreq,
                   const double *eps, int64_t *idx, int64_t W, void *out, int64_t *k_out,
                   double *tau_out, unsigned long long *status)
{
    tkc_attn a;
    std::memset(&a, 0, sizeof a);
    a.v = v;
    a.v_off = v_off;
    a.v_ld = dv;
    a.batch = batch;
    a.L = L;
    a.n = n;
    a.dv = dv;
    a.dtype = dtype;
    const int64_t rows = batch * L;
    const bool info = idx != nullptr;
    const int64_t w = info ? W : n;
    std::vector<int64_t> kept((size_t)(rows * w + 1)), ib((size_t)(rows * w + 1));
    std::vector<unsigned long long> ka((size_t)(rows * w + 1)), kb((size_t)(rows * w + 1));
    for (int64_t r = 0; r < rows; r++)
        emu_run_block((unsigned)r, TKC_NT, [&] {
            if (dtype == TKC_F32)
                attn_row_kernel<float>(a, 0, (const float *)scores, kreq, eps,
                                       info ? idx : kept.data(), w,
                                       info ? (uint32_t *)ka.data() : nullptr,
                                       (uint32_t *)kb.data(), ib.data(), (float *)out, k_out,
                                       tau_out, status);
            else
                attn_row_kernel<double>(a, 0, (const double *)scores, kreq, eps,
                                        info ? idx : kept.data(), w,
                                        info ? ka.data() : nullptr, kb.data(), ib.data(),
                                        (double *)out, k_out, tau_out, status);
        });
}

}  /* extern "C" */
