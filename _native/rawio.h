/* rawio: timed raw write loops for `walstore bench` (walstore/bench.py).
 *
 * Each call does `n` writes of `size` bytes from `buf` at offsets
 * offset0, offset0 + size, offset0 + 2*size, ... on an fd the caller opened
 * (with O_DSYNC / O_DIRECT as the method needs), and records the latency of
 * every operation in nanoseconds (CLOCK_MONOTONIC) into caller-provided
 * arrays. Every return code is checked: a short write is continued, EINTR is
 * retried, and any other failure stops the loop and is returned as -errno.
 */
#ifndef WALSTORE_RAWIO_H
#define WALSTORE_RAWIO_H

#include <stdint.h>
#include <stddef.h>

/* How each write is made durable. */
#define RAWIO_NOSYNC 0     /* pwrite only */
#define RAWIO_FSYNC 1      /* pwrite, then fsync */
#define RAWIO_FDATASYNC 2  /* pwrite, then fdatasync */
#define RAWIO_PLAIN 3      /* pwrite only; the fd carries O_DSYNC (and maybe O_DIRECT) */
#define RAWIO_RWF_DSYNC 4  /* pwritev2(..., RWF_DSYNC) */

/* Nonzero when this build has pwritev2 and RWF_DSYNC (the kernel may still say ENOSYS/EOPNOTSUPP). */
int rawio_has_rwf_dsync(void);

/* Run the loop. lat_ns[i] gets the whole operation (write + sync) of op i;
 * sync_ns, if not NULL, gets the sync call alone (0 for methods with no
 * separate sync call). Stops early, after at least min_ops operations, once
 * budget_ns nanoseconds have passed (budget_ns <= 0: no time limit).
 * For an O_DIRECT fd, buf, size and offset0 must suit the device's alignment
 * (a page-aligned buffer, e.g. from mmap, and multiples of the logical block size).
 * Returns the number of operations done (>= 0), or -errno on the first failure. */
int64_t rawio_run(int fd, int method, const void *buf, size_t size, int64_t offset0, int64_t n,
                  int64_t min_ops, int64_t budget_ns, int64_t *lat_ns, int64_t *sync_ns);

/* Monotonic clock in nanoseconds, the clock rawio_run uses. */
int64_t rawio_now_ns(void);

#endif
