/*
 * parallel.c - row-parallel execution on a persistent pool of POSIX threads, one scratch
 * arena per thread that lives across calls.
 *
 * Threads claim chunks of rows in increasing order from an atomic counter. Every row is
 * computed by exactly one thread with the same code, so results never depend on the
 * thread count; the error reported is the one of the lowest failing row.
 *
 * The pool. Workers are started on first need (tka_num_threads() - 1 of them, the
 * calling thread being the last) and then sleep between jobs; a job wakes them through a
 * generation counter, which they poll briefly before they block on a condition variable,
 * so back-to-back calls (a decode loop) do not pay a sleep and a wake-up each (the polling
 * lasts some tens of microseconds). The pool
 * runs one job at a time: a caller that finds it busy (another Python thread inside the
 * core) runs its job on its own thread, which gives the same results. A worker that is
 * never needed again (set_num_threads lowered) just sleeps. After fork() the child has
 * none of the parent's threads: it starts a pool of its own on first need.
 *
 * Scratch. Each thread, workers and callers alike, owns one arena (thread-local, freed
 * when the thread exits); a job takes a mark and releases to it, so a thread stops
 * allocating once it has seen the sizes its rows ask for. An arena that has grown past
 * TKA_ARENA_KEEP is freed when its outermost job ends, so one huge call does not pin its
 * memory for the life of the thread.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <pthread.h>
#include <sched.h>

#include "internal.h"

#define MAX_THREADS 256
/* Arenas above this many bytes are given back when their thread's outermost job ends. */
#define TKA_ARENA_KEEP ((size_t)256 << 20)
/* Polls of the job counter before a worker (or a caller waiting for workers) blocks:
 * some tens of microseconds. */
#define SPIN_POLLS 2000

static atomic_int g_threads;
static _Thread_local int t_in_parallel;

int tka_threads_in_worker(void) { return t_in_parallel; }

static int default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : (int)n);
}

int tka_num_threads(void)
{
    int n = atomic_load(&g_threads);
    return n > 0 ? n : default_threads();
}

void tka_set_num_threads(int n)
{
    atomic_store(&g_threads, n > 0 ? (n > MAX_THREADS ? MAX_THREADS : n) : 0);
}


/* ------------------------------------------------------------ per-thread arenas */

typedef struct {
    tka_arena a;
    int depth;  /* jobs of this thread in progress (nested runs share the arena) */
} thread_scratch;

static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;

static void scratch_destroy(void *p)
{
    thread_scratch *t = p;
    tka_arena_free(&t->a);
    free(t);
}

static void scratch_key_init(void) { (void)pthread_key_create(&g_scratch_key, scratch_destroy); }

/* This thread's arena, entered for one job; NULL when out of memory. */
static thread_scratch *scratch_enter(void)
{
    pthread_once(&g_scratch_once, scratch_key_init);
    thread_scratch *t = pthread_getspecific(g_scratch_key);
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t) return NULL;
        tka_arena_init(&t->a);
        if (pthread_setspecific(g_scratch_key, t) != 0) {
            free(t);
            return NULL;
        }
    }
    t->depth++;
    return t;
}

static void scratch_leave(thread_scratch *t, size_t mark)
{
    tka_arena_release(&t->a, mark);
    if (--t->depth == 0 && t->a.nblocks > 0) {
        size_t total = t->a.base[t->a.nblocks - 1] + t->a.cap[t->a.nblocks - 1];
        if (total > TKA_ARENA_KEEP) tka_arena_free(&t->a);
    }
}

/* ------------------------------------------------------------------------- jobs */

typedef struct {
    tka_row_fn fn;
    void *ctx;
    int64_t rows, chunk;
    atomic_llong next;
    atomic_llong err_row;   /* lowest failing row so far, or rows if none */
    atomic_int err_code;
    atomic_flag lock;       /* guards the (err_row, err_code) pair */
} job;

static void record_error(job *j, int64_t bad, tka_status st)
{
    while (atomic_flag_test_and_set_explicit(&j->lock, memory_order_acquire)) tka_cpu_relax();
    if (bad < atomic_load(&j->err_row)) {
        atomic_store(&j->err_row, bad);
        atomic_store(&j->err_code, st);
    }
    atomic_flag_clear_explicit(&j->lock, memory_order_release);
}

