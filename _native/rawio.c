/* rawio: timed raw write loops for `walstore bench`. See rawio.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "rawio.h"

#include <errno.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

int64_t rawio_now_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return -1;
    return (int64_t)ts.tv_sec * 1000000000LL + (int64_t)ts.tv_nsec;
}

int rawio_has_rwf_dsync(void)
{
#if defined(RWF_DSYNC) && defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 26))
    return 1;
#else
    return 0;
#endif
}

/* Write all of buf at off; short writes are continued, EINTR retried. 0 or -errno. */
static int write_all(int fd, int method, const char *buf, size_t size, off_t off)
{
    size_t done = 0;
    while (done < size) {
        ssize_t w;
        if (method == RAWIO_RWF_DSYNC) {
#if defined(RWF_DSYNC) && defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 26))
            struct iovec iov;
            iov.iov_base = (void *)(buf + done);
            iov.iov_len = size - done;
            w = pwritev2(fd, &iov, 1, off + (off_t)done, RWF_DSYNC);
#else
            return -ENOSYS;
#endif
        } else {
            w = pwrite(fd, buf + done, size - done, off + (off_t)done);
        }
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO; /* no progress: never spin */
        done += (size_t)w;
    }
    return 0;
}

static int sync_fd(int fd, int method)
{
    int rc;
    do {
        rc = method == RAWIO_FSYNC ? fsync(fd) : fdatasync(fd);
    } while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : -errno;
}

int64_t rawio_run(int fd, int method, const void *buf, size_t size, int64_t offset0, int64_t n,
                  int64_t min_ops, int64_t budget_ns, int64_t *lat_ns, int64_t *sync_ns)
{
    int64_t i, start, t0, t1, t2;
    int rc;

    if (fd < 0 || buf == NULL || size == 0 || n < 0 || offset0 < 0 || lat_ns == NULL)
        return -EINVAL;
    if (method < RAWIO_NOSYNC || method > RAWIO_RWF_DSYNC)
        return -EINVAL;
    start = rawio_now_ns();
    if (start < 0)
        return -errno;
    for (i = 0; i < n; i++) {
        off_t off = (off_t)(offset0 + i * (int64_t)size);
        t0 = rawio_now_ns();
        rc = write_all(fd, method, (const char *)buf, size, off);
        if (rc != 0)
            return rc;
        t1 = rawio_now_ns();
        if (method == RAWIO_FSYNC || method == RAWIO_FDATASYNC) {
            rc = sync_fd(fd, method);
            if (rc != 0)
                return rc;
            t2 = rawio_now_ns();
        } else {
            t2 = t1;
        }
        if (t0 < 0 || t1 < 0 || t2 < 0)
            return -EIO;
        lat_ns[i] = t2 - t0;
        if (sync_ns != NULL)
            sync_ns[i] = t2 - t1;
        if (budget_ns > 0 && i + 1 >= min_ops && t2 - start >= budget_ns)
            return i + 1;
    }
    return n;
}
