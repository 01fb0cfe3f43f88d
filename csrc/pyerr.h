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
