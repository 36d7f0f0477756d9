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

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older headers lack it, older kernels say EINVAL */
#endif
#endif

#include "kvdict.h"
#include "walstore_format.h"

#ifdef PYPY_VERSION

int ws_kv_build_dict(const ws_kv *kv, uintptr_t dict, uintptr_t codec_keys, uint64_t *cursor, uint64_t limit,
                     int prefault)
{
    (void)prefault;
    (void)kv;
    (void)dict;
    (void)codec_keys;
    (void)cursor;
    (void)limit;
    return WS_KV_DICT_UNSUPPORTED;
}

void ws_kv_dict_arena_stats(uint64_t *regions, uint64_t *arenas, uint64_t *populated)
{
    *regions = *arenas = *populated = 0;
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

/* ---- the new objects in pages populated ahead ------------------------------------------
 *
 * CPython's small-object allocator (pymalloc) takes memory from the OS in arenas (1 MiB from
 * 3.10 on), each its own mmap of 4 KiB pages, each first touched by a page fault on the thread
 * making an object. A million keys make about 200 MB of new objects: some 50,000 faults, each
 * zeroing its page, on the one thread that holds the GIL. So while a call below holds the GIL,
 * new arenas come from one region it maps (through the arena-allocator hook of PEP 445,
 * PyObject_SetArenaAllocator, restored before the call lets go of the GIL), and a helper
 * thread populates that region (MADV_POPULATE_WRITE, Linux 5.14 and later) a window ahead of
 * the arenas handed out, up to what the call's objects are estimated to need: the page zeroing
 * runs on another core, and the objects land in pages already there.
 *
 * What this may and may not touch:
 * - Only the region's pages at or past the next arena to hand out are populated, and
 *   populating does not change their contents (they are zero).
 * - An arena from the region is an ordinary page-aligned mapping: pymalloc frees it later,
 *   through the restored default allocator, with munmap, as any arena. An arena freed while the
 *   hook is set stops the helper first (so it never populates an address that was unmapped and
 *   perhaps mapped again by someone else), then is unmapped.
 * - The region is used only when the default allocator is CPython's own mmap one (checked once:
 *   its functions in the same image as PyObject_Malloc, and an arena from it page-aligned), on
 *   Linux, with the GIL; without the helper (no thread, or a kernel without
 *   MADV_POPULATE_WRITE) the region's pages fault as pymalloc's own would.
 * - Handing out an arena is an atomic bump: with one GIL per interpreter (3.12 and later) an
 *   arena may be asked for from another thread while the hook is set. */
#if defined(__linux__) && !defined(Py_GIL_DISABLED)
#define REGION_ARENAS 1
#define REGION_MAX ((size_t)1 << 30)  /* the most address space mapped per call */
#define POPULATE_STEP ((size_t)1 << 20) /* bytes per madvise call */
#define POPULATE_WINDOW ((size_t)16 << 20) /* how far ahead of the next arena the helper goes */
#define ESTIMATE_SLACK 1.0625          /* the estimate's margin (pools, size classes) */

typedef struct { /* PyObjectArenaAllocator: the same layout from 3.4 to 3.14 */
    void *ctx;
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *ptr, size_t size);
} arena_allocator;

static struct {
    int state; /* 0: not checked yet; 1: usable; -1: not */
    void (*get)(arena_allocator *);
    void (*set)(arena_allocator *);
    arena_allocator saved;
    uint8_t *base, *end;
    uint8_t *next;   /* next arena to hand out (atomic: the helper reads it) */
    int stop;        /* atomic: the helper ends */
    int helper_on;
    pthread_t helper;
    uint64_t regions, arenas, populated; /* counters, for the tests */
} region;

/* The helper: populate [next, min(next + window, end)) as the arenas advance. */
static void *populate_ahead(void *unused)
{
    uint8_t *done = region.base;
    (void)unused;
    while (!__atomic_load_n(&region.stop, __ATOMIC_ACQUIRE)) {
        uint8_t *next = __atomic_load_n(&region.next, __ATOMIC_ACQUIRE);
        uint8_t *target = (size_t)(region.end - next) > POPULATE_WINDOW ? next + POPULATE_WINDOW : region.end;
        if (done < next)
            done = next;
        if (done >= target) {
            usleep(50);
            continue;
        }
        size_t step = (size_t)(target - done) < POPULATE_STEP ? (size_t)(target - done) : POPULATE_STEP;
        if (madvise(done, step, MADV_POPULATE_WRITE) != 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            break; /* EINVAL: a kernel without it; anything else: stop populating */
        }
        __atomic_add_fetch(&region.populated, step, __ATOMIC_RELAXED);
        done += step;
    }
    return NULL;
}

static void stop_helper(void)
{
    if (region.helper_on) {
        __atomic_store_n(&region.stop, 1, __ATOMIC_RELEASE);
        pthread_join(region.helper, NULL);
        region.helper_on = 0;
    }
}

