/* `db[key] = value` in C: the store's mp_ass_subscript slot. See fastput.h.
 *
 * Only the CPython C API's stable ABI is used (Py_LIMITED_API 3.10, walstore's
 * oldest Python; the cffi module itself is abi3), and only on CPython. The slot
 * is called by the interpreter with the GIL held, like any slot; the two cffi
 * functions below are called without it (cffi releases it) and take it back.
 *
 * The fast path is NativeLogWriter.commit_op (walstore/nativelog.py) for the one
 * case it serves, step for step:
 *
 *   1. the key is exactly str or bytes and the value exactly bytes or str (else,
 *      or if a str does not encode to UTF-8: the Python `put`, which raises what
 *      it always raised);
 *   2. the writer's lock is taken without blocking (`acquire(False)`): if another
 *      thread holds it (a roll, a seal, close, a transaction, a reference-path
 *      write, a commit waiting for the GIL...), the Python `put` takes the slow
 *      path and queues for the lock as it always did. Holding the real lock, not
 *      merely the GIL, is what keeps the log order equal to the dict order even
 *      if the dict update runs Python code (an old value's __del__) that lets
 *      another thread run;
 *   3. under the lock: the writer's gate must be open (cleared, under the lock,
 *      when the writer closes or is poisoned) and no failpoint armed; else the
 *      lock is released and the Python `put` does it all;
 *   4. the append: ws_log_put_op_touched copies the frame into map pages this
 *      segment already wrote through, with the GIL held; a frame that reaches a
 *      page not yet written (whose first write may wait for the kernel to find
 *      or read it), or that would be pwritten, is appended by ws_log_put_op with
 *      the GIL released, exactly as commit_op does;
 *   5. appended (seq > 0): PyDict_SetItem on the store's dict, under the lock; if
 *      it fails, the writer's `_apply_failed` (poison, StorePoisonedError), as
 *      commit_op. An error code: `_append_failed` (poison, or DiskFullError).
 *      No room (a roll is due) or too big: nothing was written; the lock is
 *      released and the Python `put` does everything;
 *   6. the lock is released, then a NOTIFY flag calls the writer's `_notified`
 *      (preallocation, auto-compaction), as `_committed` does. Lazy mode: no wait.
 */
#if !defined(Py_LIMITED_API)
#if defined(_MSC_VER)
#if !defined(_DEBUG) && !defined(Py_DEBUG) && !defined(Py_TRACE_REFS) && !defined(Py_REF_DEBUG)
#define Py_LIMITED_API 0x030A0000
#endif
#include <pyconfig.h>
#else
#include <pyconfig.h>
#if !defined(Py_DEBUG) && !defined(Py_TRACE_REFS) && !defined(Py_REF_DEBUG) && !defined(Py_GIL_DISABLED)
#define Py_LIMITED_API 0x030A0000
#endif
#endif
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stddef.h>

#include "fastput.h"
#include "walstore_format.h"

#ifdef PYPY_VERSION

int ws_fastput_type(uintptr_t out)
{
    (void)out;
    return WS_FASTPUT_UNSUPPORTED;
}

int ws_fastput_bind(uintptr_t store, ws_log *log, const int *gate, uintptr_t writer, uintptr_t data,
                    uintptr_t acquire, uintptr_t release, uintptr_t armed, int lazy)
{
    (void)lazy;
    (void)store;
    (void)log;
    (void)gate;
    (void)writer;
    (void)data;
    (void)acquire;
    (void)release;
    (void)armed;
    return WS_FASTPUT_UNSUPPORTED;
}

#else

#define SEQ_MASK ((int64_t)WS_LOG_NOTIFY - 1)

typedef struct {
    PyObject_HEAD
    ws_log *log;         /* NULL: not bound, every put is the Python `put` */
    const int *gate;     /* owned by `writer` */
    PyObject *writer;    /* owns `log` and `gate` */
    PyObject *data;      /* the store's dict */
    PyObject *acquire;   /* the writer lock's bound methods */
    PyObject *release;
    PyObject *armed;     /* walstore.failpoints._armed */
    int lazy;            /* the store's mode is lazy (none, interval); else sync: wait here */
    unsigned long long puts; /* puts done here (under the writer's lock) */
} fastobj;

