/*
 * py_attention.c - CPython wrappers of the attention functions (attention.c).
 *
 * The Python layer (topkattn/attention.py) broadcasts the batch axes, casts the operands
 * to one dtype with adjacent last-axis elements, and passes each operand as
 * (array, byte offset of every batch element, byte stride between rows), and the batch
 * shape, so that an error in the data (NaN or +inf scores, a fully masked row) names the
 * query row's position in its message.
 */
#include "pyutil.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    PyArrayObject *arr, *off;
    long long ld;
} operand_t;

static int get_operand(PyObject *tuple, const char *name, int64_t batch, operand_t *op)
{
    PyObject *arr, *off;
    if (!PyArg_ParseTuple(tuple, "O!O!L", &PyArray_Type, &arr, &PyArray_Type, &off, &op->ld))
        return -1;
    op->arr = (PyArrayObject *)arr;
    op->off = (PyArrayObject *)off;
    if (PyArray_TYPE(op->off) != NPY_INT64 || !PyArray_IS_C_CONTIGUOUS(op->off) ||
        PyArray_SIZE(op->off) != batch) {
        PyErr_Format(PyExc_ValueError, "%s: offsets must be %lld contiguous int64 values", name,
                     (long long)batch);
        return -1;
    }
    return tka_py_require_aligned(op->off, name);
}

/* The elements of an operand (or the mask) are read as typed values at base + offset +
 * row * ld + column * elem: all of these must be multiples of the element size. */
static int operand_aligned(const operand_t *op, int64_t batch, const char *name)
{
    return tka_py_require_aligned_at(PyArray_BYTES(op->arr), PyArray_DATA(op->off), batch,
                                     &op->ld, 1, (size_t)PyArray_ITEMSIZE(op->arr), name);
}

/* The query rows of a call: the batch shape followed by L, for error messages. */
typedef struct {
    int64_t shape[TKA_PY_MAX_AXES + 1];
    tka_py_where where;
} query_rows_t;

/* The mask operand (mask, m_off, m_sl, m_sn) or None into a. */
static int parse_mask(PyObject *mt, int64_t batch, tka_attn *a)
{
    if (mt == Py_None) return 0;
    PyObject *marr, *moff;
    long long sl, sn;
    if (!PyArg_ParseTuple(mt, "O!O!LL", &PyArray_Type, &marr, &PyArray_Type, &moff, &sl, &sn))
        return -1;
    if (PyArray_TYPE((PyArrayObject *)marr) != NPY_FLOAT64 ||
        PyArray_TYPE((PyArrayObject *)moff) != NPY_INT64 ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)moff) ||
        PyArray_SIZE((PyArrayObject *)moff) != batch) {
        PyErr_SetString(PyExc_TypeError, "mask must be float64 with one offset per problem");
        return -1;
    }
    const long long ms[2] = {sl, sn};
    if (tka_py_require_aligned((PyArrayObject *)moff, "mask offsets") < 0 ||
        tka_py_require_aligned_at(PyArray_BYTES((PyArrayObject *)marr),
                                  PyArray_DATA((PyArrayObject *)moff), batch, ms, 2,
                                  sizeof(double), "mask") < 0)
        return -1;
    a->mask = PyArray_BYTES((PyArrayObject *)marr);
    a->m_off = PyArray_DATA((PyArrayObject *)moff);
    a->m_sl = sl;
    a->m_sn = sn;
    return 0;
}

/* The kept positions of every row as one (rows, kmax) array padded with -1. */
static PyArrayObject *index_matrix(int64_t **lists, const int64_t *kk, int64_t rows)
{
    int64_t kmax = 0;
    for (int64_t r = 0; r < rows; r++) kmax = kk[r] > kmax ? kk[r] : kmax;
    npy_intp shi[2] = {(npy_intp)rows, (npy_intp)kmax};
    PyArrayObject *idx = (PyArrayObject *)PyArray_SimpleNew(2, shi, NPY_INT64);
    if (!idx) return NULL;
    int64_t *p = PyArray_DATA(idx);
    for (int64_t r = 0; r < rows; r++) {
        memcpy(p + r * kmax, lists[r], (size_t)kk[r] * sizeof(int64_t));
        for (int64_t j = kk[r]; j < kmax; j++) p[r * kmax + j] = -1;
    }
    return idx;
}

