/*
 * status.c - the one message table of tka_status, shared by the CPU core and the CUDA core
 * (both extensions compile this file).
 */
#include <stdatomic.h>
#include <stdio.h>

#include "tka_status.h"

typedef struct {
    const char *name;     /* the code's name without TKA_ */
    const char *message;  /* short text */
    /* bad data in rows of logits: "<argument><rows_verb><where><rows_tail>" */
    const char *rows_verb, *rows_tail;
    /* bad data in attention scores: "<scores_subject><scores_verb><where><scores_tail>" */
    const char *scores_subject, *scores_verb, *scores_tail;
} status_entry;

static const status_entry table[TKA_STATUS_COUNT] = {
    [TKA_OK] = {"OK", "no error", NULL, NULL, NULL, NULL, NULL},
    [TKA_ERR_NAN] = {"ERR_NAN", "a logit is NaN", " contains NaN", "", "the scores q.k",
                     " contain NaN", ": Q or K has NaN or inf values"},
    [TKA_ERR_POSINF] = {"ERR_POSINF", "a logit is +inf", " contains +inf",
                        " (use -inf for masked keys)", "the scores q.k", " are +inf",
                        ": Q or K has inf values"},
    [TKA_ERR_ALL_MASKED] = {"ERR_ALL_MASKED", "every logit of a row is -inf",
                            " has a fully masked row", " (every logit is -inf)", "mask",
                            " masks every key of a query row",
                            "; a softmax over no key is undefined"},
    [TKA_ERR_NOMEM] = {"ERR_NOMEM", "out of memory", NULL, NULL, NULL, NULL, NULL},
    [TKA_ERR_ARG] = {"ERR_ARG", "invalid argument", NULL, NULL, NULL, NULL, NULL},
    [TKA_ERR_INTERNAL] = {"ERR_INTERNAL", "internal error in the topkattn core, please report it",
                          NULL, NULL, NULL, NULL, NULL},
    [TKA_ERR_CUDA] = {"ERR_CUDA", "a CUDA runtime call failed", NULL, NULL, NULL, NULL, NULL},
};

static const status_entry *entry(tka_status st)
{
    return (int)st >= 0 && st < TKA_STATUS_COUNT ? &table[st] : NULL;
}

const char *tka_status_message(tka_status st)
{
    if (st == TKA_RETRY) return "internal retry signal (never returned by a public function)";
    const status_entry *e = entry(st);
    return e ? e->message : "unknown status";
}

const char *tka_status_name(tka_status st)
{
    if (st == TKA_RETRY) return "RETRY";
    const status_entry *e = entry(st);
    return e ? e->name : NULL;
}

char *tka_status_format(char *buf, size_t size, tka_status st, const char *name,
                        const char *where)
{
    const status_entry *e = entry(st);
    if (!e || !e->rows_verb)
        snprintf(buf, size, "%s", tka_status_message(st));
    else if (name)
        snprintf(buf, size, "%s%s%s%s", name, e->rows_verb, where, e->rows_tail);
    else
        snprintf(buf, size, "%s%s%s%s", e->scores_subject, e->scores_verb, where, e->scores_tail);
    return buf;
}

/* A static string, so that any thread may read it; the latest internal error wins. */
static _Atomic(const char *) g_internal_place;

tka_status tka_status_internal(const char *place)
{
    atomic_store(&g_internal_place, place);
    return TKA_ERR_INTERNAL;
}

const char *tka_status_internal_place(void)
{
    const char *p = atomic_load(&g_internal_place);
    return p ? p : "";
}
