-- A pull request's runs not yet ended, for git-integration to cancel when the request is
-- closed: by tenant, connection and request number, for active runs of pull requests only.
CREATE INDEX runs_active_pull_request ON runs (tenant_id, (trigger->>'connection_id'), (trigger->>'pull_request'))
    WHERE status IN ('queued', 'running') AND trigger ? 'pull_request';
