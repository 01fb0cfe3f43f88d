/*
 * module.c - topkattn._cuda: the CPython face of the CUDA core (tka_cuda.h).
 *
 * The only file of csrc/cuda that includes Python.h; no NumPy. Arrays arrive as raw device
 * pointers, shapes and strides (Python ints) prepared by topkattn/_gpu.py, which allocates
 * the outputs with the caller's array library. The GIL is released while the GPU works.
 *
 * The compute functions take, last and optional, the batch shape of their rows (a tuple of
 * ints), to name a bad row in the error message. They return None, or raise through
 * tka_py_raise (csrc/pyerr.c), the same function as the CPU core's glue: ValueError for bad
 * data or an argument out of range, RuntimeError for a CUDA failure.
 */
#include "../pyerr.h"

#include <stdint.h>

#include "tka_cuda.h"

typedef unsigned long long ptr_t;

/* The rows of a call, for error messages: the batch shape, plus L for attention. */
typedef struct {
    int64_t shape[TKA_PY_MAX_AXES + 1];
    tka_py_where where;
} rows_where;

static int parse_where(PyObject *batch, const char *name, long long L, rows_where *w)
{
    return tka_py_where_parse(batch, name, L, w->shape, &w->where, NULL);
}

static PyObject *result(int rc, const tkc_error *err, const rows_where *w)
{
    if (rc == TKA_OK) Py_RETURN_NONE;
    return tka_py_raise((tka_status)rc, &w->where, err->row, err->msg);
}

static PyObject *py_tail_mass(PyObject *self, PyObject *args)
{
    int dtype, device;
    ptr_t data, k, lt, kl, stream;
    long long rows, n, rs, es;
    PyObject *batch = NULL;
    rows_where w;
    if (!PyArg_ParseTuple(args, "iKLLLLKKKKi|O", &dtype, &data, &rows, &n, &rs, &es, &k, &lt, &kl,
                          &stream, &device, &batch) ||
        parse_where(batch, "logits", 0, &w) < 0)
        return NULL;
    tkc_rows x = {(const void *)(uintptr_t)data, rows, n, rs, es, dtype};
    tkc_error err;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tkc_tail_mass(&x, (const int64_t *)(uintptr_t)k, (double *)(uintptr_t)lt,
                       kl ? (double *)(uintptr_t)kl : NULL, (uintptr_t)stream, device, &err);
    Py_END_ALLOW_THREADS
    return result(rc, &err, &w);
}

static PyObject *py_k_eps(PyObject *self, PyObject *args)
{
    int dtype, device;
    ptr_t data, eps, k, tau, stream;
    long long rows, n, rs, es;
    PyObject *batch = NULL;
    rows_where w;
    if (!PyArg_ParseTuple(args, "iKLLLLKKKKi|O", &dtype, &data, &rows, &n, &rs, &es, &eps, &k,
                          &tau, &stream, &device, &batch) ||
        parse_where(batch, "logits", 0, &w) < 0)
        return NULL;
    tkc_rows x = {(const void *)(uintptr_t)data, rows, n, rs, es, dtype};
    tkc_error err;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tkc_k_eps(&x, (const double *)(uintptr_t)eps, (int64_t *)(uintptr_t)k,
                   tau ? (double *)(uintptr_t)tau : NULL, (uintptr_t)stream, device, &err);
    Py_END_ALLOW_THREADS
    return result(rc, &err, &w);
}

static PyObject *py_topk(PyObject *self, PyObject *args)
{
    int dtype, device;
    ptr_t data, idx, stream;
    long long rows, n, rs, es, k;
    PyObject *batch = NULL;
    rows_where w;
    if (!PyArg_ParseTuple(args, "iKLLLLLKKi|O", &dtype, &data, &rows, &n, &rs, &es, &k, &idx,
                          &stream, &device, &batch) ||
        parse_where(batch, "logits", 0, &w) < 0)
        return NULL;
    tkc_rows x = {(const void *)(uintptr_t)data, rows, n, rs, es, dtype};
    tkc_error err;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tkc_topk(&x, k, (int64_t *)(uintptr_t)idx, (uintptr_t)stream, device, &err);
    Py_END_ALLOW_THREADS
    return result(rc, &err, &w);
}

