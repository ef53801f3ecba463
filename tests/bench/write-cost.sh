#!/usr/bin/env bash
# write-cost.sh: what capture costs the application's writes (BENCHMARKS.md, "Write cost").
#
# 8 pgbench clients (-c 8 -j 2), one row inserted into the demo's `businesses`
# per transaction, four variants interleaved run by run (a b c d a b c d ...):
#   a  no trigger
#   b  naive AFTER INSERT FOR EACH ROW trigger: pg_notify('business_events', row_to_json(NEW)::text)
#   c  pgrelay's capture, as `pgrelay install --demo` installs it
#   d  the same capture with the commit-order lock removed from pgrelay.emit
#      (bench database only; emit is restored afterwards)
# Only the table's triggers (and, for d, emit's body) change between variants.
# Prints every run, the medians, c/b and c/d. Creates and drops its own database.
#
#   tests/bench/write-cost.sh                       # RUNS=3 SECS=15
#   RUNS=5 SECS=10 PGURL=postgres://postgres@127.0.0.1:5432 tests/bench/write-cost.sh
#   PGRELAY=/path/to/pgrelay tests/bench/write-cost.sh
#
# Needs psql and pgbench, a superuser URL (the demo install and emit's swap),
# and a built pgrelay (default: $CARGO_TARGET_DIR/debug/pgrelay, else
# target/debug/pgrelay; `cargo build --bin pgrelay`). Refuses a server with
# fsync or synchronous_commit off unless ALLOW_NONDURABLE=1.
set -euo pipefail
export LC_ALL=C PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"

PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
RUNS=${RUNS:-3}
SECS=${SECS:-15}
CLIENTS=${CLIENTS:-8}
THREADS=${THREADS:-2}
DB=${DB:-pgrelay_writecost_$$}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
PGRELAY=${PGRELAY:-${CARGO_TARGET_DIR:-$HERE/target}/debug/pgrelay}

[[ $RUNS =~ ^[1-9][0-9]*$ && $SECS =~ ^[1-9][0-9]*$ ]] || { echo "RUNS and SECS must be positive integers" >&2; exit 2; }
[[ -x $PGRELAY ]] || { echo "no pgrelay binary at $PGRELAY (cargo build --bin pgrelay, or set PGRELAY)" >&2; exit 2; }
command -v pgbench >/dev/null || { echo "pgbench not found (install postgresql-client / postgresql-contrib)" >&2; exit 2; }

# Every psql and pgbench call is bounded in time.
q() { timeout 120 psql -X -v ON_ERROR_STOP=1 -qAt "$@"; }
qdb() { q "$PGURL/$DB" "$@"; }

