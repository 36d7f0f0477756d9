/* Snapshot records framed in C: the surviving keys of a replay table as whole
 * SNAPSHOT_DATA records (docs/FORMAT.md), ready to be written.
 *
 * The payloads are exactly those of ws_kv_snapshot_chunk (and so of the
 * Python reference, PyKVReplayer.snapshot_payloads): this only adds the
 * 32-byte frame header, the zero padding and the CRC32C around each one, and
 * packs as many records as fit into the caller's buffer, in one call that
 * touches no Python object (cffi releases the GIL around it).
 */
#ifndef WALSTORE_SNAPSHOT_H
#define WALSTORE_SNAPSHOT_H

#include <stddef.h>
#include <stdint.h>

#include "kvreplay.h"

/* Fill out[0, out_size) with whole SNAPSHOT_DATA records (seq = durable = `seq`),
 * continuing from entry *cursor (start at 0) and advancing it, and add the number
 * of records written to *records.
 *
 * A record is started only while at least frame_room(chunk_bytes) bytes remain
 * (32 + chunk_bytes rounded up to 8), so each payload is cut exactly where
 * ws_kv_snapshot_chunk with a chunk_bytes buffer cuts it.
 *
 * Returns the bytes written (a multiple of 8); 0 when no surviving key is left;
 * -1, writing nothing, when the next operation is longer than chunk_bytes and
 * its record does not fit in out_size: *need is then that record's size (call
 * again with a buffer that large, or larger); -2 when out_size is below
 * frame_room(chunk_bytes) or chunk_bytes is 0 or over WS_MAX_PAYLOAD. */
int64_t ws_snapshot_frames(const ws_kv *kv, uint64_t *cursor, uint64_t chunk_bytes, uint64_t seq,
                           uint8_t *out, size_t out_size, uint64_t *records, uint64_t *need);

/* Write a zero into every 4 KiB of buf[0:len), so its pages exist before the snapshot
 * fills it: called (without the GIL) in a background thread while the state is captured.
 * Page by page, not MAP_POPULATE, whose one long hold of the process's memory map lock
 * stalled a concurrent committer's allocations for up to 38 ms. */
void ws_snapshot_touch(uint8_t *buf, size_t len);

#endif /* WALSTORE_SNAPSHOT_H */
