/* The on-disk format, version 1: the one C encoding of docs/FORMAT.md.
 *
 * walstore/format.py is the one Python encoding; tests/test_format_agreement.py
 * parses every `#define WS_...` line below and checks it equals format.py's
 * constant of the same name (without the WS_ prefix). Keep one constant per
 * line, as a plain integer or string literal.
 */
#ifndef WALSTORE_FORMAT_H
#define WALSTORE_FORMAT_H

#define WS_FORMAT_VERSION 1
#define WS_MAGIC "WALSTORE"

/* file kinds (file header offset 10) */
#define WS_KIND_SEGMENT 1
#define WS_KIND_SNAPSHOT 2
#define WS_KIND_IDENTITY 3

/* sizes */
#define WS_FILE_HEADER_SIZE 64
#define WS_FRAME_HEADER_SIZE 32
#define WS_OP_HEADER_SIZE 12
#define WS_ALIGN 8
#define WS_MAX_PAYLOAD 1073741824u

/* record types (frame offset 8); 0 is never valid */
#define WS_REC_COMMIT 1
#define WS_REC_CLOSE 2
#define WS_REC_SNAPSHOT_DATA 3
#define WS_REC_SNAPSHOT_END 4
#define WS_REC_META 5

/* operation codes (op header offset 0) */
#define WS_OP_PUT 1
#define WS_OP_DELETE 2
#define WS_OP_CALL 3

/* operation flags (op header offset 1) */
#define WS_KEY_STR 0x01
#define WS_VALUE_BYTES 0
#define WS_VALUE_STR 1
#define WS_VALUE_CODEC 2
#define WS_VALUE_KIND_SHIFT 1
#define WS_VALUE_KIND_MASK 0x06

/* SNAPSHOT_END payload: two u64 */
#define WS_SNAPSHOT_END_PAYLOAD_SIZE 16

/* masks of record types allowed in a kind of file (bit n = type n); reader.py's */
#define WS_SEGMENT_TYPES 0x06
#define WS_SNAPSHOT_TYPES 0x18
#define WS_IDENTITY_TYPES 0x20

/* padded(n): n rounded up to the record alignment; n must be below 2^64 - 7 */
#define WS_PADDED(n) (((n) + (WS_ALIGN - 1)) & ~(uint64_t)(WS_ALIGN - 1))

#endif /* WALSTORE_FORMAT_H */
