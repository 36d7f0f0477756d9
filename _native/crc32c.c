/* CRC32C with a run-time choice of hardware instructions. See crc32c.h.
 *
 * Hardware paths (SSE4.2 crc32q, ARMv8 crc32cx) run three independent CRC
 * streams over long buffers and join them with "shift by N zero bytes"
 * tables (the method of Mark Adler's public crc32c.c), so the instruction's
 * latency is hidden. The portable path is slicing-by-8. Every path reads
 * words with memcpy: no unaligned or aliasing loads, no read past `len`.
 */
#include "crc32c.h"

#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WS_CRC_X86 1
#include <nmmintrin.h>
#endif

#if defined(__aarch64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define WS_CRC_ARM 1
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#if defined(__clang__) /* clang's arm_acle.h hides __crc32c* unless built with +crc */
#define ARM_CRC_TARGET __attribute__((target("crc")))
#define CRC32CB(c, b) __builtin_arm_crc32cb((c), (b))
#define CRC32CD(c, w) __builtin_arm_crc32cd((c), (w))
#else
#include <arm_acle.h>
#define ARM_CRC_TARGET __attribute__((target("+crc")))
#define CRC32CB(c, b) __crc32cb((c), (b))
#define CRC32CD(c, w) __crc32cd((c), (w))
#endif
#endif

#define POLY 0x82f63b78u /* CRC-32C, reflected */
#define LONG_BLOCK 8192
#define SHORT_BLOCK 256

static uint32_t table8[8][256];
#if defined(WS_CRC_X86) || defined(WS_CRC_ARM)
static uint32_t zeros_long[4][256];  /* shift a CRC by LONG_BLOCK zero bytes */
static uint32_t zeros_short[4][256]; /* ... by SHORT_BLOCK zero bytes */
#endif

typedef uint32_t (*crc_fn)(uint32_t crc, const unsigned char *p, size_t n);

static uint32_t crc_table_raw(uint32_t crc, const unsigned char *p, size_t n);
static crc_fn active = crc_table_raw;
static const char *active_name = "table";

static uint64_t load64(const unsigned char *p)
{
    uint64_t w;
    memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    return w;
}

