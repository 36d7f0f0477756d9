/* gilturn: see gilturn.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "gilturn.h"

#include <sched.h>
#include <time.h>

static int turn;                    /* 1: a committer holds the GIL or is about to take it */
static uint32_t spin_us = 500;      /* the longest a claim yields */
static uint64_t hold_ns;            /* average time a committer keeps the turn (1/8 weight) */
static uint64_t claims, spun, timeouts;
static __thread uint64_t claimed_at; /* when this thread took the turn (0: it has not) */

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

void ws_turn_release(void)
{
    if (claimed_at != 0) {
        uint64_t held = now_ns() - claimed_at, avg = __atomic_load_n(&hold_ns, __ATOMIC_RELAXED);
        /* racy read-modify-write: a lost update only skews an average */
        __atomic_store_n(&hold_ns, avg - avg / 8 + held / 8, __ATOMIC_RELAXED);
        claimed_at = 0;
    }
    __atomic_store_n(&turn, 0, __ATOMIC_RELEASE);
}

static int try_take(void)
{
    int free_turn = 0;
    return __atomic_load_n(&turn, __ATOMIC_RELAXED) == 0 &&
           __atomic_compare_exchange_n(&turn, &free_turn, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

void ws_turn_claim(void)
{
    uint32_t limit = __atomic_load_n(&spin_us, __ATOMIC_RELAXED);
    if (limit == 0)
        return;
    __atomic_fetch_add(&claims, 1, __ATOMIC_RELAXED);
    if (!try_take()) {
        if (__atomic_load_n(&hold_ns, __ATOMIC_RELAXED) < WS_TURN_HOLD_MAX_NS) {
            uint64_t deadline = now_ns() + (uint64_t)limit * 1000u;
            __atomic_fetch_add(&spun, 1, __ATOMIC_RELAXED);
            for (;;) {
                sched_yield();
                if (try_take())
                    break;
                if (now_ns() > deadline) {
                    __atomic_fetch_add(&timeouts, 1, __ATOMIC_RELAXED);
                    break;
                }
            }
        }
        /* Taken, or not worth waiting for: either way this thread is next to want the
         * GIL, and its hold is measured like any other. */
        __atomic_store_n(&turn, 1, __ATOMIC_RELEASE);
    }
    claimed_at = now_ns();
}

void ws_turn_set_spin(uint32_t max_us)
{
    __atomic_store_n(&spin_us, max_us, __ATOMIC_RELAXED);
}

void ws_turn_stats(uint64_t *c, uint64_t *s, uint64_t *t, uint64_t *h)
{
    *c = __atomic_load_n(&claims, __ATOMIC_RELAXED);
    *s = __atomic_load_n(&spun, __ATOMIC_RELAXED);
    *t = __atomic_load_n(&timeouts, __ATOMIC_RELAXED);
    *h = __atomic_load_n(&hold_ns, __ATOMIC_RELAXED);
}
