-- A forge-started run's commit, for a commit status sent again: the gateway looks for a newer
-- run of the same workflow on the same commit (its status would be replaced).
CREATE INDEX runs_webhook_commit ON runs (tenant_id, (trigger->>'commit')) WHERE trigger->>'kind' = 'webhook';
