-- Ownership: run by `pgrelay install` as the installing role, before the
-- schema files, with `pgrelay.owner` set (transaction-local) to the owner
-- role, which install has already created or checked (NOLOGIN, not a
-- superuser, no BYPASSRLS).
--
-- The schema and everything in it belong to that role, never to a
-- superuser: the capture functions are SECURITY DEFINER, so whoever owns
-- them is whose rights a row change runs with. The schema grants nothing to
-- PUBLIC, so no other role can even name the lock tables.

DO $owner$
DECLARE
    v_owner text := current_setting('pgrelay.owner');
    v_object record;
BEGIN
    IF to_regnamespace('pgrelay') IS NULL THEN
        EXECUTE format('CREATE SCHEMA pgrelay AUTHORIZATION %I', v_owner);
        RETURN;
    END IF;

    -- An earlier install: capture code of the first release was owned by the
    -- installer and attached by hand-written functions. Its triggers are
    -- dropped with it; `install --watch` (or --demo) attaches the new ones.
    DROP FUNCTION IF EXISTS pgrelay.capture_reservation() CASCADE;
    DROP FUNCTION IF EXISTS pgrelay.capture() CASCADE;
    DROP FUNCTION IF EXISTS pgrelay.watch(regclass, text, text);
    DROP FUNCTION IF EXISTS pgrelay.emit(text, text, text, jsonb);

    -- Hand the schema and whatever it holds to the owner (a no-op when it
    -- already owns them).
    EXECUTE format('ALTER SCHEMA pgrelay OWNER TO %I', v_owner);
    FOR v_object IN
        SELECT format('ALTER %s %s OWNER TO %I',
                      CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
                      c.oid::regclass, v_owner) AS ddl
        FROM pg_class c
        WHERE c.relnamespace = 'pgrelay'::regnamespace AND c.relkind IN ('r', 'p', 'S')
          AND c.relowner <> quote_ident(v_owner)::regrole
        UNION ALL
        SELECT format('ALTER FUNCTION %s OWNER TO %I', p.oid::regprocedure, v_owner)
        FROM pg_proc p
        WHERE p.pronamespace = 'pgrelay'::regnamespace AND p.proowner <> quote_ident(v_owner)::regrole
    LOOP
        EXECUTE v_object.ddl;
    END LOOP;
END
$owner$;

REVOKE ALL ON SCHEMA pgrelay FROM PUBLIC;
