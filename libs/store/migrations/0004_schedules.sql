-- Schedules and what their ticks did.
CREATE TABLE schedules (
    tenant_id   text NOT NULL,
    id          uuid NOT NULL,
    spec        jsonb NOT NULL,
    paused      boolean NOT NULL DEFAULT false,
    last_tick   timestamptz,
    last_run_id uuid,
    ticks       bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
