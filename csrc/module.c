/*
 * module.c - topkattn._core: the module, and the wrappers of the distribution-level
 * functions. The wrapper files (module.c, py_*.c, pyutil.c) are the only ones that see
 * Python.h and NumPy; the core (topkattn.h) knows nothing of Python.
 *
 * Each function validates its arguments (dtype, shape, ranges) with messages that name
 * the public argument, allocates its outputs, releases the GIL around the C core, and
 * turns a tka_status into a Python exception. Broadcasting of per-row parameters (k, eps,
 * thresholds) is done by the Python wrappers; here they arrive as arrays of one value
 * per row.
 */
#define TKA_IMPORT_ARRAY
#include "pyutil.h"
#include "search.h"

#include <math.h>
#include <string.h>

/* ------------------------------------------------------------ distribution */

static PyObject *py_tail_mass(PyObject *self, PyObject *args)
{
    PyObject *xo, *ko;
    int want_kl;
    if (!PyArg_ParseTuple(args, "OOp", &xo, &ko, &want_kl)) return NULL;
    tka_py_logits L;
    if (tka_py_logits_parse(xo, "logits", &L) < 0) return NULL;
    PyArrayObject *k = NULL, *lt = NULL, *kl = NULL;
    PyObject *res = NULL;
    if (!(k = tka_py_per_row(ko, NPY_INT64, L.rows.rows, "k")) ||
        tka_py_check_k(k, L.rows.n, "k") < 0)
        goto done;
    if (!(lt = tka_py_batch_new(&L, 0, 0, NPY_FLOAT64))) goto done;
    if (want_kl && !(kl = tka_py_batch_new(&L, 0, 0, NPY_FLOAT64))) goto done;
    tka_error err;
    tka_status st;
    Py_BEGIN_ALLOW_THREADS
    st = tka_tail_mass(&L.rows, PyArray_DATA(k), PyArray_DATA(lt), kl ? PyArray_DATA(kl) : NULL, &err);
    Py_END_ALLOW_THREADS
    if (st != TKA_OK) { tka_py_logits_raise(st, &err, &L, "logits"); goto done; }
    res = kl ? Py_BuildValue("OO", lt, kl) : Py_BuildValue("(O)", lt);
done:
    Py_XDECREF(k);
    Py_XDECREF(lt);
    Py_XDECREF(kl);
    tka_py_logits_free(&L);
    return res;
}

static PyObject *py_tv_curve(PyObject *self, PyObject *args)
{
    PyObject *xo;
    if (!PyArg_ParseTuple(args, "O", &xo)) return NULL;
    tka_py_logits L;
    if (tka_py_logits_parse(xo, "logits", &L) < 0) return NULL;
    PyObject *res = NULL;
    PyArrayObject *out = tka_py_batch_new(&L, 1, (npy_intp)L.rows.n + 1, NPY_FLOAT64);
    if (out) {
        tka_error err;
        tka_status st;
        Py_BEGIN_ALLOW_THREADS
        st = tka_tv_curve(&L.rows, PyArray_DATA(out), &err);
        Py_END_ALLOW_THREADS
        if (st != TKA_OK) tka_py_logits_raise(st, &err, &L, "logits");
        else { res = (PyObject *)out; out = NULL; }
    }
    Py_XDECREF(out);
    tka_py_logits_free(&L);
    return res;
}

static PyObject *py_k_eps(PyObject *self, PyObject *args)
{
    PyObject *xo, *eo;
    int want_tau;
    if (!PyArg_ParseTuple(args, "OOp", &xo, &eo, &want_tau)) return NULL;
    tka_py_logits L;
    if (tka_py_logits_parse(xo, "logits", &L) < 0) return NULL;
    PyArrayObject *eps = NULL, *k = NULL, *tau = NULL;
    PyObject *res = NULL;
    if (!(eps = tka_py_per_row(eo, NPY_FLOAT64, L.rows.rows, "eps"))) goto done;
    const double *ev = PyArray_DATA(eps);
    for (npy_intp i = 0; i < PyArray_SIZE(eps); i++) {
        if (!(ev[i] > 0.0 && ev[i] < 1.0)) {
            char num[64];
            snprintf(num, sizeof num, "%.17g", ev[i]);
            PyErr_Format(PyExc_ValueError, "eps must be in the open interval (0, 1), got %s", num);
            goto done;
        }
    }
    if (!(k = tka_py_batch_new(&L, 0, 0, NPY_INT64))) goto done;
    if (want_tau && !(tau = tka_py_batch_new(&L, 0, 0, NPY_FLOAT64))) goto done;
    tka_error err;
    tka_status st;
    Py_BEGIN_ALLOW_THREADS
    st = tka_k_eps(&L.rows, ev, PyArray_DATA(k), tau ? PyArray_DATA(tau) : NULL, &err);
    Py_END_ALLOW_THREADS
    if (st != TKA_OK) { tka_py_logits_raise(st, &err, &L, "logits"); goto done; }
    res = tau ? Py_BuildValue("OO", k, tau) : Py_BuildValue("(O)", k);
done:
    Py_XDECREF(eps);
    Py_XDECREF(k);
    Py_XDECREF(tau);
    tka_py_logits_free(&L);
    return res;
}