/* Top-k mode: (out, k, tau, idx), k, tau and idx None without want_info. */
static PyObject *run_topk(const tka_attn *a, const query_rows_t *qr, int t, PyArrayObject *kv,
                          PyArrayObject *ev, int want_info)
{
    const int64_t rows = a->batch * a->L;
    npy_intp shape2[2] = {(npy_intp)rows, (npy_intp)a->dv}, shape1[1] = {(npy_intp)rows};
    PyArrayObject *out = NULL, *kout = NULL, *tau = NULL, *idx = NULL;
    int64_t **lists = NULL;
    PyObject *res = NULL;
    /* k and tau only where the caller wants them (tau without info costs every weight of a
     * fixed-k row) */
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(2, shape2, t)) ||
        (want_info && !(kout = (PyArrayObject *)PyArray_SimpleNew(1, shape1, NPY_INT64))) ||
        (want_info && !(tau = (PyArrayObject *)PyArray_SimpleNew(1, shape1, NPY_FLOAT64))))
        goto done;
    if (want_info && !(lists = calloc((size_t)(rows > 0 ? rows : 1), sizeof(int64_t *)))) {
        PyErr_NoMemory();
        goto done;
    }
    tka_error err;
    tka_status st;
    Py_BEGIN_ALLOW_THREADS
    st = tka_topk_attention(a, kv ? PyArray_DATA(kv) : NULL, ev ? PyArray_DATA(ev) : NULL,
                            PyArray_DATA(out), kout ? PyArray_DATA(kout) : NULL,
                            tau ? PyArray_DATA(tau) : NULL, lists, &err);
    Py_END_ALLOW_THREADS
    if (st != TKA_OK) {
        tka_py_raise(st, &qr->where, err.row, err.what);
        goto done;
    }
    if (lists && !(idx = index_matrix(lists, PyArray_DATA(kout), rows))) goto done;
    res = Py_BuildValue("OOOO", out, kout ? (PyObject *)kout : Py_None,
                        tau ? (PyObject *)tau : Py_None, idx ? (PyObject *)idx : Py_None);
done:
    if (lists) {
        for (int64_t r = 0; r < rows; r++) tka_free(lists[r]);
        free(lists);
    }
    Py_XDECREF(out);
    Py_XDECREF(kout);
    Py_XDECREF(tau);
    Py_XDECREF(idx);
    return res;
}

/* Dense mode (out) and row-error mode ((err_sq, tau)). */
static PyObject *run_dense_or_error(const tka_attn *a, const query_rows_t *qr, int mode, int t,
                                    PyArrayObject *kv)
{
    const int64_t rows = a->batch * a->L;
    npy_intp shape2[2] = {(npy_intp)rows, (npy_intp)a->dv}, shape1[1] = {(npy_intp)rows};
    PyArrayObject *out, *tau = NULL;
    PyObject *res = NULL;
    tka_error err;
    tka_status st;
    if (mode == TKA_ATTN_DENSE) {
        if (!(out = (PyArrayObject *)PyArray_SimpleNew(2, shape2, t))) return NULL;
        Py_BEGIN_ALLOW_THREADS
        st = tka_attention(a, PyArray_DATA(out), &err);
        Py_END_ALLOW_THREADS
    } else {
        if (!(out = (PyArrayObject *)PyArray_SimpleNew(1, shape1, NPY_FLOAT64)) ||
            !(tau = (PyArrayObject *)PyArray_SimpleNew(1, shape1, NPY_FLOAT64))) {
            Py_XDECREF(out);
            return NULL;
        }
        Py_BEGIN_ALLOW_THREADS
        st = tka_attention_row_error(a, PyArray_DATA(kv), PyArray_DATA(out), PyArray_DATA(tau),
                                     &err);
        Py_END_ALLOW_THREADS
    }
    if (st != TKA_OK) tka_py_raise(st, &qr->where, err.row, err.what);
    else if (tau) res = Py_BuildValue("OO", out, tau);
    else { res = (PyObject *)out; out = NULL; }
    Py_XDECREF(out);
    Py_XDECREF(tau);
    return res;
}

