/*
 * pyerr.c - tka_status to Python exception (see pyerr.h); compiled into both extensions.
 */
#include "pyerr.h"

#include <stdio.h>

/* The position of flat row `row` in `where`, as the message wants it:
 * " at batch index (i, j)" for logits, " (query row at index (b, l) of (..., L))" for
 * attention, "" when there is no position (a single row of logits, or row < 0). */
static void row_label(const tka_py_where *w, int64_t row, char *buf, size_t size)
{
    buf[0] = '\0';
    if (!w || row < 0 || w->ndim <= 0) return;
    int64_t idx[64];
    const int nd = w->ndim < 64 ? w->ndim : 64;
    for (int i = nd - 1; i >= 0; i--) {
        idx[i] = w->shape[i] ? row % w->shape[i] : 0;
        row = w->shape[i] ? row / w->shape[i] : 0;
    }
    size_t used = (size_t)snprintf(buf, size, "%s",
                                   w->name ? " at batch index (" : " (query row at index (");
    for (int i = 0; i < nd && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, i ? ", %lld" : "%lld", (long long)idx[i]);
    if (nd == 1 && used < size) used += (size_t)snprintf(buf + used, size - used, ",");
    if (used < size) snprintf(buf + used, size - used, w->name ? ")" : ") of (..., L))");
}

int tka_py_where_parse(PyObject *batch, const char *name, int64_t L, int64_t *shape,
                       tka_py_where *where, int64_t *count)
{
    where->name = name;
    where->shape = shape;
    where->ndim = 0;
    if (count) *count = 1;
    if (!batch || batch == Py_None) return 0;
    if (!PyTuple_Check(batch) || PyTuple_GET_SIZE(batch) > TKA_PY_MAX_AXES) {
        PyErr_SetString(PyExc_TypeError, "batch must be the batch shape (a tuple of ints)");
        return -1;
    }
    const int nd = (int)PyTuple_GET_SIZE(batch);
    for (int i = 0; i < nd; i++) {
        shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(batch, i));
        if (shape[i] == -1 && PyErr_Occurred()) return -1;
        if (count) *count *= shape[i];
    }
    where->ndim = nd;
    if (!name) shape[where->ndim++] = L;  /* attention: query rows (..., L) */
    return 0;
}

PyObject *tka_py_raise(tka_status st, const tka_py_where *where, int64_t row,
                       const char *detail)
{
    char label[512], text[1024];
    switch (st) {
    case TKA_ERR_NAN:
    case TKA_ERR_POSINF:
    case TKA_ERR_ALL_MASKED:
        row_label(where, row, label, sizeof label);
        tka_status_format(text, sizeof text, st, where ? where->name : "logits", label);
        PyErr_SetString(PyExc_ValueError, text);
        return NULL;
    case TKA_ERR_NOMEM:
        return PyErr_NoMemory();
    case TKA_ERR_ARG:
        PyErr_SetString(PyExc_ValueError, detail && detail[0] ? detail : tka_status_message(st));
        return NULL;
    case TKA_ERR_CUDA:
        return PyErr_Format(PyExc_RuntimeError, "topkattn CUDA core: %s",
                            detail && detail[0] ? detail : tka_status_message(st));
    case TKA_ERR_INTERNAL:
        return PyErr_Format(PyExc_RuntimeError, "topkattn: internal error at %s, please report it",
                            detail && detail[0] ? detail : tka_status_internal_place());
    default:
        return PyErr_Format(PyExc_RuntimeError,
                            "topkattn: internal error, unexpected status %d (%s), please report it",
                            (int)st, tka_status_message(st));
    }
}
