-- Reruns not yet ended, by tenant: git-integration follows them up to the runs they rerun
-- when a pull request is closed, so that a rerun of one of its runs is cancelled too.
CREATE INDEX runs_active_rerun ON runs (tenant_id) WHERE status IN ('queued', 'running') AND trigger->>'kind' = 'rerun';
