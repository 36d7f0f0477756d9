/* logwrite: framing, writing and group commit of the log writer. See logwrite.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "logwrite.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "gilturn.h"
#include "walstore_format.h"

#define SCRATCH_MIN 4096
#define WS_LOG_LAZY_TOUCHED 2 /* append(): lazy, and only into map pages already written through */

struct ws_log {
    pthread_mutex_t mu;
    pthread_cond_t done[2]; /* waiters for sync generation g sleep on done[g & 1] */
    pthread_cond_t cv;      /* pausers wait here for a running sync to end */
    pthread_cond_t idle_cv; /* (CLOCK_MONOTONIC) ws_log_gap waits here for syncs to start and end */
    int waiters;            /* under mu: committers inside ws_log_wait */
    int gappers;            /* under mu: background writers inside ws_log_gap */
    int arrivals;           /* under mu: holds waiting for a committer to come back (on idle_cv) */
    uint64_t arrival_waits; /* under mu: holds that waited for a committer to come back */
    uint64_t arrived;       /* under mu: ... and saw one come back before HOLD_ARRIVAL_US */
    pthread_cond_t gather_cv; /* (CLOCK_MONOTONIC) a would-be leader gathers committers here */
    int gathering;          /* under mu: a leader waits for committers before its sync */
    uint32_t gather_max_us; /* under mu: the longest it waits (0: never) */
    int peak;               /* under mu: most committers waiting at a sync lately */
    int peak_window;        /* under mu: most in the current window of PEAK_WINDOW syncs */
    uint64_t sync_ns;       /* under mu: how long the last fdatasync took */
    uint64_t burst_fsyncs;  /* under mu: fsyncs when the last ws_log_burst ended */
    uint64_t burst_bps;     /* under mu: bytes a second the last burst part ran at (0: none yet) */
    uint64_t written;       /* atomic: highest seq whose frame (and every earlier one) is written */
    uint64_t durable;       /* atomic, stored under mu: highest seq on stable storage */
    uint64_t fsyncs;        /* under mu */
    uint64_t sync_gen;      /* under mu: syncs started */
    uint64_t sync_target;   /* under mu: what the running sync covers */
    int fd;                 /* under mu */
    int syncing;            /* under mu: an fdatasync is running */
    int holders;            /* under mu: holds of the syncs (bursts, held turns): while any, none starts */
    uint64_t holds;         /* under mu: holds ended (burst parts and held turns) */
    uint64_t syncs_in_holds; /* under mu: commit syncs that ended while held (0) */
    int paused;             /* under mu: pause depth */
    int closed;             /* under mu */
    int error;              /* atomic, stored under mu: errno of a failed sync, never cleared */
    int inject_sync;        /* under mu, tests: errno the next fdatasync reports */
    int inject_write;       /* appends only, tests: errno the next pwrite fails with */
    uint64_t limit;         /* appends only (the caller serialises appends) */
    uint64_t last_seq;      /* appends only; relaxed atomic for readers: the last seq assigned */
    uint64_t offset;        /* appends only; relaxed atomic: where the next frame goes */
    uint64_t log_bytes;     /* appends only; relaxed atomic: frame bytes since the caller reset it */
    uint64_t notify_offset; /* relaxed atomic: flag an append that ends at or past this offset */
    uint64_t notify_bytes;  /* relaxed atomic: ... or brings log_bytes to this */
    uint8_t *map;           /* appends and set_segment only */
    uint64_t map_size;
    uint64_t touched;       /* appends and set_segment only: map pages below this were written through */
    uint64_t page;          /* the page size (a power of two) */
    uint8_t *scratch;       /* appends only: frame assembly for pwrite */
    size_t scratch_size;
};

/* (mu held) Wake every waiter: state changed for all of them. */
static void wake_all(ws_log *log)
{
    pthread_cond_broadcast(&log->done[0]);
    pthread_cond_broadcast(&log->done[1]);
    pthread_cond_broadcast(&log->cv);
    pthread_cond_broadcast(&log->idle_cv);
    pthread_cond_broadcast(&log->gather_cv);
}

static inline void put32(uint8_t *p, uint32_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    memcpy(p, &v, 4);
}

