/* The C record scanner. See scan.h; mirrors walstore/reader.py line for line.
 *
 * Every read is preceded by a check that the bytes are inside [0, size):
 * offsets only grow by a frame size already checked against what remains.
 */
#include "scan.h"

#include "crc32c.h"
#include "le.h"
#include "walstore_format.h"
#include "yieldpoint.h"

typedef struct {
    uint64_t length;
    uint64_t seq;
    uint64_t durable;
    unsigned type;
} frame;

static const char *const damage_names[] = {
    NULL,           "short-header", "zero-header-then-data", "bad-length", "bad-crc",
    "bad-type",     "bad-reserved", "bad-seq",               "bad-watermark", "bad-payload",
};

const char *ws_damage_name(int damage)
{
    if (damage <= 0 || (size_t)damage >= sizeof damage_names / sizeof damage_names[0])
        return NULL;
    return damage_names[damage];
}

static int all_zero(const uint8_t *p, size_t n)
{
    while (n >= 32) {
        uint64_t a = ws_le64(p), b = ws_le64(p + 8), c = ws_le64(p + 16), d = ws_le64(p + 24);
        if (a | b | c | d)
            return 0;
        p += 32;
        n -= 32;
    }
    while (n--)
        if (*p++)
            return 0;
    return 1;
}

/* reader._nonzero_end: just past the last non-zero byte at or after `start`,
 * rounded up to WS_ALIGN and capped at `size`; `start` if there is none. */
static uint64_t nonzero_end(const uint8_t *buf, size_t size, size_t start)
{
    size_t end = size;
    uint64_t r;
    if (start >= size)
        return start;
    while (end - start >= 8 && ws_le64(buf + end - 8) == 0)
        end -= 8;
    while (end > start && buf[end - 1] == 0)
        end--;
    if (end == start)
        return start;
    r = WS_PADDED((uint64_t)end);
    return r < size ? r : size;
}

/* reader.check_frame: length bounds, CRC, type, reserved fields (not sequence numbers). */
static int check_frame(const uint8_t *buf, size_t size, size_t off, uint32_t type_mask, frame *f)
{
    const uint8_t *h;
    uint64_t avail, padlen;
    uint32_t stored, length, res32;
    unsigned type, flags, res16;
    if (off > size || size - off < WS_FRAME_HEADER_SIZE)
        return WS_DAMAGE_SHORT_HEADER;
    h = buf + off;
    stored = ws_le32(h);
    length = ws_le32(h + 4);
    type = h[8];
    flags = h[9];
    res16 = ws_le16(h + 10);
    res32 = ws_le32(h + 12);
    avail = size - off - WS_FRAME_HEADER_SIZE;
    padlen = WS_PADDED((uint64_t)length);
    if (length > WS_MAX_PAYLOAD || length > avail || padlen > avail)
        return WS_DAMAGE_BAD_LENGTH;
    if (ws_crc32c(0, h + 4, (size_t)(WS_FRAME_HEADER_SIZE - 4 + padlen)) != stored)
        return WS_DAMAGE_BAD_CRC;
    if (type >= 32 || !((type_mask >> type) & 1))
        return WS_DAMAGE_BAD_TYPE;
    if (flags || res16 || res32)
        return WS_DAMAGE_BAD_RESERVED;
    f->length = length;
    f->type = type;
    f->seq = ws_le64(h + 16);
    f->durable = ws_le64(h + 24);
    return WS_DAMAGE_NONE;
}

int ws_check_ops(const uint8_t *p, size_t len, int puts_only, uint64_t *where)
{
    size_t pos = 0;
    while (pos < len) {
        unsigned op, flags;
        uint32_t klen, vlen;
        if (len - pos < WS_OP_HEADER_SIZE) {
            *where = pos;
            return WS_DETAIL_OPS_CUT_SHORT;
        }
        op = p[pos];
        flags = p[pos + 1];
        if (op < WS_OP_PUT || op > WS_OP_CALL || ws_le16(p + pos + 2)) {
            *where = pos;
            return WS_DETAIL_OPS_BAD_OP;
        }
        if (puts_only && op != WS_OP_PUT) {
            *where = pos;
            return WS_DETAIL_OPS_NOT_PUT;
        }
        if ((flags & ~(unsigned)(WS_KEY_STR | WS_VALUE_KIND_MASK)) || ((flags >> WS_VALUE_KIND_SHIFT) & 3) == 3) {
            *where = pos;
            return WS_DETAIL_OPS_BAD_FLAGS;
        }
        klen = ws_le32(p + pos + 4);
        vlen = ws_le32(p + pos + 8);
        pos += WS_OP_HEADER_SIZE;
        if (klen > len - pos || vlen > len - pos - klen) {
            *where = pos;
            return WS_DETAIL_OPS_LENGTHS;
        }
        pos += (size_t)klen + vlen;
    }
    return 0;
}

/* seq >= last_seq, where last_seq is last_commit or first_seq - 1 (maybe -1). */
static int at_least_last(const ws_scan_result *r, uint64_t first_seq, uint64_t seq)
{
    if (r->have_commit)
        return seq >= r->last_commit;
    return first_seq == 0 || seq >= first_seq - 1;
}

/* A frame header whose type and reserved fields could belong to a record that parses:
 * resync looks at these before the CRC (check_frame's order names the damage of the scan
 * itself), so that garbage, where random length fields reach far, stays linear. */
static int plausible(const uint8_t *h, uint32_t type_mask)
{
    unsigned type = h[8];
    return type < 32 && ((type_mask >> type) & 1) && !h[9] && !ws_le16(h + 10) && !ws_le32(h + 12);
}