/*
 * _attention(mode, (q, q_off, q_ld), (k, k_off, k_ld), (v, v_off, v_ld),
 *            (mask, m_off, m_sl, m_sn) or None, batch_shape, L, n, d, dv, scale, k_or_None,
 *            eps_or_None, want_info)
 * MODE_DENSE: out (batch*L, dv)
 * MODE_TOPK: (out, k, tau, idx (batch*L, kmax) padded with -1); without want_info
 *            (out, None, None, None)
 * MODE_ROW_ERROR: (err_sq, tau) (V unused)
 */
static PyObject *py_attention(PyObject *self, PyObject *args)
{
    int mode, want_info;
    PyObject *qt, *kt, *vt, *mt, *bo, *ko, *eo;
    long long L, n, d, dv;
    double scale;
    if (!PyArg_ParseTuple(args, "iOOOOOLLLLdOOp", &mode, &qt, &kt, &vt, &mt, &bo, &L, &n, &d,
                          &dv, &scale, &ko, &eo, &want_info))
        return NULL;
    if (mode != TKA_ATTN_DENSE && mode != TKA_ATTN_TOPK && mode != TKA_ATTN_ROW_ERROR)
        return PyErr_Format(PyExc_ValueError, "unknown attention mode %d", mode);
    int64_t batch;
    query_rows_t qr;
    operand_t Q, K, V;
    if (bo == Py_None) return PyErr_Format(PyExc_TypeError, "batch shape missing");
    if (tka_py_where_parse(bo, NULL, L, qr.shape, &qr.where, &batch) < 0 ||
        get_operand(qt, "Q", batch, &Q) < 0 ||
        get_operand(kt, "K", batch, &K) < 0 || get_operand(vt, "V", batch, &V) < 0)
        return NULL;
    int t = PyArray_TYPE(Q.arr);
    if (tka_py_dtype(t) < 0 || PyArray_TYPE(K.arr) != t || PyArray_TYPE(V.arr) != t) {
        PyErr_SetString(PyExc_TypeError,
                        "Q, K and V must share one dtype, float32, float64 or float16");
        return NULL;
    }
    if (operand_aligned(&Q, batch, "Q") < 0 || operand_aligned(&K, batch, "K") < 0 ||
        operand_aligned(&V, batch, "V") < 0)
        return NULL;
    const int64_t rows = batch * (int64_t)L;
    tka_attn a = {
        .dtype = (tka_dtype)tka_py_dtype(t),
        .batch = batch, .L = L, .n = n, .d = d, .dv = dv,
        .q = PyArray_BYTES(Q.arr), .k = PyArray_BYTES(K.arr), .v = PyArray_BYTES(V.arr),
        .q_off = PyArray_DATA(Q.off), .k_off = PyArray_DATA(K.off), .v_off = PyArray_DATA(V.off),
        .q_ld = Q.ld, .k_ld = K.ld, .v_ld = V.ld, .scale = scale,
    };
    if (parse_mask(mt, batch, &a) < 0) return NULL;
    PyArrayObject *kv = NULL, *ev = NULL;
    PyObject *res = NULL;
    if (ko != Py_None && !(kv = tka_py_per_row(ko, NPY_INT64, rows, "k"))) goto done;
    if (eo != Py_None && !(ev = tka_py_per_row(eo, NPY_FLOAT64, rows, "eps"))) goto done;
    if (mode != TKA_ATTN_DENSE && !kv && (mode == TKA_ATTN_ROW_ERROR || !ev)) {
        PyErr_SetString(PyExc_ValueError, "k or eps is required");
        goto done;
    }
    res = mode == TKA_ATTN_TOPK ? run_topk(&a, &qr, t, kv, ev, want_info)
                                : run_dense_or_error(&a, &qr, mode, t, kv);
done:
    Py_XDECREF(kv);
    Py_XDECREF(ev);
    return res;
}

PyMethodDef tka_attention_methods[] = {
    {"attention", py_attention, METH_VARARGS,
     "attention(mode, q, k, v, mask, batch_shape, L, n, d, dv, scale, k, eps, want_info)"},
    {NULL, NULL, 0, NULL},
};
