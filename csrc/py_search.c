/*
 * py_search.c - CPython wrappers of the certified search (search.c).
 *
 * The key index's arrays belong to the Python KeyIndex object (topkattn/search.py),
 * which passes them here as one tuple; they are checked (dtype, C order, shapes) before
 * the core sees them, so a corrupted object raises instead of crashing.
 */
#include "pyutil.h"
#include "search.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The array `o` as type/ndim with the given leading shape (-1: any), C-contiguous. */
static int get_arr(PyObject *o, const char *name, int type, int ndim, const npy_intp *shape,
                   int writable, PyArrayObject **out)
{
    *out = NULL;
    if (o == Py_None) return 0;
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "index array %s must be a NumPy array", name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_TYPE(a) != type || PyArray_NDIM(a) != ndim || !PyArray_IS_C_CONTIGUOUS(a)
        || !PyArray_ISNOTSWAPPED(a) || (writable && !PyArray_ISWRITEABLE(a))) {
        PyErr_Format(PyExc_ValueError, "index array %s has the wrong dtype, rank or layout", name);
        return -1;
    }
    if (tka_py_require_aligned(a, name) < 0) return -1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] >= 0 && PyArray_DIM(a, i) != shape[i]) {
            PyErr_Format(PyExc_ValueError, "index array %s has the wrong shape", name);
            return -1;
        }
    }
    *out = a;
    return 0;
}

/* V as (heads, n, -1) of its own float dtype, its rows anywhere in memory: adjacent values
 * within a row, non-negative head and row strides in whole elements (a slice of a longer
 * cache is read in place). Returns -1 with an exception set, or 1 for a dtype that is not
 * a float (no exception). */
static int get_v(PyObject *o, npy_intp heads, npy_intp n, PyArrayObject **out)
{
    *out = NULL;
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "V must be a NumPy array");
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (tka_py_dtype(PyArray_TYPE(a)) < 0) return 1;
    const npy_intp it = PyArray_ITEMSIZE(a);
    int bad = PyArray_NDIM(a) != 3 || !PyArray_ISNOTSWAPPED(a);
    bad = bad || PyArray_DIM(a, 0) != heads || PyArray_DIM(a, 1) != n
          || (PyArray_DIM(a, 2) > 1 && PyArray_STRIDE(a, 2) != it);
    for (int i = 0; i < 2 && !bad; i++)  /* the stride of an axis of length 1 is never used */
        bad = PyArray_DIM(a, i) > 1 && (PyArray_STRIDE(a, i) < 0 || PyArray_STRIDE(a, i) % it);
    if (bad) {
        PyErr_Format(PyExc_ValueError, "V has the wrong shape or layout");
        return -1;
    }
    if (tka_py_require_aligned(a, "V") < 0) return -1;
    *out = a;
    return 0;
}

/* Fill a tka_key_index from the tuple (keys, perm, n, block_size, summary, lo, hi, ctr,
 * rad, pz, pscale, perr, maxabs[, mom]). Borrowed references only. */
