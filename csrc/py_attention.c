/*
 * py_attention.c - CPython wrappers of the attention functions (attention.c).
 *
 * The Python layer (topkattn/attention.py) broadcasts the batch axes, casts the operands
 * to one dtype with adjacent last-axis elements, and passes each operand as
 * (array, byte offset of every batch element, byte stride between rows). Errors found in
 * the data (NaN or +inf scores, a fully masked row) come back as ("error", code, row) so
 * the Python layer can name the batch position in its message.
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
    return 0;
}

static PyObject *data_error(tka_status st, const tka_error *err)
{
    if (st == TKA_ERR_NOMEM) return PyErr_NoMemory();
    if (st == TKA_ERR_ARG)
        return PyErr_Format(PyExc_ValueError, "%s", err->what ? err->what : "invalid argument");
    return Py_BuildValue("sil", "error", (int)st, (long)err->row);
}

/*
 * _attention(mode, (q, q_off, q_ld), (k, k_off, k_ld), (v, v_off, v_ld),
 *            (mask, m_off, m_sl, m_sn) or None, batch, L, n, d, dv, scale, k_or_None,
 *            eps_or_None, want_info)
 * mode 0: dense -> out (batch*L, dv)
 * mode 1: top-k -> (out, k, tau, idx (batch*L, kmax) padded with -1, or None)
 * mode 2: row error (V unused) -> (err_sq, tau)
 */
