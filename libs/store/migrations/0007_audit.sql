-- Access: when each key was last used, and the tenant's audit log.
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;

CREATE TABLE audit_log (
    tenant_id   text        NOT NULL,
    seq         bigint      NOT NULL,
    id          uuid        NOT NULL,
    key_id      uuid,
    actor       text        NOT NULL,
    method      text        NOT NULL,
    path        text        NOT NULL,
    route       text,
    status      integer     NOT NULL,
    ip          text,
    user_agent  text,
    at          timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);

-- The active-runs quota counts a tenant's runs not yet ended; a partial index keeps that cheap.
CREATE INDEX runs_active ON runs (tenant_id) WHERE status IN ('queued', 'running');
-- Run listings filter by status and trigger kind.
CREATE INDEX runs_tenant_status ON runs (tenant_id, status, id DESC);

-- A run's labels, for GET /v1/runs?label=key=value.
ALTER TABLE runs ADD COLUMN labels jsonb NOT NULL DEFAULT '{}';
CREATE INDEX runs_labels ON runs USING gin (labels jsonb_path_ops);