static int parse_index(PyObject *t, tka_key_index *ix, tka_key_index_out *o, int writable)
{
    PyObject *keys, *perm, *lo, *hi, *ctr, *rad, *pz, *pscale, *perr, *maxabs, *mom = Py_None;
    long long n, bs;
    int summary;
    memset(ix, 0, sizeof *ix);
    memset(o, 0, sizeof *o);
    if (!PyArg_ParseTuple(t, "OOLLiOOOOOOOO|O", &keys, &perm, &n, &bs, &summary, &lo, &hi,
                          &ctr, &rad, &pz, &pscale, &perr, &maxabs, &mom))
        return -1;
    if (!PyArray_Check(keys) || PyArray_NDIM((PyArrayObject *)keys) != 3) {
        PyErr_SetString(PyExc_ValueError, "index keys must be a (heads, cap, d) array");
        return -1;
    }
    PyArrayObject *k = (PyArrayObject *)keys, *a;
    int kt = PyArray_TYPE(k);
    if (tka_py_dtype(kt) < 0) {
        PyErr_SetString(PyExc_TypeError, "index keys must be float32, float64 or float16");
        return -1;
    }
    const npy_intp H = PyArray_DIM(k, 0), cap = PyArray_DIM(k, 1), d = PyArray_DIM(k, 2);
    if (bs < 1 || n < 1 || n > cap || d < 1 || (summary & ~(TKA_SUM_MINMAX | TKA_SUM_BALL)) ||
        !summary) {
        PyErr_SetString(PyExc_ValueError, "inconsistent key index (n, block_size or summary)");
        return -1;
    }
    /* A block size past the capacity means one block of every key: the same blocks (key
     * ranges [b bs, min((b + 1) bs, n))) as a block size of cap, which is what the core
     * gets, so that nothing computes with (or sizes buffers by) a block size near 2^63. */
    if (bs > cap) bs = cap;
    /* blocks of the capacity, rounded up (no cap + bs - 1: no overflow) */
    const npy_intp cb = (npy_intp)(cap / bs + (cap % bs != 0));
    npy_intp s_keys[3] = {H, cap, d}, s_hc[2] = {H, cap}, s_blk[3] = {H, -1, d}, s_hb[2] = {H, -1},
             s_h[1] = {H};
    if (get_arr(keys, "keys", kt, 3, s_keys, 0, &a) < 0) return -1;
    ix->keys = PyArray_DATA(a);
    if (get_arr(perm, "perm", NPY_INT64, 2, s_hc, 0, &a) < 0) return -1;
    if (!a) { PyErr_SetString(PyExc_ValueError, "index perm missing"); return -1; }
    ix->perm = PyArray_DATA(a);
    if (get_arr(maxabs, "maxabs", NPY_FLOAT64, 1, s_h, writable, &a) < 0) return -1;
    if (!a) { PyErr_SetString(PyExc_ValueError, "index maxabs missing"); return -1; }
    ix->maxabs = o->maxabs = PyArray_DATA(a);
    npy_intp cap_blocks = -1;
    if (summary & TKA_SUM_MINMAX) {
        PyArrayObject *b;
        if (get_arr(lo, "lo", NPY_FLOAT32, 3, s_blk, writable, &a) < 0 ||
            get_arr(hi, "hi", NPY_FLOAT32, 3, s_blk, writable, &b) < 0) return -1;
        if (!a || !b || PyArray_DIM(a, 1) != PyArray_DIM(b, 1)) {
            PyErr_SetString(PyExc_ValueError, "index lo/hi missing or inconsistent");
            return -1;
        }
        cap_blocks = PyArray_DIM(a, 1);
        ix->lo = o->lo = PyArray_DATA(a);
        ix->hi = o->hi = PyArray_DATA(b);
    }
    if (summary & TKA_SUM_BALL) {
        PyArrayObject *b;
        if (get_arr(ctr, "ctr", NPY_FLOAT32, 3, s_blk, writable, &a) < 0 ||
            get_arr(rad, "rad", NPY_FLOAT64, 2, s_hb, writable, &b) < 0) return -1;
        if (!a || !b || PyArray_DIM(a, 1) != PyArray_DIM(b, 1) ||
            (cap_blocks >= 0 && PyArray_DIM(a, 1) != cap_blocks)) {
            PyErr_SetString(PyExc_ValueError, "index ctr/rad missing or inconsistent");
            return -1;
        }
        cap_blocks = PyArray_DIM(a, 1);
        ix->ctr = o->ctr = PyArray_DATA(a);
        ix->rad = o->rad = PyArray_DATA(b);
        if (mom != Py_None) {  /* the blocks' second moments (optional) */
            npy_intp s_mom[3] = {H, cap_blocks, 2};
            if (get_arr(mom, "mom", NPY_FLOAT64, 3, s_mom, writable, &a) < 0) return -1;
            ix->mom = o->mom = PyArray_DATA(a);
        }
    }
    if (cap_blocks < cb) {
        PyErr_SetString(PyExc_ValueError, "index block arrays are too short");
        return -1;
    }
    if (pz != Py_None) {
        PyArrayObject *b, *c;
        /* int8 codes (H, cap, d), or 4-bit ones two per byte (H, cap, ceil(d / 2)), whose
         * bound needs the blocks' centroids */
        const int four = PyArray_Check(pz) && PyArray_TYPE((PyArrayObject *)pz) == NPY_UINT8;
        npy_intp s_codes[3] = {H, cap, four ? (d + 1) / 2 : d};
        if (four && !(summary & TKA_SUM_BALL)) {
            PyErr_SetString(PyExc_ValueError, "4-bit proxies need the ball summary");
            return -1;
        }
        /* the 4-bit sums (at most 2 ceil(d / 2) 15 127, less a bias of at most 8 127 d) stay
         * exact in int32 */
        if (four && d > TKA_INT4_MAX_D) {
            PyErr_SetString(PyExc_ValueError, "4-bit proxies take at most 2^19 dimensions");
            return -1;
        }
        if (get_arr(pz, "pz", four ? NPY_UINT8 : NPY_INT8, 3, s_codes, writable, &a) < 0 ||
            get_arr(pscale, "pscale", NPY_FLOAT32, 2, s_hc, writable, &b) < 0 ||
            get_arr(perr, "perr", NPY_FLOAT32, 2, s_hc, writable, &c) < 0) return -1;
        if (!a || !b || !c) {
            PyErr_SetString(PyExc_ValueError, "index proxies incomplete");
            return -1;
        }
        if (four)
            ix->pz4 = o->pz4 = PyArray_DATA(a);
        else
            ix->pz = o->pz = PyArray_DATA(a);
        ix->pscale = o->pscale = PyArray_DATA(b);
        ix->perr = o->perr = PyArray_DATA(c);
    }
    ix->heads = H;
    ix->n = n;
    ix->cap = cap;
    ix->d = d;
    ix->block_size = bs;
    ix->cap_blocks = cap_blocks;
    ix->dtype = (tka_dtype)tka_py_dtype(kt);
    ix->summary = summary;
    return 0;
}

