/* libFuzzer target: scan + KV replay + CRC32C on arbitrary bytes.
 *
 * Input: 8 control bytes, then the "file". Control byte 0 picks the type
 * mask, 1 the first sequence number, 2 the start offset, 3 the hash seed,
 * 4 bit 0 asks for CRC fix-up (every frame from `start` gets a correct CRC,
 * so the fuzzer gets past the CRC check to the type, number, payload and KV
 * logic), 6 the snapshot payload size less one (1..256 bytes). The file is copied to a heap block of its exact size, so
 * AddressSanitizer catches any read past the end.
 *
 * Beyond memory safety it checks invariants and aborts on a violation:
 * the result's offsets are in range, every record the scanner accepts
 * replays without a framing or operation error, and the snapshot payloads
 * are whole PUT ops within the chunk size (or one op alone) whose keys and
 * values are exactly the export's, in order; the snapshot records framed in C
 * (ws_snapshot_frames) carry exactly those payloads, each with a correct
 * header, zero padding and CRC32C.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "crc32c.h"
#include "kvreplay.h"
#include "le.h"
#include "scan.h"
#include "snapshot.h"
#include "walstore_format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                    \
    do {                                                                                               \
        if (!(cond))                                                                                   \
            abort();                                                                                   \
    } while (0)

/* Give each frame from `off` a correct CRC, as far as lengths allow. */
static void fix_crcs(uint8_t *buf, size_t size, size_t off)
{
    while (off <= size && size - off >= WS_FRAME_HEADER_SIZE) {
        uint64_t padlen = WS_PADDED((uint64_t)ws_le32(buf + off + 4));
        uint32_t crc;
        if (padlen > size - off - WS_FRAME_HEADER_SIZE)
            return;
        crc = ws_crc32c(0, buf + off + 4, (size_t)(WS_FRAME_HEADER_SIZE - 4 + padlen));
        memcpy(buf + off, &crc, 4); /* little-endian hosts only; fuzzing runs on x86-64 and aarch64 */
        off += WS_FRAME_HEADER_SIZE + (size_t)padlen;
    }
}

/* Snapshot payloads of the table, chunk_bytes each: every one a whole number of PUT ops,
 * within chunk_bytes or a single op; their keys and values, in order, are exactly `blob`
 * (the export), so every surviving key appears once. */
/* ws_kv_items, a few at a time, walks the same keys and values as the export blob. */
static void items_match(const ws_kv *kv, const uint8_t *blob, uint64_t blob_bytes)
{
    ws_kv_item items[3];
    uint64_t cursor = 0, at = 0, count = 0, last = 0;
    size_t n;
    while ((n = ws_kv_items(kv, &cursor, items, 3)) > 0) {
        CHECK(n <= 3);
        for (size_t i = 0; i < n; i++) {
            uint64_t len = (uint64_t)items[i].klen + items[i].vlen;
            CHECK(len <= blob_bytes - at);
            CHECK(len == 0 || memcmp(items[i].key, blob + at, (size_t)len) == 0);
            CHECK(count == 0 || items[i].entry > last);
            CHECK(items[i].entry < cursor);
            last = items[i].entry;
            at += len;
            count++;
        }
    }
    CHECK(count == ws_kv_len(kv) && at == blob_bytes);
    CHECK(ws_kv_items(kv, &cursor, items, 3) == 0);
}