/* Made once, under the GIL; never freed (the module is never unloaded). */
static PyObject *fast_type;
static PyObject *s_put, *s_delitem, *s_notified, *s_apply_failed, *s_append_failed, *s_wait_failed, *no_block;

/* A held lock is released keeping the exception set; returns -1. */
static int unlock_failed(PyObject *release)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyObject *r = PyObject_CallNoArgs(release);
    if (r == NULL)
        PyErr_Clear(); /* cannot happen (this thread holds the lock); the first error is the one to see */
    Py_XDECREF(r);
    PyErr_Restore(t, v, tb);
    return -1;
}

static int unlock(PyObject *release)
{
    PyObject *r = PyObject_CallNoArgs(release);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The Python path: self.<name>(key[, value]); 0 or -1 with its exception. */
static int call_python(PyObject *self, PyObject *name, PyObject *key, PyObject *value)
{
    PyObject *r = PyObject_CallMethodObjArgs(self, name, key, value, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* (Lock held.) The dict update failed after the record was logged: the writer's
 * `_apply_failed(seq, exc)` poisons the store and raises StorePoisonedError. */
static void apply_failed(PyObject *writer, int64_t seq)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb != NULL && v != NULL)
        PyException_SetTraceback(v, tb);
    PyObject *n = PyLong_FromLongLong(seq);
    PyObject *r = PyObject_CallMethodObjArgs(writer, s_apply_failed, n ? n : Py_None, v ? v : Py_None, NULL);
    if (r != NULL) { /* it always raises; if it did not, still report the failure */
        Py_DECREF(r);
        PyErr_Restore(t, v, tb);
        t = v = tb = NULL;
    }
    Py_XDECREF(n);
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
}

/* (Lock held.) The append returned an error code: `_append_failed(rc, payload_size)` raises. */
static void append_failed(PyObject *writer, int64_t rc, Py_ssize_t payload)
{
    PyObject *a = PyLong_FromLongLong(rc), *b = PyLong_FromSsize_t(payload), *r = NULL;
    if (a != NULL && b != NULL)
        r = PyObject_CallMethodObjArgs(writer, s_append_failed, a, b, NULL);
    if (r != NULL) { /* it always raises */
        Py_DECREF(r);
        PyErr_SetString(PyExc_SystemError, "walstore: _append_failed returned");
    }
    Py_XDECREF(a);
    Py_XDECREF(b);
}

/* Bytes of a str (UTF-8, a new bytes object in *tmp) or of a bytes object. 1: done;
 * 0: another type or a str that does not encode (no exception left set). */
static int bytes_of(PyObject *o, PyObject **tmp, char **p, Py_ssize_t *n, int *is_str)
{
    if (PyBytes_CheckExact(o)) {
        *is_str = 0;
        return PyBytes_AsStringAndSize(o, p, n) == 0 ? 1 : (PyErr_Clear(), 0);
    }
    if (!PyUnicode_CheckExact(o))
        return 0;
    *is_str = 1;
    *tmp = PyUnicode_AsUTF8String(o);
    if (*tmp == NULL || PyBytes_AsStringAndSize(*tmp, p, n) != 0) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

static int fast_ass_subscript(PyObject *self, PyObject *key, PyObject *value)
{
    fastobj *f = (fastobj *)self;
    PyObject *kt = NULL, *vt = NULL;
    PyObject *writer, *data, *release;
    char *kp, *vp;
    Py_ssize_t kn, vn;
    int kstr, vstr, rc = -1;
    int64_t r;

    if (value == NULL)
        return call_python(self, s_delitem, key, NULL);
    if (f->log == NULL || !bytes_of(key, &kt, &kp, &kn, &kstr) || !bytes_of(value, &vt, &vp, &vn, &vstr)) {
        Py_XDECREF(kt);
        Py_XDECREF(vt);
        return call_python(self, s_put, key, value);
    }
    /* Own what this call uses: a GIL release below lets other threads run. */
    ws_log *log = f->log;
    const int *gate = f->gate;
    writer = f->writer;
    data = f->data;
    release = f->release;
    Py_INCREF(writer);
    Py_INCREF(data);
    Py_INCREF(release);
    PyObject *got = PyObject_Call(f->acquire, no_block, NULL);
    if (got == NULL)
        goto out;
    int locked = got == Py_True;
    Py_DECREF(got);
    if (!locked || !__atomic_load_n(gate, __ATOMIC_ACQUIRE) || PyDict_Size(f->armed) != 0) {
        if (locked && unlock(release) < 0)
            goto out;
        r = WS_LOG_NO_ROOM; /* the Python path does everything */
    } else {
        uint32_t op_flags = WS_OP_PUT | (uint32_t)((kstr ? WS_KEY_STR : 0) | (vstr ? WS_VALUE_STR << WS_VALUE_KIND_SHIFT : 0)) << 8;
        if (f->lazy)
            r = ws_log_put_op_touched(log, op_flags, (const uint8_t *)kp, (size_t)kn, (const uint8_t *)vp, (size_t)vn);
        else /* sync: a pwrite into the page cache, with the GIL held: one GIL hand-off per
              * commit (the wait below) instead of two, which the committers of a group
              * commit otherwise spend switching threads */
            r = ws_log_put_op(log, op_flags, (const uint8_t *)kp, (size_t)kn, (const uint8_t *)vp, (size_t)vn, 0);
        if (r == WS_LOG_NOT_HERE) {
            PyThreadState *ts = PyEval_SaveThread();
            r = ws_log_put_op(log, op_flags, (const uint8_t *)kp, (size_t)kn, (const uint8_t *)vp, (size_t)vn, 1);
            PyEval_RestoreThread(ts);
        }
        if (r > 0) {
            if (PyDict_SetItem(data, key, value) < 0) {
                apply_failed(writer, r & SEQ_MASK);
                rc = unlock_failed(release);
                goto out;
            }
            f->puts++;
        } else if (r < WS_LOG_NO_ROOM && r != WS_LOG_TOO_BIG) {
            append_failed(writer, r, WS_OP_HEADER_SIZE + kn + vn);
            rc = unlock_failed(release);
            goto out;
        }
        if (unlock(release) < 0)
            goto out;
    }
    if (r <= 0) { /* nothing was written: no room (a roll), too big, or not for the fast path */
        rc = call_python(self, s_put, key, value);
    } else {
        rc = 0;
        if (r >= (int64_t)WS_LOG_NOTIFY) {
            PyObject *n = PyObject_CallMethodObjArgs(writer, s_notified, NULL);
            Py_XDECREF(n);
            rc = n == NULL ? -1 : 0;
        }
        if (rc == 0 && !f->lazy) { /* sync: return once an fdatasync begun after the write ended */
            PyThreadState *ts = PyEval_SaveThread();
            int w = ws_log_commit_wait(log, (uint64_t)(r & SEQ_MASK));
            PyEval_RestoreThread(ts);
            if (w != 0) { /* closed, or a failed sync: the writer's `_wait_failed(rc)` raises */
                PyObject *code = PyLong_FromLong(w);
                PyObject *n = code ? PyObject_CallMethodObjArgs(writer, s_wait_failed, code, NULL) : NULL;
                Py_XDECREF(code);
                Py_XDECREF(n);
                rc = -1;
                if (n != NULL) { /* cannot happen: it always raises */
                    PyErr_SetString(PyExc_RuntimeError, "walstore: a failed wait did not raise");
                }
            }
        }
    }
out:
    Py_DECREF(writer);
    Py_DECREF(data);
    Py_DECREF(release);
    Py_XDECREF(kt);
    Py_XDECREF(vt);
    return rc;
}

static int fast_traverse(PyObject *self, visitproc visit, void *arg)
{
    fastobj *f = (fastobj *)self;
    Py_VISIT((PyObject *)Py_TYPE(self));
    Py_VISIT(f->writer);
    Py_VISIT(f->data);
    Py_VISIT(f->acquire);
    Py_VISIT(f->release);
    Py_VISIT(f->armed);
    return 0;
}

/* Unbind: the fields are emptied first, then released (a release may run Python code). */
static int fast_clear(PyObject *self)
{
    fastobj *f = (fastobj *)self;
    PyObject *old[5] = {f->writer, f->data, f->acquire, f->release, f->armed};
    f->log = NULL;
    f->gate = NULL;
    f->writer = f->data = f->acquire = f->release = f->armed = NULL;
    for (int i = 0; i < 5; i++)
        Py_XDECREF(old[i]);
    return 0;
}

static void fast_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    fast_clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static PyMemberDef fast_members[] = {
    {"_fast_puts", T_ULONGLONG, offsetof(fastobj, puts), READONLY, "puts done by the C fast path"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot fast_slots[] = {
    {Py_mp_ass_subscript, (void *)fast_ass_subscript},
    {Py_tp_traverse, (void *)fast_traverse},
    {Py_tp_clear, (void *)fast_clear},
    {Py_tp_dealloc, (void *)fast_dealloc},
    {Py_tp_members, (void *)fast_members},
    {Py_tp_doc, (void *)"walstore's `db[key] = value` in C (see _native/fastput.c); a base of NativeStore."},
    {0, NULL},
};

static PyType_Spec fast_spec = {
    "walstore._walstore_native.FastSetItem",
    (int)sizeof(fastobj),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    fast_slots,
};

static int make_type(void)
{
    if (fast_type != NULL)
        return 0;
    PyObject *names[6] = {
        PyUnicode_InternFromString("put"),
        PyUnicode_InternFromString("_fast_delitem"),
        PyUnicode_InternFromString("_notified"),
        PyUnicode_InternFromString("_apply_failed"),
        PyUnicode_InternFromString("_append_failed"),
        PyUnicode_InternFromString("_wait_failed"),
    };
    PyObject *args = PyTuple_Pack(1, Py_False);
    PyObject *type = PyType_FromSpec(&fast_spec);
    int ok = args != NULL && type != NULL;
    for (int i = 0; i < 6; i++)
        ok = ok && names[i] != NULL;
    if (!ok || fast_type != NULL) { /* failed, or made meanwhile (the GIL was let go) */
        for (int i = 0; i < 6; i++)
            Py_XDECREF(names[i]);
        Py_XDECREF(args);
        Py_XDECREF(type);
        return ok ? 0 : -1;
    }
    s_put = names[0];
    s_delitem = names[1];
    s_notified = names[2];
    s_apply_failed = names[3];
    s_append_failed = names[4];
    s_wait_failed = names[5];
    no_block = args;
    fast_type = type;
    return 0;
}

int ws_fastput_type(uintptr_t out_addr)
{
    PyObject *out = (PyObject *)out_addr;
    int rc = WS_FASTPUT_FAILED;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (PyDict_CheckExact(out) && make_type() == 0 && PyDict_SetItemString(out, "FastSetItem", fast_type) == 0)
        rc = WS_FASTPUT_OK;
    PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}

int ws_fastput_bind(uintptr_t store, ws_log *log, const int *gate, uintptr_t writer, uintptr_t data,
                    uintptr_t acquire, uintptr_t release, uintptr_t armed, int lazy)
{
    PyObject *self = (PyObject *)store;
    PyObject *objs[5] = {(PyObject *)writer, (PyObject *)data, (PyObject *)acquire, (PyObject *)release,
                         (PyObject *)armed};
    int rc = WS_FASTPUT_FAILED;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (fast_type == NULL || !PyObject_TypeCheck(self, (PyTypeObject *)fast_type))
        goto out;
    if (log == NULL) {
        fast_clear(self);
        rc = WS_FASTPUT_OK;
        goto out;
    }
    if (gate == NULL || !PyDict_CheckExact(objs[1]) || !PyDict_CheckExact(objs[4]) || !PyCallable_Check(objs[2]) ||
        !PyCallable_Check(objs[3]))
        goto out;
    fastobj *f = (fastobj *)self;
    PyObject *old[5] = {f->writer, f->data, f->acquire, f->release, f->armed};
    for (int i = 0; i < 5; i++)
        Py_INCREF(objs[i]);
    f->writer = objs[0];
    f->data = objs[1];
    f->acquire = objs[2];
    f->release = objs[3];
    f->armed = objs[4];
    f->gate = gate;
    f->lazy = lazy;
    f->log = log;
    for (int i = 0; i < 5; i++)
        Py_XDECREF(old[i]);
    rc = WS_FASTPUT_OK;
out:
    PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}

#endif /* PYPY_VERSION */
