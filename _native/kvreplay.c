/* Last-writer-wins key/value replay. See kvreplay.h.
 *
 * An insertion-ordered hash table in the manner of CPython's dict: an entry
 * array in insertion order, and an open-addressing index (linear probing)
 * of entry numbers. A deleted key leaves a dead entry and a "dummy" slot
 * until the next rebuild, which drops dead entries and keeps the order.
 */
#include "kvreplay.h"

#include <stdlib.h>

#include "le.h"
#include "walstore_format.h"

#define SLOT_EMPTY 0u
#define SLOT_DUMMY 1u
#define SLOT_BASE 2u /* slot value = entry number + SLOT_BASE */
#define MAX_ENTRIES (UINT32_MAX - SLOT_BASE)

typedef struct {
    const uint8_t *key; /* the value follows at key + klen */
    uint32_t klen;
    uint32_t vlen;
    uint32_t hash;
    uint8_t flags; /* op flags of the last PUT: key-is-str bit, value kind */
    uint8_t live;
} entry;

struct ws_kv {
    uint64_t seed;
    entry *entries;
    size_t n_entries; /* live and dead; each holds one slot (or none, once its dummy is reused) */
    size_t cap_entries;
    size_t n_live;
    uint32_t *slots;
    size_t mask; /* slot count - 1, a power of two minus one */
};

#define P1 0x9E3779B185EBCA87ull
#define P2 0xC2B2AE3D27D4EB4Full

static uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
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
    kv->slots = calloc(kv->mask + 1, sizeof *kv->slots);
    kv->entries = malloc(kv->cap_entries * sizeof *kv->entries);
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
    free(kv->slots);
    free(kv->entries);
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
    size_t nslots = 8, cap, j = 0;
    uint32_t *slots;
    entry *entries;
    if (want > MAX_ENTRIES)
        return WS_KV_ENOMEM;
    while (nslots / 3 * 2 < want)
        nslots <<= 1;
    cap = nslots / 3 * 2;
    if (cap > MAX_ENTRIES)
        cap = MAX_ENTRIES;
    slots = calloc(nslots, sizeof *slots);
    entries = malloc(cap * sizeof *entries);
    if (!entries || !slots) {
        free(entries);
        free(slots);
        return WS_KV_ENOMEM;
    }
    for (size_t i = 0; i < kv->n_entries; i++) {
        if (!kv->entries[i].live)
            continue;
        size_t s = kv->entries[i].hash & (nslots - 1);
        while (slots[s] != SLOT_EMPTY)
            s = (s + 1) & (nslots - 1);
        slots[s] = (uint32_t)(j + SLOT_BASE);
        entries[j++] = kv->entries[i];
    }
    free(kv->entries);
    free(kv->slots);
    kv->entries = entries;
    kv->slots = slots;
    kv->n_entries = j;
    kv->cap_entries = cap;
    kv->mask = nslots - 1;
    return WS_KV_OK;
}

/* The slot holding the key (*found = 1), or the slot to insert it in (*found = 0). */
static size_t lookup(const ws_kv *kv, const uint8_t *key, uint32_t klen, unsigned kflag, uint32_t hash,
                     int *found)
{
    size_t s = hash & kv->mask, reuse = SIZE_MAX;
    for (;;) {
        uint32_t v = kv->slots[s];
        if (v == SLOT_EMPTY) {
            *found = 0;
            return reuse != SIZE_MAX ? reuse : s;
        }
        if (v == SLOT_DUMMY) {
            if (reuse == SIZE_MAX)
                reuse = s;
        } else {
            const entry *e = &kv->entries[v - SLOT_BASE];
            if (e->hash == hash && e->klen == klen && (unsigned)(e->flags & WS_KEY_STR) == kflag &&
                memcmp(e->key, key, klen) == 0) {
                *found = 1;
                return s;
            }
        }
        s = (s + 1) & kv->mask;
    }
}