/* reader._resync: count the records that parse past the damage, on 8-byte steps. */
static void resync(const uint8_t *buf, size_t size, uint64_t first_seq, uint32_t type_mask,
                   ws_scan_result *r)
{
    uint64_t pos = r->end + WS_ALIGN;
    uint64_t stop = r->data_end;
    while (pos <= stop && stop - pos >= WS_FRAME_HEADER_SIZE) {
        frame f;
        if (plausible(buf + pos, type_mask) && check_frame(buf, size, (size_t)pos, type_mask, &f) == WS_DAMAGE_NONE &&
            at_least_last(r, first_seq, f.seq) && (f.durable < f.seq || f.type != WS_REC_COMMIT)) {
            r->resync_records++;
            if (f.durable > r->resync_max_durable)
                r->resync_max_durable = f.durable;
            pos += WS_FRAME_HEADER_SIZE + WS_PADDED(f.length);
        } else {
            pos += WS_ALIGN;
        }
    }
}

/* The sequence and watermark rules for one record; a WS_DAMAGE_* code. */
static int check_seq(ws_scan_result *r, const frame *f, uint64_t first_seq, int segment)
{
    if (!segment) {
        if (f->seq != first_seq || f->durable != first_seq) {
            r->detail = WS_DETAIL_SNAPSHOT_SEQ;
            r->detail_a = f->seq;
            r->detail_b = f->durable;
            return WS_DAMAGE_BAD_SEQ;
        }
        return WS_DAMAGE_NONE;
    }
    if (f->type == WS_REC_COMMIT) {
        int next = r->have_commit ? (r->last_commit != UINT64_MAX && f->seq == r->last_commit + 1)
                                  : f->seq == first_seq;
        if (!next) {
            r->detail = WS_DETAIL_COMMIT_SEQ;
            r->detail_a = f->seq;
            return WS_DAMAGE_BAD_SEQ;
        }
        if (f->durable >= f->seq) {
            r->detail = WS_DETAIL_COMMIT_WATERMARK;
            r->detail_a = f->durable;
            r->detail_b = f->seq;
            return WS_DAMAGE_BAD_WATERMARK;
        }
        return WS_DAMAGE_NONE;
    }
    /* CLOSE: repeats the last COMMIT's number, durable == seq */
    if (r->have_commit ? f->seq != r->last_commit : (first_seq == 0 || f->seq != first_seq - 1)) {
        r->detail = WS_DETAIL_CLOSE_SEQ;
        r->detail_a = f->seq;
        return WS_DAMAGE_BAD_SEQ;
    }
    if (f->durable != f->seq) {
        r->detail = WS_DETAIL_CLOSE_WATERMARK;
        r->detail_a = f->durable;
        r->detail_b = f->seq;
        return WS_DAMAGE_BAD_WATERMARK;
    }
    return WS_DAMAGE_NONE;
}

int ws_scan_records(const uint8_t *buf, size_t size, size_t start, uint64_t first_seq,
                    uint32_t type_mask, ws_scan_result *out)
{
    size_t off = start;
    int segment = type_mask == WS_SEGMENT_TYPES;
    int damage = WS_DAMAGE_NONE;
    uint64_t alt;
    ws_yield_point yp;
    memset(out, 0, sizeof *out);
    ws_yield_begin(&yp);
    for (;;) {
        frame f;
        const uint8_t *payload;
        ws_yield_step(&yp, 256);
        if (off >= size)
            break;
        if (size - off < WS_FRAME_HEADER_SIZE) {
            if (!all_zero(buf + off, size - off))
                damage = WS_DAMAGE_SHORT_HEADER;
            break;
        }
        if (all_zero(buf + off, WS_FRAME_HEADER_SIZE)) {
            if (!all_zero(buf + off + WS_FRAME_HEADER_SIZE, size - off - WS_FRAME_HEADER_SIZE))
                damage = WS_DAMAGE_ZERO_HEADER_THEN_DATA;
            break;
        }
        damage = check_frame(buf, size, off, type_mask, &f);
        if (damage)
            break;
        damage = check_seq(out, &f, first_seq, segment);
        if (damage)
            break;
        payload = buf + off + WS_FRAME_HEADER_SIZE;
        if (f.type == WS_REC_COMMIT || f.type == WS_REC_SNAPSHOT_DATA) {
            int why = ws_check_ops(payload, (size_t)f.length, f.type == WS_REC_SNAPSHOT_DATA, &out->detail_a);
            if (why) {
                out->detail = why;
                damage = WS_DAMAGE_BAD_PAYLOAD;
                break;
            }
        } else if (f.type == WS_REC_SNAPSHOT_END && f.length != WS_SNAPSHOT_END_PAYLOAD_SIZE) {
            out->detail = WS_DETAIL_SNAPSHOT_END_SIZE;
            damage = WS_DAMAGE_BAD_PAYLOAD;
            break;
        }
        if (f.type == WS_REC_COMMIT) {
            out->last_commit = f.seq;
            out->have_commit = 1;
        }
        if (f.durable > out->max_durable)
            out->max_durable = f.durable;
        out->closed = f.type == WS_REC_CLOSE;
        out->records++;
        off += WS_FRAME_HEADER_SIZE + (size_t)WS_PADDED(f.length);
    }
    out->end = off;
    out->damage = damage;
    if (damage == WS_DAMAGE_NONE) {
        out->data_end = off;
        return 0;
    }
    out->data_end = nonzero_end(buf, size, off);
    alt = off < size ? (uint64_t)off + WS_ALIGN : off;
    if (alt > out->data_end)
        out->data_end = alt;
    if (out->data_end > size)
        out->data_end = size;
    resync(buf, size, first_seq, type_mask, out);
    return 0;
}
