/* Yield points: CPU-heavy background loops give a waiting thread the core.
 *
 * A compaction replays the sealed log (scan, apply), makes its burst buffers'
 * pages and frames the snapshot in C, each a loop that keeps a core busy for
 * tens of milliseconds. On a 2-core machine the store's own committers then
 * waited, runnable, 1.5 to 5 ms for a core after their fdatasync returned
 * (perf sched): the scheduler let the loop run on. A thread that turns
 * yielding on (ws_set_yielding, for itself only) calls sched_yield() after
 * every WS_YIELD_EVERY_NS of such work, which costs one system call when no
 * other thread waits. Loops run by other threads (open()'s replay) are unchanged.
 */
#ifndef WALSTORE_YIELDPOINT_H
#define WALSTORE_YIELDPOINT_H

#include <stdint.h>

#define WS_YIELD_EVERY_NS 100000u /* 100 us: at most that long before a waiting thread gets the core */

/* Turn yield points on (1) or off (0) for the calling thread; returns the previous setting. */
int ws_set_yielding(int on);
/* sched_yield() calls the calling thread's yield points have made (for tests). */
uint64_t ws_yields(void);

typedef struct {
    uint64_t last_ns; /* when this loop last yielded, or began (0: not yet) */
    unsigned count;   /* steps since the clock was last read */
    int on;           /* the thread's setting when the loop began */
} ws_yield_point;

/* Start a loop's yield point: reads the calling thread's setting once. */
void ws_yield_begin(ws_yield_point *y);
/* (internal) Read the clock; yield if WS_YIELD_EVERY_NS have passed. */
void ws_yield_check(ws_yield_point *y);

/* One step of a loop: every `every` steps (each a fraction of a microsecond
 * to a few), the clock is read; nothing at all when yielding is off. */
static inline void ws_yield_step(ws_yield_point *y, unsigned every)
{
    if (y->on && ++y->count >= every)
        ws_yield_check(y);
}

#endif /* WALSTORE_YIELDPOINT_H */
