-- Secret names only: values live sealed in the event log and are opened only by executors.
CREATE TABLE secrets (
    tenant_id  text NOT NULL,
    name       text NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, name)
);
