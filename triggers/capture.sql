-- Capture: turns a row change into a pgrelay.events row and a NOTIFY.
--
-- Commit order. Capture triggers are CONSTRAINT TRIGGERs, DEFERRABLE INITIALLY
-- DEFERRED, so they run while the transaction commits. pgrelay.emit takes a
-- transaction-level advisory lock before it takes the id, and the lock is held
-- until the commit is visible. So a transaction that takes id N is visible
-- before any transaction can take an id above N: a reader that has seen N has
-- seen, or will see, nothing below N appear later. NOTIFY already serialises
-- notifying commits on one lock, so the extra serialisation is only the work
-- done here under the lock, which is kept minimal.
--
-- Payload rule. The NOTIFY payload is the event envelope when it is shorter
-- than PostgreSQL's 8000-byte limit, and only {"id":N,"channel":...} when it is
-- not: pgrelay then reads the row from pgrelay.events. A large row never makes
-- the application's statement fail.
--
-- The functions are SECURITY DEFINER (owned by the installing role) so that
-- application roles need no privileges on the pgrelay schema.

-- The `at` of an event frame: UTC, microseconds, RFC 3339. Shared by the
-- NOTIFY envelope and pgrelay's replay queries so both render time alike.
-- STABLE like to_char itself, so that the planner inlines it.
CREATE OR REPLACE FUNCTION pgrelay.format_at(p_at timestamptz)
RETURNS text
LANGUAGE sql
STABLE
PARALLEL SAFE
AS $$ SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') $$;

CREATE OR REPLACE FUNCTION pgrelay.emit(p_channel text, p_table text, p_op text, p_payload jsonb)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_id       bigint;
    v_at       timestamptz;
    -- Everything but the id and the time is built before the lock: only
    -- what must be in commit order is done under it.
    v_rest     text := json_build_object(
        'channel', p_channel,
        'table', p_table,
        'op', p_op,
        'data', p_payload)::text;
    v_envelope text;
BEGIN
    -- 0x7067_7265 is "pgre": pgrelay's advisory lock class, object 1 = id order.
    PERFORM pg_advisory_xact_lock(1885827685, 1);
    v_id := nextval('pgrelay.events_id_seq');
    -- Taken under the lock, so created_at grows with the id (retention
    -- prunes by time, in id order).
    v_at := clock_timestamp();
    INSERT INTO pgrelay.events (id, channel, table_name, op, payload, created_at)
    VALUES (v_id, p_channel, p_table, p_op, p_payload, v_at);
    v_envelope := '{"id" : ' || v_id || ', "at" : "' || pgrelay.format_at(v_at) || '", '
        || substr(v_rest, 2);
    IF octet_length(v_envelope) >= 8000 THEN
        v_envelope := json_build_object('id', v_id, 'channel', p_channel)::text;
    END IF;
    PERFORM pg_notify(p_channel, v_envelope);
END
$$;

-- emit runs inside the SECURITY DEFINER capture functions, with their
-- search_path; nobody else needs to call it. (No SET clause of its own: it
-- would cost a configuration save and restore on every row.)
REVOKE ALL ON FUNCTION pgrelay.emit(text, text, text, jsonb) FROM PUBLIC;

-- Generic capture for any table: the row (NEW, or OLD for DELETE) as the
-- payload, on the channel given as the trigger's first argument.
CREATE OR REPLACE FUNCTION pgrelay.capture()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgrelay.emit(
        TG_ARGV[0],
        TG_TABLE_NAME,
        TG_OP,
        to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END));
    RETURN NULL;
END
$$;

-- Attaches pgrelay.capture to a table, replacing an earlier attachment.
-- Used by `pgrelay install --watch TABLE=CHANNEL`.
CREATE OR REPLACE FUNCTION pgrelay.watch(p_table regclass, p_channel text, p_ops text DEFAULT 'INSERT OR UPDATE OR DELETE')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_ops !~ '^(INSERT|UPDATE|DELETE)( OR (INSERT|UPDATE|DELETE))*$' THEN
        RAISE EXCEPTION 'invalid trigger events: %', p_ops;
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS pgrelay_capture ON %s', p_table);
    EXECUTE format(
        'CREATE CONSTRAINT TRIGGER pgrelay_capture AFTER %s ON %s '
        'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pgrelay.capture(%L)',
        p_ops, p_table, p_channel);
END
$$;

-- Triggers run their function without an EXECUTE check; nobody needs to call
-- these directly, and a role able to would attach them to its own table.
REVOKE ALL ON FUNCTION pgrelay.capture() FROM PUBLIC;
