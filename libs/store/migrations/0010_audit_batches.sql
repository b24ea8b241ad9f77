-- A gateway appends the calls answered while its previous append was under way as one event
-- (`AuditBatchRecorded`): a record is its event's sequence and its place in the event.
ALTER TABLE audit_log ADD COLUMN part integer NOT NULL DEFAULT 0;
ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey, ADD PRIMARY KEY (tenant_id, seq, part);
