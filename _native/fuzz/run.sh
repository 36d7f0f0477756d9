#!/usr/bin/env bash
# Build the libFuzzer target (clang, ASan + UBSan) and run it for SECONDS (default 60).
# Exits non-zero on any finding (crash, sanitizer report, leak, timeout, broken
# invariant); the input that caused it is left in _native/fuzz/build/artifacts/.
# Needs clang (Debian: apt-get install -y clang). Usage: _native/fuzz/run.sh [SECONDS]
set -euo pipefail

secs="${1:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
native="$(dirname "$here")"
build="$here/build"
python="${PYTHON:-python3}"

if ! command -v clang >/dev/null 2>&1; then
    echo "fuzz/run.sh: clang not found (apt-get install -y clang)" >&2
    exit 2
fi

mkdir -p "$build/corpus" "$build/artifacts"
clang -g -O1 -std=gnu11 -Wall -Wextra -Werror \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I"$native" "$here/fuzz_replay.c" "$native/crc32c.c" "$native/scan.c" "$native/kvreplay.c" "$native/snapshot.c" "$native/yieldpoint.c" \
    -o "$build/fuzz_replay"
rm -rf "$build/seeds"
"$python" "$here/make_corpus.py" "$build/seeds"

echo "fuzz/run.sh: fuzzing for ${secs}s"
# build/corpus grows across runs on one machine; seeds are rewritten each run.
"$build/fuzz_replay" \
    -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$build/artifacts/" -print_final_stats=1 \
    "$build/corpus" "$build/seeds"