/* index_order(keys (H, n, d), block_size[, in_place]) -> perm (H, n) int64. With in_place
 * the rows of keys (writable, C-contiguous) are left in that order; otherwise keys are not
 * touched (the ordering works on a copy). */
static PyObject *py_index_order(PyObject *self, PyObject *args)
{
    PyObject *ko;
    long long bs;
    int in_place = 0;
    if (!PyArg_ParseTuple(args, "OL|p", &ko, &bs, &in_place)) return NULL;
    PyArrayObject *k;
    npy_intp any3[3] = {-1, -1, -1};
    if (!PyArray_Check(ko)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a NumPy array");
        return NULL;
    }
    int kt = PyArray_TYPE((PyArrayObject *)ko);
    if (tka_py_dtype(kt) < 0 || get_arr(ko, "keys", kt, 3, any3, in_place, &k) < 0)
        return PyErr_Occurred() ? NULL
                                : PyErr_Format(PyExc_TypeError, "keys must be float32, float64 or float16");
    if (bs < 1) return PyErr_Format(PyExc_ValueError, "block_size must be >= 1");
    npy_intp H = PyArray_DIM(k, 0), n = PyArray_DIM(k, 1), d = PyArray_DIM(k, 2);
    /* before allocating H * n positions: keys of no dimension are refused, and an empty
     * set of keys has nothing to order (no loop over the heads) */
    if (d < 1) return PyErr_Format(PyExc_ValueError, "keys must have a last axis d >= 1, got d = 0");
    npy_intp shp[2] = {H, n};
    PyArrayObject *perm = (PyArrayObject *)PyArray_SimpleNew(2, shp, NPY_INT64);
    if (!perm) return NULL;
    if (H == 0 || n == 0) return (PyObject *)perm;
    tka_status st = TKA_OK;
    char *base = PyArray_BYTES(k);
    int64_t *pp = PyArray_DATA(perm);
    const size_t es = (size_t)PyArray_ITEMSIZE(k), head = (size_t)(n * d) * es;
    char *work = in_place ? NULL : malloc(head);
    if (!in_place && !work) {
        Py_DECREF(perm);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp h = 0; h < H && st == TKA_OK; h++) {
        char *kh = base + (size_t)h * head;
        if (!in_place) kh = memcpy(work, kh, head);
        st = tka_index_order(kh, (tka_dtype)tka_py_dtype(kt), n, d, bs, pp + h * n);
    }
    Py_END_ALLOW_THREADS
    free(work);
    if (st != TKA_OK) {
        Py_DECREF(perm);
        return tka_py_raise(st, NULL, -1, NULL);
    }
    return (PyObject *)perm;
}