static void snapshot_payloads(const ws_kv *kv, const uint8_t *blob, uint64_t blob_bytes, uint64_t chunk_bytes)
{
    uint64_t cursor = 0, need = 0, want, seen = 0, ops = 0;
    size_t cap = (size_t)chunk_bytes;
    uint8_t *out = malloc(cap), *big = NULL;
    if (!out)
        return;
    for (;;) {
        uint8_t *p = out;
        int64_t n = ws_kv_snapshot_chunk(kv, &cursor, chunk_bytes, out, cap, &need);
        size_t pos = 0, nops = 0;
        if (n == 0)
            break;
        if (n < 0) {
            CHECK(need > chunk_bytes && need >= WS_OP_HEADER_SIZE);
            big = malloc((size_t)need);
            if (!big) {
                free(out);
                return;
            }
            want = need;
            n = ws_kv_snapshot_chunk(kv, &cursor, chunk_bytes, big, (size_t)want - 1, &need); /* still too small */
            CHECK(n == -1 && need == want);
            n = ws_kv_snapshot_chunk(kv, &cursor, chunk_bytes, big, (size_t)want, &need);
            CHECK(n == (int64_t)want);
            p = big;
        }
        CHECK(n > 0);
        while (pos < (size_t)n) {
            uint64_t len;
            CHECK((size_t)n - pos >= WS_OP_HEADER_SIZE);
            CHECK(p[pos] == WS_OP_PUT && p[pos + 2] == 0 && p[pos + 3] == 0);
            CHECK(!(p[pos + 1] & ~(WS_KEY_STR | WS_VALUE_KIND_MASK)) && ((p[pos + 1] >> WS_VALUE_KIND_SHIFT) & 3) != 3);
            len = (uint64_t)ws_le32(p + pos + 4) + ws_le32(p + pos + 8);
            pos += WS_OP_HEADER_SIZE;
            CHECK(len <= (size_t)n - pos && len <= blob_bytes - seen);
            CHECK(len == 0 || memcmp(p + pos, blob + seen, (size_t)len) == 0);
            seen += len;
            pos += (size_t)len;
            nops++;
        }
        CHECK((uint64_t)n <= chunk_bytes || nops == 1);
        ops += nops;
        free(big);
        big = NULL;
    }
    free(out);
    CHECK(ops == ws_kv_len(kv) && seen == blob_bytes);
}

/* Next payload of ws_kv_snapshot_chunk into *out (grown as needed); its size, or 0 at the end. */
static int64_t next_payload(const ws_kv *kv, uint64_t *cursor, uint64_t chunk_bytes, uint8_t **out, size_t *cap)
{
    uint64_t need = 0;
    int64_t n = ws_kv_snapshot_chunk(kv, cursor, chunk_bytes, *out, *cap, &need);
    if (n == -1) {
        uint8_t *p = realloc(*out, (size_t)need);
        if (!p)
            return -2;
        *out = p;
        *cap = (size_t)need;
        n = ws_kv_snapshot_chunk(kv, cursor, chunk_bytes, *out, *cap, &need);
    }
    return n;
}

/* ws_snapshot_frames, through buffers of varying room: every frame is a well-formed
 * SNAPSHOT_DATA record (length, type, zero reserved fields, seq, padding, CRC32C)
 * whose payload is the next payload of ws_kv_snapshot_chunk, and the records end
 * with the payloads. */
static void snapshot_frames(const ws_kv *kv, uint64_t chunk_bytes, uint64_t seq, size_t extra)
{
    uint64_t fcursor = 0, pcursor = 0, records = 0, need = 0, total = 0;
    size_t room = WS_FRAME_HEADER_SIZE + (size_t)WS_PADDED(chunk_bytes) + extra;
    size_t pcap = (size_t)chunk_bytes;
    uint8_t *out = malloc(room), *payload = malloc(pcap);
    if (!out || !payload)
        goto done;
    CHECK(ws_snapshot_frames(kv, &fcursor, chunk_bytes, seq, out, room - extra - 1, &records, &need) == -2);
    for (;;) {
        int64_t n = ws_snapshot_frames(kv, &fcursor, chunk_bytes, seq, out, room, &records, &need);
        size_t pos = 0;
        if (n == -1) { /* one op over chunk_bytes whose record does not fit: grow to `need` */
            uint8_t *p;
            CHECK(need > room);
            p = realloc(out, (size_t)need);
            if (!p)
                goto done;
            out = p;
            room = (size_t)need;
            continue;
        }
        CHECK(n >= 0 && n % 8 == 0 && (size_t)n <= room);
        if (n == 0)
            break;
        while (pos < (size_t)n) {
            const uint8_t *f = out + pos;
            uint64_t len, padded;
            int64_t plen;
            CHECK((size_t)n - pos >= WS_FRAME_HEADER_SIZE);
            len = ws_le32(f + 4);
            padded = WS_PADDED(len);
            CHECK(padded <= (size_t)n - pos - WS_FRAME_HEADER_SIZE);
            CHECK(f[8] == WS_REC_SNAPSHOT_DATA && f[9] == 0 && ws_le16(f + 10) == 0 && ws_le32(f + 12) == 0);
            CHECK(ws_le64(f + 16) == seq && ws_le64(f + 24) == seq);
            CHECK(ws_le32(f) == ws_crc32c(0, f + 4, (size_t)(WS_FRAME_HEADER_SIZE - 4 + padded)));
            for (uint64_t i = len; i < padded; i++)
                CHECK(f[WS_FRAME_HEADER_SIZE + i] == 0);
            plen = next_payload(kv, &pcursor, chunk_bytes, &payload, &pcap);
            if (plen == -2)
                goto done;
            CHECK(plen > 0 && (uint64_t)plen == len && memcmp(f + WS_FRAME_HEADER_SIZE, payload, (size_t)len) == 0);
            pos += WS_FRAME_HEADER_SIZE + (size_t)padded;
            total++;
        }
    }
    CHECK(next_payload(kv, &pcursor, chunk_bytes, &payload, &pcap) == 0);
    CHECK(records == total);
done:
    free(out);
    free(payload);
}

