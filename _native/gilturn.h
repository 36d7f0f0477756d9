/* gilturn: handing the GIL from one sync committer to the next without a wake-up.
 *
 * A sync commit lets go of the GIL while it waits for its fdatasync, and takes it
 * back when the sync ends. Every committer a sync releases wants the GIL at once; in
 * CPython each one that finds it held sleeps in take_gil until the holder lets go and
 * signals it, and on a VM whose idle vCPUs halt, that wake-up costs 35 to 40 us (docs/
 * NATIVE.md, "Handing the GIL between committers"). So 6 committers cost 200 us of
 * hand-offs per sync, as long as the sync itself.
 *
 * The turn is a hint beside the GIL: one flag, set while a committer holds the GIL or
 * is about to take it. A committer whose sync ended claims the turn before it takes
 * the GIL; while another committer has it, it yields its CPU (sched_yield, it never
 * sleeps), for at most the spin limit, so that the moment the holder lets go (its next
 * commit's wait) it takes the GIL with no wake-up. It spins only while committers keep
 * the turn briefly (under WS_TURN_HOLD_MAX_NS on average): with longer holds a sleep
 * and a wake-up cost less than the spinning. The GIL alone keeps the interpreter safe:
 * a wrong hint costs time, never correctness.
 *
 * Both functions are called without the GIL. The state is per process, like the GIL.
 */
#ifndef WALSTORE_GILTURN_H
#define WALSTORE_GILTURN_H

#include <stdint.h>

/* Committers spin for the turn only while it is held for less than this on average. */
#define WS_TURN_HOLD_MAX_NS 100000u

/* The caller has just let go of the GIL to wait for a sync. */
void ws_turn_release(void);

/* The caller is about to take the GIL back. */
void ws_turn_claim(void);

/* The longest a committer yields for the turn, in us (0: never; the default is 500). */
void ws_turn_set_spin(uint32_t max_us);

/* Counters since the process started: claims, claims that yielded at least once,
 * claims that gave up at the limit (and took the turn anyway), and the average hold. */
void ws_turn_stats(uint64_t *claims, uint64_t *spun, uint64_t *timeouts, uint64_t *hold_ns);

#endif /* WALSTORE_GILTURN_H */