static PyObject *py_topk(PyObject *self, PyObject *args)
{
    PyObject *xo;
    long long k;
    if (!PyArg_ParseTuple(args, "OL", &xo, &k)) return NULL;
    tka_py_logits L;
    if (tka_py_logits_parse(xo, "logits", &L) < 0) return NULL;
    PyObject *res = NULL;
    if (k < 0 || k > L.rows.n) {
        PyErr_Format(PyExc_ValueError, "k must be in [0, n] = [0, %lld], got %lld",
                     (long long)L.rows.n, k);
        tka_py_logits_free(&L);
        return NULL;
    }
    PyArrayObject *out = tka_py_batch_new(&L, 1, (npy_intp)k, NPY_INT64);
    if (out) {
        tka_error err;
        tka_status st;
        Py_BEGIN_ALLOW_THREADS
        st = tka_topk(&L.rows, (int64_t)k, PyArray_DATA(out), &err);
        Py_END_ALLOW_THREADS
        if (st != TKA_OK) tka_py_logits_raise(st, &err, &L, "logits");
        else { res = (PyObject *)out; out = NULL; }
    }
    Py_XDECREF(out);
    tka_py_logits_free(&L);
    return res;
}

/* ------------------------------------------------------------------ bounds */

static PyObject *py_gap_bound(PyObject *self, PyObject *args)
{
    PyObject *xo, *ko;
    int form;
    if (!PyArg_ParseTuple(args, "OOi", &xo, &ko, &form)) return NULL;
    tka_py_logits L;
    if (tka_py_logits_parse(xo, "logits", &L) < 0) return NULL;
    PyArrayObject *k = NULL, *out = NULL;
    PyObject *res = NULL;
    if (!(k = tka_py_per_row(ko, NPY_INT64, L.rows.rows, "k")) ||
        tka_py_check_k(k, L.rows.n, "k") < 0)
        goto done;
    if (!(out = tka_py_batch_new(&L, 0, 0, NPY_FLOAT64))) goto done;
    tka_error err;
    tka_status st;
    Py_BEGIN_ALLOW_THREADS
    st = tka_gap_bound(&L.rows, PyArray_DATA(k), form, PyArray_DATA(out), &err);
    Py_END_ALLOW_THREADS
    if (st != TKA_OK) { tka_py_logits_raise(st, &err, &L, "logits"); goto done; }
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(k);
    Py_XDECREF(out);
    tka_py_logits_free(&L);
    return res;
}

