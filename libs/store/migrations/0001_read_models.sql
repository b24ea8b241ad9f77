-- Read models projected from the event log by the projector. Nothing here is a source of
-- truth: `taskmesh projector rebuild` truncates these tables and replays the log.
-- Every tenant-owned row carries tenant_id, and every read filters on it.

CREATE TABLE projection_checkpoints (
    projection text PRIMARY KEY,
    last_seq   bigint NOT NULL
);

CREATE TABLE tenants (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE api_keys (
    id         uuid PRIMARY KEY,
    tenant_id  text NOT NULL,
    role       text NOT NULL,
    key_hash   text NOT NULL UNIQUE,
    prefix     text NOT NULL,
    name       text,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE runs (
    tenant_id       text NOT NULL,
    id              uuid NOT NULL,
    workflow_name   text NOT NULL,
    status          text NOT NULL,
    trigger         jsonb NOT NULL,
    inputs          jsonb NOT NULL,
    idempotency_key text,
    created_at      timestamptz NOT NULL,
    started_at      timestamptz,
    finished_at     timestamptz,
    last_seq        bigint NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX runs_tenant_created ON runs (tenant_id, id DESC);
CREATE UNIQUE INDEX runs_idempotency ON runs (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE steps (
    tenant_id   text NOT NULL,
    run_id      uuid NOT NULL,
    step_id     text NOT NULL,
    position    int NOT NULL,
    kind        text NOT NULL,
    needs       text[] NOT NULL,
    status      text NOT NULL,
    attempts    int NOT NULL DEFAULT 0,
    exit_code   int,
    output      text,
    output_truncated boolean NOT NULL DEFAULT false,
    error       text,
    reason      text,
    started_at  timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (tenant_id, run_id, step_id)
);

CREATE TABLE step_attempts (
    tenant_id   text NOT NULL,
    run_id      uuid NOT NULL,
    step_id     text NOT NULL,
    attempt     int NOT NULL,
    executor    text NOT NULL,
    status      text NOT NULL,
    exit_code   int,
    error       text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    PRIMARY KEY (tenant_id, run_id, step_id, attempt)
);

CREATE TABLE repo_connections (
    id         uuid PRIMARY KEY,
    tenant_id  text NOT NULL,
    forge      text NOT NULL,
    repository text NOT NULL,
    secret     text NOT NULL,
    branches   text[] NOT NULL,
    workflow   jsonb NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX repo_connections_tenant ON repo_connections (tenant_id);

CREATE TABLE webhook_endpoints (
    id          uuid PRIMARY KEY,
    tenant_id   text NOT NULL,
    url         text NOT NULL,
    secret      text NOT NULL,
    event_types text[] NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id);
