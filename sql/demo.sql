-- Demo domain: the reservation platform of the README walk-through.
-- Installed by `pgrelay install --demo`; idempotent.

CREATE TABLE IF NOT EXISTS public.users (
    id     bigserial PRIMARY KEY,
    email  text NOT NULL UNIQUE,
    role   text NOT NULL DEFAULT 'customer'
);

CREATE TABLE IF NOT EXISTS public.businesses (
    id          bigserial   PRIMARY KEY,
    owner_id    bigint      NOT NULL REFERENCES public.users (id),
    name        text        NOT NULL,
    description text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.reservations (
    id           bigserial   PRIMARY KEY,
    business_id  bigint      NOT NULL REFERENCES public.businesses (id),
    customer_id  bigint      NOT NULL REFERENCES public.users (id),
    starts_at    timestamptz NOT NULL,
    party_size   integer     NOT NULL CHECK (party_size > 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);
