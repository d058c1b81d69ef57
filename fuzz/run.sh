#!/bin/sh
# Build csrc/fuzz_feed.c (libFuzzer + ASan + UBSan) and fuzz spialloc_batch_feed.
#
#   fuzz/run.sh [SECONDS]        default 600; extra libFuzzer flags via FUZZ_FLAGS
#
# Seeds: fuzz/corpus/feed/ (real kernel replies, see fuzz/capture_corpus.py),
# read-only; new inputs go to build/fuzz/corpus/.  Crashes are written to
# fuzz/crashes/ (crash-<sha1>); reproduce one with
#   build/fuzz/fuzz_feed fuzz/crashes/crash-...
set -eu
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-600}
CC=${CC:-clang}
OUT=build/fuzz
mkdir -p "$OUT/corpus" fuzz/crashes

if ! command -v "$CC" >/dev/null 2>&1; then
    echo "fuzz/run.sh: $CC not found (apt-get install -y clang)" >&2
    exit 2
fi
"$CC" -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -Wall -Wextra -Icsrc csrc/fuzz_feed.c csrc/spialloc.c -o "$OUT/fuzz_feed"

LOG="$OUT/fuzz.log"
echo "fuzz/run.sh: fuzzing spialloc_batch_feed for ${SECONDS_TO_RUN}s, log in $LOG"
START=$(date +%s)
set +e
ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:detect_leaks=1} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
"$OUT/fuzz_feed" -max_total_time="$SECONDS_TO_RUN" -print_final_stats=1 \
    -artifact_prefix=fuzz/crashes/ -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
    ${FUZZ_FLAGS:-} "$OUT/corpus" fuzz/corpus/feed >"$LOG" 2>&1
RC=$?
set -e
END=$(date +%s)
echo "--- libFuzzer summary (exit $RC, $((END - START))s wall) ---"
grep -E '^(INFO: Seed|INFO: seed corpus|#[0-9]+[[:space:]]+(INITED|DONE|REDUCE|pulse)|Done [0-9]+ runs|stat::)' "$LOG" | tail -n 25
grep -E 'ERROR: |SUMMARY: |runtime error|invariant violated|Test unit written' "$LOG" || echo "no crash, no sanitizer report"
echo "corpus: $(ls "$OUT/corpus" | wc -l) inputs in $OUT/corpus; crashes: $(ls fuzz/crashes | wc -l) in fuzz/crashes/"

# Source coverage of the final corpus (llvm-cov, if installed): which lines of
# the parser the fuzzer reached.  Functions that do I/O (send/recv) are not
# reachable from spialloc_batch_feed and show as uncovered.
PROFDATA=$(command -v llvm-profdata || true)
LLVMCOV=$(command -v llvm-cov || true)
if [ -n "$PROFDATA" ] && [ -n "$LLVMCOV" ]; then
    "$CC" -g -O0 -fprofile-instr-generate -fcoverage-mapping -fsanitize=fuzzer \
        -Icsrc csrc/fuzz_feed.c csrc/spialloc.c -o "$OUT/fuzz_feed_cov"
    LLVM_PROFILE_FILE="$OUT/feed.profraw" "$OUT/fuzz_feed_cov" -runs=0 "$OUT/corpus" fuzz/corpus/feed >/dev/null 2>&1 || true
    "$PROFDATA" merge -sparse "$OUT/feed.profraw" -o "$OUT/feed.profdata"
    echo "--- coverage of csrc/spialloc.c by the corpus (parser functions) ---"
    "$LLVMCOV" report "$OUT/fuzz_feed_cov" -instr-profile="$OUT/feed.profdata" -show-functions csrc/spialloc.c \
        | grep -E '^(Name|-|TOTAL)|feed|handle_msg|save_text|settle|read_hdr|_init|init_common|delsa_msg_len' || true
    "$LLVMCOV" show "$OUT/fuzz_feed_cov" -instr-profile="$OUT/feed.profdata" csrc/spialloc.c \
        -name-regex='(spialloc_batch_feed|handle_msg|save_text)$' > "$OUT/coverage.txt" 2>/dev/null || true
    echo "(line-by-line: $OUT/coverage.txt)"
fi
exit $RC
