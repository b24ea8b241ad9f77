-- Stored workflows: every version, immutable.
CREATE TABLE workflows (
    tenant_id  text NOT NULL,
    name       text NOT NULL,
    version    int NOT NULL,
    definition jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, name, version)
);
ALTER TABLE runs ADD COLUMN workflow_version int;