static int put(ws_kv *kv, const uint8_t *key, uint32_t klen, uint32_t vlen, unsigned flags)
{
    unsigned kflag = flags & WS_KEY_STR;
    uint32_t hash = hash_key(kv->seed, key, klen, kflag);
    int found;
    size_t s = lookup(kv, key, klen, kflag, hash, &found);
    entry *e;
    if (found) {
        e = &kv->entries[kv->slots[s] - SLOT_BASE];
        e->key = key; /* equal bytes; its value follows it */
        e->vlen = vlen;
        e->flags = (uint8_t)flags;
        return WS_KV_OK;
    }
    if (kv->n_entries == kv->cap_entries) {
        int rc = rebuild(kv);
        if (rc)
            return rc;
        if (kv->n_entries == kv->cap_entries)
            return WS_KV_ENOMEM;
        s = lookup(kv, key, klen, kflag, hash, &found);
    }
    e = &kv->entries[kv->n_entries];
    e->key = key;
    e->klen = klen;
    e->vlen = vlen;
    e->hash = hash;
    e->flags = (uint8_t)flags;
    e->live = 1;
    kv->slots[s] = (uint32_t)(kv->n_entries + SLOT_BASE);
    kv->n_entries++;
    kv->n_live++;
    return WS_KV_OK;
}

static void del_key(ws_kv *kv, const uint8_t *key, uint32_t klen, unsigned flags)
{
    unsigned kflag = flags & WS_KEY_STR;
    uint32_t hash = hash_key(kv->seed, key, klen, kflag);
    int found;
    size_t s = lookup(kv, key, klen, kflag, hash, &found);
    if (!found)
        return;
    kv->entries[kv->slots[s] - SLOT_BASE].live = 0;
    kv->slots[s] = SLOT_DUMMY;
    kv->n_live--;
}

/* Apply the operations of one payload (the checks of reader.check_ops, then CALL). */
static int apply_ops(ws_kv *kv, const uint8_t *p, size_t len)
{
    size_t pos = 0;
    while (pos < len) {
        unsigned op, flags;
        uint32_t klen, vlen;
        if (len - pos < WS_OP_HEADER_SIZE)
            return WS_KV_EOPS;
        op = p[pos];
        flags = p[pos + 1];
        if (op < WS_OP_PUT || op > WS_OP_CALL || ws_le16(p + pos + 2))
            return WS_KV_EOPS;
        if ((flags & ~(unsigned)(WS_KEY_STR | WS_VALUE_KIND_MASK)) || ((flags >> WS_VALUE_KIND_SHIFT) & 3) == 3)
            return WS_KV_EOPS;
        klen = ws_le32(p + pos + 4);
        vlen = ws_le32(p + pos + 8);
        pos += WS_OP_HEADER_SIZE;
        if (klen > len - pos || vlen > len - pos - klen)
            return WS_KV_EOPS;
        if (op == WS_OP_CALL)
            return WS_KV_ECALL;
        if (op == WS_OP_PUT) {
            int rc = put(kv, p + pos, klen, vlen, flags);
            if (rc)
                return rc;
        } else {
            del_key(kv, p + pos, klen, flags);
        }
        pos += (size_t)klen + vlen;
    }
    return WS_KV_OK;
}

int ws_kv_apply_range(ws_kv *kv, const uint8_t *buf, size_t size, size_t start, size_t end,
                      uint64_t *err_offset)
{
    size_t pos = start;
    *err_offset = start;
    if (start > end || end > size)
        return WS_KV_ERANGE;
    while (pos < end) {
        uint32_t length;
        unsigned type;
        uint64_t padlen;
        *err_offset = pos;
        if (end - pos < WS_FRAME_HEADER_SIZE)
            return WS_KV_EFRAME;
        length = ws_le32(buf + pos + 4);
        type = buf[pos + 8];
        padlen = WS_PADDED((uint64_t)length);
        if (length > WS_MAX_PAYLOAD || padlen > end - pos - WS_FRAME_HEADER_SIZE)
            return WS_KV_EFRAME;
        if (type == WS_REC_COMMIT || type == WS_REC_SNAPSHOT_DATA) {
            int rc = apply_ops(kv, buf + pos + WS_FRAME_HEADER_SIZE, length);
            if (rc)
                return rc;
        } else if (type != WS_REC_CLOSE && type != WS_REC_SNAPSHOT_END) {
            return WS_KV_ETYPE;
        }
        pos += WS_FRAME_HEADER_SIZE + (size_t)padlen;
    }
    return WS_KV_OK;
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

int64_t ws_kv_export(const ws_kv *kv, uint8_t *blob, size_t blob_size, uint64_t *runs, size_t runs_cap)
{
    const entry *prev = NULL;
    size_t at = 0, n = 0;
    uint64_t *run = NULL;
    for (size_t i = 0; i < kv->n_entries; i++) {
        const entry *e = &kv->entries[i];
        size_t len = (size_t)e->klen + e->vlen;
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
