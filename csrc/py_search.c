/*
 * py_search.c - CPython wrappers of the certified search (search.c).
 */
#include "pyutil.h"

PyMethodDef tka_search_methods[] = {
    {NULL, NULL, 0, NULL},
};
