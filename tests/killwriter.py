"""Child process for the SIGKILL test: commits forever, reporting each step on stdout.

Commit i is a transaction {"next": i + 1, "k<i % 37>": i, "t<i % 5>": -i}
(deterministic, so the parent can rebuild the state after any n commits).
Prints "A i" before commit i is attempted and "K i" once it is acknowledged.
"""

from __future__ import annotations

import sys

import walstore


def commit_ops(i: int) -> dict[str, int]:
    return {"next": i + 1, f"k{i % 37}": i, f"t{i % 5}": -i}


def state_after(n: int) -> dict[str, int]:
    state: dict[str, int] = {}
    for i in range(n):
        state.update(commit_ops(i))
    return state


def main() -> None:
    path = sys.argv[1]
    segment_size = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 14
    db = walstore.open(path, segment_size=segment_size)
    i = db.get("next", 0)
    out = sys.stdout
    out.write(f"R {i}\n")
    out.flush()
    while True:
        out.write(f"A {i}\n")
        out.flush()
        with db.transaction() as tx:
            for k, v in commit_ops(i).items():
                tx[k] = v
        out.write(f"K {i}\n")
        out.flush()
        i += 1


if __name__ == "__main__":
    main()
