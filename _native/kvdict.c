/* The replayed state as a Python dict, built in C. See kvdict.h.
 *
 * Only the CPython C API's stable ABI is called (Py_LIMITED_API, as the cffi
 * module itself), and only on CPython: elsewhere the function is a stub that
 * says so. Beyond it, the dict's memory layout is read, for known versions
 * after a check, to prefetch its table ("the dict's table read ahead of the
 * inserts" below). cffi calls C functions with the GIL released, so this one
 * takes it back (PyGILState_Ensure) for as long as it touches Python objects.
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
                     int flags)
{
    (void)flags;
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

int ws_kv_dict_layout(int layout, uint64_t *batches)
{
    (void)layout;
    *batches = 0;
    return -1;
}

#else

#define BATCH 256 /* items fetched from the table per ws_kv_items call */
#define STAGE_ITEM 256 /* items of at most this many bytes (key and value) are staged */
#define STAGE_AHEAD 16 /* items whose bytes are prefetched ahead of the one copied */

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)(p))
#endif

static void prefetch_item(const ws_kv_item *it)
{
    size_t len = (size_t)it->klen + it->vlen;
    PREFETCH(it->key);
    if (len > 1)
        PREFETCH(it->key + len - 1);
}

/* Where each item's bytes are read from: small items are first copied, the
 * whole batch in one tight loop with the bytes STAGE_AHEAD items on
 * prefetched, into `stage` (BATCH * STAGE_ITEM bytes, or NULL), so their cache
 * and TLB misses in the maps overlap instead of each stalling between object
 * allocations. */
