/*
 * chunks.c - kernel calls over a whole row, split into fixed chunks for long rows.
 *
 * A row longer than TKA_CHUNK elements is processed as chunks of TKA_CHUNK; their partial
 * results (sums, counts, gathered logits) are combined in chunk order. The chunk size
 * does not depend on the thread count, so the result is the same whether the chunks run
 * on one thread or several: a single long row (a decode step) still uses every core and
 * stays bit-identical for any thread count.
 */
#include <math.h>
#include <string.h>

#include "internal.h"

enum { OP_SCAN, OP_SPLIT, OP_MOMENT, OP_BAND, OP_MAXBELOW };

typedef struct {
    const tka_kernels *K;
    tka_dtype dt;
    const char *p;
    int64_t n, es, nch;
    int op, with_mass;
    double a, b, c;
    int64_t ccap;          /* gather capacity per chunk */
    tka_scan_out *scan;    /* per chunk outputs */
    double *s1, *s2, *s3;
    tka_band_out *band;
    double *cvals;
    int64_t *cidx;
} cjob;

static tka_status chunk_fn(void *ctx, int64_t c0, int64_t c1, tka_arena *s, int64_t *bad)
{
    cjob *j = ctx;
    for (int64_t c = c0; c < c1; c++) {
        int64_t off = c * TKA_CHUNK, len = j->n - off < TKA_CHUNK ? j->n - off : TKA_CHUNK;
        const void *p = j->p + off * j->es;
        switch (j->op) {
        case OP_SCAN: j->K->scan[j->dt](p, len, &j->scan[c]); break;
        case OP_SPLIT: j->K->sumexp_split[j->dt](p, len, j->a, j->b, j->c, &j->s1[c], &j->s2[c]); break;
        case OP_MOMENT: j->K->sumexp_moment[j->dt](p, len, j->a, &j->s1[c], &j->s2[c], &j->s3[c]); break;
        case OP_MAXBELOW: j->s1[c] = j->K->max_below[j->dt](p, len, j->a); break;
        default:
            j->K->band[j->dt](p, len, j->a, j->b, j->c, j->with_mass,
                              j->cvals ? j->cvals + c * j->ccap : NULL,
                              j->cidx ? j->cidx + c * j->ccap : NULL, j->ccap, &j->band[c]);
        }
    }
    return TKA_OK;
}

/* Run one op over every chunk; the per-chunk outputs are allocated in s, in the caller's
 * scope: the caller reads them, then releases. */
static tka_status run(cjob *j, const tka_row *w, tka_arena *s)
{
    j->K = w->K;
    j->dt = w->dt;
    j->p = w->p;
    j->n = w->n;
    j->es = w->dt == TKA_F32 ? 4 : 8;
    j->nch = (w->n + TKA_CHUNK - 1) / TKA_CHUNK;
    size_t per = sizeof(tka_scan_out) + 3 * sizeof(double) + sizeof(tka_band_out);
    char *mem = tka_arena_alloc(s, (size_t)j->nch * per);
    if (!mem) return TKA_ERR_NOMEM;
    j->scan = (tka_scan_out *)mem;
    j->band = (tka_band_out *)(mem + (size_t)j->nch * sizeof(tka_scan_out));
    j->s1 = (double *)(mem + (size_t)j->nch * (sizeof(tka_scan_out) + sizeof(tka_band_out)));
    j->s2 = j->s1 + j->nch;
    j->s3 = j->s2 + j->nch;
    int64_t bad;
    if (tka_threads_in_worker()) return chunk_fn(j, 0, j->nch, s, &bad);
    return tka_rows_run_parallel(j->nch, (double)w->n, chunk_fn, j, &bad);
}

tka_status tka_row_scan(tka_row *w, tka_arena *s, tka_scan_out *out)
{
    if (w->n <= TKA_CHUNK) {
        w->K->scan[w->dt](w->p, w->n, out);
        return TKA_OK;
    }
    const size_t mark = tka_arena_mark(s);
    cjob j = {.op = OP_SCAN};
    tka_status st = run(&j, w, s);
    if (st == TKA_OK) {
        *out = j.scan[0];
        for (int64_t c = 1; c < j.nch; c++) {
            if (j.scan[c].max > out->max) out->max = j.scan[c].max;
            out->n_masked += j.scan[c].n_masked;
            out->bad |= j.scan[c].bad;
        }
    }
    tka_arena_release(s, mark);
    return st;
}