SCRIPT=$(mktemp /tmp/pgrelay-write-cost.XXXXXX.sql)
ORIG_EMIT=""; OWNER=""; CREATED=0
cleanup() {
    status=$?
    if [[ $CREATED = 1 ]]; then
        if [[ -n $ORIG_EMIT ]]; then
            printf 'SET ROLE %s;\n%s;\nRESET ROLE;\n' "$OWNER" "$ORIG_EMIT" | qdb >/dev/null 2>&1 ||
                echo "warning: could not restore pgrelay.emit" >&2
        fi
        q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" ||
            echo "warning: could not drop database $DB" >&2
    fi
    rm -f "$SCRIPT"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "# $(date -u +%FT%TZ) $(uname -n), $(nproc) cores; $(q "$PGURL/postgres" -c 'SELECT version()')"
FSYNC=$(q "$PGURL/postgres" -c 'SHOW fsync')
SYNC=$(q "$PGURL/postgres" -c 'SHOW synchronous_commit')
echo "# server $PGURL: fsync=$FSYNC synchronous_commit=$SYNC"
if [[ $FSYNC != on || $SYNC != on ]] && [[ ${ALLOW_NONDURABLE:-0} != 1 ]]; then
    echo "the server is not durable (fsync=$FSYNC synchronous_commit=$SYNC); set ALLOW_NONDURABLE=1 to measure anyway" >&2
    exit 2
fi
echo "# load before: $(uptime)"
echo "# pgbench -n -c $CLIENTS -j $THREADS -T $SECS, RUNS=$RUNS, database $DB"

q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
CREATED=1
timeout 300 "$PGRELAY" install --database-url "$PGURL/$DB" --demo >/dev/null

qdb <<'SQL'
INSERT INTO users (id, email) SELECT g, 'u' || g || '@example.com' FROM generate_series(1, 1000) g;
CREATE FUNCTION naive_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('business_events', row_to_json(NEW)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER naive_notify AFTER INSERT ON businesses
    FOR EACH ROW EXECUTE FUNCTION naive_notify();
SQL

OWNER=$(qdb -c "SELECT quote_ident(nspowner::regrole::text) FROM pg_namespace WHERE nspname = 'pgrelay'")
EMIT_SIG="pgrelay.emit(text, text, text, jsonb)"
ORIG_EMIT=$(qdb -c "SELECT pg_get_functiondef('$EMIT_SIG'::regprocedure)")
UNLOCKED_EMIT=$(printf '%s\n' "$ORIG_EMIT" | sed '/LOCK TABLE pgrelay\.commit_order_lock/d')
grep -q 'LOCK TABLE pgrelay.commit_order_lock' <<<"$ORIG_EMIT" ||
    { echo "pgrelay.emit does not take the commit-order lock; nothing to compare" >&2; exit 1; }
if grep -q 'commit_order_lock' <<<"$UNLOCKED_EMIT"; then
    echo "could not strip the lock from pgrelay.emit" >&2; exit 1
fi
echo "# owner $OWNER; capture trigger: $(qdb -c "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'pgrelay_capture' AND tgrelid = 'businesses'::regclass")"

cat > "$SCRIPT" <<'SQL'
\set owner random(1, 1000)
INSERT INTO businesses (owner_id, name) VALUES (:owner, 'pgbench business');
SQL

set_emit() { # locked | unlocked, as the owner role so that it keeps owning emit
    local def=$ORIG_EMIT
    [[ $1 = unlocked ]] && def=$UNLOCKED_EMIT
    printf 'SET ROLE %s;\n%s;\nRESET ROLE;\n' "$OWNER" "$def" | qdb >/dev/null
}
set_variant() {
    local naive capture emit
    case $1 in
        a) naive=DISABLE capture=DISABLE emit=locked ;;
        b) naive=ENABLE  capture=DISABLE emit=locked ;;
        c) naive=DISABLE capture=ENABLE  emit=locked ;;
        d) naive=DISABLE capture=ENABLE  emit=unlocked ;;
    esac
    set_emit $emit
    qdb -c "ALTER TABLE businesses $naive TRIGGER naive_notify" \
        -c "ALTER TABLE businesses $capture TRIGGER pgrelay_capture"
}
variant_state() { # what will run: the triggers' enabled flags, emit's lock and owner
    qdb -F ' ' -c "SELECT string_agg(tgname || '=' || tgenabled::text, ' ' ORDER BY tgname) FROM pg_trigger WHERE tgrelid = 'businesses'::regclass AND NOT tgisinternal" \
                 -c "SELECT CASE WHEN pg_get_functiondef('$EMIT_SIG'::regprocedure) LIKE '%commit_order_lock%' THEN 'emit=locked' ELSE 'emit=unlocked' END || ' owner=' || (SELECT proowner::regrole FROM pg_proc WHERE oid = '$EMIT_SIG'::regprocedure)" | tr '\n' ' '
}

declare -A TPS

for run in $(seq "$RUNS"); do
    for v in a b c d; do
        set_variant $v
        state=$(variant_state)
        qdb -c "CHECKPOINT"
        before=$(qdb -c "SELECT count(*) FROM pgrelay.events")
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        out=$(timeout $((SECS + 120)) pgbench -n -c "$CLIENTS" -j "$THREADS" -T "$SECS" -f "$SCRIPT" "$PGURL/$DB" 2>&1) ||
            { echo "$out" >&2; echo "pgbench failed in run $run variant $v" >&2; exit 1; }
        tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
        txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
        [[ -n $tps ]] || { echo "$out" >&2; echo "no tps in pgbench output" >&2; exit 1; }
        events=$(( $(qdb -c "SELECT count(*) FROM pgrelay.events") - before ))
        printf 'run %d variant %s tps %10.1f  txns %7s events %7s  load %s  [%s]\n' \
            "$run" "$v" "$tps" "$txns" "$events" "$load" "$state"
        TPS[$v]+="$tps "
    done
done
set_emit locked

median() { tr ' ' '\n' <<<"$1" | grep . | sort -g |
    awk '{x[NR] = $1} END {print (NR % 2) ? x[(NR + 1) / 2] : (x[NR / 2] + x[NR / 2 + 1]) / 2}'; }
echo
printf '%-20s %-44s %10s\n' variant "runs (tps, in order)" median
for v in a b c d; do
    case $v in
        a) name="a no trigger" ;;
        b) name="b naive pg_notify" ;;
        c) name="c pgrelay capture" ;;
        d) name="d capture, no lock" ;;
    esac
    runs=$(tr ' ' '\n' <<<"${TPS[$v]}" | grep . | awk '{printf "%s%.1f", (NR > 1 ? " / " : ""), $1}')
    printf '%-20s %-44s %10.1f\n' "$name" "$runs" "$(median "${TPS[$v]}")"
done
ma=$(median "${TPS[a]}"); mb=$(median "${TPS[b]}"); mc=$(median "${TPS[c]}"); md=$(median "${TPS[d]}")
awk -v a="$ma" -v b="$mb" -v c="$mc" -v d="$md" 'BEGIN {
    printf "c/b = %.3f  (ordered capture vs naive NOTIFY)\n", c / b
    printf "c/d = %.3f  (ordered vs unordered capture; target >= 0.9: %s)\n", c / d, (c / d >= 0.9 ? "met" : "missed")
    printf "b/a = %.3f  c/a = %.3f  d/a = %.3f\n", b / a, c / a, d / a
}'
echo "# load after: $(uptime)"