static void run_chunks(job *j)
{
    thread_scratch *t = scratch_enter();
    if (!t) {  /* no scratch for this thread: fail the first rows it would have taken */
        int64_t r0 = atomic_fetch_add(&j->next, j->chunk);
        if (r0 < j->rows) record_error(j, r0, TKA_ERR_NOMEM);
        return;
    }
    const size_t mark = tka_arena_mark(&t->a);
    int was = t_in_parallel;
    t_in_parallel = 1;
    for (;;) {
        int64_t r0 = atomic_fetch_add(&j->next, j->chunk);
        /* Rows are claimed in increasing order: once an error is known at row e, every
         * row below e has already been claimed and will finish, so we may stop. */
        if (r0 >= j->rows || r0 > atomic_load(&j->err_row)) break;
        int64_t r1 = r0 + j->chunk < j->rows ? r0 + j->chunk : j->rows;
        int64_t bad = -1;
        tka_status st = j->fn(j->ctx, r0, r1, &t->a, &bad);
        tka_arena_release(&t->a, mark);
        if (st == TKA_RETRY) st = TKA_INTERNAL_ERROR();  /* a retry must be taken inside */
        if (st != TKA_OK) record_error(j, bad < 0 ? r0 : bad, st);
    }
    t_in_parallel = was;
    scratch_leave(t, mark);
}

/* ------------------------------------------------------------------------- pool */

static struct {
    pthread_mutex_t busy;        /* held by the caller whose job the pool runs */
    pthread_mutex_t m;           /* guards the sleeping and the fields below */
    pthread_cond_t wake, done;
    int started;                 /* workers running */
    job *cur;                    /* the job of generation `gen` */
    int want;                    /* workers that take part in it (the first `want`) */
    atomic_ulong gen;            /* bumped for each job */
    atomic_int remaining;        /* workers of the current job not finished yet */
    unsigned long start_gen[MAX_THREADS];  /* `gen` when each worker was created */
} g_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
            PTHREAD_COND_INITIALIZER, 0, NULL, 0, 0, 0, {0}};

static void *worker_main(void *arg)
{
    const int id = (int)(intptr_t)arg;
    /* the generation before the first job this worker may take (read when it was created:
     * reading it here could already see that job's generation and miss it) */
    unsigned long seen = g_pool.start_gen[id];
    for (;;) {
        unsigned long g = atomic_load_explicit(&g_pool.gen, memory_order_acquire);
        for (int i = 0; g == seen && i < SPIN_POLLS; i++) {
            tka_cpu_relax();
            g = atomic_load_explicit(&g_pool.gen, memory_order_acquire);
        }
        pthread_mutex_lock(&g_pool.m);
        while ((g = atomic_load(&g_pool.gen)) == seen) pthread_cond_wait(&g_pool.wake, &g_pool.m);
        job *j = g_pool.cur;
        int take = id < g_pool.want;
        pthread_mutex_unlock(&g_pool.m);
        seen = g;
        if (!take) continue;
        run_chunks(j);
        if (atomic_fetch_sub_explicit(&g_pool.remaining, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&g_pool.m);
            pthread_cond_signal(&g_pool.done);
            pthread_mutex_unlock(&g_pool.m);
        }
    }
    return NULL;
}

/* Start workers up to `n` (called with g_pool.busy held); returns how many run. */
static int pool_grow(int n)
{
    while (g_pool.started < n) {
        pthread_attr_t at;
        pthread_t tid;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        g_pool.start_gen[g_pool.started] = atomic_load(&g_pool.gen);
        int rc = pthread_create(&tid, &at, worker_main, (void *)(intptr_t)g_pool.started);
        pthread_attr_destroy(&at);
        if (rc != 0) break;  /* fewer threads: same results, less speed */
        g_pool.started++;
    }
    return g_pool.started < n ? g_pool.started : n;
}

/* The child of a fork has only the thread that forked: forget the parent's workers. The
 * locks are re-created, since another thread of the parent may have held them. */
