-- pgrelay schema: the event log and its metadata. Idempotent: run by every
-- `pgrelay install`, inside one transaction, as the owner role (sql/owner.sql
-- created the schema for it), so every object here belongs to that role.

-- Event ids come from this sequence, but only while holding the commit-order
-- lock at commit time (see triggers/capture.sql), so ids are handed out in
-- commit order.
CREATE SEQUENCE IF NOT EXISTS pgrelay.events_id_seq AS bigint;

CREATE TABLE IF NOT EXISTS pgrelay.events (
    id          bigint      PRIMARY KEY,
    channel     text        NOT NULL,
    table_name  text        NOT NULL,
    op          text        NOT NULL,
    payload     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX IF NOT EXISTS events_created_at_idx ON pgrelay.events (created_at);

-- What a user's replay searches by (db::USER_EVENTS_BETWEEN): the events
-- whose payload names a user in a field, found without reading other users'
-- rows. Each capture adds its entries under the commit-order lock, so they
-- go to the index's pending list (fastupdate: one append, not a tree insert
-- per key), kept small (256 kB) so that the capture which flushes it, or
-- autovacuum, does little at a time. Built here while the log is small (under 32 MiB);
-- on a large log (an upgrade) `pgrelay install` builds it CONCURRENTLY after
-- this transaction instead, so the application's writes are never blocked
-- for the length of a build.
DO $index$
BEGIN
    IF to_regclass('pgrelay.events_payload_idx') IS NULL
       AND pg_relation_size('pgrelay.events') < 32 * 1024 * 1024 THEN
        CREATE INDEX events_payload_idx ON pgrelay.events
            USING gin (payload jsonb_path_ops) WITH (fastupdate = on, gin_pending_list_limit = 256);
    END IF;
END
$index$;
ALTER INDEX IF EXISTS pgrelay.events_payload_idx SET (fastupdate = on, gin_pending_list_limit = 256);

-- One row. `epoch` identifies this event log: a cursor from another epoch (a
-- restored or reinstalled database) gets `reset`, never a silent gap.
-- `pruned_through` is the highest id that retention may have deleted: a cursor
-- below it cannot be replayed completely.
CREATE TABLE IF NOT EXISTS pgrelay.meta (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch           text    NOT NULL,
    pruned_through  bigint  NOT NULL DEFAULT 0
);

INSERT INTO pgrelay.meta (epoch)
VALUES (md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text))
ON CONFLICT (singleton) DO NOTHING;

-- The commit-order lock (taken by pgrelay.emit) and the retention lock (taken
-- by pgrelay.prune): empty tables, locked and never read or written. Unlike an
-- advisory lock, which any role can take, these can only be locked by their
-- owner, its members and superusers: LOCK TABLE in EXCLUSIVE mode needs
-- UPDATE, DELETE or TRUNCATE, granted to nobody, and the schema grants no
-- USAGE, so other roles cannot even name them.
CREATE TABLE IF NOT EXISTS pgrelay.commit_order_lock ();
CREATE TABLE IF NOT EXISTS pgrelay.prune_lock ();

-- Retention: deletes one batch of events older than p_older_than and records
-- the highest deleted id in meta.pruned_through. Returns the rows deleted, or
-- -1 when another pgrelay replica is pruning right now (one at a time).
-- Runs with the rights of pgrelay serve's role.
CREATE OR REPLACE FUNCTION pgrelay.prune(p_older_than interval, p_batch integer)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
    v_max   bigint;
BEGIN
    BEGIN
        LOCK TABLE pgrelay.prune_lock IN EXCLUSIVE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN -1;
    END;
    WITH doomed AS (
        SELECT id FROM pgrelay.events
        WHERE created_at < clock_timestamp() - p_older_than
        ORDER BY id
        LIMIT p_batch
    ), deleted AS (
        DELETE FROM pgrelay.events e USING doomed d WHERE e.id = d.id RETURNING e.id
    )
    SELECT count(*), max(id) INTO v_count, v_max FROM deleted;
    IF v_count > 0 THEN
        UPDATE pgrelay.meta SET pruned_through = greatest(pruned_through, v_max);
    END IF;
    RETURN v_count;
END
$$;

-- Read state (the bell): per user and stream, how far the user has read
-- (`read_up_to`), the ids read one by one above it (the newest 100 at most),
-- and up to where they cleared their history. One row per user and stream,
-- written only through pgrelay.mark_read, which adds a row only when a mark
-- moves something.
CREATE TABLE IF NOT EXISTS pgrelay.read_state (
    user_id          text     NOT NULL,
    stream           text     NOT NULL,
    read_up_to       bigint   NOT NULL DEFAULT 0,
    read_ids         bigint[] NOT NULL DEFAULT '{}',
    cleared_through  bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, stream)
);

