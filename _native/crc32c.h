/* CRC32C (Castagnoli, iSCSI polynomial), as the `crc32c` Python package computes it.
 *
 * ws_crc32c(crc, buf, len) continues a finished CRC: ws_crc32c(0, "123456789", 9)
 * == 0xE3069283, and ws_crc32c(ws_crc32c(0, a, n), b, m) is the CRC of a then b.
 * The implementation is chosen once, when the library is loaded: SSE4.2 on
 * x86-64, the ARMv8 CRC extension on aarch64, else a portable table. Any
 * length and any alignment; reads exactly `len` bytes from `buf`.
 */
#ifndef WALSTORE_CRC32C_H
#define WALSTORE_CRC32C_H

#include <stddef.h>
#include <stdint.h>

uint32_t ws_crc32c(uint32_t crc, const void *buf, size_t len);

/* The portable slicing-by-8 table path, whatever the CPU (for tests). */
uint32_t ws_crc32c_table(uint32_t crc, const void *buf, size_t len);

/* Which implementation ws_crc32c uses: "sse4.2", "armv8-crc" or "table". */
const char *ws_crc32c_impl(void);

#endif /* WALSTORE_CRC32C_H */