static PyObject *py_multigap_bound(PyObject *self, PyObject *args)
{
    PyObject *xo, *ko, *co;
    long long nseg;
    int spacing, exhaustive = 0;
    if (!PyArg_ParseTuple(args, "OOOLi|p", &xo, &ko, &co, &nseg, &spacing, &exhaustive))
        return NULL;
    if (spacing != TKA_SPACING_GEOMETRIC && spacing != TKA_SPACING_LINEAR)
        return PyErr_Format(PyExc_ValueError, "unknown spacing %d", spacing);
    tka_py_logits L;
    if (tka_py_logits_parse(xo, "logits", &L) < 0) return NULL;
    PyArrayObject *k = NULL, *cuts = NULL, *out = NULL;
    PyObject *res = NULL;
    if (!(k = tka_py_per_row(ko, NPY_INT64, L.rows.rows, "k")) ||
        tka_py_check_k(k, L.rows.n, "k") < 0)
        goto done;
    if (co != Py_None) {
        cuts = (PyArrayObject *)PyArray_FROM_OTF(co, NPY_INT64, NPY_ARRAY_IN_ARRAY);
        if (!cuts) goto done;
        if (PyArray_NDIM(cuts) != 1) {
            PyErr_SetString(PyExc_ValueError, "cuts must be an int or a 1-D array of ranks");
            goto done;
        }
        const int64_t *c = PyArray_DATA(cuts);
        for (npy_intp i = 0; i < PyArray_SIZE(cuts); i++) {
            if (c[i] < 1 || c[i] > L.rows.n || (i && c[i] <= c[i - 1])) {
                PyErr_Format(PyExc_ValueError,
                             "cuts must be strictly increasing ranks in [1, n] = [1, %lld]",
                             (long long)L.rows.n);
                goto done;
            }
        }
    } else if (nseg < 1) {
        PyErr_Format(PyExc_ValueError, "cuts must be >= 1 segments, got %lld", nseg);
        goto done;
    }
    if (!(out = tka_py_batch_new(&L, 0, 0, NPY_FLOAT64))) goto done;
    tka_error err;
    tka_status st;
    Py_BEGIN_ALLOW_THREADS
    st = tka_multigap_bound(&L.rows, PyArray_DATA(k), cuts ? PyArray_DATA(cuts) : NULL,
                            cuts ? PyArray_SIZE(cuts) : 0, (int64_t)nseg,
                            spacing | (exhaustive ? TKA_MULTIGAP_EXHAUSTIVE : 0),
                            PyArray_DATA(out), &err);
    Py_END_ALLOW_THREADS
    if (st != TKA_OK) { tka_py_logits_raise(st, &err, &L, "logits"); goto done; }
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(k);
    Py_XDECREF(cuts);
    Py_XDECREF(out);
    tka_py_logits_free(&L);
    return res;
}

static PyObject *py_block_bound(PyObject *self, PyObject *args)
{
    PyObject *uo, *so, *ao, *zo;
    if (!PyArg_ParseTuple(args, "OOOO", &uo, &so, &ao, &zo)) return NULL;
    PyArrayObject *u = NULL, *sz = NULL, *la = NULL, *lz = NULL, *out = NULL;
    PyObject *res = NULL;
    if (!(u = (PyArrayObject *)PyArray_FROM_OTF(uo, NPY_FLOAT64, NPY_ARRAY_IN_ARRAY))) goto done;
    if (!(sz = (PyArrayObject *)PyArray_FROM_OTF(so, NPY_INT64, NPY_ARRAY_IN_ARRAY))) goto done;
    if (PyArray_NDIM(u) != 2) {
        PyErr_SetString(PyExc_ValueError, "block_upper must be 2-D (rows, blocks) here");
        goto done;
    }
    int64_t rows = PyArray_DIM(u, 0), nb = PyArray_DIM(u, 1);
    if (!(PyArray_SIZE(sz) == nb || PyArray_SIZE(sz) == rows * nb)) {
        PyErr_Format(PyExc_ValueError, "block_sizes must have %lld or %lld entries", (long long)nb,
                     (long long)(rows * nb));
        goto done;
    }
    /* one size per block shared by all rows, or one per (row, block) */
    int per_row_sizes = PyArray_SIZE(sz) != nb;
    const int64_t *sv = PyArray_DATA(sz);
    for (npy_intp i = 0; i < PyArray_SIZE(sz); i++) {
        if (sv[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "block_sizes must be >= 0");
            goto done;
        }
    }
    const double *uv = PyArray_DATA(u);
    for (npy_intp i = 0; i < PyArray_SIZE(u); i++) {
        if (uv[i] != uv[i] || uv[i] == INFINITY) {
            PyErr_SetString(PyExc_ValueError, "block_upper must not contain NaN or +inf");
            goto done;
        }
    }
    if (!(la = tka_py_per_row(ao, NPY_FLOAT64, rows, "kept_mass"))) goto done;
    if (!(lz = tka_py_per_row(zo, NPY_FLOAT64, rows, "scored_mass"))) goto done;
    npy_intp osh[1] = {rows};
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(1, osh, NPY_FLOAT64))) goto done;
    tka_error err;
    tka_status st;
    Py_BEGIN_ALLOW_THREADS
    st = tka_block_bound(uv, sv, per_row_sizes, PyArray_DATA(la), PyArray_DATA(lz), rows, nb,
                         PyArray_DATA(out), &err);
    Py_END_ALLOW_THREADS
    if (st != TKA_OK) {
        char detail[256];
        snprintf(detail, sizeof detail, "%s (row %lld)", err.what ? err.what : "invalid input",
                 (long long)err.row);
        tka_py_raise(st, NULL, err.row, detail);
        goto done;
    }
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(u);
    Py_XDECREF(sz);
    Py_XDECREF(la);
    Py_XDECREF(lz);
    Py_XDECREF(out);
    return res;
}

