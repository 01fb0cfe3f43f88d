/*
 * attention.cu - Top-k attention on the GPU (docs/design.md §3), decode (L = 1) and prefill alike.
 *
 * Per chunk of query rows:
 *   1. scores_kernel: s_j = scale * q . k_j (+ mask), one warp per key, the lanes splitting
 *      d; many blocks per query row, so that reading K can use the whole GPU. Scores go to
 *      a scratch buffer of n values per row in the accumulation type (float32, or float64
 *      for float64 operands).
 *   2. attn_row_kernel, one block per query row: validate the scores, choose k (given, or
 *      k_eps by the radix walk), select the k-th largest by rank, gather the kept positions
 *      in index order (ties: lower position), optionally sort them by decreasing score for
 *      the caller, then out = sum_kept e^{s - max} v / sum_kept e^{s - max}, reading only
 *      the kept rows of V.
 */
#include "host.cuh"
#include "attn_kernels.cuh"


template <class T>
static void launch_attention(Call &c, const tkc_attn *a, const i64 *k, const double *eps,
                             void *out, i64 *k_out, double *tau_out, i64 *idx_out, i64 idx_width)
{
    typedef typename real_of<T>::type A;
    typedef typename key_of<A>::type KT;
    const i64 rows = a->batch * a->L;
    const bool info = idx_out != nullptr;
    const i64 W = info ? idx_width : a->n;
    const i64 per_row = a->n * (i64)sizeof(A)
                        + (info ? W * (i64)(2 * sizeof(KT) + sizeof(i64)) : W * (i64)sizeof(i64));
    const i64 chunk = rows_per_launch(rows, per_row);
    A *scores = (A *)c.alloc((size_t)(chunk * a->n) * sizeof(A));
    i64 *kept = info ? nullptr : (i64 *)c.alloc((size_t)(chunk * W) * sizeof(i64));
    KT *ka = info ? (KT *)c.alloc((size_t)(chunk * W) * sizeof(KT)) : nullptr;
    KT *kb = info ? (KT *)c.alloc((size_t)(chunk * W) * sizeof(KT)) : nullptr;
    i64 *ib = info ? (i64 *)c.alloc((size_t)(chunk * W) * sizeof(i64)) : nullptr;
    const size_t smem = (size_t)a->d * sizeof(A);
    for (i64 r0 = 0; r0 < rows && c.good(); r0 += chunk) {
        const i64 m = rows - r0 < chunk ? rows - r0 : chunk;
        dim3 grid((unsigned)((a->n + SCORE_KEYS - 1) / SCORE_KEYS), (unsigned)m);
        scores_kernel<T><<<grid, SCORE_NT, smem, c.stream>>>(*a, r0, scores);
        if (!c.launched("scores_kernel")) break;
        attn_row_kernel<T><<<(unsigned)m, TKC_NT, 0, c.stream>>>(
            *a, r0, scores, k, eps, info ? idx_out + r0 * W : kept, W, ka, kb, ib, (T *)out,
            k_out, tau_out, c.status);
        c.launched("attn_row_kernel");
    }
}

extern "C" int tkc_topk_attention(const tkc_attn *a, const int64_t *k, const double *eps,
                                  void *out, int64_t *k_out, double *tau_out, int64_t *idx_out,
                                  int64_t idx_width, uintptr_t stream, int device, tkc_error *err)
{
    if (a->batch < 0 || a->L < 1 || a->n < 1 || a->d < 1 || a->dv < 0)
        return tkc_arg_error(err, "attention: empty L, n or d");
    if (a->n >= ((i64)1 << 31))
        return tkc_arg_error(err, "attention: more than 2^31 - 1 keys are not supported on the GPU");
    if (a->d > 4096) return tkc_arg_error(err, "attention: d > 4096 is not supported on the GPU");
    if ((k == nullptr) == (eps == nullptr)) return tkc_arg_error(err, "attention: give k or eps");
    if (idx_out && idx_width < 1) return tkc_arg_error(err, "attention: idx_width must be >= 1");
    if (a->dtype < TKC_F32 || a->dtype > TKC_BF16) return tkc_arg_error(err, "unsupported dtype");
    Call c(stream, device, err);
    if (a->batch > 0) {
        switch (a->dtype) {
        case TKC_F32: launch_attention<float>(c, a, k, eps, out, k_out, tau_out, idx_out, idx_width); break;
        case TKC_F64: launch_attention<double>(c, a, k, eps, out, k_out, tau_out, idx_out, idx_width); break;
        case TKC_F16: launch_attention<__half>(c, a, k, eps, out, k_out, tau_out, idx_out, idx_width); break;
        default: launch_attention<__nv_bfloat16>(c, a, k, eps, out, k_out, tau_out, idx_out, idx_width); break;
        }
    }
    return c.finish();
}
