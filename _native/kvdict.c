/* The replayed state as a Python dict, built in C. See kvdict.h.
 *
 * Only the CPython C API's stable ABI is used (Py_LIMITED_API, as the cffi
 * module itself), and only on CPython: elsewhere the function is a stub that
 * says so. cffi calls C functions with the GIL released, so this one takes
 * it back (PyGILState_Ensure) for as long as it touches Python objects.
 */
#if !defined(Py_LIMITED_API)
#if defined(_MSC_VER)
#if !defined(_DEBUG) && !defined(Py_DEBUG) && !defined(Py_TRACE_REFS) && !defined(Py_REF_DEBUG)
#define Py_LIMITED_API /* before pyconfig.h, which picks the import library from it */
#endif
#include <pyconfig.h>
#else
#include <pyconfig.h>
/* As cffi decides, and never for free-threaded builds (they have no stable ABI). */
#if !defined(Py_DEBUG) && !defined(Py_TRACE_REFS) && !defined(Py_REF_DEBUG) && !defined(Py_GIL_DISABLED)
#define Py_LIMITED_API
#endif
#endif
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

#include "kvdict.h"
#include "walstore_format.h"

#ifdef PYPY_VERSION

int ws_kv_build_dict(const ws_kv *kv, uintptr_t dict, uintptr_t codec_keys, uint64_t *cursor, uint64_t limit)
{
    (void)kv;
    (void)dict;
    (void)codec_keys;
    (void)cursor;
    (void)limit;
    return WS_KV_DICT_UNSUPPORTED;
}

#else

#define BATCH 256 /* items fetched from the table per ws_kv_items call */
#define STAGE_ITEM 256 /* items of at most this many bytes (key and value) are staged */

/* Where each item's bytes are read from: small items are first copied, the
 * whole batch in one tight loop, into `stage` (BATCH * STAGE_ITEM bytes, or
 * NULL), so their cache and TLB misses in the maps overlap instead of each
 * stalling between object allocations. */
static void stage_batch(const ws_kv_item *items, size_t n, const uint8_t **src, uint8_t *stage)
{
    for (size_t j = 0; j < n; j++) {
        size_t len = (size_t)items[j].klen + items[j].vlen;
        if (stage && len <= STAGE_ITEM) {
            memcpy(stage + j * STAGE_ITEM, items[j].key, len);
            src[j] = stage + j * STAGE_ITEM;
        } else {
            src[j] = items[j].key;
        }
    }
}

/* A new reference: str (strict UTF-8) when `text`, else bytes; NULL with an exception set. */
static PyObject *make(const uint8_t *p, uint32_t n, int text)
{
    if (text)
        return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, NULL);
    return PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
}

/* Insert one item; 0, or -1 with an exception set. Every reference made here is released. */
static int insert(PyObject *dict, PyObject *codec_keys, const ws_kv_item *it, const uint8_t *src)
{
    unsigned kind = ((unsigned)it->flags >> WS_VALUE_KIND_SHIFT) & 3;
    PyObject *key, *value;
    int rc;
    key = make(src, it->klen, it->flags & WS_KEY_STR);
    if (!key)
        return -1;
    value = make(src + it->klen, it->vlen, kind == WS_VALUE_STR);
    if (!value) {
        Py_DECREF(key);
        return -1;
    }
    rc = PyDict_SetItem(dict, key, value);
    if (rc == 0 && kind == WS_VALUE_CODEC)
        rc = PyList_Append(codec_keys, key);
    Py_DECREF(value);
    Py_DECREF(key);
    return rc;
}

int ws_kv_build_dict(const ws_kv *kv, uintptr_t dict_addr, uintptr_t codec_keys_addr, uint64_t *cursor,
                     uint64_t limit)
{
    PyObject *dict = (PyObject *)dict_addr, *codec_keys = (PyObject *)codec_keys_addr;
    ws_kv_item items[BATCH];
    const uint8_t *src[BATCH];
    uint8_t *stage = malloc(BATCH * STAGE_ITEM); /* NULL: no staging */
    uint64_t done = 0;
    int rc = WS_KV_DICT_DONE;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (!PyDict_CheckExact(dict) || !PyList_CheckExact(codec_keys)) {
        rc = WS_KV_DICT_UNSUPPORTED;
        goto out;
    }
    while (rc == WS_KV_DICT_DONE) {
        size_t want = limit - done < BATCH ? (size_t)(limit - done) : BATCH, n;
        uint64_t at = *cursor;
        if (want == 0) {
            /* Stopped at the limit: more only if an entry is left (ws_kv_items with cap 0 moves nothing). */
            ws_kv_item probe;
            if (ws_kv_items(kv, &at, &probe, 1))
                rc = WS_KV_DICT_MORE;
            break;
        }
        n = ws_kv_items(kv, cursor, items, want);
        if (n == 0)
            break;
        stage_batch(items, n, src, stage);
        for (size_t j = 0; j < n; j++) {
            if (insert(dict, codec_keys, &items[j], src[j]) < 0) {
                *cursor = items[j].entry; /* the caller redoes this one in Python */
                PyErr_Clear();
                rc = WS_KV_DICT_FAILED;
                break;
            }
        }
        done += n;
    }
out:
    PyGILState_Release(gil);
    free(stage);
    return rc;
}

#endif /* PYPY_VERSION */