/* index_fill(ix_tuple, k0): summaries and proxies of keys [k0, n). */
static PyObject *py_index_fill(PyObject *self, PyObject *args)
{
    PyObject *t;
    long long k0;
    if (!PyArg_ParseTuple(args, "O!L", &PyTuple_Type, &t, &k0)) return NULL;
    tka_key_index ix;
    tka_key_index_out o;
    if (parse_index(t, &ix, &o, 1) < 0) return NULL;
    if (k0 < 0 || k0 > ix.n) return PyErr_Format(PyExc_ValueError, "k0 out of range");
    tka_error err;
    tka_status st;
    Py_BEGIN_ALLOW_THREADS
    st = tka_index_fill(&ix, &o, k0, &err);
    Py_END_ALLOW_THREADS
    if (st != TKA_OK) return tka_py_raise(st, NULL, err.row, err.what);
    Py_RETURN_NONE;
}

/*
 * search(ix_tuple, Q (H, L, d) float64, scale, eps (H*L,), method, delta, seed,
 *        mc_samples, use_proxy, V (H, n, dv) float32/64 or None[, unordered[, stages]])
 * -> (indices (H*L, kmax) padded with -1, k, tv_bound, keys_scored, blocks_scored,
 *     proxies_read, bytes_read, certified_mc, output (H*L, dv) or None, full_scoring,
 *     stages (H*L, 2, TKA_STAGES) seconds and bytes per stage, or None)
 */
