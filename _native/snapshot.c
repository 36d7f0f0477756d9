/* Snapshot records framed in C. See snapshot.h. */
#include "snapshot.h"

#include <string.h>

#include "crc32c.h"
#include "walstore_format.h"
#include "yieldpoint.h"

static void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void put_le64(uint8_t *p, uint64_t v)
{
    put_le32(p, (uint32_t)v);
    put_le32(p + 4, (uint32_t)(v >> 32));
}

/* Header (crc field last), padding, CRC around the payload already at out + 32. */
static size_t seal_frame(uint8_t *out, uint8_t type, uint64_t seq, uint64_t durable, size_t len)
{
    size_t padded = (size_t)WS_PADDED(len);
    put_le32(out + 4, (uint32_t)len);
    out[8] = type;
    out[9] = 0;
    memset(out + 10, 0, 6); /* reserved u16 and u32 */
    put_le64(out + 16, seq);
    put_le64(out + 24, durable);
    if (padded > len)
        memset(out + WS_FRAME_HEADER_SIZE + len, 0, padded - len);
    put_le32(out, ws_crc32c(0, out + 4, WS_FRAME_HEADER_SIZE - 4 + padded));
    return WS_FRAME_HEADER_SIZE + padded;
}

int64_t ws_snapshot_frames(const ws_kv *kv, uint64_t *cursor, uint64_t chunk_bytes, uint64_t seq,
                           uint8_t *out, size_t out_size, uint64_t *records, uint64_t *need)
{
    uint64_t room; /* the most one record of chunk_bytes can take */
    size_t at = 0;
    *need = 0;
    if (chunk_bytes == 0 || chunk_bytes > WS_MAX_PAYLOAD)
        return -2;
    room = WS_FRAME_HEADER_SIZE + WS_PADDED(chunk_bytes);
    if (out_size < room)
        return -2;
    while (out_size - at >= room) {
        uint64_t op_need = 0;
        /* A multiple of 8 (>= padded(chunk_bytes)): whatever payload fits, its padding fits too. */
        size_t avail = (out_size - at - WS_FRAME_HEADER_SIZE) & ~(size_t)(WS_ALIGN - 1);
        int64_t n = ws_kv_snapshot_chunk(kv, cursor, chunk_bytes, out + at + WS_FRAME_HEADER_SIZE, avail, &op_need);
        if (n == 0)
            break;
        if (n < 0) { /* one operation longer than chunk_bytes, and the rest of out too small */
            if (at)
                break; /* write what we have; the next call reports it */
            *need = WS_FRAME_HEADER_SIZE + WS_PADDED(op_need);
            return -1;
        }
        /* n <= avail: a payload of at most chunk_bytes, or one longer operation alone */
        at += seal_frame(out + at, WS_REC_SNAPSHOT_DATA, seq, seq, (size_t)n);
        (*records)++;
    }
    return (int64_t)at;
}

void ws_snapshot_touch(uint8_t *buf, size_t len)
{
    volatile uint8_t *p = buf;
    ws_yield_point yp;
    ws_yield_begin(&yp);
    for (size_t off = 0; off < len; off += 4096) {
        p[off] = 0; /* a page fault: about 1 us here */
        ws_yield_step(&yp, 16);
    }
}
