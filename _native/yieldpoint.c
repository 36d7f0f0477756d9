/* Yield points (yieldpoint.h): per-thread setting, sched_yield every WS_YIELD_EVERY_NS. */
#define _GNU_SOURCE
#include "yieldpoint.h"

#include <sched.h>
#include <time.h>

static _Thread_local int yielding;
static _Thread_local uint64_t yields;

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int ws_set_yielding(int on)
{
    int was = yielding;
    yielding = on != 0;
    return was;
}

uint64_t ws_yields(void)
{
    return yields;
}

void ws_yield_begin(ws_yield_point *y)
{
    y->last_ns = 0;
    y->count = 0;
    y->on = yielding;
}

void ws_yield_check(ws_yield_point *y)
{
    uint64_t t = now_ns();
    y->count = 0;
    if (y->last_ns == 0) {
        y->last_ns = t;
    } else if (t - y->last_ns >= WS_YIELD_EVERY_NS) {
        sched_yield();
        yields++;
        y->last_ns = now_ns();
    }
}
