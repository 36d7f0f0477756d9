/* Last-writer-wins key/value replay. See kvreplay.h.
 *
 * An insertion-ordered hash table in the manner of CPython's dict: an entry
 * array in insertion order, and an open-addressing index (linear probing)
 * of entry numbers. A deleted key leaves a dead entry and a "dummy" slot
 * until the next rebuild, which drops dead entries and keeps the order.
 *
 * Replay is bound by memory latency (a table of millions of keys does not fit
 * in cache), so operations are decoded PIPE ahead of being applied, and the
 * slot and entry each operation will touch are prefetched in stages. Each
 * slot holds the hash beside the entry number, so a probe reads an entry only
 * when the hashes match, and the entry to prefetch is known. Each entry keeps
 * its key's first INLINE_KEY bytes, so comparing a key that short reads
 * nothing from the log; for a longer key the rest of the stored key is
 * prefetched in a third stage.
 * Large tables are placed on 2 MiB pages where Linux offers them (fewer TLB
 * misses). Prefetches are hints only: every operation is still applied in
 * log order with a full lookup.
 */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* mmap, madvise under -std=c11 */
#endif
#include "kvreplay.h"

#include <stdlib.h>
#include <string.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "le.h"
#include "walstore_format.h"
#include "yieldpoint.h"

/* A slot is (hash << 32) | (entry number + SLOT_BASE), or EMPTY or DUMMY:
 * probing compares hashes in the slots and reads an entry only on a match. */
#define SLOT_EMPTY 0u
#define SLOT_DUMMY 1u
#define SLOT_BASE 2u
#define MAX_ENTRIES (UINT32_MAX - SLOT_BASE)

#define PIPE 16 /* operations decoded ahead of the one applied; a power of two */

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)(p))
#endif

#define INLINE_KEY 16 /* the first bytes of a key, kept in its entry for the comparisons */

typedef struct {
    const uint8_t *key; /* the value follows at key + klen */
    uint32_t klen;
    uint32_t vlen;
    uint32_t hash;
    uint8_t flags; /* op flags of the last PUT: key-is-str bit, value kind */
    uint8_t live;
    uint8_t head[INLINE_KEY]; /* key[0, min(klen, INLINE_KEY)) */
} entry;

struct ws_kv {
    uint64_t seed;
    entry *entries;
    size_t n_entries; /* live and dead; each holds one slot (or none, once its dummy is reused) */
    size_t cap_entries;
    size_t n_live;
    uint64_t *slots;
    size_t mask; /* slot count - 1, a power of two minus one */
};

/* Tables of HUGE_MIN bytes or more are mapped on their own, aligned to and
 * advised to use 2 MiB pages where the system offers them (Linux THP): a
 * table of millions of keys is read at random, and with 4 KiB pages nearly
 * every access also misses the TLB. Everything else, and every other
 * system, uses calloc. Both return zeroed memory. */
#if defined(__linux__) && defined(MADV_HUGEPAGE)
#define HUGE_PAGE ((size_t)2 << 20)
#define HUGE_MIN ((size_t)4 << 20)

