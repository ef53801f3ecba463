#!/usr/bin/env bash
# second-round.sh: every point of BENCHMARKS.md "Performance, second round
# (issue 14)", RUNS rounds (default 3), the points interleaved round by round
# so that a slow minute hurts each point once rather than one point thrice.
# Each run is one `pgrelay-bench --json` line in $OUT/<point>.jsonl; the bench
# refuses (exit 3) to measure on a busy machine unless ALLOW_NOISY=1, and
# marks such runs `"noisy": true`. A refused run is recorded as
# `{"refused": true}`, and a run that ended with no report (a setup error,
# a crash) as `{"error": STATUS}`, so that medians.py counts both.
#
#   cargo build --release --workspace --bins
#   tests/bench/second-round.sh                       # RUNS=3 OUT=bench-results
#   POINTS="fanout storm" RUNS=1 tests/bench/second-round.sh
#
# Medians: python3 tests/bench/medians.py bench-results
set -uo pipefail

BENCH=${BENCH:-${CARGO_TARGET_DIR:-target}/release/pgrelay-bench}
RUNS=${RUNS:-3}
OUT=${OUT:-bench-results}
POINTS=${POINTS:-"fanout p99-1k p99-10k most-sockets door storm ideal-fanout ideal-p99-1k ideal-p99-10k"}
NOISY=()
[ "${ALLOW_NOISY:-0}" = 1 ] && NOISY=(--allow-noisy)
mkdir -p "$OUT"

run() {
    local point=$1
    shift
    case "$point" in
    # 1: 1,000 sockets x 2,000 rows/s, ten rows per INSERT statement
    fanout) "$BENCH" --sockets 1000 --rate 2000 --rows-per-insert 10 --duration 10s "$@" ;;
    # 2: p99 at 1,000 x 100/s and 10,000 x 100/s (3: the latter's idle RSS)
    p99-1k) "$BENCH" --sockets 1000 --rate 100 --duration 10s "$@" ;;
    p99-10k) "$BENCH" --sockets 10000 --rate 100 --duration 10s "$@" ;;
    # 4: 19,000 sockets, half dashboard, half notifications, 50 rows/s
    most-sockets) "$BENCH" --sockets 19000 --rate 50 --stream mixed --duration 10s "$@" ;;
    # 5: new sockets per second through the whole door, 1,000 open
    door) "$BENCH" --scenario connect-rate --sockets 1000 --connect-total 20000 "$@" ;;
    # 5: 10,000 sockets resume at once after a restart, 1,000 rows missed
    storm) "$BENCH" --scenario resume-storm --sockets 10000 --stream mixed --rate 100 \
        --duration 5s --down-rows 1000 "$@" ;;
    # The same clients against the plain broadcaster (`--scenario ideal`, no
    # PostgreSQL): what points 1 and 2 cost on this machine with nothing but
    # the fan-out's writes
    ideal-fanout) "$BENCH" --scenario ideal --sockets 1000 --rate 2000 --rows-per-insert 10 --duration 10s "$@" ;;
    ideal-p99-1k) "$BENCH" --scenario ideal --sockets 1000 --rate 100 --duration 10s "$@" ;;
    ideal-p99-10k) "$BENCH" --scenario ideal --sockets 10000 --rate 100 --duration 10s "$@" ;;
    *) echo "unknown point $point" >&2; return 2 ;;
    esac
}

for round in $(seq 1 "$RUNS"); do
    for point in $POINTS; do
        echo "round $round: $point" >&2
        touch "$OUT/$point.jsonl"
        before=$(wc -l <"$OUT/$point.jsonl")
        run "$point" --json "${NOISY[@]}" >>"$OUT/$point.jsonl" 2>>"$OUT/$point.log"
        status=$?
        after=$(wc -l <"$OUT/$point.jsonl")
        if [ "$status" = 3 ]; then
            echo '{"refused": true}' >>"$OUT/$point.jsonl"
        elif [ "$after" = "$before" ]; then
            echo "{\"error\": $status}" >>"$OUT/$point.jsonl"
        fi
        echo "  exit $status" >&2
    done
done