static PyObject *py_search(PyObject *self, PyObject *args)
{
    PyObject *t, *qo, *eo, *vo;
    double scale, delta;
    int method, use_proxy, unordered = 0, stages = 0;
    unsigned long long seed;
    long long mc_samples;
    if (!PyArg_ParseTuple(args, "O!OdOidKLpO|pp", &PyTuple_Type, &t, &qo, &scale, &eo, &method,
                          &delta, &seed, &mc_samples, &use_proxy, &vo, &unordered, &stages))
        return NULL;
    tka_key_index ix;
    tka_key_index_out o;
    if (parse_index(t, &ix, &o, 0) < 0) return NULL;
    PyArrayObject *q, *e, *v = NULL;
    npy_intp sq[3] = {ix.heads, -1, ix.d};
    /* float32 queries are read as they are (converted exactly per value) */
    const int q32 = PyArray_Check(qo) && PyArray_TYPE((PyArrayObject *)qo) == NPY_FLOAT32;
    if (get_arr(qo, "Q", q32 ? NPY_FLOAT32 : NPY_FLOAT64, 3, sq, 0, &q) < 0) return NULL;
    if (!q) return PyErr_Format(PyExc_ValueError, "Q missing");
    const npy_intp L = PyArray_DIM(q, 1), rows = ix.heads * L;
    npy_intp se[1] = {rows};
    if (get_arr(eo, "eps", NPY_FLOAT64, 1, se, 0, &e) < 0) return NULL;
    if (!e) return PyErr_Format(PyExc_ValueError, "eps missing");
    if (vo != Py_None) {
        const int gv = get_v(vo, ix.heads, ix.n, &v);
        if (gv < 0) return NULL;
        if (gv > 0) return PyErr_Format(PyExc_TypeError, "V must be float32, float64 or float16");
    }
    if (method != TKA_SEARCH_DELTA && method != TKA_SEARCH_MC)
        return PyErr_Format(PyExc_ValueError, "unknown method");
    if (method == TKA_SEARCH_MC && (!(delta > 0.0 && delta < 1.0) || mc_samples < 2))
        return PyErr_Format(PyExc_ValueError, "MC needs delta in (0, 1) and mc_samples >= 2");

    tka_search_args sa;
    memset(&sa, 0, sizeof sa);
    if (q32) sa.q32 = PyArray_DATA(q);
    else sa.q = PyArray_DATA(q);
    sa.L = L;
    sa.scale = scale;
    sa.eps = PyArray_DATA(e);
    sa.method = method;
    sa.delta = delta;
    sa.seed = seed;
    sa.mc_samples = mc_samples;
    sa.use_proxy = use_proxy;
    sa.unordered = unordered;
    sa.stages = stages;
    npy_intp dv = 0;
    if (v) {
        sa.v = PyArray_DATA(v);
        sa.vdtype = (tka_dtype)tka_py_dtype(PyArray_TYPE(v));
        dv = PyArray_DIM(v, 2);
        sa.dv = dv;
        /* in elements; 0 for an axis of length 1 (its stride is never used) */
        sa.v_head_stride = ix.heads > 1 ? PyArray_STRIDE(v, 0) / PyArray_ITEMSIZE(v) : 0;
        sa.v_row_stride = ix.n > 1 ? PyArray_STRIDE(v, 1) / PyArray_ITEMSIZE(v) : 0;
    }
    PyObject *res = NULL;
    tka_search_row *out = PyMem_Calloc((size_t)(rows > 0 ? rows : 1), sizeof(tka_search_row));
    PyArrayObject *ov = NULL, *idx = NULL, *kk = NULL, *tv = NULL, *ks = NULL, *bsc = NULL,
                  *pr = NULL, *by = NULL, *mcf = NULL, *fsc = NULL, *stg = NULL;
    if (!out) return PyErr_NoMemory();
    if (v) {
        npy_intp so[2] = {rows, dv};
        if (!(ov = (PyArrayObject *)PyArray_SimpleNew(2, so, NPY_FLOAT64))) goto done;
    }
    tka_error err;
    tka_status st;
    Py_BEGIN_ALLOW_THREADS
    st = tka_search(&ix, &sa, out, ov ? PyArray_DATA(ov) : NULL, &err);
    Py_END_ALLOW_THREADS
    if (st != TKA_OK) {
        tka_py_raise(st, NULL, err.row, err.what);
        goto done;
    }
    {
        /* unordered: only the output is wanted, no kept set is returned (a (rows, 0) array) */
        npy_intp kmax = 0;
        for (npy_intp r = 0; r < rows && !unordered; r++) if (out[r].k > kmax) kmax = out[r].k;
        npy_intp s2[2] = {rows, kmax}, s1[1] = {rows};
        if (!(idx = (PyArrayObject *)PyArray_SimpleNew(2, s2, NPY_INT64)) ||
            !(kk = (PyArrayObject *)PyArray_SimpleNew(1, s1, NPY_INT64)) ||
            !(tv = (PyArrayObject *)PyArray_SimpleNew(1, s1, NPY_FLOAT64)) ||
            !(ks = (PyArrayObject *)PyArray_SimpleNew(1, s1, NPY_INT64)) ||
            !(bsc = (PyArrayObject *)PyArray_SimpleNew(1, s1, NPY_INT64)) ||
            !(pr = (PyArrayObject *)PyArray_SimpleNew(1, s1, NPY_INT64)) ||
            !(by = (PyArrayObject *)PyArray_SimpleNew(1, s1, NPY_FLOAT64)) ||
            !(mcf = (PyArrayObject *)PyArray_SimpleNew(1, s1, NPY_BOOL)) ||
            !(fsc = (PyArrayObject *)PyArray_SimpleNew(1, s1, NPY_BOOL)))
            goto done;
        npy_intp s3[3] = {rows, 2, TKA_STAGES};
        if (stages && !(stg = (PyArrayObject *)PyArray_SimpleNew(3, s3, NPY_FLOAT64))) goto done;
        int64_t *ip = PyArray_DATA(idx);
        for (npy_intp r = 0; r < rows; r++) {
            const tka_search_row *w = &out[r];
            if (kmax > 0) {
                memcpy(ip + r * kmax, w->idx, (size_t)w->k * sizeof(int64_t));
                for (npy_intp j = w->k; j < kmax; j++) ip[r * kmax + j] = -1;
            }
            ((int64_t *)PyArray_DATA(kk))[r] = w->k;
            ((double *)PyArray_DATA(tv))[r] = w->tv_bound;
            ((int64_t *)PyArray_DATA(ks))[r] = w->keys_scored;
            ((int64_t *)PyArray_DATA(bsc))[r] = w->blocks_scored;
            ((int64_t *)PyArray_DATA(pr))[r] = w->proxies_read;
            ((double *)PyArray_DATA(by))[r] = w->bytes_read;
            ((npy_bool *)PyArray_DATA(mcf))[r] = (npy_bool)(w->certified_mc != 0);
            ((npy_bool *)PyArray_DATA(fsc))[r] = (npy_bool)(w->full_scoring != 0);
            if (stg) {
                double *sp = (double *)PyArray_DATA(stg) + r * 2 * TKA_STAGES;
                memcpy(sp, w->stage_s, sizeof w->stage_s);
                memcpy(sp + TKA_STAGES, w->stage_bytes, sizeof w->stage_bytes);
            }
        }
        res = Py_BuildValue("OOOOOOOOOOO", idx, kk, tv, ks, bsc, pr, by, mcf,
                            ov ? (PyObject *)ov : Py_None, fsc, stg ? (PyObject *)stg : Py_None);
    }
done:
    for (npy_intp r = 0; r < rows; r++) free(out[r].idx);
    PyMem_Free(out);
    Py_XDECREF(ov);
    Py_XDECREF(idx);
    Py_XDECREF(kk);
    Py_XDECREF(tv);
    Py_XDECREF(ks);
    Py_XDECREF(bsc);
    Py_XDECREF(pr);
    Py_XDECREF(by);
    Py_XDECREF(mcf);
    Py_XDECREF(fsc);
    Py_XDECREF(stg);
    return res;
}