/* ------------------------------------------------------------ row statistics */

static PyObject *py_entropy(PyObject *self, PyObject *args)
{
    PyObject *xo;
    if (!PyArg_ParseTuple(args, "O", &xo)) return NULL;
    tka_py_logits L;
    if (tka_py_logits_parse(xo, "logits", &L) < 0) return NULL;
    PyObject *res = NULL;
    PyArrayObject *out = tka_py_batch_new(&L, 0, 0, NPY_FLOAT64);
    if (out) {
        tka_error err;
        tka_status st;
        Py_BEGIN_ALLOW_THREADS
        st = tka_entropy(&L.rows, PyArray_DATA(out), &err);
        Py_END_ALLOW_THREADS
        if (st != TKA_OK) tka_py_logits_raise(st, &err, &L, "logits");
        else { res = (PyObject *)out; out = NULL; }
    }
    Py_XDECREF(out);
    tka_py_logits_free(&L);
    return res;
}

static PyObject *py_effective_support(PyObject *self, PyObject *args)
{
    PyObject *xo, *to;
    if (!PyArg_ParseTuple(args, "OO", &xo, &to)) return NULL;
    tka_py_logits L;
    if (tka_py_logits_parse(xo, "logits", &L) < 0) return NULL;
    PyArrayObject *thr = NULL, *out = NULL;
    PyObject *res = NULL;
    if (!(thr = tka_py_per_row(to, NPY_FLOAT64, L.rows.rows, "threshold"))) goto done;
    const double *tv = PyArray_DATA(thr);
    for (npy_intp i = 0; i < PyArray_SIZE(thr); i++) {
        if (!(tv[i] > 0.0 && tv[i] <= 1.0)) {
            PyErr_SetString(PyExc_ValueError, "threshold must be in (0, 1]");
            goto done;
        }
    }
    if (!(out = tka_py_batch_new(&L, 0, 0, NPY_INT64))) goto done;
    tka_error err;
    tka_status st;
    Py_BEGIN_ALLOW_THREADS
    st = tka_effective_support(&L.rows, tv, PyArray_DATA(out), &err);
    Py_END_ALLOW_THREADS
    if (st != TKA_OK) { tka_py_logits_raise(st, &err, &L, "logits"); goto done; }
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(thr);
    Py_XDECREF(out);
    tka_py_logits_free(&L);
    return res;
}

static PyObject *py_fit_gaussian(PyObject *self, PyObject *args)
{
    PyObject *xo;
    if (!PyArg_ParseTuple(args, "O", &xo)) return NULL;
    tka_py_logits L;
    if (tka_py_logits_parse(xo, "logits", &L) < 0) return NULL;
    PyObject *res = NULL;
    PyArrayObject *mu = tka_py_batch_new(&L, 0, 0, NPY_FLOAT64);
    PyArrayObject *sg = tka_py_batch_new(&L, 0, 0, NPY_FLOAT64);
    if (mu && sg) {
        tka_error err;
        tka_status st;
        Py_BEGIN_ALLOW_THREADS
        st = tka_fit_gaussian(&L.rows, PyArray_DATA(mu), PyArray_DATA(sg), &err);
        Py_END_ALLOW_THREADS
        if (st != TKA_OK) tka_py_logits_raise(st, &err, &L, "logits");
        else res = Py_BuildValue("OO", mu, sg);
    }
    Py_XDECREF(mu);
    Py_XDECREF(sg);
    tka_py_logits_free(&L);
    return res;
}

/* ------------------------------------------------------------ Gaussian model */

/* Elementwise over same-size float64 arrays (the wrapper broadcasts them). */
typedef enum { G_CDF, G_SF, G_PPF, G_ISF, G_TAIL, G_KEPS, G_KEPS_FINITE } gauss_op;

