/* Last-writer-wins key/value replay over already-scanned record ranges.
 *
 * A key is (key bytes, key-is-str flag). PUT sets it, DELETE removes it, and
 * the table keeps Python dict order: a key keeps its first position until it
 * is deleted; a PUT after a DELETE puts it last. Entries point into the
 * caller's buffers (copying only a key's first 16 bytes, for comparisons):
 * the caller keeps every buffer passed to ws_kv_apply_range alive and
 * unchanged until ws_kv_export has run.
 *
 * Memory safety: every frame and op length is checked against the range
 * before use; allocations grow with the number of operations seen, never
 * with a length field.
 */
#ifndef WALSTORE_KVREPLAY_H
#define WALSTORE_KVREPLAY_H

#include <stddef.h>
#include <stdint.h>

#define WS_KV_OK 0
#define WS_KV_ERANGE 1 /* start > end or end > size */
#define WS_KV_EFRAME 2 /* a frame header or payload runs past the range end */
#define WS_KV_ETYPE 3  /* a record type that is neither COMMIT, CLOSE, SNAPSHOT_DATA nor SNAPSHOT_END */
#define WS_KV_EOPS 4   /* the operations do not fill the payload exactly */
#define WS_KV_ECALL 5  /* a CALL operation: not key/value state */
#define WS_KV_ENOMEM 6 /* out of memory, or more than 2^32 - 3 entries */

/* One run of consecutive surviving entries with the same sizes and flags. */
#define WS_KV_RUN_FIELDS 5 /* blob offset, count, key length, value length, op flags */

typedef struct ws_kv ws_kv;

/* A new empty table; `seed` keys the hash (pass random bytes). NULL if out of memory. */
ws_kv *ws_kv_new(uint64_t seed);
void ws_kv_free(ws_kv *kv);

/* Apply the records in buf[start, end). On error, returns a WS_KV_E* code
 * with the offset of the offending record in *err_offset; the operations
 * before it have been applied. */
int ws_kv_apply_range(ws_kv *kv, const uint8_t *buf, size_t size, size_t start, size_t end,
                      uint64_t *err_offset);

/* Number of live keys. */
uint64_t ws_kv_len(const ws_kv *kv);

/* Sizes for ws_kv_export: the bytes of all surviving keys and values, and the number of runs. */
void ws_kv_export_sizes(const ws_kv *kv, uint64_t *blob_bytes, uint64_t *runs);

/* The bytes the surviving keys from entry `cursor` on take as snapshot operations (op
 * header, key, value), counted only until they pass `limit`: a result over `limit` means
 * "more than limit". Walks at most the entries that fit in limit (plus dead ones). */
uint64_t ws_kv_ops_bytes_from(const ws_kv *kv, uint64_t cursor, uint64_t limit);

/* Copy each surviving key then its value into `blob`, in dict order, and
 * describe them as runs (WS_KV_RUN_FIELDS u64 each) in `runs`. Returns the
 * number of runs written, or -1 if blob_size or runs_cap is too small. */
int64_t ws_kv_export(const ws_kv *kv, uint8_t *blob, size_t blob_size, uint64_t *runs, size_t runs_cap);

/* One surviving key for ws_kv_items. */
typedef struct {
    const uint8_t *key; /* klen bytes; the value's vlen bytes follow at key + klen */
    uint64_t entry;     /* its entry number: a cursor that starts at this key */
    uint32_t klen;
    uint32_t vlen;
    uint8_t flags; /* op flags of its last PUT: key-is-str bit, value kind */
} ws_kv_item;

/* Up to `cap` surviving keys, in dict order, from entry *cursor on (start at
 * 0), into out; advances *cursor past the last one. Returns how many; 0 when
 * none is left. The pointers are into the buffers given to ws_kv_apply_range,
 * which must still be alive; calls nothing else. */
size_t ws_kv_items(const ws_kv *kv, uint64_t *cursor, ws_kv_item *out, size_t cap);

/* Snapshot payloads: the surviving keys as PUT operations (docs/FORMAT.md: the
 * 12-byte op header with the flags of the key's last PUT, then key, then value),
 * in dict order, cut into payloads of at most chunk_bytes; an operation longer
 * than chunk_bytes is alone in its payload. Copies straight from the buffers
 * the entries point into (they must still be alive); calls nothing else.
 *
 * Writes the next payload, from entry *cursor (start at 0), into
 * out[0, out_size) and advances *cursor past it. Returns its size in bytes;
 * 0 when no surviving key is left; or -1, writing nothing, when its first
 * operation alone does not fit in out_size: *need is then that operation's
 * size (call again with a buffer that large). With out_size >= chunk_bytes
 * only an operation longer than chunk_bytes needs the larger buffer. */
int64_t ws_kv_snapshot_chunk(const ws_kv *kv, uint64_t *cursor, uint64_t chunk_bytes, uint8_t *out,
                             size_t out_size, uint64_t *need);

#endif /* WALSTORE_KVREPLAY_H */
