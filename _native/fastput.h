/* `db[key] = value` in C: the store's __setitem__ slot, made with the CPython C API.
 *
 * Only for the cffi module (it needs Python.h), like kvdict.h. walstore/nativelog.py
 * makes the type and binds each store to its writer; walstore/store.py's NativeStore
 * puts the type first in its bases, so CPython calls the slot directly. The slot does
 * what NativeLogWriter.commit_op does for a lazy-mode put of a str or bytes key and
 * value (same lock, same record, same dict update, same failure handling) and calls
 * the store's Python `put` for everything else. See docs/NATIVE.md, "Fast puts".
 */
#ifndef WALSTORE_FASTPUT_H
#define WALSTORE_FASTPUT_H

#include <stdint.h>

#include "logwrite.h"

#define WS_FASTPUT_OK 0
#define WS_FASTPUT_FAILED 1      /* an argument had the wrong type, or out of memory: nothing changed */
#define WS_FASTPUT_UNSUPPORTED 2 /* not CPython */

/* Make the type (once per process; later calls give the same object) and store it in
 * `out` (the address of a dict the caller holds) under "FastSetItem". The GIL must NOT
 * be held (cffi releases it); this takes it. */
int ws_fastput_type(uintptr_t out);

/* Bind the store at address `store` (an instance of the type) to a writer: its C log,
 * its gate (fast puts only while *gate != 0; the writer clears it under its lock when
 * it closes or is poisoned), the writer object itself (kept alive: it owns `log` and
 * `gate`; its `_notified`, `_apply_failed` and `_append_failed` are called), the dict
 * to update, the writer lock's `acquire` and `release`, and `armed` (a dict: fast puts
 * only while it is empty), and `lazy` (the store's mode: lazy, no wait; else sync: the
 * slot waits for the fdatasync with the GIL released, and a failed wait calls the
 * writer's `_wait_failed(rc)`, which raises). `log` NULL unbinds (every put takes the
 * Python path). The GIL must NOT be held. */
int ws_fastput_bind(uintptr_t store, ws_log *log, const int *gate, uintptr_t writer, uintptr_t data,
                    uintptr_t acquire, uintptr_t release, uintptr_t armed, int lazy);

#endif /* WALSTORE_FASTPUT_H */
