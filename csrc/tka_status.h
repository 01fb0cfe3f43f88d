/*
 * tka_status.h - the status codes of topkattn's C and CUDA cores, and their one message
 * table (status.c). Plain C, no Python: the CPython glue of both extensions (pyerr.c) turns
 * a status into an exception.
 */
#ifndef TKA_STATUS_H
#define TKA_STATUS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/** What a core function returns. Bad data is reported with the lowest bad row. */
typedef enum {
    TKA_OK = 0,
    TKA_ERR_NAN = 1,         /**< a logit (or an attention score) is NaN */
    TKA_ERR_POSINF = 2,      /**< a logit (or score) is +inf */
    TKA_ERR_ALL_MASKED = 3,  /**< every logit of a row is -inf */
    TKA_ERR_NOMEM = 4,       /**< an allocation failed */
    TKA_ERR_ARG = 5,         /**< an argument is out of range (text given with the status) */
    TKA_ERR_INTERNAL = 6,    /**< a state the code holds impossible: a bug (place recorded) */
    TKA_ERR_CUDA = 7,        /**< a CUDA runtime call failed (text given with the status) */
    TKA_STATUS_COUNT,        /**< number of codes a public function may return */
    /** Not an error: a step asks its caller to solve the row another way. Internal only;
     *  the thread pool turns one that escapes into TKA_ERR_INTERNAL. */
    TKA_RETRY = 100
} tka_status;

/** Short English text of a status, e.g. "out of memory" (never NULL). */
const char *tka_status_message(tka_status st);

/** Name of a status without the prefix, e.g. "ERR_NAN" (NULL for an unknown code). */
const char *tka_status_name(tka_status st);

/**
 * The user-facing sentence for bad data (TKA_ERR_NAN, TKA_ERR_POSINF, TKA_ERR_ALL_MASKED)
 * into buf: "<name> contains NaN<where>" for rows of logits held by argument `name`, or,
 * when name is NULL, the attention wording ("the scores q.k contain NaN<where>: ...").
 * `where` names the row (e.g. " at batch index (2,)") or is "". Other statuses give their
 * tka_status_message. Returns buf.
 */
char *tka_status_format(char *buf, size_t size, tka_status st, const char *name,
                        const char *where);

/** Record where an internal error happened ("file.c:123") and return TKA_ERR_INTERNAL. */
tka_status tka_status_internal(const char *place);

/** The place of the most recent internal error ("" if none). */
const char *tka_status_internal_place(void);

#define TKA_STR_(x) #x
#define TKA_STR(x) TKA_STR_(x)
/** Return value for a state that cannot happen: TKA_ERR_INTERNAL, recording file and line. */
#define TKA_INTERNAL_ERROR() tka_status_internal(__FILE__ ":" TKA_STR(__LINE__))

#ifdef __cplusplus
}
#endif
#endif /* TKA_STATUS_H */