static void *region_alloc(void *ctx, size_t size)
{
    uint8_t *p = __atomic_load_n(&region.next, __ATOMIC_ACQUIRE);
    (void)ctx;
    while ((size_t)(region.end - p) >= size) {
        if (__atomic_compare_exchange_n(&region.next, &p, p + size, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_add_fetch(&region.arenas, 1, __ATOMIC_RELAXED);
            return p;
        }
    }
    return region.saved.alloc(region.saved.ctx, size);
}

static void region_free(void *ctx, void *p, size_t size)
{
    (void)ctx;
    if ((uint8_t *)p >= region.base && (uint8_t *)p < region.end) {
        stop_helper();
        munmap(p, size);
    } else {
        region.saved.free(region.saved.ctx, p, size);
    }
}

static int same_image(void *a, void *b)
{
    Dl_info x, y;
    return dladdr(a, &x) && dladdr(b, &y) && x.dli_fbase == y.dli_fbase;
}

/* (GIL held) 1 when the region may be used, deciding once. */
static int region_usable(void)
{
    if (region.state == 0) {
        region.state = -1;
        region.get = (void (*)(arena_allocator *))dlsym(RTLD_DEFAULT, "PyObject_GetArenaAllocator");
        region.set = (void (*)(arena_allocator *))dlsym(RTLD_DEFAULT, "PyObject_SetArenaAllocator");
        if (region.get && region.set) {
            arena_allocator now;
            region.get(&now);
            if (now.alloc && now.free && same_image((void *)now.alloc, (void *)PyObject_Malloc) &&
                same_image((void *)now.free, (void *)PyObject_Malloc)) {
                void *probe = now.alloc(now.ctx, POPULATE_STEP);
                if (probe && ((uintptr_t)probe & 4095) == 0)
                    region.state = 1;
                if (probe)
                    now.free(now.ctx, probe, POPULATE_STEP);
            }
        }
    }
    return region.state == 1;
}

/* (GIL held) New arenas from a fresh region, sized for about `bytes` of new objects, until
 * region_end(); a helper thread populates it ahead of them. The region is mapped to the
 * estimate (not more: under strict overcommit a mapping is charged whole); objects past it
 * come from pymalloc's own arenas, as without it. */
static void region_begin(size_t bytes)
{
    void *r;
    size_t size;
    arena_allocator mine = {NULL, region_alloc, region_free};
    sigset_t all, old;
    if (!region_usable())
        return;
    size = (size_t)((double)bytes * ESTIMATE_SLACK) + POPULATE_STEP;
    size = size > REGION_MAX ? REGION_MAX : (size + POPULATE_STEP - 1) & ~(POPULATE_STEP - 1);
    r = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED)
        return;
    region.base = region.next = r;
    region.end = region.base + size;
    region.stop = 0;
    region.regions++;
    region.get(&region.saved);
    region.set(&mine);
    /* The helper blocks every signal (it inherits the mask it is created with), so that
     * none meant for Python's handlers is delivered to it. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    region.helper_on = pthread_create(&region.helper, NULL, populate_ahead, NULL) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* (GIL held) The default allocator back; the region's unused end unmapped. */
static void region_end(void)
{
    if (region.base == NULL)
        return;
    stop_helper();
    region.set(&region.saved);
    if (region.next < region.end)
        munmap(region.next, (size_t)(region.end - region.next));
    region.base = region.next = region.end = NULL;
}

/* What `n` bytes become as a small object (pymalloc: 16-byte size classes up to 512), or 0. */
static size_t small_object(size_t n)
{
    return n <= 512 ? (n + 15) & ~(size_t)15 : 0;
}

/* About how many bytes of small objects the batch's keys and values make. */
static size_t batch_bytes(const ws_kv_item *items, size_t n)
{
    size_t total = 0;
    for (size_t j = 0; j < n; j++) {
        unsigned kind = ((unsigned)items[j].flags >> WS_VALUE_KIND_SHIFT) & 3;
        /* bytes: 32-byte header and a NUL; str: about 48 bytes of header for ASCII */
        total += small_object((size_t)items[j].klen + ((items[j].flags & WS_KEY_STR) ? 49 : 33));
        total += small_object((size_t)items[j].vlen + (kind == WS_VALUE_STR ? 49 : 33));
    }
    return total;
}
#else
static void region_begin(size_t bytes)
{
    (void)bytes;
}
static void region_end(void)
{
}
static size_t batch_bytes(const ws_kv_item *items, size_t n)
{
    (void)items;
    (void)n;
    return 0;
}
#endif

void ws_kv_dict_arena_stats(uint64_t *regions, uint64_t *arenas, uint64_t *populated)
{
#ifdef REGION_ARENAS
    *regions = region.regions;
    *arenas = __atomic_load_n(&region.arenas, __ATOMIC_RELAXED);
    *populated = __atomic_load_n(&region.populated, __ATOMIC_RELAXED);
#else
    *regions = *arenas = *populated = 0;
#endif
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
                     uint64_t limit, int prefault)
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
        if (done == 0 && prefault) /* the first batch's objects, times the batches to come */
            region_begin(batch_bytes(items, n) / n * (size_t)limit);
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
    region_end();
out:
    PyGILState_Release(gil);
    free(stage);
    return rc;
}

#endif /* PYPY_VERSION */