static PyObject *py_gauss(PyObject *self, PyObject *args)
{
    int op;
    PyObject *ao, *bo = Py_None, *co = Py_None;
    if (!PyArg_ParseTuple(args, "iO|OO", &op, &ao, &bo, &co)) return NULL;
    if (op < G_CDF || op > G_KEPS_FINITE)
        return PyErr_Format(PyExc_ValueError, "gauss: unknown op %d (0 to %d)", op,
                            (int)G_KEPS_FINITE);
    PyArrayObject *a = NULL, *b = NULL, *c = NULL, *out = NULL;
    PyObject *res = NULL;
    if (!(a = (PyArrayObject *)PyArray_FROM_OTF(ao, NPY_FLOAT64, NPY_ARRAY_IN_ARRAY))) goto done;
    npy_intp m = PyArray_SIZE(a);
    if (bo != Py_None && !(b = (PyArrayObject *)PyArray_FROM_OTF(bo, NPY_FLOAT64, NPY_ARRAY_IN_ARRAY)))
        goto done;
    if (co != Py_None && !(c = (PyArrayObject *)PyArray_FROM_OTF(co, NPY_FLOAT64, NPY_ARRAY_IN_ARRAY)))
        goto done;
    int need = op == G_TAIL ? 2 : (op >= G_KEPS ? 3 : 1);
    if ((need >= 2 && (!b || PyArray_SIZE(b) != m)) || (need >= 3 && (!c || PyArray_SIZE(c) != m))) {
        PyErr_SetString(PyExc_ValueError, "gauss: arguments must have the same size");
        goto done;
    }
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(a), PyArray_SHAPE(a), NPY_FLOAT64)))
        goto done;
    {
        const double *x = PyArray_DATA(a), *y = b ? PyArray_DATA(b) : NULL,
                     *z = c ? PyArray_DATA(c) : NULL;
        double *o = PyArray_DATA(out);
        Py_BEGIN_ALLOW_THREADS
        for (npy_intp i = 0; i < m; i++) {
            switch (op) {
            case G_CDF: o[i] = tka_norm_cdf(x[i]); break;
            case G_SF: o[i] = tka_norm_sf(x[i]); break;
            case G_PPF: o[i] = tka_norm_ppf(x[i]); break;
            case G_ISF: o[i] = tka_norm_isf(x[i]); break;
            case G_TAIL: o[i] = tka_gaussian_tail_mass(x[i], y[i]); break;
            case G_KEPS: o[i] = tka_gaussian_k_eps(x[i], y[i], z[i], 0); break;
            case G_KEPS_FINITE: o[i] = tka_gaussian_k_eps(x[i], y[i], z[i], 1); break;
            }
        }
        Py_END_ALLOW_THREADS
    }
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    Py_XDECREF(out);
    return res;
}

/* ------------------------------------------------------------ build and runtime */

static PyObject *py_simd_info(PyObject *self, PyObject *noargs)
{
    PyObject *compiled = PyList_New(0), *supported = PyList_New(0);
    if (!compiled || !supported) goto fail;
    for (int s = 0; s < TKA_SIMD_COUNT; s++) {
        PyObject *name = PyUnicode_FromString(tka_simd_name((tka_simd)s));
        if (!name) goto fail;
        if ((tka_simd_compiled((tka_simd)s) && PyList_Append(compiled, name) < 0) ||
            (tka_simd_supported((tka_simd)s) && PyList_Append(supported, name) < 0)) {
            Py_DECREF(name);
            goto fail;
        }
        Py_DECREF(name);
    }
    return Py_BuildValue("{s:N,s:N,s:s,s:s,s:s}", "compiled", compiled, "supported", supported,
                         "active", tka_simd_name(tka_simd_active()), "cpu_features",
                         tka_cpu_features(), "compiler",
#ifdef __VERSION__
                         "gcc-compatible " __VERSION__
#else
                         "unknown"
#endif
    );
fail:
    Py_XDECREF(compiled);
    Py_XDECREF(supported);
    return NULL;
}

