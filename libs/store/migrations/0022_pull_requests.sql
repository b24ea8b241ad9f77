-- Whether a repository connection's pull (merge) requests start runs.
ALTER TABLE repo_connections ADD COLUMN pull_requests boolean NOT NULL DEFAULT false;
