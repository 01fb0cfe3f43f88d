/*
 * parallel.c - row-parallel execution on plain POSIX threads, one scratch arena per thread.
 *
 * Threads claim chunks of rows in increasing order from an atomic counter. Every row is
 * computed by exactly one thread with the same code, so results never depend on the
 * thread count; the error reported is the one of the lowest failing row.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <pthread.h>

#include "internal.h"

static atomic_int g_threads;
static _Thread_local int t_in_parallel;

int tka_threads_in_worker(void) { return t_in_parallel; }

static int default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 256 ? 256 : (int)n);
}

int tka_num_threads(void)
{
    int n = atomic_load(&g_threads);
    return n > 0 ? n : default_threads();
}

void tka_set_num_threads(int n) { atomic_store(&g_threads, n > 0 ? (n > 256 ? 256 : n) : 0); }

typedef struct {
    tka_row_fn fn;
    void *ctx;
    int64_t rows, chunk;
    atomic_llong next;
    atomic_llong err_row;   /* lowest failing row so far, or rows if none */
    atomic_int err_code;
    pthread_mutex_t lock;
} job;

static void run_chunks(job *j)
{
    tka_arena s;
    tka_arena_init(&s);
    int was = t_in_parallel;
    t_in_parallel = 1;
    for (;;) {
        int64_t r0 = atomic_fetch_add(&j->next, j->chunk);
        /* Rows are claimed in increasing order: once an error is known at row e, every
         * row below e has already been claimed and will finish, so we may stop. */
        if (r0 >= j->rows || r0 > atomic_load(&j->err_row)) break;
        int64_t r1 = r0 + j->chunk < j->rows ? r0 + j->chunk : j->rows;
        int64_t bad = -1;
        tka_status st = j->fn(j->ctx, r0, r1, &s, &bad);
        if (st == TKA_RETRY) st = TKA_INTERNAL_ERROR();  /* a retry must be taken inside */
        if (st != TKA_OK) {
            if (bad < 0) bad = r0;
            pthread_mutex_lock(&j->lock);
            if (bad < atomic_load(&j->err_row)) {
                atomic_store(&j->err_row, bad);
                atomic_store(&j->err_code, st);
            }
            pthread_mutex_unlock(&j->lock);
        }
    }
    t_in_parallel = was;
    tka_arena_free(&s);
}

static void *worker(void *arg)
{
    run_chunks((job *)arg);
    return NULL;
}

/* Below this many elements a job runs on the calling thread: starting threads costs
 * tens of microseconds. */
#define TKA_PARALLEL_MIN_WORK 65536.0

tka_status tka_rows_run_parallel(int64_t rows, double work, tka_row_fn fn, void *ctx,
                             int64_t *err_row)
{
    *err_row = -1;
    if (rows <= 0) return TKA_OK;
    int nt = tka_num_threads();
    if (work < TKA_PARALLEL_MIN_WORK * 2) nt = 1;
    else if (work / nt < TKA_PARALLEL_MIN_WORK) nt = (int)(work / TKA_PARALLEL_MIN_WORK);
    if (nt > rows) nt = (int)rows;
    if (nt < 1) nt = 1;

    job j;
    j.fn = fn;
    j.ctx = ctx;
    j.rows = rows;
    /* Several chunks per thread balance uneven rows; the chunking never changes results. */
    j.chunk = rows / ((int64_t)nt * 8);
    if (j.chunk < 1) j.chunk = 1;
    atomic_init(&j.next, 0);
    atomic_init(&j.err_row, rows);
    atomic_init(&j.err_code, TKA_OK);
    pthread_mutex_init(&j.lock, NULL);

    pthread_t tid[256];
    int started = 0;
    for (int t = 1; t < nt; t++) {
        if (pthread_create(&tid[started], NULL, worker, &j) != 0) break; /* fewer threads */
        started++;
    }
    run_chunks(&j);
    for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
    pthread_mutex_destroy(&j.lock);

    tka_status st = (tka_status)atomic_load(&j.err_code);
    if (st != TKA_OK) *err_row = atomic_load(&j.err_row);
    return st;
}

tka_status tka_rows_run_serial(int64_t rows, tka_row_fn fn, void *ctx, int64_t *err_row)
{
    tka_arena s;
    tka_arena_init(&s);
    *err_row = -1;
    tka_status st = rows > 0 ? fn(ctx, 0, rows, &s, err_row) : TKA_OK;
    if (st == TKA_RETRY) st = TKA_INTERNAL_ERROR();  /* a retry must be taken inside */
    tka_arena_free(&s);
    return st;
}