static void replay(const uint8_t *buf, size_t size, size_t start, size_t end, uint64_t seed, int scanned,
                   uint32_t mask, uint64_t chunk_bytes)
{
    ws_kv *kv = ws_kv_new(seed);
    uint64_t err = 0, blob_bytes = 0, runs = 0, counted = 0;
    uint8_t *blob;
    uint64_t *table;
    int rc;
    if (!kv)
        return;
    rc = ws_kv_apply_range(kv, buf, size, start, end, &err);
    if (scanned && (mask == WS_SEGMENT_TYPES || mask == WS_SNAPSHOT_TYPES))
        CHECK(rc == WS_KV_OK || rc == WS_KV_ECALL); /* accepted records always frame */
    CHECK(rc == WS_KV_OK || err < size || err == start);
    ws_kv_export_sizes(kv, &blob_bytes, &runs);
    CHECK(blob_bytes <= (uint64_t)size * 2 + 1 && runs <= ws_kv_len(kv));
    blob = malloc(blob_bytes ? blob_bytes : 1);
    table = malloc((runs ? runs : 1) * WS_KV_RUN_FIELDS * sizeof *table);
    if (blob && table) {
        CHECK(ws_kv_export(kv, blob, blob_bytes, table, runs) == (int64_t)runs);
        for (uint64_t i = 0; i < runs; i++) {
            const uint64_t *run = table + i * WS_KV_RUN_FIELDS;
            CHECK(run[0] + run[1] * (run[2] + run[3]) <= blob_bytes);
            counted += run[1];
        }
        CHECK(counted == ws_kv_len(kv));
        if (runs)
            CHECK(ws_kv_export(kv, blob, blob_bytes, table, runs - 1) == -1);
        snapshot_payloads(kv, blob, blob_bytes, chunk_bytes);
        snapshot_frames(kv, chunk_bytes, seed * 7 + 1, (size_t)(seed % 3) * 40);
        items_match(kv, blob, blob_bytes);
    }
    free(blob);
    free(table);
    ws_kv_free(kv);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint32_t masks[4] = {WS_SEGMENT_TYPES, WS_SNAPSHOT_TYPES, WS_IDENTITY_TYPES, 0xFFFFFFFFu};
    uint8_t ctl[8] = {0};
    size_t n = size < 8 ? size : 8, start;
    uint32_t mask;
    uint64_t first_seq, chunk_bytes;
    uint8_t *buf;
    ws_scan_result r;

    memcpy(ctl, data, n);
    data += n;
    size -= n;
    buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    if (size)
        memcpy(buf, data, size);
    mask = masks[ctl[0] & 3];
    first_seq = ctl[1] == 255 ? UINT64_MAX : ctl[1] == 254 ? 0 : ctl[1];
    start = (size_t)ctl[2] * 8 % (size + 17);
    if (ctl[4] & 1)
        fix_crcs(buf, size, start);

    CHECK(ws_crc32c(ctl[5], buf, size) == ws_crc32c_table(ctl[5], buf, size));

    ws_scan_records(buf, size, start, first_seq, mask, &r);
    CHECK(r.end >= start);
    if (start <= size) {
        CHECK(r.end <= size && r.data_end <= size && r.data_end >= r.end);
    }
    CHECK((r.damage == WS_DAMAGE_NONE) == (ws_damage_name(r.damage) == NULL));
    if (r.damage == WS_DAMAGE_NONE)
        CHECK(r.data_end == r.end && r.resync_records == 0);
    else
        CHECK(r.end < size);
    chunk_bytes = (uint64_t)ctl[6] + 1; /* 1..256: ops over it, exact fits and splits all happen */
    if (start <= size)
        replay(buf, size, start, (size_t)r.end, ctl[3], 1, mask, chunk_bytes);
    replay(buf, size, start <= size ? start : size, size, ctl[3], 0, mask, chunk_bytes);
    free(buf);
    return 0;
}
