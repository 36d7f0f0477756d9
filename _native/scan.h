/* The C record scanner: equal in verdict to walstore/reader.py scan_records.
 *
 * Memory safety: reads only buf[0, size); every length field is checked
 * against the bytes that remain before it is used; nothing is allocated.
 */
#ifndef WALSTORE_SCAN_H
#define WALSTORE_SCAN_H

#include <stddef.h>
#include <stdint.h>

/* Damage names, in docs/FORMAT.md's words (see ws_damage_name). */
#define WS_DAMAGE_NONE 0
#define WS_DAMAGE_SHORT_HEADER 1
#define WS_DAMAGE_ZERO_HEADER_THEN_DATA 2
#define WS_DAMAGE_BAD_LENGTH 3
#define WS_DAMAGE_BAD_CRC 4
#define WS_DAMAGE_BAD_TYPE 5
#define WS_DAMAGE_BAD_RESERVED 6
#define WS_DAMAGE_BAD_SEQ 7
#define WS_DAMAGE_BAD_WATERMARK 8
#define WS_DAMAGE_BAD_PAYLOAD 9

/* What `detail_a` / `detail_b` hold, so the caller can word reader.py's detail. */
#define WS_DETAIL_NONE 0
#define WS_DETAIL_COMMIT_SEQ 1      /* a = seq */
#define WS_DETAIL_COMMIT_WATERMARK 2 /* a = durable, b = seq */
#define WS_DETAIL_CLOSE_SEQ 3       /* a = seq */
#define WS_DETAIL_CLOSE_WATERMARK 4 /* a = durable, b = seq */
#define WS_DETAIL_SNAPSHOT_SEQ 5    /* a = seq, b = durable */
#define WS_DETAIL_OPS_CUT_SHORT 6
#define WS_DETAIL_OPS_BAD_OP 7      /* a = payload offset */
#define WS_DETAIL_OPS_BAD_FLAGS 8   /* a = payload offset */
#define WS_DETAIL_OPS_LENGTHS 9     /* a = payload offset */
#define WS_DETAIL_SNAPSHOT_END_SIZE 10
#define WS_DETAIL_OPS_NOT_PUT 11     /* a = payload offset: a snapshot holds only PUTs */

typedef struct {
    uint64_t end;                /* offset just past the last valid record */
    uint64_t last_commit;        /* seq of the last valid COMMIT, if have_commit */
    uint64_t max_durable;
    uint64_t records;
    uint64_t resync_max_durable;
    uint64_t resync_records;
    uint64_t data_end;
    uint64_t detail_a;
    uint64_t detail_b;
    int have_commit;             /* else last_seq is first_seq - 1 (may be -1) */
    int closed;
    int damage;                  /* WS_DAMAGE_* */
    int detail;                  /* WS_DETAIL_* */
} ws_scan_result;

/* Scan records from `start` (any value; past `size` is a clean empty scan).
 * `type_mask` bit n allows record type n; segment sequence rules apply when it
 * equals WS_SEGMENT_TYPES, snapshot rules otherwise. Always returns 0. */
int ws_scan_records(const uint8_t *buf, size_t size, size_t start, uint64_t first_seq,
                    uint32_t type_mask, ws_scan_result *out);

/* "short-header", ..., or NULL for WS_DAMAGE_NONE / unknown codes. */
const char *ws_damage_name(int damage);

/* reader.check_ops: 0 if payload[0, len) is a well-formed sequence of
 * operations (only PUTs if `puts_only`: a SNAPSHOT_DATA payload), else a
 * WS_DETAIL_OPS_* code with the payload offset in *where. */
int ws_check_ops(const uint8_t *payload, size_t len, int puts_only, uint64_t *where);

#endif /* WALSTORE_SCAN_H */
