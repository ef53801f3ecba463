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
