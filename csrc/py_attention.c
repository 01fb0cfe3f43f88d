/*
 * py_attention.c - CPython wrappers of the attention functions (attention.c).
 */
#include "pyutil.h"

PyMethodDef tka_attention_methods[] = {
    {NULL, NULL, 0, NULL},
};