static PyObject *py_attention(PyObject *self, PyObject *args)
{
    int mode, want_info;
    PyObject *qt, *kt, *vt, *mt, *ko, *eo;
    long long batch, L, n, d, dv;
    double scale;
    if (!PyArg_ParseTuple(args, "iOOOOLLLLLdOOp", &mode, &qt, &kt, &vt, &mt, &batch, &L, &n, &d,
                          &dv, &scale, &ko, &eo, &want_info))
        return NULL;
    operand_t Q, K, V;
    if (get_operand(qt, "Q", batch, &Q) < 0 || get_operand(kt, "K", batch, &K) < 0 ||
        get_operand(vt, "V", batch, &V) < 0)
        return NULL;
    int t = PyArray_TYPE(Q.arr);
    if ((t != NPY_FLOAT32 && t != NPY_FLOAT64) || PyArray_TYPE(K.arr) != t ||
        PyArray_TYPE(V.arr) != t) {
        PyErr_SetString(PyExc_TypeError, "Q, K and V must share one dtype, float32 or float64");
        return NULL;
    }
    const int64_t rows = (int64_t)batch * (int64_t)L;
    tka_attn a = {
        .dtype = t == NPY_FLOAT32 ? TKA_F32 : TKA_F64,
        .batch = batch, .L = L, .n = n, .d = d, .dv = dv,
        .q = PyArray_BYTES(Q.arr), .k = PyArray_BYTES(K.arr), .v = PyArray_BYTES(V.arr),
        .q_off = PyArray_DATA(Q.off), .k_off = PyArray_DATA(K.off), .v_off = PyArray_DATA(V.off),
        .q_ld = Q.ld, .k_ld = K.ld, .v_ld = V.ld, .scale = scale,
    };
    if (mt != Py_None) {
        PyObject *marr, *moff;
        long long sl, sn;
        if (!PyArg_ParseTuple(mt, "O!O!LL", &PyArray_Type, &marr, &PyArray_Type, &moff, &sl, &sn))
            return NULL;
        if (PyArray_TYPE((PyArrayObject *)marr) != NPY_FLOAT64 ||
            PyArray_TYPE((PyArrayObject *)moff) != NPY_INT64 ||
            PyArray_SIZE((PyArrayObject *)moff) != batch) {
            PyErr_SetString(PyExc_TypeError, "mask must be float64 with one offset per problem");
            return NULL;
        }
        a.mask = PyArray_BYTES((PyArrayObject *)marr);
        a.m_off = PyArray_DATA((PyArrayObject *)moff);
        a.m_sl = sl;
        a.m_sn = sn;
    }
    PyArrayObject *kv = NULL, *ev = NULL, *out = NULL, *kout = NULL, *tau = NULL, *idx = NULL;
    int64_t **lists = NULL;
    PyObject *res = NULL;
    tka_error err;
    tka_status st;
    if (ko != Py_None && !(kv = per_row(ko, NPY_INT64, rows, "k"))) goto done;
    if (eo != Py_None && !(ev = per_row(eo, NPY_FLOAT64, rows, "eps"))) goto done;
    if (mode != 0 && !kv && (mode == 2 || !ev)) {
        PyErr_SetString(PyExc_ValueError, "k or eps is required");
        goto done;
    }
    npy_intp shape2[2] = {(npy_intp)rows, (npy_intp)dv}, shape1[1] = {(npy_intp)rows};
    if (mode == 0) {
        if (!(out = (PyArrayObject *)PyArray_SimpleNew(2, shape2, t))) goto done;
        Py_BEGIN_ALLOW_THREADS
        st = tka_attention(&a, PyArray_DATA(out), &err);
        Py_END_ALLOW_THREADS
        if (st != TKA_OK) { res = data_error(st, &err); goto done; }
        res = (PyObject *)out;
        out = NULL;
    } else if (mode == 1) {
        if (!(out = (PyArrayObject *)PyArray_SimpleNew(2, shape2, t)) ||
            !(kout = (PyArrayObject *)PyArray_SimpleNew(1, shape1, NPY_INT64)) ||
            !(tau = (PyArrayObject *)PyArray_SimpleNew(1, shape1, NPY_FLOAT64)))
            goto done;
        if (want_info && !(lists = calloc((size_t)(rows > 0 ? rows : 1), sizeof(int64_t *)))) {
            PyErr_NoMemory();
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        st = tka_topk_attention(&a, kv ? PyArray_DATA(kv) : NULL, ev ? PyArray_DATA(ev) : NULL,
                                PyArray_DATA(out), PyArray_DATA(kout), PyArray_DATA(tau), lists,
                                &err);
        Py_END_ALLOW_THREADS
        if (st != TKA_OK) { res = data_error(st, &err); goto done; }
        if (lists) {
            const int64_t *kk = PyArray_DATA(kout);
            int64_t kmax = 0;
            for (int64_t r = 0; r < rows; r++) kmax = kk[r] > kmax ? kk[r] : kmax;
            npy_intp shi[2] = {(npy_intp)rows, (npy_intp)kmax};
            if (!(idx = (PyArrayObject *)PyArray_SimpleNew(2, shi, NPY_INT64))) goto done;
            int64_t *p = PyArray_DATA(idx);
            for (int64_t r = 0; r < rows; r++) {
                memcpy(p + r * kmax, lists[r], (size_t)kk[r] * sizeof(int64_t));
                for (int64_t j = kk[r]; j < kmax; j++) p[r * kmax + j] = -1;
            }
        }
        res = Py_BuildValue("OOOO", out, kout, tau, idx ? (PyObject *)idx : Py_None);
    } else {
        if (!(out = (PyArrayObject *)PyArray_SimpleNew(1, shape1, NPY_FLOAT64)) ||
            !(tau = (PyArrayObject *)PyArray_SimpleNew(1, shape1, NPY_FLOAT64)))
            goto done;
        Py_BEGIN_ALLOW_THREADS
        st = tka_attention_row_error(&a, PyArray_DATA(kv), PyArray_DATA(out), PyArray_DATA(tau),
                                     &err);
        Py_END_ALLOW_THREADS
        if (st != TKA_OK) { res = data_error(st, &err); goto done; }
        res = Py_BuildValue("OO", out, tau);
    }
done:
    if (lists) {
        for (int64_t r = 0; r < rows; r++) tka_free(lists[r]);
        free(lists);
    }
    Py_XDECREF(kv);
    Py_XDECREF(ev);
    Py_XDECREF(out);
    Py_XDECREF(kout);
    Py_XDECREF(tau);
    Py_XDECREF(idx);
    return res;
}

PyMethodDef tka_attention_methods[] = {
    {"attention", py_attention, METH_VARARGS,
     "attention(mode, q, k, v, mask, batch, L, n, d, dv, scale, k, eps, want_info)"},
    {NULL, NULL, 0, NULL},
};