/* search_qnorm(Q): the largest L1 norm of the rows of a C-contiguous float32 or float64
 * array (last axis), summed in float64; inf or NaN when a value is not finite (or a sum
 * overflows). One pass, no temporary array. */
static PyObject *py_search_qnorm(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *o;
    if (!PyArg_ParseTuple(args, "O", &o)) return NULL;
    if (!PyArray_Check(o)) return PyErr_Format(PyExc_TypeError, "Q must be a NumPy array");
    PyArrayObject *a = (PyArrayObject *)o;
    const int t = PyArray_TYPE(a);
    if ((t != NPY_FLOAT32 && t != NPY_FLOAT64) || PyArray_NDIM(a) < 1
        || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISNOTSWAPPED(a))
        return PyErr_Format(PyExc_ValueError, "Q must be a C-contiguous float32 or float64 array");
    if (tka_py_require_aligned(a, "Q") < 0) return NULL;
    const npy_intp d = PyArray_DIM(a, PyArray_NDIM(a) - 1), total = PyArray_SIZE(a);
    const npy_intp rows = d > 0 ? total / d : 0;
    double best = 0.0;
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp r = 0; r < rows; r++) {
        double s0 = 0.0, s1 = 0.0;
        npy_intp j = 0;
        if (t == NPY_FLOAT32) {
            const float *x = (const float *)PyArray_DATA(a) + r * d;
            for (; j + 2 <= d; j += 2) s0 += fabs((double)x[j]), s1 += fabs((double)x[j + 1]);
            for (; j < d; j++) s0 += fabs((double)x[j]);
        } else {
            const double *x = (const double *)PyArray_DATA(a) + r * d;
            for (; j + 2 <= d; j += 2) s0 += fabs(x[j]), s1 += fabs(x[j + 1]);
            for (; j < d; j++) s0 += fabs(x[j]);
        }
        const double s = s0 + s1;
        if (!(s <= best)) best = s;  /* NaN sticks: nothing compares above it */
        if (isnan(best)) break;
    }
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(best);
}

PyMethodDef tka_search_methods[] = {
    {"search_qnorm", py_search_qnorm, METH_VARARGS,
     "search_qnorm(Q) -> float: the largest L1 norm of Q's rows (inf or NaN: a value not finite)."},
    {"index_order", py_index_order, METH_VARARGS,
     "index_order(keys, block_size[, in_place]) -> perm: block-tightening order of each head's\n"
     "keys (with in_place, the rows of keys are left in that order)."},
    {"index_fill", py_index_fill, METH_VARARGS,
     "index_fill(index_tuple, k0): block summaries and proxies for keys [k0, n)."},
    {"search", py_search, METH_VARARGS,
     "search(index_tuple, Q, scale, eps, method, delta, seed, mc_samples, use_proxy, V[, unordered"
     "[, stages]]): certified search rows (and per-stage seconds and bytes with stages)."},
    {NULL, NULL, 0, NULL},
};
