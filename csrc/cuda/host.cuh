/*
 * host.cuh - the host side of one call into the CUDA core: select the caller's device, queue
 * work on the caller's stream, take scratch from the stream-ordered allocator, and at the end
 * read back the status word (lowest bad row and its code), wait for the stream, release the
 * scratch and restore the previous device. The first failing CUDA call is remembered and
 * everything after it is skipped.
 */
#ifndef TKA_CUDA_HOST_CUH
#define TKA_CUDA_HOST_CUH

#include <stdio.h>
#include <string.h>

#include "common.cuh"

/* Bytes of scratch one launch may take; rows are processed in chunks that fit. */
#define TKC_SCRATCH_BUDGET ((i64)512 << 20)
/* Rows per launch (grid y of the scoring kernel is limited to 65535). */
#define TKC_MAX_ROWS_PER_LAUNCH 65535

struct Call {
    cudaStream_t stream;
    int prev_device;
    bool device_set;
    u64 *status;
    void *scratch[4];
    int nscratch;
    cudaError_t first;
    const char *where;
    tkc_error *err;

    Call(uintptr_t s, int device, tkc_error *e)
        : stream((cudaStream_t)s), prev_device(-1), device_set(false), status(nullptr),
          nscratch(0), first(cudaSuccess), where(nullptr), err(e)
    {
        err->row = -1;
        err->msg[0] = 0;
        if (ok(cudaGetDevice(&prev_device), "cudaGetDevice") &&
            ok(cudaSetDevice(device), "cudaSetDevice"))
            device_set = true;
        if (ok(cudaMallocAsync((void **)&status, sizeof(u64), stream), "cudaMallocAsync"))
            ok(cudaMemsetAsync(status, 0xff, sizeof(u64), stream), "cudaMemsetAsync");
    }

    bool ok(cudaError_t e, const char *what)
    {
        if (e != cudaSuccess && first == cudaSuccess) {
            first = e;
            where = what;
        }
        return first == cudaSuccess;
    }

    bool good() const { return first == cudaSuccess; }

    /* Device scratch of `bytes` (at least 1), released by finish(). */
    void *alloc(size_t bytes)
    {
        void *p = nullptr;
        if (!good() || nscratch == 4) return nullptr;
        if (!ok(cudaMallocAsync(&p, bytes ? bytes : 1, stream), "cudaMallocAsync (scratch)"))
            return nullptr;
        scratch[nscratch++] = p;
        return p;
    }

    /* Check the launch just made. */
    bool launched(const char *what) { return ok(cudaGetLastError(), what); }

    /* Wait for the work, translate the status word; returns a tka_status. */
    int finish()
    {
        u64 word = ~0ull;
        if (good() && ok(cudaMemcpyAsync(&word, status, sizeof(u64), cudaMemcpyDeviceToHost, stream),
                         "cudaMemcpyAsync (status)"))
            ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        for (int i = 0; i < nscratch; i++) cudaFreeAsync(scratch[i], stream);
        if (status) cudaFreeAsync(status, stream);
        if (device_set && prev_device >= 0) cudaSetDevice(prev_device);
        if (!good()) {
            snprintf(err->msg, sizeof err->msg, "%s: %s", where, cudaGetErrorString(first));
            cudaGetLastError();  /* clear a sticky launch error for the next call */
            return TKA_ERR_CUDA;
        }
        if (word == ~0ull) return TKA_OK;
        err->row = (i64)(word >> 4);
        return (int)(word & 15);
    }
};

static inline int tkc_arg_error(tkc_error *err, const char *msg)
{
    err->row = -1;
    snprintf(err->msg, sizeof err->msg, "%s", msg);
    return TKA_ERR_ARG;
}

/* Rows per launch so that `per_row` bytes of scratch each fit in the budget. */
static inline i64 rows_per_launch(i64 rows, i64 per_row)
{
    i64 c = per_row > 0 ? TKC_SCRATCH_BUDGET / per_row : rows;
    if (c < 1) c = 1;
    if (c > TKC_MAX_ROWS_PER_LAUNCH) c = TKC_MAX_ROWS_PER_LAUNCH;
    return c < rows ? c : rows;
}

#endif /* TKA_CUDA_HOST_CUH */
