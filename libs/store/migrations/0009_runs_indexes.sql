-- `runs_active` (tenant_id, partial on queued or running) let a generic plan of the projector's
-- `UPDATE runs … WHERE tenant_id = $1 AND id = $2 AND status = 'queued'` scan every active run of
-- the tenant to find one: the predicate's `status = 'queued'` implies the partial index's, and on
-- a young table its estimate tied with the primary key's. Each run start then cost O(active
-- runs). `runs_tenant_status` (tenant_id, status, id DESC) serves the quota count as well (an
-- index-only range scan per status) and is a point lookup for that update.
DROP INDEX IF EXISTS runs_active;
-- The primary key (tenant_id, id) already serves `ORDER BY id DESC` within a tenant, scanned
-- backwards; a second copy only costs a write on every insert.
DROP INDEX IF EXISTS runs_tenant_created;