static PyObject *py_set_simd(PyObject *self, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int s = 0; s < TKA_SIMD_COUNT; s++) {
        if (strcmp(name, tka_simd_name((tka_simd)s)) == 0) {
            if (tka_simd_select((tka_simd)s) != TKA_OK)
                return PyErr_Format(PyExc_ValueError,
                                    "SIMD path %s is not available here (%s; CPU features: %s)",
                                    name, tka_simd_compiled((tka_simd)s) ? "the CPU lacks it" : "not compiled",
                                    tka_cpu_features());
            Py_RETURN_NONE;
        }
    }
    return PyErr_Format(PyExc_ValueError, "unknown SIMD path %s: use scalar, avx2, avx512 or neon", name);
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *args)
{
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    tka_set_num_threads(n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs)
{
    return PyLong_FromLong(tka_num_threads());
}

/* vexp(x): e^x of every element of x (converted to a float64 copy) by the active kernel
 * set's vector exp, the one every sum of exponentials uses; for the accuracy tests. */
static PyObject *py_vexp(PyObject *self, PyObject *args)
{
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O", &obj)) return NULL;
    PyArrayObject *x = (PyArrayObject *)PyArray_FROMANY(obj, NPY_FLOAT64, 0, 0,
                                                         NPY_ARRAY_CARRAY | NPY_ARRAY_ENSURECOPY);
    if (!x) return NULL;
    PyArrayObject *out = (PyArrayObject *)PyArray_NewLikeArray(x, NPY_CORDER, NULL, 0);
    if (!out) {
        Py_DECREF(x);
        return NULL;
    }
    const int64_t n = (int64_t)PyArray_SIZE(x);
    const double *xp = (const double *)PyArray_DATA(x);
    double *op = (double *)PyArray_DATA(out);
    Py_BEGIN_ALLOW_THREADS
    tka_vexp(xp, n, op);
    Py_END_ALLOW_THREADS
    Py_DECREF(x);
    return (PyObject *)out;
}

/* mass_bounds(ub, rad, mom, qn2, g, cab, c1060, eta, inv_m): the block bounds of the
 * streaming search (per-key ub and block mass um, float64 arrays of m blocks; mom of shape
 * (m, 2)) by the active kernel set, for the tests. Returns (ub, um). */
static PyObject *py_mass_bounds(PyObject *self, PyObject *args)
{
    PyObject *ob, *orad, *omom;
    tka_mass_consts c;
    if (!PyArg_ParseTuple(args, "OOOdddddd", &ob, &orad, &omom, &c.qn2, &c.g, &c.cab, &c.c1060,
                          &c.eta, &c.inv_m))
        return NULL;
    c.q2 = c.qn2 * c.qn2 * (1.0 + 0x1p-50);
    PyArrayObject *ub = (PyArrayObject *)PyArray_FROMANY(ob, NPY_FLOAT64, 1, 1,
                                                          NPY_ARRAY_CARRAY | NPY_ARRAY_ENSURECOPY);
    PyArrayObject *rad = (PyArrayObject *)PyArray_FROMANY(orad, NPY_FLOAT64, 1, 1, NPY_ARRAY_CARRAY);
    PyArrayObject *mom = (PyArrayObject *)PyArray_FROMANY(omom, NPY_FLOAT64, 2, 2, NPY_ARRAY_CARRAY);
    PyArrayObject *um = NULL;
    PyObject *res = NULL;
    if (!ub || !rad || !mom) goto done;
    const npy_intp m = PyArray_DIM(ub, 0);
    if (PyArray_DIM(rad, 0) != m || PyArray_DIM(mom, 0) != m || PyArray_DIM(mom, 1) != 2) {
        PyErr_SetString(PyExc_ValueError, "mass_bounds: rad must have shape (m,), mom (m, 2)");
        goto done;
    }
    if (!(um = (PyArrayObject *)PyArray_SimpleNew(1, &m, NPY_FLOAT64))) goto done;
    Py_BEGIN_ALLOW_THREADS
    tka_mass_bounds((double *)PyArray_DATA(ub), (const double *)PyArray_DATA(rad),
                    (const double *)PyArray_DATA(mom), (int64_t)m, &c, (double *)PyArray_DATA(um));
    Py_END_ALLOW_THREADS
    res = Py_BuildValue("OO", ub, um);
done:
    Py_XDECREF(ub);
    Py_XDECREF(rad);
    Py_XDECREF(mom);
    Py_XDECREF(um);
    return res;
}

/* exp2_table(): the 32 values 2^(j/32) the vector exp scales by. */
static PyObject *py_exp2_table(PyObject *self, PyObject *noargs)
{
    npy_intp n = 32;
    PyObject *out = PyArray_SimpleNew(1, &n, NPY_FLOAT64);
    if (out) memcpy(PyArray_DATA((PyArrayObject *)out), tka_exp2_table(), 32 * sizeof(double));
    return out;
}

static PyMethodDef methods[] = {
    {"tail_mass", py_tail_mass, METH_VARARGS, "tail_mass(logits, k, want_kl) -> (log_tau[, kl])"},
    {"tv_curve", py_tv_curve, METH_VARARGS, "tv_curve(logits) -> tau(k), k = 0..n"},
    {"k_eps", py_k_eps, METH_VARARGS, "k_eps(logits, eps, want_tau) -> (k[, tau])"},
    {"topk", py_topk, METH_VARARGS, "topk(logits, k) -> indices"},
    {"gap_bound", py_gap_bound, METH_VARARGS, "gap_bound(logits, k, form)"},
    {"multigap_bound", py_multigap_bound, METH_VARARGS,
     "multigap_bound(logits, k, cuts_or_None, nseg, spacing)"},
    {"block_bound", py_block_bound, METH_VARARGS,
     "block_bound(block_upper, block_sizes, log_kept, log_scored)"},
    {"entropy", py_entropy, METH_VARARGS, "entropy(logits)"},
    {"effective_support", py_effective_support, METH_VARARGS, "effective_support(logits, thr)"},
    {"fit_gaussian", py_fit_gaussian, METH_VARARGS, "fit_gaussian(logits) -> (mu, sigma)"},
    {"gauss", py_gauss, METH_VARARGS, "gauss(op, a[, b[, c]]): elementwise Gaussian functions"},
    {"vexp", py_vexp, METH_VARARGS, "vexp(x): e^x by the active kernel set (for tests)"},
    {"exp2_table", py_exp2_table, METH_NOARGS, "exp2_table(): 2^(j/32), j < 32"},
    {"mass_bounds", py_mass_bounds, METH_VARARGS,
     "mass_bounds(ub, rad, mom, qn2, g, cab, c1060, eta, inv_m) -> (ub, um) (for tests)"},
    {"simd_info", py_simd_info, METH_NOARGS, "compiled/supported/active SIMD paths"},
    {"set_simd", py_set_simd, METH_VARARGS, "set_simd(name)"},
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "set_num_threads(n)"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads()"},
    {NULL, NULL, 0, NULL},
};

/* The numbers the Python layer passes to and gets from this module, so that it never
 * restates them: statuses (STATUS_OK, STATUS_ERR_NAN, ...), attention modes, search
 * summaries and methods, bound forms and spacings, Gaussian operations. */
static int add_constants(PyObject *m)
{
    static const struct { const char *name; int value; } c[] = {
        {"MODE_DENSE", TKA_ATTN_DENSE}, {"MODE_TOPK", TKA_ATTN_TOPK},
        {"MODE_ROW_ERROR", TKA_ATTN_ROW_ERROR},
        {"SUMMARY_MINMAX", TKA_SUM_MINMAX}, {"SUMMARY_BALL", TKA_SUM_BALL},
        {"METHOD_DELTA", TKA_SEARCH_DELTA}, {"METHOD_MC", TKA_SEARCH_MC},
        {"INT4_MAX_D", TKA_INT4_MAX_D},
        {"GAP_MASS", TKA_GAP_MASS}, {"GAP_GAP", TKA_GAP_GAP},
        {"SPACING_GEOMETRIC", TKA_SPACING_GEOMETRIC}, {"SPACING_LINEAR", TKA_SPACING_LINEAR},
        {"G_CDF", G_CDF}, {"G_SF", G_SF}, {"G_PPF", G_PPF}, {"G_ISF", G_ISF},
        {"G_TAIL", G_TAIL}, {"G_KEPS", G_KEPS}, {"G_KEPS_FINITE", G_KEPS_FINITE},
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        if (PyModule_AddIntConstant(m, c[i].name, c[i].value) < 0) return -1;
    for (int st = 0; st < TKA_STATUS_COUNT; st++) {
        char name[64];
        snprintf(name, sizeof name, "STATUS_%s", tka_status_name((tka_status)st));
        if (PyModule_AddIntConstant(m, name, st) < 0) return -1;
    }
    return 0;
}

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_core",
                                       "C core of topkattn (private; use the topkattn package).",
                                       -1, methods};

PyMODINIT_FUNC PyInit__core(void)
{
    import_array();
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (PyModule_AddFunctions(m, tka_attention_methods) < 0 ||
        PyModule_AddFunctions(m, tka_search_methods) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    tka_simd_active(); /* detect the CPU and pick the kernels now, under the GIL */
    if (add_constants(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
