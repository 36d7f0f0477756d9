/* The replayed state as a Python dict, built in C with the CPython C API.
 *
 * Only for the cffi module (it needs Python.h): the fuzz harness and the
 * plain-C compiles leave it out.
 */
#ifndef WALSTORE_KVDICT_H
#define WALSTORE_KVDICT_H

#include <stdint.h>

#include "kvreplay.h"

#define WS_KV_DICT_DONE 0        /* every surviving key from *cursor on is in the dict */
#define WS_KV_DICT_MORE 1        /* `limit` keys done; call again from *cursor */
#define WS_KV_DICT_FAILED 2      /* making or inserting the key at *cursor failed; no exception is left set */
#define WS_KV_DICT_UNSUPPORTED 3 /* not CPython, or not a dict and a list: nothing done */

#define WS_KV_DICT_PREFAULT 1 /* flags: the new objects' pages populated ahead by a helper thread */
#define WS_KV_DICT_PREFETCH 2 /* flags: the dict's table read ahead of each batch's inserts */

/* Insert up to `limit` surviving keys, in dict order from entry *cursor on,
 * into `dict` (a dict), advancing *cursor. `dict` and `codec_keys` are the
 * addresses of a dict and a list the caller holds references to (CPython's
 * id()); the GIL must NOT be held (cffi releases it), this takes it. A key is
 * str (strict UTF-8) when its key-is-str flag is set, else bytes; a value is
 * str for kind 1, else bytes; for kind 2 (codec) the raw bytes are inserted
 * and the key is appended to `codec_keys`, for the caller to decode. Each
 * reference made is released or owned by the dict or list. On FAILED the
 * keys before *cursor are in the dict, the one at *cursor maybe (the caller
 * redoes it), and the exception has been cleared.
 *
 * `flags`: with WS_KV_DICT_PREFAULT (Linux, CPython's own arena allocator),
 * the new objects' memory is populated ahead by a helper thread while the
 * call runs (kvdict.c, "the new objects in pages populated ahead"): `limit`
 * should then be the number of keys left, or less, since it sizes what is
 * populated. With WS_KV_DICT_PREFETCH (CPython versions whose dict layout is
 * known and checked), each batch's inserts find the dict's table in cache
 * (kvdict.c, "the dict's table read ahead of the inserts"). Neither changes
 * the result. */
int ws_kv_build_dict(const ws_kv *kv, uintptr_t dict, uintptr_t codec_keys, uint64_t *cursor, uint64_t limit,
                     int flags);

/* Counters since the process started: calls that took their arenas from a
 * populated region, arenas handed out from regions, bytes populated ahead. */
void ws_kv_dict_arena_stats(uint64_t *regions, uint64_t *arenas, uint64_t *populated);

/* The dict layout WS_KV_DICT_PREFETCH reads: with `layout` 0, the one in use
 * (10: CPython 3.10's; 11: that of 3.11 to 3.13), deciding it on first use, or
 * -1 when none is (another version or build: nothing is read ahead). With 10 or
 * 11, whether that layout's checks pass on this Python (1 or 0), without
 * changing the one in use. *batches: batches read ahead since the process
 * started. Takes the GIL (which must not be held). For the tests. */
int ws_kv_dict_layout(int layout, uint64_t *batches);

#endif /* WALSTORE_KVDICT_H */