static inline void put64(uint8_t *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

ws_log *ws_log_new(uint64_t last_seq)
{
    ws_log *log = calloc(1, sizeof(*log));
    if (log == NULL)
        return NULL;
    if (pthread_mutex_init(&log->mu, NULL) != 0) {
        free(log);
        return NULL;
    }
    pthread_condattr_t mono;
    int mono_ok = pthread_condattr_init(&mono) == 0;
    if (mono_ok)
        pthread_condattr_setclock(&mono, CLOCK_MONOTONIC);
    int idle_ok = pthread_cond_init(&log->idle_cv, mono_ok ? &mono : NULL) == 0;
    if (idle_ok && pthread_cond_init(&log->gather_cv, mono_ok ? &mono : NULL) != 0) {
        pthread_cond_destroy(&log->idle_cv);
        idle_ok = 0;
    }
    if (mono_ok)
        pthread_condattr_destroy(&mono);
    if (!idle_ok || pthread_cond_init(&log->cv, NULL) != 0 || pthread_cond_init(&log->done[0], NULL) != 0 ||
        pthread_cond_init(&log->done[1], NULL) != 0) {
        pthread_mutex_destroy(&log->mu);
        free(log);
        return NULL;
    }
    log->written = last_seq;
    log->durable = last_seq;
    log->last_seq = last_seq;
    log->notify_offset = UINT64_MAX;
    log->notify_bytes = UINT64_MAX;
    log->fd = -1;
    log->limit = UINT64_MAX;
    long page = sysconf(_SC_PAGESIZE);
    log->page = page >= 4096 && (page & (page - 1)) == 0 ? (uint64_t)page : 4096;
    return log;
}

static void unmap(ws_log *log)
{
    if (log->map != NULL) {
        munmap(log->map, (size_t)log->map_size);
        log->map = NULL;
        log->map_size = 0;
    }
}

void ws_log_free(ws_log *log)
{
    if (log == NULL)
        return;
    unmap(log);
    free(log->scratch);
    pthread_cond_destroy(&log->cv);
    pthread_cond_destroy(&log->idle_cv);
    pthread_cond_destroy(&log->gather_cv);
    pthread_cond_destroy(&log->done[0]);
    pthread_cond_destroy(&log->done[1]);
    pthread_mutex_destroy(&log->mu);
    free(log);
}

int ws_log_set_segment(ws_log *log, int fd, uint64_t map_size)
{
    int rc = 0;
    unmap(log);
    log->touched = 0;
    if (fd >= 0 && map_size > 0 && map_size <= (uint64_t)SIZE_MAX) {
        void *m = mmap(NULL, (size_t)map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            rc = -errno;
        } else {
            log->map = m;
            log->map_size = map_size;
        }
    }
    pthread_mutex_lock(&log->mu);
    log->fd = fd;
    wake_all(log);
    pthread_mutex_unlock(&log->mu);
    return rc;
}

void ws_log_set_limit(ws_log *log, uint64_t limit)
{
    log->limit = limit;
}

/* Room for `size` bytes of frame assembly; NULL if out of memory. */
static uint8_t *scratch(ws_log *log, size_t size)
{
    if (size > log->scratch_size) {
        size_t want = size < SCRATCH_MIN ? SCRATCH_MIN : size;
        uint8_t *p = realloc(log->scratch, want);
        if (p == NULL)
            return NULL;
        log->scratch = p;
        log->scratch_size = want;
    }
    return log->scratch;
}

/* All of buf at offset (a short write is continued); 0 or -errno. */
static int pwrite_fd(int fd, const uint8_t *buf, size_t size, uint64_t offset)
{
    size_t done = 0;
    while (done < size) {
        ssize_t w = pwrite(fd, buf + done, size - done, (off_t)(offset + done));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        done += (size_t)w;
    }
    return 0;
}

static int pwrite_all(ws_log *log, const uint8_t *buf, size_t size, uint64_t offset)
{
    if (log->inject_write) {
        int e = log->inject_write;
        log->inject_write = 0;
        return -e;
    }
    return pwrite_fd(log->fd, buf, size, offset);
}

/* Frame parts: header fields, then up to three payload pieces (op header, key, value). */
struct piece {
    const uint8_t *p;
    size_t n;
};

static int64_t append(ws_log *log, uint64_t seq, uint64_t offset, uint32_t type, const struct piece *pieces,
                      int npieces, int lazy)
{
    size_t n = 0;
    for (int i = 0; i < npieces; i++) {
        if (pieces[i].n > WS_MAX_PAYLOAD - n)
            return WS_LOG_TOO_BIG;
        n += pieces[i].n;
    }
    size_t frame = WS_FRAME_HEADER_SIZE + (size_t)WS_PADDED(n);
    if (__atomic_load_n(&log->error, __ATOMIC_ACQUIRE) != 0)
        return WS_LOG_FAILED;
    if (offset > log->limit || frame > log->limit - offset)
        return WS_LOG_NO_ROOM;
    int direct = lazy && log->map != NULL && offset <= log->map_size && frame <= log->map_size - offset;
    if (lazy == WS_LOG_LAZY_TOUCHED && (!direct || offset + frame > log->touched))
        return WS_LOG_NOT_HERE;
    uint8_t *f = direct ? log->map + offset : scratch(log, frame);
    if (f == NULL)
        return -ENOMEM;
    uint64_t durable = __atomic_load_n(&log->durable, __ATOMIC_ACQUIRE);
    put32(f + 4, (uint32_t)n);
    f[8] = (uint8_t)type;
    f[9] = 0;
    memset(f + 10, 0, 6);
    put64(f + 16, seq);
    put64(f + 24, durable);
    size_t at = WS_FRAME_HEADER_SIZE;
    for (int i = 0; i < npieces; i++) {
        if (pieces[i].n) {
            memcpy(f + at, pieces[i].p, pieces[i].n);
            at += pieces[i].n;
        }
    }
    if (at < frame)
        memset(f + at, 0, frame - at);
    put32(f, ws_crc32c(0, f + 4, frame - 4));
    if (!direct) {
        int rc = pwrite_all(log, f, frame, offset);
        if (rc < 0)
            return rc;
    } else if (offset + frame > log->touched) {
        log->touched = (offset + frame + log->page - 1) & ~(log->page - 1);
    }
    __atomic_store_n(&log->written, seq, __ATOMIC_RELEASE);
    return (int64_t)frame;
}

/* (appends serialised) Append at the log's own offset with the next seq; see logwrite.h. */
static int64_t put(ws_log *log, uint32_t type, const struct piece *pieces, int npieces, int lazy)
{
    uint64_t seq = log->last_seq + 1;
    int64_t r = append(log, seq, log->offset, type, pieces, npieces, lazy);
    if (r <= 0)
        return r;
    uint64_t offset = log->offset + (uint64_t)r;
    uint64_t bytes = log->log_bytes + (uint64_t)r;
    __atomic_store_n(&log->offset, offset, __ATOMIC_RELAXED);
    __atomic_store_n(&log->log_bytes, bytes, __ATOMIC_RELAXED);
    __atomic_store_n(&log->last_seq, seq, __ATOMIC_RELAXED);
    if (offset >= __atomic_load_n(&log->notify_offset, __ATOMIC_RELAXED) ||
        bytes >= __atomic_load_n(&log->notify_bytes, __ATOMIC_RELAXED))
        return (int64_t)(seq | WS_LOG_NOTIFY);
    return (int64_t)seq;
}

int64_t ws_log_put(ws_log *log, uint32_t type, const uint8_t *payload, size_t size, int lazy)
{
    struct piece p = {payload, size};
    return put(log, type, &p, 1, lazy != 0);
}

static int64_t put_op(ws_log *log, uint32_t op_flags, const uint8_t *key, size_t key_size, const uint8_t *value,
                      size_t value_size, int lazy)
{
    uint8_t oph[WS_OP_HEADER_SIZE];
    if (key_size > UINT32_MAX || value_size > UINT32_MAX)
        return WS_LOG_TOO_BIG;
    oph[0] = (uint8_t)(op_flags & 0xff);
    oph[1] = (uint8_t)((op_flags >> 8) & 0xff);
    oph[2] = 0;
    oph[3] = 0;
    put32(oph + 4, (uint32_t)key_size);
    put32(oph + 8, (uint32_t)value_size);
    struct piece p[3] = {{oph, sizeof(oph)}, {key, key_size}, {value, value_size}};
    return put(log, WS_REC_COMMIT, p, 3, lazy);
}

int64_t ws_log_put_op(ws_log *log, uint32_t op_flags, const uint8_t *key, size_t key_size, const uint8_t *value,
                      size_t value_size, int lazy)
{
    return put_op(log, op_flags, key, key_size, value, value_size, lazy != 0);
}

int64_t ws_log_put_op_touched(ws_log *log, uint32_t op_flags, const uint8_t *key, size_t key_size,
                              const uint8_t *value, size_t value_size)
{
    return put_op(log, op_flags, key, key_size, value, value_size, WS_LOG_LAZY_TOUCHED);
}

uint64_t ws_log_last_seq(ws_log *log)
{
    return __atomic_load_n(&log->last_seq, __ATOMIC_RELAXED);
}

void ws_log_set_last_seq(ws_log *log, uint64_t seq)
{
    __atomic_store_n(&log->last_seq, seq, __ATOMIC_RELAXED);
}

uint64_t ws_log_offset(ws_log *log)
{
    return __atomic_load_n(&log->offset, __ATOMIC_RELAXED);
}

void ws_log_set_offset(ws_log *log, uint64_t offset)
{
    __atomic_store_n(&log->offset, offset, __ATOMIC_RELAXED);
}

uint64_t ws_log_log_bytes(ws_log *log)
{
    return __atomic_load_n(&log->log_bytes, __ATOMIC_RELAXED);
}

void ws_log_set_log_bytes(ws_log *log, uint64_t n)
{
    __atomic_store_n(&log->log_bytes, n, __ATOMIC_RELAXED);
}

void ws_log_set_notify(ws_log *log, uint64_t offset, uint64_t log_bytes)
{
    __atomic_store_n(&log->notify_offset, offset, __ATOMIC_RELAXED);
    __atomic_store_n(&log->notify_bytes, log_bytes, __ATOMIC_RELAXED);
}

#define PEAK_WINDOW 64 /* syncs (a power of two) after which `peak` forgets committers gone */

static void deadline_after(struct timespec *t, uint64_t us);

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

void ws_log_set_gather(ws_log *log, uint32_t max_us)
{
    pthread_mutex_lock(&log->mu);
    log->gather_max_us = max_us;
    pthread_mutex_unlock(&log->mu);
}

static int data_sync(int fd)
{
#if defined(__APPLE__) && defined(F_FULLFSYNC)
    return fcntl(fd, F_FULLFSYNC);
#else
    return fdatasync(fd);
#endif
}

int ws_log_wait(ws_log *log, uint64_t seq)
{
    int rc, gathered = 0;
    if (__atomic_load_n(&log->durable, __ATOMIC_ACQUIRE) >= seq)
        return 0;
    pthread_mutex_lock(&log->mu);
    log->waiters++;
    if (log->arrivals)
        pthread_cond_broadcast(&log->idle_cv); /* a hold waits for a committer to come back */
    if (log->gathering && log->waiters >= log->peak)
        pthread_cond_signal(&log->gather_cv); /* the leader has gathered as many as it expects */
    for (;;) {
        if (log->durable >= seq) {
            rc = 0;
            break;
        }
        if (log->error) {
            rc = -log->error;
            break;
        }
        if (log->closed) {
            rc = WS_LOG_CLOSED;
            break;
        }
        if (log->syncing && seq <= log->sync_target) {
            /* The running sync covers seq: sleep until it ends. */
            pthread_cond_wait(&log->done[log->sync_gen & 1], &log->mu);
            continue;
        }
        if (log->syncing || log->gathering || log->holders || log->paused || log->fd < 0) {
            /* Needs the next sync: its committers sleep apart, and one is woken to lead it. */
            pthread_cond_wait(&log->done[(log->sync_gen + 1) & 1], &log->mu);
            continue;
        }
        if (!gathered && log->waiters < log->peak && log->gather_max_us > 0) {
            /* Fewer committers wait than did at recent syncs: those the last sync released
             * are publishing their next records. Wait for them, at most half a sync (and
             * gather_max_us), so that this sync covers them too instead of leaving them
             * to the next one. */
            uint64_t us = log->sync_ns / 2000;
            struct timespec until;
            deadline_after(&until, us < log->gather_max_us ? us : log->gather_max_us);
            log->gathering = 1;
            while (log->waiters < log->peak && !log->closed && !log->error && !log->paused)
                if (pthread_cond_timedwait(&log->gather_cv, &log->mu, &until) == ETIMEDOUT)
                    break;
            log->gathering = 0;
            gathered = 1;
            continue; /* the state may have changed: decide again (this time without gathering) */
        }
        /* Lead: one fdatasync for everything published so far. */
        if (log->waiters > log->peak_window)
            log->peak_window = log->waiters;
        if (log->waiters > log->peak)
            log->peak = log->waiters;
        if ((log->sync_gen & (PEAK_WINDOW - 1)) == 0) { /* forget committers that have gone */
            log->peak = log->peak_window;
            log->peak_window = 0;
        }
        log->syncing = 1;
        uint64_t gen = ++log->sync_gen;
        uint64_t target = __atomic_load_n(&log->written, __ATOMIC_ACQUIRE);
        log->sync_target = target;
        if (log->gappers)
            pthread_cond_broadcast(&log->idle_cv); /* a burst may start behind this sync */
        int fd = log->fd;
        int injected = log->inject_sync;
        log->inject_sync = 0;
        pthread_mutex_unlock(&log->mu);
        uint64_t t0 = now_ns();
        int r = data_sync(fd);
        int e = r == 0 ? 0 : errno;
        uint64_t took = now_ns() - t0;
        if (injected)
            e = injected; /* the sync ran: like a real failure, the data may or may not be there */
        pthread_mutex_lock(&log->mu);
        log->syncing = 0;
        log->sync_ns = took;
        if (e != 0) {
            if (log->error == 0)
                __atomic_store_n(&log->error, e, __ATOMIC_RELEASE);
            wake_all(log);
        } else {
            log->fsyncs++;
            if (target > log->durable)
                __atomic_store_n(&log->durable, target, __ATOMIC_RELEASE);
            pthread_cond_broadcast(&log->done[gen & 1]);
            pthread_cond_signal(&log->done[(gen + 1) & 1]);
            pthread_cond_broadcast(&log->cv);
            pthread_cond_broadcast(&log->idle_cv);
        }
    }
    if (--log->waiters == 0)
        pthread_cond_broadcast(&log->idle_cv);
    pthread_mutex_unlock(&log->mu);
    return rc;
}

int ws_log_commit_wait(ws_log *log, uint64_t seq)
{
    ws_turn_release();
    int rc = ws_log_wait(log, seq);
    ws_turn_claim();
    return rc;
}

static void deadline_after(struct timespec *t, uint64_t us)
{
    clock_gettime(CLOCK_MONOTONIC, t);
    t->tv_sec += (time_t)(us / 1000000u);
    t->tv_nsec += (long)(us % 1000000u) * 1000L;
    if (t->tv_nsec >= 1000000000L) {
        t->tv_sec++;
        t->tv_nsec -= 1000000000L;
    }
}

/* ws_log_gap counting the syncs since `*since` (the current count if NULL). */
static int gap(ws_log *log, const uint64_t *since, uint32_t syncs, uint32_t idle_us, uint32_t max_us)
{
    struct timespec until, quiet;
    uint64_t start, seen;
    int rc = 0, enough = 0;
    deadline_after(&until, max_us);
    pthread_mutex_lock(&log->mu);
    log->gappers++;
    seen = log->fsyncs;
    start = since ? *since : seen;
    deadline_after(&quiet, idle_us);
    while (!log->closed && !log->error && !log->paused) {
        if (!enough && log->fsyncs - start >= syncs) {
            enough = 1; /* now wait for the next commit's sync to start, or idle_us */
            deadline_after(&quiet, idle_us);
        }
        if (enough && log->syncing) {
            rc = 1; /* a commit's sync runs: the burst goes now, and that commit alone waits for it */
            break;
        }
        if (!enough && (log->fsyncs != seen || log->syncing || log->waiters > 0)) {
            seen = log->fsyncs; /* commits are running: the quiet period starts over */
            deadline_after(&quiet, idle_us);
        }
        struct timespec *next = (quiet.tv_sec < until.tv_sec ||
                                 (quiet.tv_sec == until.tv_sec && quiet.tv_nsec < until.tv_nsec))
                                    ? &quiet
                                    : &until;
        if (pthread_cond_timedwait(&log->idle_cv, &log->mu, next) == ETIMEDOUT) {
            if (next == &until) {
                rc = 2;
                break;
            }
            if (enough || (log->fsyncs == seen && !log->syncing && log->waiters == 0))
                break; /* no sync started for idle_us: nobody to make room for */
        }
    }
    log->gappers--;
    pthread_mutex_unlock(&log->mu);
    return rc;
}

int ws_log_gap(ws_log *log, uint32_t syncs, uint32_t idle_us, uint32_t max_us)
{
    return gap(log, NULL, syncs, idle_us, max_us);
}

/* Hold the syncs: the running one ends, and no other starts until release(); returns the
 * count of syncs done then. Traced on the dev VM, a burst written while a commit's flush
 * ran held up that commit for the write and the next one for the burst's own flush; held,
 * one commit waits for both and the next not at all. Holds nest (a counter).
 *
 * When a sync was running, the hold also waits (at most HOLD_ARRIVAL_US) for a committer
 * to come back and wait: the committer that sync released is then back in its next commit,
 * which waits for the hold anyway. Traced on the dev VM, a burst that started its write at
 * once added about 0.7 ms to the commit before it (its return to Python, on a core the
 * burst's write was being set up on, is the likely cause), one more slowed commit per burst
 * and held turn; waiting for the arrival removed those (docs/BENCHMARKS.md). */
#define HOLD_ARRIVAL_US 1000
static uint64_t hold(ws_log *log)
{
    uint64_t at;
    int waited = 0;
    pthread_mutex_lock(&log->mu);
    log->holders++;
    while (log->syncing && !log->closed && !log->error) {
        pthread_cond_wait(&log->cv, &log->mu);
        waited = 1;
    }
    if (waited && log->waiters == 0) {
        struct timespec until;
        deadline_after(&until, HOLD_ARRIVAL_US);
        log->arrivals++;
        log->arrival_waits++;
        while (log->waiters == 0 && !log->closed && !log->error)
            if (pthread_cond_timedwait(&log->idle_cv, &log->mu, &until) == ETIMEDOUT)
                break;
        log->arrivals--;
        if (log->waiters > 0)
            log->arrived++;
    }
    at = log->fsyncs;
    pthread_mutex_unlock(&log->mu);
    return at;
}

static void release(ws_log *log, uint64_t fsyncs_at)
{
    pthread_mutex_lock(&log->mu);
    if (log->holders > 0)
        log->holders--;
    log->holds++;
    log->syncs_in_holds += log->fsyncs - fsyncs_at;
    log->burst_fsyncs = log->fsyncs;
    if (log->holders == 0)
        pthread_cond_signal(&log->done[(log->sync_gen + 1) & 1]); /* one waiting committer leads the next sync */
    pthread_mutex_unlock(&log->mu);
}

#define BURST_PART_MIN (1u << 20) /* a burst is cut into parts of at least this many bytes */
/* A log's first burst part, before any rate is known: about 20 ms at this machine's slow
 * disk state (about 210 MB/s). A first 24 MiB part, sized for nothing, held a commit 84 to
 * 116 ms when a new store's first segment was prepared (docs/BENCHMARKS.md). */
#define BURST_FIRST_PART (4u << 20)

/* (mu held) The most bytes one burst part should hold to take max_ns at the rate the last
 * part ran (BURST_FIRST_PART before any), a multiple of 4096 (O_DIRECT), at least
 * BURST_PART_MIN; 0 for no limit. */
static uint64_t part_cap(const ws_log *log, uint64_t max_ns)
{
    uint64_t cap;
    if (max_ns == 0)
        return 0;
    if (log->burst_bps == 0)
        return BURST_FIRST_PART;
    cap = log->burst_bps / 1000u * (max_ns / 1000000u) + log->burst_bps / 1000000000u * (max_ns % 1000000u);
    cap &= ~(uint64_t)4095;
    return cap < BURST_PART_MIN ? BURST_PART_MIN : cap;
}

int64_t ws_log_burst(ws_log *log, uint32_t syncs, uint32_t idle_us, uint32_t max_us, uint64_t max_ns, int fd,
                     const uint8_t *buf, size_t len, uint64_t offset)
{
    int64_t total = 0;
    size_t done = 0;
    do {
        struct timespec t0, t1;
        int rc, e = 0;
        uint64_t fsyncs_at, cap, ns;
        size_t part = len - done;
        pthread_mutex_lock(&log->mu);
        cap = part_cap(log, max_ns);
        pthread_mutex_unlock(&log->mu);
        if (cap && part > cap) { /* a slower disk than the caller sized for: equal, shorter parts */
            uint64_t n = (part + cap - 1) / cap, even = ((part + n - 1) / n + 4095) & ~(uint64_t)4095;
            part = (size_t)(even < part ? even : part);
        }
        gap(log, &log->burst_fsyncs, syncs, idle_us, max_us); /* read under mu */
        fsyncs_at = hold(log);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        rc = pwrite_fd(fd, buf + done, part, offset + done);
        if (rc >= 0 && data_sync(fd) != 0)
            e = errno;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ns = (uint64_t)((int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec));
        release(log, fsyncs_at);
        if (rc < 0)
            return rc;
        if (e)
            return -e;
        if (part >= BURST_PART_MIN) { /* small parts say little about the rate */
            pthread_mutex_lock(&log->mu);
            log->burst_bps = (uint64_t)((double)part * 1e9 / (double)(ns ? ns : 1));
            pthread_mutex_unlock(&log->mu);
        }
        total += (int64_t)ns;
        done += part;
    } while (done < len);
    return total;
}

void ws_log_set_burst_rate(ws_log *log, uint64_t bytes_per_second)
{
    pthread_mutex_lock(&log->mu);
    log->burst_bps = bytes_per_second;
    pthread_mutex_unlock(&log->mu);
}

uint64_t ws_log_burst_rate(ws_log *log)
{
    pthread_mutex_lock(&log->mu);
    uint64_t r = log->burst_bps;
    pthread_mutex_unlock(&log->mu);
    return r;
}

int ws_log_hold(ws_log *log, uint32_t syncs, uint32_t idle_us, uint32_t max_us, uint64_t *token)
{
    int rc = gap(log, NULL, syncs, idle_us, max_us);
    *token = hold(log);
    return rc;
}

void ws_log_release(ws_log *log, uint64_t token)
{
    release(log, token);
}

void ws_log_hold_stats(ws_log *log, uint64_t *holds, uint64_t *syncs_during)
{
    pthread_mutex_lock(&log->mu);
    *holds = log->holds;
    *syncs_during = log->syncs_in_holds;
    pthread_mutex_unlock(&log->mu);
}

void ws_log_arrival_stats(ws_log *log, uint64_t *waited, uint64_t *arrived)
{
    pthread_mutex_lock(&log->mu);
    *waited = log->arrival_waits;
    *arrived = log->arrived;
    pthread_mutex_unlock(&log->mu);
}

void ws_log_pause(ws_log *log)
{
    pthread_mutex_lock(&log->mu);
    log->paused++;
    while (log->syncing)
        pthread_cond_wait(&log->cv, &log->mu);
    pthread_mutex_unlock(&log->mu);
}

void ws_log_resume(ws_log *log)
{
    pthread_mutex_lock(&log->mu);
    if (log->paused > 0)
        log->paused--;
    wake_all(log);
    pthread_mutex_unlock(&log->mu);
}

void ws_log_publish(ws_log *log, uint64_t seq)
{
    uint64_t cur = __atomic_load_n(&log->written, __ATOMIC_RELAXED);
    while (cur < seq && !__atomic_compare_exchange_n(&log->written, &cur, seq, 1, __ATOMIC_RELEASE, __ATOMIC_RELAXED))
        ;
}

void ws_log_mark_durable(ws_log *log, uint64_t seq)
{
    pthread_mutex_lock(&log->mu);
    if (seq > log->durable)
        __atomic_store_n(&log->durable, seq, __ATOMIC_RELEASE);
    wake_all(log);
    pthread_mutex_unlock(&log->mu);
}

void ws_log_fail(ws_log *log, int err)
{
    pthread_mutex_lock(&log->mu);
    if (err > 0) {
        if (log->error == 0)
            __atomic_store_n(&log->error, err, __ATOMIC_RELEASE);
    } else {
        log->closed = 1;
    }
    wake_all(log);
    pthread_mutex_unlock(&log->mu);
}

void ws_log_inject(ws_log *log, int sync_errno, int write_errno)
{
    pthread_mutex_lock(&log->mu);
    log->inject_sync = sync_errno;
    log->inject_write = write_errno;
    pthread_mutex_unlock(&log->mu);
}

uint64_t ws_log_durable(ws_log *log)
{
    return __atomic_load_n(&log->durable, __ATOMIC_ACQUIRE);
}

uint64_t ws_log_written(ws_log *log)
{
    return __atomic_load_n(&log->written, __ATOMIC_ACQUIRE);
}

uint64_t ws_log_fsyncs(ws_log *log)
{
    pthread_mutex_lock(&log->mu);
    uint64_t n = log->fsyncs;
    pthread_mutex_unlock(&log->mu);
    return n;
}

int ws_log_error(ws_log *log)
{
    pthread_mutex_lock(&log->mu);
    int e = log->error;
    pthread_mutex_unlock(&log->mu);
    return e;
}