static void stage_batch(const ws_kv_item *items, size_t n, const uint8_t **src, uint8_t *stage)
{
    for (size_t j = 0; j < n && j < STAGE_AHEAD; j++)
        prefetch_item(&items[j]);
    for (size_t j = 0; j < n; j++) {
        size_t len = (size_t)items[j].klen + items[j].vlen;
        if (j + STAGE_AHEAD < n)
            prefetch_item(&items[j + STAGE_AHEAD]);
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

/* ---- the dict's table read ahead of the inserts --------------------------------------------
 *
 * Inserting a million new keys into a dict is bound by memory latency: each insert probes the
 * dict's index array, and the entry a used slot points to, at random in tables of tens of MB,
 * and CPython reads them only as the insert runs, one miss after the other. The floor
 * (dict(zip(keys, values))) pays the same misses. Here a batch's objects are made and hashed
 * first, then the first PROBE_AHEAD slots of each key's probe sequence and the entries they
 * hold are prefetched, a pass over the batch per slot, and only then are the keys inserted, in
 * order, with PyDict_SetItem: the batch's misses overlap.
 *
 * This needs the layout of CPython's dict (PyDictObject and its keys object), which no API
 * gives. It is used only for the versions whose layout is known (3.10, and 3.11 to 3.13, read
 * from Py_GetVersion at run time, since an abi3 module may be loaded by a later Python), on
 * 64-bit builds with the GIL and without debug options, and only after a probe has found, by
 * CPython's own probe sequence over that layout, every key of four test dicts (bytes and str
 * keys; 1- and 2-byte indices) at its own entry, with its hash. Otherwise nothing is
 * prefetched. What is read: the dict's keys pointer, its keys object's header, and index slots
 * and entries within the sizes that header gives, always of the table the dict holds at that
 * moment (a resize frees the old one). A prefetch is a hint: it never faults. The inserts are
 * PyDict_SetItem's, unchanged. */
#if SIZE_MAX == UINT64_MAX && !defined(Py_DEBUG) && !defined(Py_TRACE_REFS) && !defined(Py_GIL_DISABLED) && \
    (defined(__GNUC__) || defined(__clang__))
#define TABLE_PREFETCH 1
#define PROBE_AHEAD 2 /* slots of each key's probe read ahead, with the entries they hold */

/* 0: not checked yet; -1: not used; 10: 3.10's layout; 11: that of 3.11 to 3.13. Set once
 * (atomically: with a GIL per interpreter, 3.12 on, two may decide at once, alike). */
static int dict_layout;
static uint64_t prefetched_batches; /* batches whose table was read ahead, for the tests */

typedef struct {
    const uint8_t *keys; /* the keys object this view was taken from */
    int layout;
    const uint8_t *indices;
    const uint8_t *entries;
    size_t mask;
    Py_ssize_t nentries;
    unsigned ix_shift;   /* log2 of an index's bytes */
    unsigned entry_size; /* 24 (hash, key, value) or 16 (key, value: str keys from 3.11 on) */
} table_view;

/* The keys object the dict holds now (PyDictObject: head, ma_used, ma_version_tag, ma_keys, ma_values). */
static const uint8_t *dict_keys(PyObject *dict)
{
    return *(const uint8_t *const *)((const uint8_t *)dict + 32);
}

/* (GIL held) A view of the dict's combined table as `layout` (10 or 11) has it; 0 if it has
 * none (split), or if the header is not one that layout can have. */
static int view_table(PyObject *dict, int layout, table_view *t)
{
    const uint8_t *keys = dict_keys(dict);
    if (*(void *const *)((const uint8_t *)dict + 40) != NULL || keys == NULL)
        return 0;
    t->keys = keys;
    t->layout = layout;
    if (layout == 10) { /* dk_refcnt, dk_size, dk_lookup, dk_usable, dk_nentries, dk_indices */
        size_t size = *(const size_t *)(keys + 8);
        if (size < 8 || (size & (size - 1)) != 0)
            return 0;
        t->ix_shift = size <= 0xff ? 0 : size <= 0xffff ? 1 : size <= 0xffffffffu ? 2 : 3;
        t->mask = size - 1;
        t->indices = keys + 40;
        t->entries = t->indices + (size << t->ix_shift);
        t->entry_size = 24;
        t->nentries = *(const Py_ssize_t *)(keys + 32);
    } else { /* dk_refcnt, dk_log2_size, dk_log2_index_bytes, dk_kind, dk_version, dk_usable, dk_nentries */
        unsigned log2_size = keys[8], log2_index_bytes = keys[9], kind = keys[10];
        if (kind > 1 || log2_size < 3 || log2_size > 40 || log2_index_bytes < log2_size ||
            log2_index_bytes > log2_size + 3)
            return 0;
        t->mask = ((size_t)1 << log2_size) - 1;
        t->ix_shift = log2_index_bytes - log2_size;
        t->indices = keys + 32;
        t->entries = t->indices + ((size_t)1 << log2_index_bytes);
        t->entry_size = kind == 0 ? 24 : 16;
        t->nentries = *(const Py_ssize_t *)(keys + 24);
    }
    return 1;
}

/* (GIL held) 1 if the dict still holds a table of the view's address and size (a table at
 * the same address with the same mask has its entries where the view says). */
static int same_table(PyObject *dict, const table_view *t)
{
    table_view now;
    return dict_keys(dict) == t->keys && view_table(dict, t->layout, &now) && now.mask == t->mask &&
           now.entry_size == t->entry_size;
}

static const void *slot_address(const table_view *t, Py_hash_t hash)
{
    return t->indices + (((size_t)hash & t->mask) << t->ix_shift);
}

/* The entry number in slot `i`: >= 0, or -1 (empty) or -2 (deleted). */
static Py_ssize_t slot_index(const table_view *t, size_t i)
{
    switch (t->ix_shift) {
    case 0:
        return ((const int8_t *)t->indices)[i];
    case 1:
        return ((const int16_t *)t->indices)[i];
    case 2:
        return ((const int32_t *)t->indices)[i];
    default:
        return ((const int64_t *)t->indices)[i];
    }
}

/* The entry slot `i` holds, or NULL (an empty or deleted slot). */
static const uint8_t *entry_at(const table_view *t, size_t i)
{
    Py_ssize_t ix = slot_index(t, i);
    return ix >= 0 && ix < t->nentries ? t->entries + (size_t)ix * t->entry_size : NULL;
}

/* The key object an entry holds (after the hash, in 24-byte entries). */
static PyObject *entry_key(const table_view *t, const uint8_t *entry)
{
    return *(PyObject *const *)(entry + (t->entry_size == 24 ? 8 : 0));
}

/* (GIL held) 1 if every key of `dict` (made from `keys`, in order) is where the layout says:
 * found by CPython's probe sequence (perturb >>= 5; i = i * 5 + perturb + 1) at its own entry,
 * with its hash where entries hold one. */
static int layout_holds(PyObject *dict, PyObject *keys, int layout)
{
    table_view t;
    Py_ssize_t n = PyList_Size(keys);
    if (!view_table(dict, layout, &t) || t.nentries != n || PyDict_Size(dict) != n)
        return 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *key = PyList_GetItem(keys, k);
        Py_hash_t hash = PyObject_Hash(key);
        size_t perturb = (size_t)hash, i = (size_t)hash & t.mask, probes = 0;
        const uint8_t *entry = t.entries + (size_t)k * t.entry_size;
        if (hash == -1 || entry_key(&t, entry) != key || (t.entry_size == 24 && *(const Py_hash_t *)entry != hash))
            return 0;
        while (slot_index(&t, i) != k) {
            if (slot_index(&t, i) == -1 || ++probes > t.mask)
                return 0;
            perturb >>= 5;
            i = (i * 5 + perturb + 1) & t.mask;
        }
    }
    return 1;
}

/* (GIL held) 1 if a dict of `n` new keys (bytes, or str when `text`) passes layout_holds. */
static int layout_sample_holds(Py_ssize_t n, int text, int layout)
{
    PyObject *dict = PyDict_New(), *keys = PyList_New(0);
    int ok = dict && keys;
    for (Py_ssize_t k = 0; ok && k < n; k++) {
        char buf[40];
        int len = snprintf(buf, sizeof buf, "walstore-dict-layout-%zd", k);
        PyObject *key = make((const uint8_t *)buf, (uint32_t)len, text);
        ok = key && PyDict_SetItem(dict, key, Py_None) == 0 && PyList_Append(keys, key) == 0;
        Py_XDECREF(key);
    }
    ok = ok && layout_holds(dict, keys, layout);
    Py_XDECREF(dict);
    Py_XDECREF(keys);
    if (PyErr_Occurred())
        PyErr_Clear();
    return ok;
}

/* (GIL held) 1 if `layout` (10 or 11) holds for four test dicts: 5 keys (1-byte indices) and
 * 300 keys (2-byte indices), bytes and str. A wrong layout is caught before anything is read
 * through it: view_table refuses the header it would see. */
static int layout_checks(int layout)
{
    return layout_sample_holds(5, 0, layout) && layout_sample_holds(300, 0, layout) &&
           layout_sample_holds(5, 1, layout) && layout_sample_holds(300, 1, layout);
}

/* (GIL held) The layout in use (10 or 11), or 0 when the dict's table is not read ahead;
 * decided once. */
static int layout_known(void)
{
    int known = __atomic_load_n(&dict_layout, __ATOMIC_ACQUIRE);
    if (known == 0) {
        int major = 0, minor = 0, layout = -1;
        if (sscanf(Py_GetVersion(), "%d.%d", &major, &minor) == 2 && major == 3 && minor >= 10 && minor <= 13)
            layout = minor == 10 ? 10 : 11;
        known = layout > 0 && layout_checks(layout) ? layout : -1;
        __atomic_store_n(&dict_layout, known, __ATOMIC_RELEASE);
    }
    return known > 0 ? known : 0;
}
#endif

/* One batch: its keys and values made, the keys hashed (the hash is cached in the key, for the
 * insert), then inserted in order; with `prefetch`, the dict's table read ahead in between
 * (above). Returns how many items are in the dict: n, or fewer when making or inserting the
 * next one failed (its exception cleared). Every reference made is released or owned by the
 * dict or the list. */
static size_t insert_batch(PyObject *dict, PyObject *codec_keys, const ws_kv_item *items, const uint8_t *const *src,
                           size_t n, int prefetch)
{
    PyObject *keys[BATCH], *values[BATCH];
    Py_hash_t hashes[BATCH];
    size_t made = 0, done = 0;
#ifdef TABLE_PREFETCH
    table_view t;
    const uint8_t *ahead[BATCH];
    int layout = prefetch ? layout_known() : 0;
    int view = layout && view_table(dict, layout, &t);
    if (view)
        __atomic_add_fetch(&prefetched_batches, 1, __ATOMIC_RELAXED);
#else
    (void)prefetch;
#endif
    for (; made < n; made++) {
        const ws_kv_item *it = &items[made];
        unsigned kind = ((unsigned)it->flags >> WS_VALUE_KIND_SHIFT) & 3;
        keys[made] = make(src[made], it->klen, it->flags & WS_KEY_STR);
        if (!keys[made]) {
            PyErr_Clear(); /* before the inserts below */
            break;
        }
        values[made] = make(src[made] + it->klen, it->vlen, kind == WS_VALUE_STR);
        hashes[made] = values[made] ? PyObject_Hash(keys[made]) : -1; /* cached in the key for the insert */
        if (hashes[made] == -1) {
            PyErr_Clear();
            Py_XDECREF(values[made]);
            Py_DECREF(keys[made]);
            break;
        }
#ifdef TABLE_PREFETCH
        if (view)
            PREFETCH(slot_address(&t, hashes[made]));
#endif
    }
#ifdef TABLE_PREFETCH
    if (view) { /* nothing inserted since the view was taken: the same table, its slots now in cache */
        size_t slot[BATCH], perturb[BATCH];
        uint8_t more[BATCH]; /* the probe goes on at slot[j] */
        for (size_t j = 0; j < made; j++) {
            slot[j] = (size_t)hashes[j] & t.mask;
            perturb[j] = (size_t)hashes[j];
            more[j] = 1;
        }
        /* A pass per probe step: each slot read was prefetched a pass before (the first ones
         * as the batch's objects were made); a used slot's entry is prefetched, and the
         * probe's next slot. */
        for (int level = 0; level < PROBE_AHEAD; level++) {
            for (size_t j = 0; j < made; j++) {
                const uint8_t *entry;
                if (!more[j])
                    continue;
                entry = entry_at(&t, slot[j]);
                if (level == 0)
                    ahead[j] = entry;
                if (!entry) {
                    more[j] = 0;
                    continue;
                }
                PREFETCH(entry);
                perturb[j] >>= 5;
                slot[j] = (slot[j] * 5 + perturb[j] + 1) & t.mask;
                PREFETCH(t.indices + (slot[j] << t.ix_shift));
            }
        }
    }
#endif
    for (; done < made; done++) {
        unsigned kind = ((unsigned)items[done].flags >> WS_VALUE_KIND_SHIFT) & 3;
        int rc;
#ifdef TABLE_PREFETCH
        /* Entries of str keys hold no hash: the probe reads the stored key. Fetch it a few inserts
         * ahead, from its entry (now in cache), while the dict still holds the viewed table. */
        if (view && t.entry_size == 16 && done + 8 < made && ahead[done + 8] && same_table(dict, &t))
            PREFETCH(entry_key(&t, ahead[done + 8]));
#endif
        rc = PyDict_SetItem(dict, keys[done], values[done]);
        if (rc == 0 && kind == WS_VALUE_CODEC)
            rc = PyList_Append(codec_keys, keys[done]);
        if (rc < 0) {
            PyErr_Clear();
            break;
        }
        Py_DECREF(values[done]);
        Py_DECREF(keys[done]);
    }
    for (size_t j = done; j < made; j++) {
        Py_DECREF(values[j]);
        Py_DECREF(keys[j]);
    }
    return done;
}

int ws_kv_build_dict(const ws_kv *kv, uintptr_t dict_addr, uintptr_t codec_keys_addr, uint64_t *cursor,
                     uint64_t limit, int flags)
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
        size_t want = limit - done < BATCH ? (size_t)(limit - done) : BATCH, n, inserted;
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
        if (done == 0 && (flags & WS_KV_DICT_PREFAULT)) /* the first batch's objects, times the batches to come */
            region_begin(batch_bytes(items, n) / n * (size_t)limit);
        stage_batch(items, n, src, stage);
        inserted = insert_batch(dict, codec_keys, items, src, n, flags & WS_KV_DICT_PREFETCH);
        if (inserted < n) {
            *cursor = items[inserted].entry; /* the caller redoes this one in Python */
            rc = WS_KV_DICT_FAILED;
            break;
        }
        done += n;
    }
    region_end();
out:
    PyGILState_Release(gil);
    free(stage);
    return rc;
}

int ws_kv_dict_layout(int layout, uint64_t *batches)
{
    int rc = -1;
    PyGILState_STATE gil = PyGILState_Ensure();
#ifdef TABLE_PREFETCH
    if (layout == 0) {
        int known = layout_known();
        rc = known ? known : -1;
    } else if (layout == 10 || layout == 11) {
        rc = layout_checks(layout);
    }
    *batches = __atomic_load_n(&prefetched_batches, __ATOMIC_RELAXED);
#else
    (void)layout;
    *batches = 0;
#endif
    PyGILState_Release(gil);
    return rc;
}

#endif /* PYPY_VERSION */