tka_status tka_row_sumexp_split(const tka_row *w, tka_arena *s, double t, double ref_hi,
                                double ref_lo, double *hi, double *lo)
{
    if (w->n <= TKA_CHUNK) {
        w->K->sumexp_split[w->dt](w->p, w->n, t, ref_hi, ref_lo, hi, lo);
        return TKA_OK;
    }
    const size_t mark = tka_arena_mark(s);
    cjob j = {.op = OP_SPLIT, .a = t, .b = ref_hi, .c = ref_lo};
    tka_status st = run(&j, w, s);
    if (st == TKA_OK) {
        double h = 0.0, l = 0.0;
        for (int64_t c = 0; c < j.nch; c++) { h += j.s1[c]; l += j.s2[c]; }
        *hi = h;
        *lo = l;
    }
    tka_arena_release(s, mark);
    return st;
}

tka_status tka_row_sumexp_moment(const tka_row *w, tka_arena *s, double ref, double *zb,
                                 double *m1, double *cnt)
{
    if (w->n <= TKA_CHUNK) {
        w->K->sumexp_moment[w->dt](w->p, w->n, ref, zb, m1, cnt);
        return TKA_OK;
    }
    const size_t mark = tka_arena_mark(s);
    cjob j = {.op = OP_MOMENT, .a = ref};
    tka_status st = run(&j, w, s);
    if (st == TKA_OK) {
        double a = 0.0, b = 0.0, c = 0.0;
        for (int64_t i = 0; i < j.nch; i++) { a += j.s1[i]; b += j.s2[i]; c += j.s3[i]; }
        *zb = a;
        *m1 = b;
        *cnt = c;
    }
    tka_arena_release(s, mark);
    return st;
}

tka_status tka_row_max_below(const tka_row *w, tka_arena *s, double t, double *out)
{
    if (w->n <= TKA_CHUNK) {
        *out = w->K->max_below[w->dt](w->p, w->n, t);
        return TKA_OK;
    }
    const size_t mark = tka_arena_mark(s);
    cjob j = {.op = OP_MAXBELOW, .a = t};
    tka_status st = run(&j, w, s);
    if (st == TKA_OK) {
        double m = -INFINITY;
        for (int64_t c = 0; c < j.nch; c++) m = j.s1[c] > m ? j.s1[c] : m;
        *out = m;
    }
    tka_arena_release(s, mark);
    return st;
}

/* tka_row_band of a long row; its per-chunk buffers are allocated in s (caller's scope). */
static tka_status band_chunked(const tka_row *w, tka_arena *s, double lo, double hi, double ref,
                               int with_mass, double *vals, int64_t *idx, int64_t cap,
                               tka_band_out *out)
{
    const int64_t nch = (w->n + TKA_CHUNK - 1) / TKA_CHUNK;
    const int64_t ccap = cap < TKA_CHUNK ? cap : TKA_CHUNK;
    cjob j = {.op = OP_BAND, .a = lo, .b = hi, .c = ref, .with_mass = with_mass, .ccap = ccap};
    if (ccap > 0) {
        j.cvals = tka_arena_alloc(s, (size_t)(nch * ccap) * sizeof(double));
        if (!j.cvals) return TKA_ERR_NOMEM;
        if (idx) {
            j.cidx = tka_arena_alloc(s, (size_t)(nch * ccap) * sizeof(int64_t));
            if (!j.cidx) return TKA_ERR_NOMEM;
        }
    }
    tka_status st = run(&j, w, s);
    if (st != TKA_OK) return st;
    memset(out, 0, sizeof *out);
    for (int64_t c = 0; c < nch; c++) {
        const tka_band_out *b = &j.band[c];
        int64_t take = b->n_band < ccap ? b->n_band : ccap;
        if (out->n_band + take > cap) take = cap - out->n_band > 0 ? cap - out->n_band : 0;
        if (take > 0) {
            memcpy(vals + out->n_band, j.cvals + c * ccap, (size_t)take * sizeof(double));
            if (idx)
                for (int64_t i = 0; i < take; i++) idx[out->n_band + i] = j.cidx[c * ccap + i] + c * TKA_CHUNK;
        }
        out->n_above += b->n_above;
        out->n_band += b->n_band;
        out->mass_above += b->mass_above;
        out->mass_below += b->mass_below;
    }
    return TKA_OK;
}

tka_status tka_row_band(const tka_row *w, tka_arena *s, double lo, double hi, double ref,
                        int with_mass, double *vals, int64_t *idx, int64_t cap, tka_band_out *out)
{
    if (w->n <= TKA_CHUNK) {
        w->K->band[w->dt](w->p, w->n, lo, hi, ref, with_mass, vals, idx, cap, out);
        return TKA_OK;
    }
    const size_t mark = tka_arena_mark(s);
    tka_status st = band_chunked(w, s, lo, hi, ref, with_mass, vals, idx, cap, out);
    tka_arena_release(s, mark);
    return st;
}
