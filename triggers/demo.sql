-- Demo capture: businesses INSERT and UPDATE on business_events; reservations
-- INSERT on reservation_events, the payload enriched with the business owner so
-- the router can notify them (audience user:business_owner_id).

SELECT pgrelay.watch('public.businesses', 'business_events', 'INSERT OR UPDATE');

CREATE OR REPLACE FUNCTION pgrelay.capture_reservation()
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
        to_jsonb(NEW) || jsonb_build_object(
            'business_owner_id',
            (SELECT b.owner_id FROM public.businesses b WHERE b.id = NEW.business_id)));
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION pgrelay.capture_reservation() FROM PUBLIC;

DROP TRIGGER IF EXISTS pgrelay_capture ON public.reservations;
CREATE CONSTRAINT TRIGGER pgrelay_capture AFTER INSERT ON public.reservations
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION pgrelay.capture_reservation('reservation_events');
