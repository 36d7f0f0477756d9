/* logwrite: the log writer's hot path in C, called without the GIL.
 *
 * walstore/nativelog.py drives it; walstore/writer.py is the pure-Python
 * reference, record for record the same bytes. What lives here:
 *
 *  - framing: ws_log_put / ws_log_put_op build one COMMIT frame (the header
 *    of docs/FORMAT.md, hardware CRC32C, zero padding) with the next sequence
 *    number and write it at the log's offset, copied into a shared map of the
 *    pre-written segment (lazy modes) or by pwrite (sync mode); only then is
 *    its sequence number published as written.
 *  - group commit: ws_log_wait(seq) returns once an fdatasync that began after
 *    `seq` was published has returned. Whoever finds no sync running leads one
 *    covering everything published so far; the others sleep on a condition
 *    variable, so a waiter never needs the GIL to take the next turn.
 *  - poisoning: a failed fdatasync is recorded and never retried; every waiter
 *    not yet covered, and every later wait, gets its errno.
 *
 * The caller (Python, holding the writer's lock) serialises appends; the log
 * keeps the position (last seq, offset) and the caller moves it for frames it
 * writes itself. Waits may run in any thread at once.
 */
#ifndef WALSTORE_LOGWRITE_H
#define WALSTORE_LOGWRITE_H

#include <stddef.h>
#include <stdint.h>

/* ws_log_put* results besides a seq (> 0) and -errno */
#define WS_LOG_NO_ROOM 0          /* the frame does not fit below the segment limit: roll */
#define WS_LOG_TOO_BIG (-100000)  /* payload over WS_MAX_PAYLOAD */
/* ws_log_wait result when the log was closed before covering the seq */
#define WS_LOG_CLOSED (-100001)
/* ws_log_put* result after an fdatasync failed: the log is poisoned, nothing written */
#define WS_LOG_FAILED (-100002)
/* ws_log_put_op_touched result: the frame would go elsewhere than into map pages already
 * written through; nothing written or published */
#define WS_LOG_NOT_HERE (-100003)
/* or'ed into the seq ws_log_put* returns: a notify threshold was reached */
#define WS_LOG_NOTIFY 4611686018427387904

typedef struct ws_log ws_log;

ws_log *ws_log_new(uint64_t last_seq);
void ws_log_free(ws_log *log);

/* The segment written to from now on (-1: none) and its map of map_size
 * pre-written bytes (0: no map). Call paused. 0, or -errno if the map failed
 * (writes then use pwrite). */
int ws_log_set_segment(ws_log *log, int fd, uint64_t map_size);
/* Frames must end at or below `limit` bytes into the segment. */
void ws_log_set_limit(ws_log *log, uint64_t limit);

/* Append one COMMIT at the log's offset with the next sequence number (the caller
 * serialises appends and dict updates under one lock). Returns the seq (> 0), with
 * WS_LOG_NOTIFY or'ed in when the frame ends at or past the notify offset or brings
 * log_bytes to the notify count; else nothing is written or published:
 * WS_LOG_NO_ROOM, WS_LOG_TOO_BIG, WS_LOG_FAILED, -errno. `lazy`: copy into the map
 * where it covers the frame (no syscall), else pwrite. */
int64_t ws_log_put(ws_log *log, uint32_t type, const uint8_t *payload, size_t size, int lazy);
/* ws_log_put of a one-operation payload: op | flags << 8, key, value. */
int64_t ws_log_put_op(ws_log *log, uint32_t op_flags, const uint8_t *key, size_t key_size, const uint8_t *value,
                      size_t value_size, int lazy);

/* ws_log_put_op, lazy, for a caller that holds the GIL (walstore/fastput.c): only when
 * the frame is copied into pages of the map that earlier frames of this segment were
 * copied into, so the copy meets no page the kernel must first find, read or allocate
 * (a first write, which may wait for the disk); else WS_LOG_NOT_HERE and nothing is
 * done, and the caller appends with ws_log_put_op, GIL released. Every other result
 * is ws_log_put_op's. */
int64_t ws_log_put_op_touched(ws_log *log, uint32_t op_flags, const uint8_t *key, size_t key_size,
                              const uint8_t *value, size_t value_size);

/* The position the log writes at (the caller moves it for frames it writes itself). */
uint64_t ws_log_last_seq(ws_log *log);
void ws_log_set_last_seq(ws_log *log, uint64_t seq);
uint64_t ws_log_offset(ws_log *log);
void ws_log_set_offset(ws_log *log, uint64_t offset);
/* Frame bytes appended since the caller last set it (the compaction policy's measure). */
uint64_t ws_log_log_bytes(ws_log *log);
void ws_log_set_log_bytes(ws_log *log, uint64_t n);
/* When ws_log_put flags WS_LOG_NOTIFY (UINT64_MAX: never). */
void ws_log_set_notify(ws_log *log, uint64_t offset, uint64_t log_bytes);

