/*
 * pyutil.c - argument parsing and error reporting shared by the CPython wrappers.
 */
#include "pyutil.h"

#include <stdint.h>
#include <string.h>

static int misaligned_error(const char *name, size_t align)
{
    PyErr_Format(PyExc_ValueError,
                 "%s is not aligned: its elements must sit at multiples of %zu bytes "
                 "(pass a copy, e.g. %s.copy())", name, align, name);
    return -1;
}

int tka_py_require_aligned(PyArrayObject *a, const char *name)
{
    if (PyArray_ISALIGNED(a)) return 0;
    return misaligned_error(name, (size_t)PyArray_ITEMSIZE(a));
}

int tka_py_require_aligned_at(const char *base, const int64_t *off, int64_t count,
                              const long long *strides, int nstrides, size_t align,
                              const char *name)
{
    uint64_t bits = (uint64_t)(uintptr_t)base;
    for (int i = 0; i < nstrides; i++) bits |= (uint64_t)strides[i];
    for (int64_t i = 0; i < count; i++) bits |= (uint64_t)off[i];
    return bits % align ? misaligned_error(name, align) : 0;
}

void tka_py_logits_free(tka_py_logits *L)
{
    Py_XDECREF(L->arr);
    PyMem_Free(L->offsets);
    L->arr = NULL;
    L->offsets = NULL;
}

int tka_py_logits_parse(PyObject *obj, const char *name, tka_py_logits *L)
{
    memset(L, 0, sizeof *L);
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a NumPy array, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    int t = PyArray_TYPE(a);
    if (tka_py_dtype(t) < 0) {
        PyObject *d = PyObject_Str((PyObject *)PyArray_DESCR(a));
        PyErr_Format(PyExc_TypeError, "%s must be float32, float64 or float16, got %s", name,
                     d ? PyUnicode_AsUTF8(d) : "another dtype");
        Py_XDECREF(d);
        return -1;
    }
    if (!PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError, "%s must be in native byte order", name);
        return -1;
    }
    if (tka_py_require_aligned(a, name) < 0) return -1;
    int nd = PyArray_NDIM(a);
    if (nd < 1) {
        PyErr_Format(PyExc_ValueError, "%s must have at least one axis (..., n), got a scalar", name);
        return -1;
    }
    const npy_intp *shape = PyArray_SHAPE(a), *strides = PyArray_STRIDES(a);
    if (shape[nd - 1] == 0) {
        PyErr_Format(PyExc_ValueError, "%s has an empty last axis (n = 0): there is no key", name);
        return -1;
    }
    int64_t rows = 1;
    for (int i = 0; i < nd - 1; i++) {
        rows *= shape[i];
        L->bshape[i] = shape[i];
    }
    L->bdim = nd - 1;
    int64_t *off = PyMem_Malloc((size_t)(rows > 0 ? rows : 1) * sizeof(int64_t));
    if (!off) {
        PyErr_NoMemory();
        return -1;
    }
    /* byte offset of every row: an odometer over the batch axes */
    npy_intp idx[NPY_MAXDIMS] = {0};
    int64_t cur = 0;
    for (int64_t r = 0; r < rows; r++) {
        off[r] = cur;
        for (int i = nd - 2; i >= 0; i--) {
            if (++idx[i] < shape[i]) { cur += strides[i]; break; }
            cur -= strides[i] * (shape[i] - 1);
            idx[i] = 0;
        }
    }
    Py_INCREF(a);
    L->arr = a;
    L->offsets = off;
    L->rows.data = PyArray_BYTES(a);
    L->rows.row_offset = off;
    L->rows.row_stride = 0;
    L->rows.elem_stride = strides[nd - 1];
    L->rows.rows = rows;
    L->rows.n = shape[nd - 1];
    L->rows.dtype = (tka_dtype)tka_py_dtype(t);
    return 0;
}

PyObject *tka_py_logits_raise(tka_status st, const tka_error *err, const tka_py_logits *L,
                              const char *name)
{
    int64_t shape[NPY_MAXDIMS];
    for (int i = 0; i < L->bdim; i++) shape[i] = L->bshape[i];
    const tka_py_where where = {name, L->bdim, shape};
    return tka_py_raise(st, &where, err ? err->row : -1, err ? err->what : NULL);
}

/* A C-contiguous array of `type` holding exactly `rows` values (one per row). */
PyArrayObject *tka_py_per_row(PyObject *obj, int type, int64_t rows, const char *name)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(obj, type, NPY_ARRAY_IN_ARRAY);
    if (!a) return NULL;
    if (PyArray_SIZE(a) != rows) {
        PyErr_Format(PyExc_ValueError, "%s must have one value per row (%lld), got %lld", name,
                     (long long)rows, (long long)PyArray_SIZE(a));
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

int tka_py_check_k(PyArrayObject *k, int64_t n, const char *name)
{
    const int64_t *kv = PyArray_DATA(k);
    npy_intp m = PyArray_SIZE(k);
    for (npy_intp i = 0; i < m; i++) {
        if (kv[i] < 0 || kv[i] > n) {
            PyErr_Format(PyExc_ValueError, "%s must be in [0, n] = [0, %lld], got %lld", name,
                         (long long)n, (long long)kv[i]);
            return -1;
        }
    }
    return 0;
}

PyArrayObject *tka_py_batch_new(const tka_py_logits *L, int extra, npy_intp extra_len, int type)
{
    npy_intp shape[NPY_MAXDIMS + 1];
    memcpy(shape, L->bshape, sizeof(npy_intp) * (size_t)L->bdim);
    if (extra) shape[L->bdim] = extra_len;
    return (PyArrayObject *)PyArray_SimpleNew(L->bdim + extra, shape, type);
}