static PyObject *py_topk_attention(PyObject *self, PyObject *args)
{
    int dtype, device;
    ptr_t q, k, v, q_off, k_off, v_off, mask, m_off, kreq, eps, out, k_out, tau_out, idx_out, stream;
    long long q_ld, k_ld, v_ld, batch, L, n, d, dv, m_sl, m_sn, idx_width;
    double scale;
    PyObject *bshape = NULL;
    rows_where w;
    if (!PyArg_ParseTuple(args, "iKKKKKKLLLLLLLLdKKLLKKKKKKLKi|O", &dtype, &q, &k, &v, &q_off,
                          &k_off, &v_off, &q_ld, &k_ld, &v_ld, &batch, &L, &n, &d, &dv, &scale,
                          &mask, &m_off, &m_sl, &m_sn, &kreq, &eps, &out, &k_out, &tau_out,
                          &idx_out, &idx_width, &stream, &device, &bshape) ||
        parse_where(bshape, NULL, L, &w) < 0)
        return NULL;
    tkc_attn a = {
        .q = (const void *)(uintptr_t)q, .k = (const void *)(uintptr_t)k,
        .v = (const void *)(uintptr_t)v,
        .q_off = (const int64_t *)(uintptr_t)q_off, .k_off = (const int64_t *)(uintptr_t)k_off,
        .v_off = (const int64_t *)(uintptr_t)v_off,
        .q_ld = q_ld, .k_ld = k_ld, .v_ld = v_ld,
        .batch = batch, .L = L, .n = n, .d = d, .dv = dv, .scale = scale,
        .mask = mask ? (const void *)(uintptr_t)mask : NULL,
        .m_off = (const int64_t *)(uintptr_t)m_off, .m_sl = m_sl, .m_sn = m_sn,
        .dtype = dtype,
    };
    tkc_error err;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tkc_topk_attention(&a, kreq ? (const int64_t *)(uintptr_t)kreq : NULL,
                            eps ? (const double *)(uintptr_t)eps : NULL, (void *)(uintptr_t)out,
                            k_out ? (int64_t *)(uintptr_t)k_out : NULL,
                            tau_out ? (double *)(uintptr_t)tau_out : NULL,
                            idx_out ? (int64_t *)(uintptr_t)idx_out : NULL, idx_width,
                            (uintptr_t)stream, device, &err);
    Py_END_ALLOW_THREADS
    return result(rc, &err, &w);
}

static PyObject *py_device_info(PyObject *self, PyObject *args)
{
    int device = 0, count = 0, major = 0, minor = 0;
    char name[256] = "";
    if (!PyArg_ParseTuple(args, "|i", &device)) return NULL;
    tkc_error err;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tkc_device_info(device, &count, name, sizeof name, &major, &minor, &err);
    Py_END_ALLOW_THREADS
    if (rc != TKA_OK)
        return Py_BuildValue("{s:i,s:O,s:s}", "count", count, "name", Py_None, "error", err.msg);
    return Py_BuildValue("{s:i,s:s,s:(ii),s:O}", "count", count, "name", name,
                         "compute_capability", major, minor, "error", Py_None);
}

static PyObject *py_runtime_version(PyObject *self, PyObject *noargs)
{
    return PyLong_FromLong(tkc_runtime_version());
}

static PyMethodDef methods[] = {
    {"tail_mass", py_tail_mass, METH_VARARGS,
     "tail_mass(dtype, data, rows, n, row_stride, elem_stride, k, log_tau, kl, stream, device"
     "[, batch_shape])"},
    {"k_eps", py_k_eps, METH_VARARGS,
     "k_eps(dtype, data, rows, n, row_stride, elem_stride, eps, k_out, tau_out, stream, device"
     "[, batch_shape])"},
    {"topk", py_topk, METH_VARARGS,
     "topk(dtype, data, rows, n, row_stride, elem_stride, k, idx_out, stream, device"
     "[, batch_shape])"},
    {"topk_attention", py_topk_attention, METH_VARARGS,
     "topk_attention(dtype, q, k, v, q_off, k_off, v_off, q_ld, k_ld, v_ld, batch, L, n, d, dv,"
     " scale, mask, m_off, m_sl, m_sn, k, eps, out, k_out, tau_out, idx_out, idx_width, stream,"
     " device[, batch_shape])"},
    {"device_info", py_device_info, METH_VARARGS,
     "device_info(device=0) -> {count, name, compute_capability, error}"},
    {"runtime_version", py_runtime_version, METH_NOARGS,
     "CUDA runtime version the module was built with (e.g. 13000)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "topkattn._cuda",
    "Optional CUDA core of topkattn (device pointers in, device results out; see _gpu.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cuda(void)
{
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "F32", TKC_F32) || PyModule_AddIntConstant(m, "F64", TKC_F64) ||
        PyModule_AddIntConstant(m, "F16", TKC_F16) || PyModule_AddIntConstant(m, "BF16", TKC_BF16)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