static size_t huge_round(size_t bytes)
{
    return (bytes + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
}

static void *table_alloc(size_t n, size_t size)
{
    size_t bytes, len, head;
    uint8_t *p;
    if (size && n > SIZE_MAX / size / 2)
        return NULL;
    bytes = n * size;
    if (bytes < HUGE_MIN)
        return calloc(n, size);
    len = huge_round(bytes);
    p = mmap(NULL, len + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    head = (HUGE_PAGE - ((uintptr_t)p & (HUGE_PAGE - 1))) & (HUGE_PAGE - 1);
    if (head)
        munmap(p, head);
    munmap(p + head + len, HUGE_PAGE - head);
    p += head;
    madvise(p, len, MADV_HUGEPAGE); /* a hint: failure leaves 4 KiB pages */
    return p;
}

static void table_free(void *p, size_t n, size_t size)
{
    if (p && n * size >= HUGE_MIN)
        munmap(p, huge_round(n * size));
    else
        free(p);
}
#else
static void *table_alloc(size_t n, size_t size)
{
    return calloc(n, size);
}

static void table_free(void *p, size_t n, size_t size)
{
    (void)n;
    (void)size;
    free(p);
}
#endif

/* A zeroed slot array whose pages are already written. The index is probed (read) before it
 * is written, and the first read of an untouched page maps the shared zero page, which the
 * first write then replaces: two faults, and with the scan-ahead thread running, a TLB
 * shootdown (an interprocessor interrupt) per page. Storing a zero in each page first makes
 * every page's first touch a write. (Rebuilds of 65,536 to 262,144 slots, from calloc's 4 KiB
 * pages: 1.0, 1.1 and 3.0 ms instead of 2.8, 6.4 and 11.1 ms.) */
static uint64_t *slots_alloc(size_t nslots)
{
    uint64_t *slots = table_alloc(nslots, sizeof *slots);
    if (slots) {
        for (size_t i = 0; i < nslots; i += 4096 / sizeof *slots)
            ((volatile uint64_t *)slots)[i] = SLOT_EMPTY;
    }
    return slots;
}

/* One decoded operation waiting in the pipeline. */
typedef struct {
    const uint8_t *key;
    uint64_t record; /* offset of its record, for errors */
    size_t cand;     /* prefetch hint: the entry that may hold this key, or SIZE_MAX */
    uint32_t klen;
    uint32_t vlen;
    uint32_t hash;
    uint8_t op;
    uint8_t flags;
} pending;

/* Walks the operations of the records in buf[pos, end). */
typedef struct {
    const uint8_t *buf;
    size_t end;
    size_t pos;      /* next record */
    size_t record;   /* current record */
    size_t op_pos;   /* next operation of the current payload */
    size_t op_end;   /* end of the current payload */
} decoder;

#define P1 0x9E3779B185EBCA87ull
#define P2 0xC2B2AE3D27D4EB4Full

static uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static uint64_t make_slot(uint32_t hash, size_t entry_number)
{
    return (uint64_t)hash << 32 | (uint32_t)(entry_number + SLOT_BASE);
}

/* The entry number in a slot holding one (its low half >= SLOT_BASE). */
static size_t slot_entry(uint64_t v)
{
    return (uint32_t)v - SLOT_BASE;
}

static uint32_t hash_key(uint64_t seed, const uint8_t *p, size_t n, unsigned kflag)
{
    uint64_t h = seed ^ ((uint64_t)n * P1) ^ kflag;
    while (n >= 8) {
        h ^= rotl64(ws_le64(p) * P2, 31) * P1;
        h = rotl64(h, 27) * P1 + 0x85EBCA77C2B2AE63ull;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t w = 0;
        for (size_t i = 0; i < n; i++)
            w |= (uint64_t)p[i] << (8 * i);
        h ^= rotl64(w * P2, 31) * P1;
        h = rotl64(h, 27) * P1 + 0x85EBCA77C2B2AE63ull;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= 0x165667B19E3779F9ull;
    h ^= h >> 32;
    return (uint32_t)h;
}

ws_kv *ws_kv_new(uint64_t seed)
{
    ws_kv *kv = calloc(1, sizeof *kv);
    if (!kv)
        return NULL;
    kv->seed = seed;
    kv->mask = 7;
    kv->cap_entries = 5;
    kv->slots = slots_alloc(kv->mask + 1);
    kv->entries = table_alloc(kv->cap_entries, sizeof *kv->entries);
    if (!kv->slots || !kv->entries) {
        ws_kv_free(kv);
        return NULL;
    }
    return kv;
}

void ws_kv_free(ws_kv *kv)
{
    if (!kv)
        return;
    table_free(kv->slots, kv->mask + 1, sizeof *kv->slots);
    table_free(kv->entries, kv->cap_entries, sizeof *kv->entries);
    free(kv);
}

uint64_t ws_kv_len(const ws_kv *kv)
{
    return kv->n_live;
}

/* Drop dead entries (keeping order) and size the index for twice the live keys.
 * On failure nothing has changed. */
static int rebuild(ws_kv *kv)
{
    size_t want = kv->n_live < 4 ? 8 : kv->n_live * 2;
    size_t nslots = 8, cap, j = 0, n = kv->n_entries;
    const entry *old = kv->entries;
    uint64_t *slots;
    entry *entries;
    if (want > MAX_ENTRIES)
        return WS_KV_ENOMEM;
    while (nslots / 3 * 2 < want)
        nslots <<= 1;
    cap = nslots / 3 * 2;
    if (cap > MAX_ENTRIES)
        cap = MAX_ENTRIES;
    slots = slots_alloc(nslots);
    entries = table_alloc(cap, sizeof *entries);
    if (!entries || !slots) {
        table_free(entries, cap, sizeof *entries);
        table_free(slots, nslots, sizeof *slots);
        return WS_KV_ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        size_t s;
        if (i + PIPE < n)
            PREFETCH(&slots[old[i + PIPE].hash & (nslots - 1)]);
        if (!old[i].live)
            continue;
        s = old[i].hash & (nslots - 1);
        while (slots[s] != SLOT_EMPTY)
            s = (s + 1) & (nslots - 1);
        slots[s] = make_slot(old[i].hash, j);
        entries[j++] = old[i];
    }
    table_free(kv->entries, kv->cap_entries, sizeof *kv->entries);
    table_free(kv->slots, kv->mask + 1, sizeof *kv->slots);
    kv->entries = entries;
    kv->slots = slots;
    kv->n_entries = j;
    kv->cap_entries = cap;
    kv->mask = nslots - 1;
    return WS_KV_OK;
}

/* The entry's key equals key[0, klen) (klen == e->klen): its head from the entry, the rest
 * (keys longer than INLINE_KEY) from the log. */
static int same_key(const entry *e, const uint8_t *key, uint32_t klen)
{
    size_t n = klen < INLINE_KEY ? klen : INLINE_KEY;
    return memcmp(e->head, key, n) == 0 && (klen <= INLINE_KEY || memcmp(e->key + n, key + n, klen - n) == 0);
}

/* The slot holding the key (*found = 1), or the slot to insert it in (*found = 0). */
static size_t lookup(const ws_kv *kv, const pending *p, int *found)
{
    size_t s = p->hash & kv->mask, reuse = SIZE_MAX;
    unsigned kflag = p->flags & WS_KEY_STR;
    for (;;) {
        uint64_t v = kv->slots[s];
        if (v == SLOT_EMPTY) {
            *found = 0;
            return reuse != SIZE_MAX ? reuse : s;
        }
        if (v == SLOT_DUMMY) {
            if (reuse == SIZE_MAX)
                reuse = s;
        } else if ((uint32_t)(v >> 32) == p->hash) {
            const entry *e = &kv->entries[slot_entry(v)];
            if (e->klen == p->klen && (unsigned)(e->flags & WS_KEY_STR) == kflag &&
                same_key(e, p->key, p->klen)) {
                *found = 1;
                return s;
            }
        }
        s = (s + 1) & kv->mask;
    }
}

static int put(ws_kv *kv, const pending *p)
{
    int found;
    size_t s = lookup(kv, p, &found);
    entry *e;
    if (found) {
        e = &kv->entries[slot_entry(kv->slots[s])];
        e->key = p->key; /* equal bytes; its value follows it */
        e->vlen = p->vlen;
        e->flags = p->flags;
        return WS_KV_OK;
    }
    if (kv->n_entries == kv->cap_entries) {
        int rc = rebuild(kv);
        if (rc)
            return rc;
        if (kv->n_entries == kv->cap_entries)
            return WS_KV_ENOMEM;
        s = lookup(kv, p, &found);
    }
    e = &kv->entries[kv->n_entries];
    e->key = p->key;
    memcpy(e->head, p->key, p->klen < INLINE_KEY ? p->klen : INLINE_KEY);
    e->klen = p->klen;
    e->vlen = p->vlen;
    e->hash = p->hash;
    e->flags = p->flags;
    e->live = 1;
    kv->slots[s] = make_slot(p->hash, kv->n_entries);
    kv->n_entries++;
    kv->n_live++;
    return WS_KV_OK;
}

static void del_key(ws_kv *kv, const pending *p)
{
    int found;
    size_t s = lookup(kv, p, &found);
    if (!found)
        return;
    kv->entries[slot_entry(kv->slots[s])].live = 0;
    kv->slots[s] = SLOT_DUMMY;
    kv->n_live--;
}

/* The next operation: 1 and *out filled, 0 at the end of the range, or
 * -WS_KV_E* (with d->record at the offending record). Checks every frame and
 * operation length against the range, as reader.check_ops does, then CALL. */
static int next_op(decoder *d, pending *out)
{
    const uint8_t *p;
    unsigned op, flags;
    uint32_t klen, vlen;
    while (d->op_pos >= d->op_end) {
        uint32_t length;
        unsigned type;
        uint64_t padlen;
        if (d->pos >= d->end)
            return 0;
        d->record = d->pos;
        if (d->end - d->pos < WS_FRAME_HEADER_SIZE)
            return -WS_KV_EFRAME;
        length = ws_le32(d->buf + d->pos + 4);
        type = d->buf[d->pos + 8];
        padlen = WS_PADDED((uint64_t)length);
        if (length > WS_MAX_PAYLOAD || padlen > d->end - d->pos - WS_FRAME_HEADER_SIZE)
            return -WS_KV_EFRAME;
        if (type == WS_REC_COMMIT || type == WS_REC_SNAPSHOT_DATA) {
            d->op_pos = d->pos + WS_FRAME_HEADER_SIZE;
            d->op_end = d->op_pos + length;
        } else if (type != WS_REC_CLOSE && type != WS_REC_SNAPSHOT_END) {
            return -WS_KV_ETYPE;
        }
        d->pos += WS_FRAME_HEADER_SIZE + (size_t)padlen;
    }
    if (d->op_end - d->op_pos < WS_OP_HEADER_SIZE)
        return -WS_KV_EOPS;
    p = d->buf + d->op_pos;
    op = p[0];
    flags = p[1];
    if (op < WS_OP_PUT || op > WS_OP_CALL || ws_le16(p + 2))
        return -WS_KV_EOPS;
    if ((flags & ~(unsigned)(WS_KEY_STR | WS_VALUE_KIND_MASK)) || ((flags >> WS_VALUE_KIND_SHIFT) & 3) == 3)
        return -WS_KV_EOPS;
    klen = ws_le32(p + 4);
    vlen = ws_le32(p + 8);
    d->op_pos += WS_OP_HEADER_SIZE;
    if (klen > d->op_end - d->op_pos || vlen > d->op_end - d->op_pos - klen)
        return -WS_KV_EOPS;
    if (op == WS_OP_CALL)
        return -WS_KV_ECALL;
    out->key = d->buf + d->op_pos;
    out->record = d->record;
    out->klen = klen;
    out->vlen = vlen;
    out->op = (uint8_t)op;
    out->flags = (uint8_t)flags;
    d->op_pos += (size_t)klen + vlen;
    return 1;
}

#define PROBE_AHEAD 8 /* slots a prefetch stage looks at for a matching hash */

/* Stage 2: the slots are (likely) cached; note the entry of the first slot with
 * the same hash (if any, within PROBE_AHEAD slots) and prefetch it. */
static void prefetch_entry(const ws_kv *kv, pending *p)
{
    size_t s = p->hash & kv->mask;
    p->cand = SIZE_MAX;
    for (int i = 0; i < PROBE_AHEAD; i++, s = (s + 1) & kv->mask) {
        uint64_t v = kv->slots[s];
        if (v == SLOT_EMPTY)
            return;
        if ((uint32_t)v >= SLOT_BASE && (uint32_t)(v >> 32) == p->hash) {
            p->cand = slot_entry(v);
            if (p->cand < kv->n_entries)
                PREFETCH(&kv->entries[p->cand]);
            return;
        }
    }
}

/* Stage 3, for keys longer than INLINE_KEY only (shorter ones are compared in the entry):
 * the entry is (likely) cached; prefetch the rest of its stored key for the comparison.
 * The table may have changed since stage 2 (even been rebuilt): a hint only. */
static void prefetch_key(const ws_kv *kv, const pending *p)
{
    if (p->cand < kv->n_entries)
        PREFETCH(kv->entries[p->cand].key);
}

int ws_kv_apply_range(ws_kv *kv, const uint8_t *buf, size_t size, size_t start, size_t end,
                      uint64_t *err_offset)
{
    pending ring[PIPE];
    unsigned head = 0, n = 0;
    int error = WS_KV_OK, more = 1;
    decoder d;
    *err_offset = start;
    if (start > end || end > size)
        return WS_KV_ERANGE;
    d.buf = buf;
    d.end = end;
    d.pos = d.record = start;
    d.op_pos = d.op_end = 0;
    ws_yield_point yp;
    ws_yield_begin(&yp);
    for (;;) {
        ws_yield_step(&yp, 256);
        while (more && n < PIPE) {
            pending *p = &ring[(head + n) & (PIPE - 1)];
            int r = next_op(&d, p);
            if (r <= 0) {
                more = 0;
                if (r < 0) {
                    error = -r;
                    *err_offset = d.record;
                }
                break;
            }
            p->hash = hash_key(kv->seed, p->key, p->klen, p->flags & WS_KEY_STR);
            p->cand = SIZE_MAX;
            PREFETCH(&kv->slots[p->hash & kv->mask]);
            n++;
        }
        if (n == 0)
            break;
        if (n > PIPE / 2)
            prefetch_entry(kv, &ring[(head + PIPE / 2) & (PIPE - 1)]);
        if (n > PIPE / 4 && ring[(head + PIPE / 4) & (PIPE - 1)].klen > INLINE_KEY)
            prefetch_key(kv, &ring[(head + PIPE / 4) & (PIPE - 1)]);
        if (ring[head].op == WS_OP_PUT) {
            int rc = put(kv, &ring[head]);
            if (rc) {
                *err_offset = ring[head].record;
                return rc;
            }
        } else {
            del_key(kv, &ring[head]);
        }
        head = (head + 1) & (PIPE - 1);
        n--;
    }
    return error;
}

static void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static int same_run(const entry *a, const entry *b)
{
    return a->klen == b->klen && a->vlen == b->vlen && a->flags == b->flags;
}

void ws_kv_export_sizes(const ws_kv *kv, uint64_t *blob_bytes, uint64_t *runs)
{
    const entry *prev = NULL;
    uint64_t bytes = 0, n = 0;
    for (size_t i = 0; i < kv->n_entries; i++) {
        const entry *e = &kv->entries[i];
        if (!e->live)
            continue;
        bytes += (uint64_t)e->klen + e->vlen;
        if (!prev || !same_run(prev, e))
            n++;
        prev = e;
    }
    *blob_bytes = bytes;
    *runs = n;
}

uint64_t ws_kv_ops_bytes_from(const ws_kv *kv, uint64_t cursor, uint64_t limit)
{
    uint64_t bytes = 0;
    for (uint64_t i = cursor; i < kv->n_entries && bytes <= limit; i++) {
        const entry *e = &kv->entries[i];
        if (e->live)
            bytes += WS_OP_HEADER_SIZE + (uint64_t)e->klen + e->vlen;
    }
    return bytes;
}

int64_t ws_kv_export(const ws_kv *kv, uint8_t *blob, size_t blob_size, uint64_t *runs, size_t runs_cap)
{
    const entry *prev = NULL;
    size_t at = 0, n = 0;
    uint64_t *run = NULL;
    for (size_t i = 0; i < kv->n_entries; i++) {
        const entry *e = &kv->entries[i];
        size_t len = (size_t)e->klen + e->vlen;
        if (i + PIPE < kv->n_entries)
            PREFETCH(kv->entries[i + PIPE].key);
        if (!e->live)
            continue;
        if (len > blob_size - at)
            return -1;
        if (!prev || !same_run(prev, e)) {
            if (n == runs_cap)
                return -1;
            run = runs + n * WS_KV_RUN_FIELDS;
            run[0] = at;
            run[1] = 0;
            run[2] = e->klen;
            run[3] = e->vlen;
            run[4] = e->flags;
            n++;
        }
        run[1]++;
        if (len)
            memcpy(blob + at, e->key, len);
        at += len;
        prev = e;
    }
    return (int64_t)n;
}

int64_t ws_kv_snapshot_chunk(const ws_kv *kv, uint64_t *cursor, uint64_t chunk_bytes, uint8_t *out,
                             size_t out_size, uint64_t *need)
{
    size_t i = *cursor < kv->n_entries ? (size_t)*cursor : kv->n_entries;
    size_t at = 0;
    ws_yield_point yp;
    *need = 0;
    ws_yield_begin(&yp);
    for (; i < kv->n_entries; i++) {
        const entry *e = &kv->entries[i];
        uint64_t len = (uint64_t)e->klen + e->vlen, oplen = WS_OP_HEADER_SIZE + len;
        ws_yield_step(&yp, 256);
        uint8_t *p;
        if (i + PIPE < kv->n_entries)
            PREFETCH(kv->entries[i + PIPE].key);
        if (!e->live)
            continue;
        if (at && oplen > chunk_bytes - at) /* 0 < at < chunk_bytes here: no underflow */
            break;
        if (oplen > out_size - at) {
            if (at)
                break;
            *need = oplen;
            *cursor = i;
            return -1;
        }
        p = out + at;
        p[0] = WS_OP_PUT;
        p[1] = e->flags;
        p[2] = 0;
        p[3] = 0;
        put_le32(p + 4, e->klen);
        put_le32(p + 8, e->vlen);
        if (len)
            memcpy(p + WS_OP_HEADER_SIZE, e->key, (size_t)len);
        at += (size_t)oplen;
        if (at >= chunk_bytes) {
            i++;
            break;
        }
    }
    *cursor = i;
    return (int64_t)at;
}

size_t ws_kv_items(const ws_kv *kv, uint64_t *cursor, ws_kv_item *out, size_t cap)
{
    size_t i = *cursor < kv->n_entries ? (size_t)*cursor : kv->n_entries, n = 0;
    for (; i < kv->n_entries && n < cap; i++) {
        const entry *e = &kv->entries[i];
        if (!e->live)
            continue;
        out[n].key = e->key;
        out[n].entry = i;
        out[n].klen = e->klen;
        out[n].vlen = e->vlen;
        out[n].flags = e->flags;
        n++;
    }
    *cursor = i;
    return n;
}