/* Group commit's gathering: a committer about to lead a sync while fewer committers wait
 * than did at recent syncs (those the last sync released are still publishing their
 * next records) waits for them, at most half the last sync's time and max_us, so that
 * one sync covers them all. 0 turns it off; a lone committer never waits. */
void ws_log_set_gather(ws_log *log, uint32_t max_us);

/* 0 once `seq` is durable; -errno of a failed fdatasync; WS_LOG_CLOSED. */
int ws_log_wait(ws_log *log, uint64_t seq);

/* ws_log_wait for a committer that has just let go of the GIL and takes it back on
 * return: it hands the GIL turn on first and claims it back after (gilturn.h). */
int ws_log_commit_wait(ws_log *log, uint64_t seq);

/* For a background writer that writes in bursts (a snapshot), before each burst: wait
 * until `syncs` commit fdatasyncs have completed since the call and the next one has
 * started (1: the burst then queues behind that sync, so that one commit alone waits for
 * it), or max_us passed (2), or no commit synced or waited for idle_us (0: the log is
 * idle), or the log is closed, failed or paused (0). An idle log costs idle_us. */
int ws_log_gap(ws_log *log, uint32_t syncs, uint32_t idle_us, uint32_t max_us);

/* One burst of a background writer: ws_log_gap (counting the commit syncs since the last
 * burst ended, so time spent preparing this one counts); then it holds the log's syncs (the
 * running one ends, no new one starts), pwrites all of buf at offset and fdatasyncs fd, with
 * no GIL or Python in between, and lets the next sync start. So no commit's flush runs with
 * the burst's write or flush: the next commit to sync waits for the whole burst, and its own
 * flush then has only its records to add. A burst that would take over max_ns (0: no
 * limit) at the rate this log's last burst ran (any caller's: the next segment's zeros, a
 * snapshot) goes in parts of that size (multiples of 4096, at least 1 MiB), each its own
 * gap and hold, so a slower disk than the caller sized the burst for does not hold a commit
 * longer. The nanoseconds the writes and fdatasyncs took (the waits not counted), or -errno. */
int64_t ws_log_burst(ws_log *log, uint32_t syncs, uint32_t idle_us, uint32_t max_us, uint64_t max_ns, int fd,
                     const uint8_t *buf, size_t len, uint64_t offset);
/* The rate (bytes a second) the last burst part of at least 1 MiB ran at, 0 if none; set it
 * (tests). */
uint64_t ws_log_burst_rate(ws_log *log);
void ws_log_set_burst_rate(ws_log *log, uint64_t bytes_per_second);
/* A held turn, for a background step that is not a write (unlinking a file, which frees
 * and, on a filesystem mounted with `discard`, trims its blocks): ws_log_gap, then hold the
 * syncs as ws_log_burst does until ws_log_release(token). The caller must release, and must
 * not wait for a commit in between. Returns ws_log_gap's code. */
int ws_log_hold(ws_log *log, uint32_t syncs, uint32_t idle_us, uint32_t max_us, uint64_t *token);
void ws_log_release(ws_log *log, uint64_t token);
/* Holds ended (bursts and held turns), and commit syncs that ended during one (0 by design;
 * for tests). */
void ws_log_hold_stats(ws_log *log, uint64_t *holds, uint64_t *syncs_during);
/* Holds that, a commit's sync having run when they began, waited for a committer to come
 * back and wait (at most 1 ms) before holding, and how many saw one come (for tests). */
void ws_log_arrival_stats(ws_log *log, uint64_t *waited, uint64_t *arrived);

/* No new sync starts until resumed; returns once the running one has ended. Nests. */
void ws_log_pause(ws_log *log);
void ws_log_resume(ws_log *log);
/* A record written by the caller itself (not through ws_log_append) is published;
 * publishing only ever raises the written seq. */
void ws_log_publish(ws_log *log, uint64_t seq);
/* The caller synced everything up to `seq` itself (paused). */
void ws_log_mark_durable(ws_log *log, uint64_t seq);
/* Poison with errno `err` (> 0), or close (0): waiters not covered return. */
void ws_log_fail(ws_log *log, int err);

/* Fault injection for tests: the next fdatasync (after running) reports sync_errno,
 * the next pwrite fails with write_errno without writing (0: no fault). */
void ws_log_inject(ws_log *log, int sync_errno, int write_errno);

uint64_t ws_log_durable(ws_log *log);
uint64_t ws_log_written(ws_log *log);
uint64_t ws_log_fsyncs(ws_log *log);
int ws_log_error(ws_log *log);

#endif /* WALSTORE_LOGWRITE_H */