-- Moves a user's read state on `p_stream` forward (never back): read up to
-- `p_up_to`, the ids `p_ids` one by one, or, with `p_clear`, everything up to
-- the newest event, which history then hides. An id beyond the newest event
-- is refused (22023). The new state goes into the log as an event on channel
-- `pgrelay_read` (routed to the user), so every socket of that user, on any
-- replica, hears it, and a device that was away replays it. A mark that
-- changes nothing writes nothing: no log row, no commit-order lock. So what
-- clients can make the log grow by is bounded by the log itself (each
-- write moves a cursor forward or adds a newer id), not by how often they
-- ask.
CREATE OR REPLACE FUNCTION pgrelay.mark_read(
    p_user text, p_stream text, p_up_to bigint, p_ids bigint[], p_clear boolean)
RETURNS pgrelay.read_state
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_head bigint;
    v_up_to bigint := coalesce(p_up_to, 0);
    v_row pgrelay.read_state;
    v_old pgrelay.read_state;
BEGIN
    SELECT coalesce(max(id), 0) INTO v_head FROM pgrelay.events;
    IF v_up_to > v_head OR EXISTS (SELECT 1 FROM unnest(p_ids) AS i WHERE i > v_head) THEN
        RAISE EXCEPTION 'read beyond the newest event (%)', v_head USING ERRCODE = '22023';
    END IF;
    IF p_clear THEN
        v_up_to := v_head;
    END IF;
    -- What the mark would make of the state, from a plain read: a mark that
    -- changes nothing returns here, having written nothing (no row, no row
    -- lock, no log event).
    SELECT * INTO v_old FROM pgrelay.read_state WHERE user_id = p_user AND stream = p_stream;
    v_row := (p_user, p_stream,
              greatest(coalesce(v_old.read_up_to, 0), v_up_to),
              ARRAY(SELECT DISTINCT i FROM unnest(coalesce(v_old.read_ids, '{}') || coalesce(p_ids, '{}')) AS i
                    WHERE i > greatest(coalesce(v_old.read_up_to, 0), v_up_to)
                    ORDER BY i DESC LIMIT 100),
              CASE WHEN p_clear THEN greatest(coalesce(v_old.cleared_through, 0), v_up_to)
                   ELSE coalesce(v_old.cleared_through, 0) END);
    IF (v_row.read_up_to, v_row.read_ids, v_row.cleared_through)
       = (coalesce(v_old.read_up_to, 0), coalesce(v_old.read_ids, '{}'), coalesce(v_old.cleared_through, 0)) THEN
        RETURN v_row;
    END IF;
    -- A user's rows are bounded: a super admin may open any key of any
    -- stream, and each key's state is a row. A new one only while the user
    -- has fewer than 10,000 (counted through the primary key, 10,000 at
    -- most; two marks at once may pass it by one each).
    IF v_old.user_id IS NULL AND (SELECT count(*) FROM (
            SELECT 1 FROM pgrelay.read_state WHERE user_id = p_user LIMIT 10000) AS mine) >= 10000 THEN
        -- pgrelay's own code (class PR): PostgreSQL's 54000 has other causes.
        RAISE EXCEPTION 'read state kept for too many streams (10000)' USING ERRCODE = 'PR001';
    END IF;
    -- A concurrent mark may have moved the row since: merge, never go back.
    INSERT INTO pgrelay.read_state AS r VALUES (v_row.*)
    ON CONFLICT (user_id, stream) DO UPDATE SET
        read_up_to = greatest(r.read_up_to, excluded.read_up_to),
        cleared_through = greatest(r.cleared_through, excluded.cleared_through),
        read_ids = ARRAY(
            SELECT DISTINCT i FROM unnest(r.read_ids || excluded.read_ids) AS i
            WHERE i > greatest(r.read_up_to, excluded.read_up_to)
            ORDER BY i DESC LIMIT 100)
    RETURNING * INTO v_row;
    PERFORM pgrelay.emit('pgrelay_read', 'read_state', 'UPDATE', jsonb_build_object(
        'user_id', p_user, 'stream', p_stream, 'up_to', v_row.read_up_to,
        'ids', to_jsonb(v_row.read_ids), 'cleared_through', v_row.cleared_through));
    RETURN v_row;
END
$$;

REVOKE ALL ON FUNCTION pgrelay.mark_read(text, text, bigint, bigint[], boolean) FROM PUBLIC;
