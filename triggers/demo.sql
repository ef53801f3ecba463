-- Demo capture, the seed's rules, with nothing but pgrelay.watch (the same
-- as `pgrelay install --watch ...` flags; see the README): businesses INSERT
-- and UPDATE on business_events; reservations INSERT on reservation_events,
-- the payload enriched with the business's owner_id as business_owner_id so
-- the router can notify them (audience user:business_owner_id).

SELECT pgrelay.watch('public.businesses', 'business_events', ARRAY['INSERT', 'UPDATE']);

SELECT pgrelay.watch('public.reservations', 'reservation_events', ARRAY['INSERT'],
    p_enrich_fields => ARRAY['business_owner_id'],
    p_enrich_via => ARRAY['business_id'],
    p_enrich_columns => ARRAY['owner_id']);