static void pool_after_fork_child(void)
{
    pthread_mutex_init(&g_pool.busy, NULL);
    pthread_mutex_init(&g_pool.m, NULL);
    pthread_cond_init(&g_pool.wake, NULL);
    pthread_cond_init(&g_pool.done, NULL);
    g_pool.started = 0;
    g_pool.cur = NULL;
    g_pool.want = 0;
    atomic_store(&g_pool.remaining, 0);
}

static pthread_once_t g_fork_once = PTHREAD_ONCE_INIT;
static void fork_handler_init(void) { (void)pthread_atfork(NULL, NULL, pool_after_fork_child); }

/* Run j on the calling thread and up to nt - 1 workers. */
static void pool_run(job *j, int nt)
{
    pthread_once(&g_fork_once, fork_handler_init);
    if (nt <= 1 || pthread_mutex_trylock(&g_pool.busy) != 0) {
        run_chunks(j);  /* one thread, or the pool is serving another caller */
        return;
    }
    int helpers = pool_grow(nt - 1);
    if (helpers > 0) {
        pthread_mutex_lock(&g_pool.m);
        g_pool.cur = j;
        g_pool.want = helpers;
        atomic_store(&g_pool.remaining, helpers);
        atomic_fetch_add_explicit(&g_pool.gen, 1, memory_order_release);
        pthread_cond_broadcast(&g_pool.wake);
        pthread_mutex_unlock(&g_pool.m);
    }
    run_chunks(j);
    if (helpers > 0) {
        for (int i = 0; atomic_load_explicit(&g_pool.remaining, memory_order_acquire) > 0 &&
                        i < SPIN_POLLS; i++)
            tka_cpu_relax();
        if (atomic_load(&g_pool.remaining) > 0) {
            pthread_mutex_lock(&g_pool.m);
            while (atomic_load(&g_pool.remaining) > 0) pthread_cond_wait(&g_pool.done, &g_pool.m);
            pthread_mutex_unlock(&g_pool.m);
        }
    }
    pthread_mutex_unlock(&g_pool.busy);
}

/* Below this many elements a job runs on the calling thread: waking a worker and
 * sharing the rows costs a few microseconds. */
#define TKA_PARALLEL_MIN_WORK 32768.0

tka_status tka_rows_run_parallel(int64_t rows, double work, tka_row_fn fn, void *ctx,
                                 int64_t *err_row)
{
    *err_row = -1;
    if (rows <= 0) return TKA_OK;
    int nt = t_in_parallel ? 1 : tka_num_threads();
    if (work < TKA_PARALLEL_MIN_WORK * 2) nt = 1;
    else if (work / nt < TKA_PARALLEL_MIN_WORK) nt = (int)(work / TKA_PARALLEL_MIN_WORK);
    if (nt > rows) nt = (int)rows;
    if (nt < 1) nt = 1;

    job j;
    j.fn = fn;
    j.ctx = ctx;
    j.rows = rows;
    /* Several chunks per thread balance uneven rows; the chunking never changes results. */
    j.chunk = nt > 1 ? rows / ((int64_t)nt * 8) : rows;
    if (j.chunk < 1) j.chunk = 1;
    atomic_init(&j.next, 0);
    atomic_init(&j.err_row, rows);
    atomic_init(&j.err_code, TKA_OK);
    atomic_flag_clear(&j.lock);
    pool_run(&j, nt);

    tka_status st = (tka_status)atomic_load(&j.err_code);
    if (st != TKA_OK) *err_row = atomic_load(&j.err_row);
    return st;
}

tka_status tka_rows_run_serial(int64_t rows, tka_row_fn fn, void *ctx, int64_t *err_row)
{
    *err_row = -1;
    if (rows <= 0) return TKA_OK;
    thread_scratch *t = scratch_enter();
    if (!t) return TKA_ERR_NOMEM;
    const size_t mark = tka_arena_mark(&t->a);
    tka_status st = fn(ctx, 0, rows, &t->a, err_row);
    if (st == TKA_RETRY) st = TKA_INTERNAL_ERROR();  /* a retry must be taken inside */
    scratch_leave(t, mark);
    return st;
}