/* Portable slicing-by-8 on the inverted CRC. */
static uint32_t crc_table_raw(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        crc = table8[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w = load64(p) ^ crc;
        crc = table8[7][w & 0xff] ^ table8[6][(w >> 8) & 0xff] ^ table8[5][(w >> 16) & 0xff] ^
              table8[4][(w >> 24) & 0xff] ^ table8[3][(w >> 32) & 0xff] ^ table8[2][(w >> 40) & 0xff] ^
              table8[1][(w >> 48) & 0xff] ^ table8[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = table8[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(WS_CRC_X86) || defined(WS_CRC_ARM)
/* GF(2) 32x32 matrix helpers for the zero-shift operators. */
static uint32_t gf2_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_times(mat, mat[n]);
}

/* The operator that appends `len` zero bytes to a raw CRC; len a power of two. */
static void zeros_op(uint32_t *even, size_t len)
{
    uint32_t odd[32];
    uint32_t row = 1;
    odd[0] = POLY; /* one zero bit */
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    gf2_square(even, odd); /* two zero bits */
    gf2_square(odd, even); /* four zero bits */
    for (;;) {
        gf2_square(even, odd); /* first pass: one zero byte */
        len >>= 1;
        if (len == 0)
            return;
        gf2_square(odd, even);
        len >>= 1;
        if (len == 0)
            break;
    }
    memcpy(even, odd, sizeof odd);
}

static void zeros_table(uint32_t zeros[4][256], size_t len)
{
    uint32_t op[32];
    zeros_op(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        zeros[0][n] = gf2_times(op, n);
        zeros[1][n] = gf2_times(op, n << 8);
        zeros[2][n] = gf2_times(op, n << 16);
        zeros[3][n] = gf2_times(op, n << 24);
    }
}

static uint32_t shift(uint32_t zeros[4][256], uint32_t crc)
{
    return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^ zeros[2][(crc >> 16) & 0xff] ^
           zeros[3][crc >> 24];
}
#endif

#ifdef WS_CRC_X86
__attribute__((target("sse4.2"))) static uint32_t crc_sse42_raw(uint32_t crc, const unsigned char *p,
                                                                   size_t n)
{
    uint64_t c0 = crc;
    while (n && ((uintptr_t)p & 7)) {
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
        n--;
    }
    while (n >= 3 * LONG_BLOCK) {
        uint64_t c1 = 0, c2 = 0;
        const unsigned char *end = p + LONG_BLOCK;
        do {
            c0 = _mm_crc32_u64(c0, load64(p));
            c1 = _mm_crc32_u64(c1, load64(p + LONG_BLOCK));
            c2 = _mm_crc32_u64(c2, load64(p + 2 * LONG_BLOCK));
            p += 8;
        } while (p < end);
        c0 = shift(zeros_long, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = shift(zeros_long, (uint32_t)c0) ^ (uint32_t)c2;
        p += 2 * LONG_BLOCK;
        n -= 3 * LONG_BLOCK;
    }
    while (n >= 3 * SHORT_BLOCK) {
        uint64_t c1 = 0, c2 = 0;
        const unsigned char *end = p + SHORT_BLOCK;
        do {
            c0 = _mm_crc32_u64(c0, load64(p));
            c1 = _mm_crc32_u64(c1, load64(p + SHORT_BLOCK));
            c2 = _mm_crc32_u64(c2, load64(p + 2 * SHORT_BLOCK));
            p += 8;
        } while (p < end);
        c0 = shift(zeros_short, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = shift(zeros_short, (uint32_t)c0) ^ (uint32_t)c2;
        p += 2 * SHORT_BLOCK;
        n -= 3 * SHORT_BLOCK;
    }
    while (n >= 8) {
        c0 = _mm_crc32_u64(c0, load64(p));
        p += 8;
        n -= 8;
    }
    while (n--)
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
    return (uint32_t)c0;
}
#endif

#ifdef WS_CRC_ARM
ARM_CRC_TARGET static uint32_t crc_armv8_raw(uint32_t crc, const unsigned char *p,
                                                                size_t n)
{
    uint32_t c0 = crc;
    while (n && ((uintptr_t)p & 7)) {
        c0 = CRC32CB(c0, *p++);
        n--;
    }
    while (n >= 3 * LONG_BLOCK) {
        uint32_t c1 = 0, c2 = 0;
        const unsigned char *end = p + LONG_BLOCK;
        do {
            c0 = CRC32CD(c0, load64(p));
            c1 = CRC32CD(c1, load64(p + LONG_BLOCK));
            c2 = CRC32CD(c2, load64(p + 2 * LONG_BLOCK));
            p += 8;
        } while (p < end);
        c0 = shift(zeros_long, c0) ^ c1;
        c0 = shift(zeros_long, c0) ^ c2;
        p += 2 * LONG_BLOCK;
        n -= 3 * LONG_BLOCK;
    }
    while (n >= 3 * SHORT_BLOCK) {
        uint32_t c1 = 0, c2 = 0;
        const unsigned char *end = p + SHORT_BLOCK;
        do {
            c0 = CRC32CD(c0, load64(p));
            c1 = CRC32CD(c1, load64(p + SHORT_BLOCK));
            c2 = CRC32CD(c2, load64(p + 2 * SHORT_BLOCK));
            p += 8;
        } while (p < end);
        c0 = shift(zeros_short, c0) ^ c1;
        c0 = shift(zeros_short, c0) ^ c2;
        p += 2 * SHORT_BLOCK;
        n -= 3 * SHORT_BLOCK;
    }
    while (n >= 8) {
        c0 = CRC32CD(c0, load64(p));
        p += 8;
        n -= 8;
    }
    while (n--)
        c0 = CRC32CB(c0, *p++);
    return c0;
}
#endif

/* Build the tables and pick the implementation, once, when the library loads. */
__attribute__((constructor)) static void ws_crc32c_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table8[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            table8[k][n] = table8[0][table8[k - 1][n] & 0xff] ^ (table8[k - 1][n] >> 8);
#if defined(WS_CRC_X86) || defined(WS_CRC_ARM)
    zeros_table(zeros_long, LONG_BLOCK);
    zeros_table(zeros_short, SHORT_BLOCK);
#endif
#ifdef WS_CRC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        active = crc_sse42_raw;
        active_name = "sse4.2";
    }
#endif
#ifdef WS_CRC_ARM
    if (getauxval(AT_HWCAP) & HWCAP_CRC32) {
        active = crc_armv8_raw;
        active_name = "armv8-crc";
    }
#endif
}

uint32_t ws_crc32c(uint32_t crc, const void *buf, size_t len)
{
    return ~active(~crc, (const unsigned char *)buf, len);
}

uint32_t ws_crc32c_table(uint32_t crc, const void *buf, size_t len)
{
    return ~crc_table_raw(~crc, (const unsigned char *)buf, len);
}

const char *ws_crc32c_impl(void)
{
    return active_name;
}
