/*
 * pyutil.h - what the CPython wrapper files share: the NumPy C API set-up (one unique
 * API table, imported in module.c) and the argument helpers of pyutil.c.
 */
#ifndef TOPKATTN_PYUTIL_H
#define TOPKATTN_PYUTIL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL topkattn_ARRAY_API
#ifndef TKA_IMPORT_ARRAY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "pyerr.h"
#include "topkattn.h"

/** A parsed batch of logits: the array (a new reference) and its row view. */
typedef struct {
    PyArrayObject *arr;
    int64_t *offsets;
    tka_rows rows;
    int bdim;                 /* batch dimensions = ndim - 1 */
    npy_intp bshape[NPY_MAXDIMS];
} tka_py_logits;

/** The core's dtype of a NumPy type number: float32, float64, float16; -1 for others. */
static inline int tka_py_dtype(int npy_type)
{
    return npy_type == NPY_FLOAT32 ? TKA_F32 : npy_type == NPY_FLOAT64 ? TKA_F64
         : npy_type == NPY_FLOAT16 ? TKA_F16 : -1;
}

/** 0 if the elements of `a` can be read as typed values where they are: its address and the
 *  stride of every axis of extent > 1 are multiples of the dtype's alignment (NumPy's
 *  ALIGNED flag); else -1 + ValueError naming `name`. */
int tka_py_require_aligned(PyArrayObject *a, const char *name);
/** The same for an operand read at `base + off[i] + multiples of strides[j]` (bytes): the
 *  address, every offset and every stride are multiples of `align`. */
int tka_py_require_aligned_at(const char *base, const int64_t *off, int64_t count,
                              const long long *strides, int nstrides, size_t align,
                              const char *name);
/** Parse a float32/float64/float16 array (..., n) named `name` into a row view (0, or -1 +
 *  error). */
int tka_py_logits_parse(PyObject *obj, const char *name, tka_py_logits *L);
/** Release what tka_py_logits_parse took (safe on a zeroed or freed L). */
void tka_py_logits_free(tka_py_logits *L);
/** tka_py_raise for a call over the rows of L, the argument `name`; returns NULL. */
PyObject *tka_py_logits_raise(tka_status st, const tka_error *err, const tka_py_logits *L,
                              const char *name);
/** A C-contiguous array of `type` with exactly `rows` values. */
PyArrayObject *tka_py_per_row(PyObject *obj, int type, int64_t rows, const char *name);
/** Every k in [0, n] (0, or -1 + ValueError naming `name`). */
int tka_py_check_k(PyArrayObject *k, int64_t n, const char *name);
/** A new array of the batch shape of L, with one extra trailing axis of extra_len if extra. */
PyArrayObject *tka_py_batch_new(const tka_py_logits *L, int extra, npy_intp extra_len, int type);

/** Method tables of the other wrapper files, added to the module in module.c. */
extern PyMethodDef tka_attention_methods[];
/** See tka_attention_methods. */
extern PyMethodDef tka_search_methods[];

#endif /* TOPKATTN_PYUTIL_H */
