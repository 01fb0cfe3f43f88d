/*
 * pyerr.h - the one place where a tka_status becomes a Python exception, for both
 * extensions (topkattn._core and topkattn._cuda). Needs Python.h only, not NumPy.
 */
#ifndef TOPKATTN_PYERR_H
#define TOPKATTN_PYERR_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "tka_status.h"

/** Which rows a call worked on, to name the bad one in a message. */
typedef struct {
    /** The argument holding rows of logits ("logits"), or NULL for attention query rows. */
    const char *name;
    /** The shape the flat row index runs over: the batch axes of the logits, or the batch
     *  axes followed by L for attention. */
    int ndim;
    const int64_t *shape;
} tka_py_where;

/** Most batch axes a where-shape holds (NumPy allows 64). */
#define TKA_PY_MAX_AXES 64

/**
 * Fill *where from a batch shape given as a tuple of ints (`batch`; NULL or None: no
 * position in messages), with shape[] (room for TKA_PY_MAX_AXES + 1 values) as its storage;
 * for attention (name NULL) L is appended as the last axis. *count (if not NULL) receives
 * the number of batch elements. Returns 0, or -1 with a Python exception set.
 */
int tka_py_where_parse(PyObject *batch, const char *name, int64_t L, int64_t *shape,
                       tka_py_where *where, int64_t *count);

/**
 * Set the Python exception for status st (not TKA_OK) and return NULL.
 * Bad data (NaN, +inf, a fully masked row) raises ValueError naming row `row` of `where`
 * (row < 0 or where NULL: no position); TKA_ERR_ARG raises ValueError with `detail`;
 * TKA_ERR_NOMEM raises MemoryError; TKA_ERR_INTERNAL raises RuntimeError with the place
 * of the error; TKA_ERR_CUDA raises RuntimeError with `detail` (the CUDA error text).
 */
PyObject *tka_py_raise(tka_status st, const tka_py_where *where, int64_t row,
                       const char *detail);

#endif /* TOPKATTN_PYERR_H */
