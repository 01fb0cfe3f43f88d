/*
 * arena.c - per-thread scratch memory as a stack of allocations (see tka_arena in internal.h).
 *
 * The arena is a short chain of blocks, each at least twice the size of the one before, seen
 * as one address range: a mark is an offset in that range. Allocations never move, so a
 * pointer stays valid until its owner releases to a mark taken before it. Blocks above the
 * top are kept for reuse: rows of one call ask for the same sizes in the same order, so
 * after the first row a thread allocates nothing more (and touches no new pages). Blocks
 * are not merged: a fresh block would be new pages to fault in again.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define ALIGN 64
#define MIN_BLOCK ((size_t)1 << 16)

static size_t round_up(size_t x) { return (x + (ALIGN - 1)) & ~(size_t)(ALIGN - 1); }

void tka_arena_init(tka_arena *a) { memset(a, 0, sizeof *a); }

void tka_arena_free(tka_arena *a)
{
    for (int b = 0; b < a->nblocks; b++) free(a->block[b]);
    memset(a, 0, sizeof *a);
}

/* Make block b (above the top, so free) hold at least `bytes`. */
static int grow_block(tka_arena *a, int b, size_t bytes)
{
    size_t want = b > 0 ? 2 * a->cap[b - 1] : MIN_BLOCK;
    if (want < bytes) want = round_up(bytes + bytes / 2);
    if (b < a->nblocks && a->cap[b] >= bytes) return 0;
    void *p = aligned_alloc(ALIGN, want);
    if (!p) return -1;
    /* blocks past b are free too; drop them so that offsets stay consecutive */
    for (int i = b; i < a->nblocks; i++) free(a->block[i]);
    a->block[b] = p;
    a->cap[b] = want;
    a->base[b] = b > 0 ? a->base[b - 1] + a->cap[b - 1] : 0;
    a->nblocks = b + 1;
    return 0;
}

void *tka_arena_alloc(tka_arena *a, size_t bytes)
{
    bytes = round_up(bytes ? bytes : 1);
    int b = a->cur;
    if (b < a->nblocks) {
        size_t used = a->top - a->base[b];
        if (a->cap[b] - used >= bytes) {
            a->top += bytes;
            return a->block[b] + used;
        }
        b++;  /* the rest of this block stays unused until the top drops below it */
    }
    if (b >= TKA_ARENA_BLOCKS || grow_block(a, b, bytes) < 0) return NULL;
    a->cur = b;
    a->top = a->base[b] + bytes;
    return a->block[b];
}

void tka_arena_release(tka_arena *a, size_t mark)
{
    a->top = mark;
    int b = a->cur < a->nblocks ? a->cur : a->nblocks - 1;
    while (b > 0 && a->base[b] > mark) b--;
    a->cur = b < 0 ? 0 : b;
}
